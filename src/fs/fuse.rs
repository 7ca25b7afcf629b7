//! The thin fuser adapter: each kernel request becomes a call on
//! [`MountCore`], answered from a tokio task so a slow fetch never holds up
//! other requests.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, Request,
};
use tokio::runtime::Handle;

use super::core::{CacheMode, FsResult, MountCore, errno};
use crate::protocol::{EntryKind, FileMeta};

pub struct FerryFs {
    core: Arc<MountCore>,
    runtime: Handle,
    ids: Ids,
    mountpoint: std::path::PathBuf,
    /// Set by the first request after `INIT`.
    initialized: std::sync::OnceLock<()>,
}

/// Who owns every file, and the time given to directories without one.
#[derive(Clone, Copy)]
struct Ids {
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
    read_only: bool,
}

impl FerryFs {
    /// `mountpoint` as an absolute path without symlinks.
    pub fn new(core: Arc<MountCore>, runtime: Handle, mountpoint: std::path::PathBuf) -> Self {
        let (uid, gid) = owner_ids();
        let read_only = core.options.read_only;
        Self {
            core,
            runtime,
            ids: Ids {
                uid,
                gid,
                mounted_at: SystemTime::now(),
                read_only,
            },
            mountpoint,
            initialized: std::sync::OnceLock::new(),
        }
    }

    /// Runs `work` on the runtime and hands its result to `answer`.
    fn spawn<T: Send + 'static>(
        &self,
        work: impl Future<Output = FsResult<T>> + Send + 'static,
        answer: impl FnOnce(FsResult<T>) + Send + 'static,
    ) {
        self.note_request();
        self.runtime.spawn(async move { answer(work.await) });
    }

    fn note_request(&self) {
        // A request after INIT means the kernel has applied INIT's answer,
        // which would have undone a raised readahead.
        if self.initialized.set(()).is_ok() {
            super::kernel_readahead::raise(&self.mountpoint);
        }
    }
}

fn owner_ids() -> (u32, u32) {
    // The mounting user owns every file (the server has no owners).
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((0, 0))
}

fn attr(ino: u64, meta: &FileMeta, ids: Ids) -> FileAttr {
    let Ids {
        uid,
        gid,
        mounted_at,
        read_only,
    } = ids;
    let mtime = meta.mtime.map(SystemTime::from).unwrap_or(mounted_at);
    let (kind, perm, nlink) = match meta.kind {
        EntryKind::Dir => (FileType::Directory, 0o755, 2),
        EntryKind::File => (FileType::RegularFile, 0o644, 1),
    };
    let perm = if read_only { perm & 0o555 } else { perm };
    FileAttr {
        ino: INodeNo(ino),
        size: meta.size,
        blocks: meta.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm,
        nlink,
        uid,
        gid,
        rdev: 0,
        flags: 0,
        blksize: 1 << 20,
    }
}

/// Attributes the kernel must ask for again at their next use live for no
/// time (see `MountCore::attr_volatile`).
fn ttl_of(ttl: std::time::Duration, volatile: bool) -> std::time::Duration {
    if volatile {
        std::time::Duration::ZERO
    } else {
        ttl
    }
}

fn name(name: &OsStr) -> FsResult<String> {
    name.to_str().map(str::to_owned).ok_or(errno::EINVAL)
}

fn err(code: i32) -> Errno {
    Errno::from_i32(code)
}

/// Kernel readahead asked for: large sequential reads mean fewer requests.
const KERNEL_READAHEAD: u32 = 1 << 20;

/// The largest write asked of the kernel: large sequential writes mean
/// fewer requests.
pub const MAX_WRITE: u32 = 1 << 20;

impl Filesystem for FerryFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_readahead(KERNEL_READAHEAD) {
            let _ = config.set_max_readahead(nearest);
        }
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name_os: &OsStr, reply: ReplyEntry) {
        let (core, ids) = (self.core.clone(), self.ids);
        let ttl = core.options.attr_ttl;
        let name = name(name_os);
        self.spawn(
            async move {
                let (ino, meta) = core.lookup(parent.0, &name?).await?;
                let volatile = core.attr_volatile(ino, &meta);
                Ok((ino, meta, volatile))
            },
            move |r| match r {
                Ok((ino, meta, volatile)) => reply.entry(
                    &ttl_of(ttl, volatile),
                    &attr(ino, &meta, ids),
                    Generation(0),
                ),
                Err(e) => reply.error(err(e)),
            },
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let (core, ids) = (self.core.clone(), self.ids);
        let ttl = core.options.attr_ttl;
        self.spawn(
            async move { core.getattr_for(ino.0, fh.map(|fh| fh.0)).await },
            move |r| match r {
                Ok((meta, volatile)) => {
                    reply.attr(&ttl_of(ttl, volatile), &attr(ino.0, &meta, ids))
                }
                Err(e) => reply.error(err(e)),
            },
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let core = self.core.clone();
        self.spawn(async move { core.readdir(ino.0).await }, move |r| match r {
            Ok(entries) => {
                let dots = [
                    (ino.0, ".".to_owned(), EntryKind::Dir),
                    (ino.0, "..".to_owned(), EntryKind::Dir),
                ];
                for (i, (child, name, kind)) in dots
                    .into_iter()
                    .chain(entries)
                    .enumerate()
                    .skip(offset as usize)
                {
                    let kind = match kind {
                        EntryKind::Dir => FileType::Directory,
                        EntryKind::File => FileType::RegularFile,
                    };
                    if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(err(e)),
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let core = self.core.clone();
        let write = flags.0 & (libc_flags::O_WRONLY | libc_flags::O_RDWR) != 0;
        let truncate = flags.0 & libc_flags::O_TRUNC != 0;
        let direct = write_only_direct(flags.0);
        self.spawn(
            async move { core.open(ino.0, write, truncate).await },
            move |r| match r {
                Ok((fh, mode)) => {
                    let flags = direct
                        | match mode {
                            CacheMode::Keep => FopenFlags::FOPEN_KEEP_CACHE,
                            CacheMode::Drop => FopenFlags::empty(),
                            CacheMode::Direct => FopenFlags::FOPEN_DIRECT_IO,
                        };
                    reply.opened(FileHandle(fh), flags);
                }
                Err(e) => reply.error(err(e)),
            },
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let core = self.core.clone();
        self.spawn(
            async move { core.read(fh.0, offset, size).await },
            move |r| match r {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(err(e)),
            },
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let core = self.core.clone();
        self.spawn(async move { core.release(fh.0).await }, move |r| {
            empty(reply, r)
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        // The kernel serializes the writes to a file, so the end is where
        // this one goes.
        let offset = match appends_around_page_cache(flags.0) {
            true => self.core.append_offset(fh.0, offset),
            false => offset,
        };
        // Inside the runtime: a write may start a background sync.
        let now = {
            let _runtime = self.runtime.enter();
            self.core.write_now(fh.0, offset, data)
        };
        if let Some(r) = now {
            self.note_request();
            return match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(err(e)),
            };
        }
        let core = self.core.clone();
        let data = bytes::Bytes::copy_from_slice(data);
        self.spawn(
            async move { core.write(fh.0, offset, data).await },
            move |r| match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(err(e)),
            },
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // What close(2) returns: the file's last close journals its upload.
        let core = self.core.clone();
        self.spawn(async move { core.flush(fh.0).await }, move |r| {
            empty(reply, r)
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let core = self.core.clone();
        self.spawn(async move { core.fsync(fh.0).await }, move |r| {
            empty(reply, r)
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (core, ids) = (self.core.clone(), self.ids);
        let ttl = core.options.attr_ttl;
        // Modes, owners and times are not stored remotely: accepted, unchanged.
        self.spawn(
            async move {
                let fh = fh.map(|fh| fh.0);
                match size {
                    Some(size) => core.set_size(ino.0, fh, size).await.map(|m| (m, false)),
                    None => core.getattr_for(ino.0, fh).await,
                }
            },
            move |r| match r {
                Ok((meta, volatile)) => {
                    reply.attr(&ttl_of(ttl, volatile), &attr(ino.0, &meta, ids))
                }
                Err(e) => reply.error(err(e)),
            },
        );
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name_os: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let (core, ids) = (self.core.clone(), self.ids);
        let ttl = core.options.attr_ttl;
        let name = name(name_os);
        self.spawn(
            async move { core.mkdir(parent.0, &name?).await },
            move |r| match r {
                Ok((ino, meta)) => reply.entry(&ttl, &attr(ino, &meta, ids), Generation(0)),
                Err(e) => reply.error(err(e)),
            },
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name_os: &OsStr, reply: ReplyEmpty) {
        let core = self.core.clone();
        let name = name(name_os);
        self.spawn(
            async move { core.rmdir(parent.0, &name?).await },
            move |r| empty(reply, r),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name_os: &OsStr, reply: ReplyEmpty) {
        let core = self.core.clone();
        let name = name(name_os);
        self.spawn(
            async move { core.unlink(parent.0, &name?).await },
            move |r| empty(reply, r),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name_os: &OsStr,
        newparent: INodeNo,
        newname_os: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(err(errno::EINVAL));
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let core = self.core.clone();
        let (name, newname) = (name(name_os), name(newname_os));
        self.spawn(
            async move {
                core.rename(parent.0, &name?, newparent.0, &newname?, no_replace)
                    .await
            },
            move |r| empty(reply, r),
        );
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name_os: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        let direct = write_only_direct(flags);
        let (core, ids) = (self.core.clone(), self.ids);
        let ttl = core.options.attr_ttl;
        let name = name(name_os);
        self.spawn(
            async move { core.create(parent.0, &name?).await },
            move |r| match r {
                Ok((ino, meta, fh)) => reply.created(
                    &ttl,
                    &attr(ino, &meta, ids),
                    Generation(0),
                    FileHandle(fh),
                    direct,
                ),
                Err(e) => reply.error(err(e)),
            },
        );
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Regular files come through `create`; devices and FIFOs have no place
        // on the server.
        reply.error(err(self.core.write_refusal().unwrap_or(errno::ENOTSUP)));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // The server has no hard links.
        reply.error(err(errno::EPERM));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        // The server has no symbolic links: what symlink(2) answers on a
        // filesystem without them.
        reply.error(err(self.core.write_refusal().unwrap_or(errno::EPERM)));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: fuser::ReplyEmpty,
    ) {
        // The server keeps no extended attributes.
        reply.error(err(errno::ENOTSUP));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: fuser::ReplyEmpty) {
        reply.error(Errno::NO_XATTR);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // The server keeps no extended attributes.
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The remote store has no fixed capacity; report a large free space so
        // tools that check before writing go ahead.
        let blocks = 1u64 << 40 >> 12;
        reply.statfs(blocks, blocks, blocks, 1 << 30, 1 << 30, 4096, 255, 4096);
    }
}

fn empty(reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(e)),
    }
}

/// A descriptor opened only to write (dd, cp, tar, a shell's `>`) bypasses
/// the kernel's page cache: the kernel hands the writer's own pages to this
/// process instead of first copying them into cache pages of the mounted
/// file, which nothing could read through that descriptor anyway.
fn write_only_direct(open_flags: i32) -> FopenFlags {
    if open_flags & libc_flags::O_ACCMODE == libc_flags::O_WRONLY {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

/// An `O_APPEND` write through a descriptor opened only to write: the
/// kernel keeps no page of what it writes (see [`write_only_direct`]), so
/// the mount may put it at the end of the file wherever the kernel placed it.
fn appends_around_page_cache(open_flags: i32) -> bool {
    open_flags & libc_flags::O_APPEND != 0 && !write_only_direct(open_flags).is_empty()
}

/// `open(2)` flag bits (Linux).
mod libc_flags {
    pub const O_ACCMODE: i32 = 0o3;
    pub const O_WRONLY: i32 = 0o1;
    pub const O_RDWR: i32 = 0o2;
    pub const O_TRUNC: i32 = 0o1000;
    pub const O_APPEND: i32 = 0o2000;
}
