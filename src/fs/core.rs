//! The filesystem logic behind the FUSE adapter, as ordinary async methods
//! (testable without a mount). Inputs and outputs are inode numbers, names
//! and metadata; errors carry the errno the kernel should see.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::Semaphore;

mod writes;

use self::writes::staged_meta_of;
use super::block_cache::{BLOCK_SIZE, BlockCache, BlockKey, FetchError};
use super::disk_cache::DiskCache;
use super::inodes::{Inodes, ROOT_INO};
use super::pending::UploadQueue;
use super::read_deadline::ReadDeadline;
use super::readahead::Readahead;
use super::staging::{RemoteBlocks, Staged};
use crate::client::Client;
use crate::error::Error;
use crate::protocol::{EntryKind, ErrorCode, FileMeta, MoveRequest, RemotePath, WriteLimits};
use std::sync::OnceLock;

/// Linux errno values the mount returns.
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EBADF: i32 = 9;
    pub const EEXIST: i32 = 17;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOTSUP: i32 = 95;
    pub const ESTALE: i32 = 116;
    pub const EDQUOT: i32 = 122;

    /// The errno of a local I/O error; a quota met on the cache directory's
    /// disk is a full disk to the writer.
    pub fn of_io(e: &std::io::Error) -> i32 {
        match e.raw_os_error() {
            Some(EDQUOT) => ENOSPC,
            Some(code) => code,
            None => EIO,
        }
    }
}

/// Block fetches in flight at once, prefetch included.
const FETCHES_IN_FLIGHT: usize = 8;

/// Between a fetch a read waited for failing and the read's next one.
const REFETCH_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub cache_bytes: usize,
    /// A directory for a second, on-disk block cache, and its budget in bytes.
    pub disk_cache: Option<(std::path::PathBuf, u64)>,
    /// Where files being written are staged and pending uploads journaled;
    /// without it file contents cannot be written.
    pub state_dir: Option<std::path::PathBuf>,
    /// Bound on staged bytes (files open for writing and pending uploads);
    /// `None` leaves the free space of the state directory's disk as the bound.
    pub max_staging: Option<u64>,
    pub read_only: bool,
    /// How long attributes and names are trusted without asking the server.
    pub attr_ttl: Duration,
    /// Send the chunks of a file being written before it is closed (see
    /// `fs::write_behind`).
    pub write_behind: bool,
    /// Bytes per second: while the server acknowledges write-behind's
    /// chunks this fast, a close waits for them rather than syncing the
    /// file locally as well (see `fs::write_behind`); 0: never.
    pub server_pace: u64,
    /// What the server writes (from `whoami`): a name it would refuse is
    /// refused at once rather than its upload after the close.
    pub limits: Option<WriteLimits>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 256 << 20,
            disk_cache: None,
            state_dir: None,
            max_staging: None,
            read_only: false,
            attr_ttl: Duration::from_secs(1),
            write_behind: true,
            server_pace: crate::fs::write_behind::DEFAULT_SERVER_PACE,
            limits: None,
        }
    }
}

pub type FsResult<T> = std::result::Result<T, i32>;

/// How the kernel should read through a new handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the page cache, keeping the pages it holds (same version).
    Keep,
    /// Through the page cache, dropping what it holds first.
    Drop,
    /// Around the page cache (`FOPEN_DIRECT_IO`).
    Direct,
}

/// The kernel keeps one page cache per inode, shared by every handle that
/// reads through it, and fills it with whatever the mount answers the
/// handle whose read missed. Handles pinned to different versions must
/// therefore never share it: it holds pages of `version` only, filled by
/// the `handles` open on that version. A handle on another version opened
/// while they are open reads around it (`FOPEN_DIRECT_IO`); once they are
/// all closed, the next open takes the page cache over for its version,
/// and the kernel drops the old pages as that open completes.
struct PageCache {
    /// `None`: pages of no known version (writes this mount dropped).
    version: Option<String>,
    handles: usize,
    /// The kernel has dropped the pages of earlier versions: a handle that
    /// took the page cache over for `version` has read since its open. Until
    /// then an open of `version` drops the pages itself rather than keep
    /// them (it may complete before the open that took the cache over).
    settled: bool,
}

fn errno_of(e: &Error) -> i32 {
    e.errno()
}

/// An open file: pinned to the version seen at open, until this mount
/// writes that version (see [`MountCore::follow_writes`]).
struct Handle {
    ino: u64,
    meta: FileMeta,
    /// Reads a version through the kernel's page cache (counted in
    /// [`MountCore::page_caches`]); otherwise the kernel was told
    /// `FOPEN_DIRECT_IO` or the handle reads what this mount writes.
    page_cache: AtomicBool,
    /// Opened dropping the page cache of a version not yet settled: its
    /// first read settles it (see [`PageCache::settled`]).
    settles: AtomicBool,
    readahead: Mutex<Readahead>,
    /// Set when the file is being written (through this or another handle),
    /// at the open or once this mount starts writing the handle's version.
    /// A reading handle moves on to the next staged file of the same
    /// content (see [`MountCore::follow_writes`]).
    staged: Mutex<Option<Arc<Staged>>>,
    /// Opened for writing (`O_WRONLY`, `O_RDWR`): counted among the staged
    /// file's writers, whose last close starts its upload.
    writes: bool,
}

impl Handle {
    fn staged(&self) -> Option<Arc<Staged>> {
        self.staged.lock().unwrap().clone()
    }

    /// Whether `staged` starts from the version this handle reads (or
    /// committed it since), so that the handle reads on in what it writes.
    fn reads_version_of(&self, staged: &Staged) -> bool {
        let version = version_of(&self.meta);
        staged.base.as_ref().map(version_of) == Some(version.clone())
            || staged.server_etag() == Some(version)
    }
}

pub struct MountCore {
    client: Client,
    pub inodes: Inodes,
    cache: Arc<BlockCache>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    /// Which version of each inode the kernel's page cache may hold, and how
    /// many handles fill it (see [`PageCache`]).
    page_caches: Mutex<HashMap<u64, PageCache>>,
    fetches: Arc<Semaphore>,
    /// File bytes received from the server by reads.
    fetched_bytes: Arc<AtomicU64>,
    disk: Option<Arc<DiskCache>>,
    uploads: OnceLock<Arc<UploadQueue>>,
    /// Files being written, or closed and not yet committed, by path.
    staged: Mutex<HashMap<RemotePath, Arc<Staged>>>,
    pub options: MountOptions,
}

impl MountCore {
    pub fn new(client: Client, options: MountOptions) -> std::io::Result<Self> {
        let disk = match &options.disk_cache {
            Some((dir, bytes)) => Some(DiskCache::open(dir, *bytes)?),
            None => None,
        };
        Ok(Self {
            disk,
            uploads: OnceLock::new(),
            staged: Mutex::default(),
            client,
            inodes: Inodes::new(options.attr_ttl),
            cache: Arc::new(BlockCache::new(options.cache_bytes, BLOCK_SIZE as usize)),
            handles: Mutex::default(),
            next_handle: AtomicU64::new(1),
            page_caches: Mutex::default(),
            fetches: Arc::new(Semaphore::new(FETCHES_IN_FLIGHT)),
            fetched_bytes: Arc::default(),
            options,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn path(&self, ino: u64) -> FsResult<RemotePath> {
        self.inodes.path(ino).ok_or(errno::ENOENT)
    }

    fn child(&self, parent: u64, name: &str) -> FsResult<RemotePath> {
        if name.len() > crate::protocol::path::MAX_SEGMENT_BYTES {
            return Err(errno::ENAMETOOLONG);
        }
        // Names the server can never hold (reserved, `..`) simply do not exist.
        self.path(parent)?.join(name).map_err(|_| errno::ENOENT)
    }

    /// [`child`](Self::child) for a name being made (a file, a directory, a
    /// rename's target): one the server would not write is ENAMETOOLONG
    /// now, as a local filesystem answers, not a refused upload later.
    fn new_child(&self, parent: u64, name: &str) -> FsResult<RemotePath> {
        let path = self.child(parent, name)?;
        match self.options.limits {
            Some(limits) if !limits.name_fits(name) => Err(errno::ENAMETOOLONG),
            _ => Ok(path),
        }
    }

    async fn stat(&self, path: &RemotePath) -> FsResult<(u64, FileMeta)> {
        if let Some(meta) = self.staged_meta(path) {
            return Ok((self.inodes.ino(path), meta));
        }
        if let Some(ino) = self.inodes.known(path)
            && let Some(meta) = self.inodes.fresh_meta(ino)
        {
            return Ok((ino, meta));
        }
        let version = self.inodes.version();
        match self.client.stat(path).await {
            Ok(meta) => Ok((self.inodes.remember_unless_changed(&meta, version), meta)),
            Err(e) => {
                if e.code() == ErrorCode::NotFound {
                    self.inodes.invalidate(path);
                    if self.writes_beneath(path) {
                        // Gone on the server (its last file removed), but
                        // it holds what this mount writes there.
                        return Ok((self.inodes.ino(path), unlisted_dir(path)));
                    }
                }
                Err(errno_of(&e))
            }
        }
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> FsResult<(u64, FileMeta)> {
        let path = self.child(parent, name)?;
        self.stat(&path).await
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<FileMeta> {
        let path = self.path(ino)?;
        self.stat(&path).await.map(|(_, meta)| meta)
    }

    /// The attributes the kernel asks for, and whether it must ask again at
    /// its next use of them (see [`MountCore::attr_volatile`]). Asked with a
    /// handle of a file opened for reading, the handle's version answers:
    /// the kernel asks so when the handle reads past the size it knows (or
    /// seeks from the end), and a handle reads its version to its end. A
    /// file removed on the server while open answers from an open handle,
    /// as a local filesystem answers `fstat` of an unlinked file. While
    /// this mount writes the file, its staged size answers whichever handle
    /// asks: the kernel places `O_APPEND` writes at the size it knows.
    pub async fn getattr_for(&self, ino: u64, fh: Option<u64>) -> FsResult<(FileMeta, bool)> {
        if let Some(handle) = fh.and_then(|fh| self.handle(fh).ok())
            && handle.staged().is_none()
            && handle.ino == ino
            && self.staged_size(ino).is_none()
        {
            let current = self
                .inodes
                .fresh_meta(ino)
                .is_some_and(|meta| meta.etag == handle.meta.etag);
            return Ok((handle.meta.clone(), !current));
        }
        match self.getattr(ino).await {
            Ok(meta) => {
                let volatile = self.attr_volatile(ino, &meta);
                Ok((meta, volatile))
            }
            Err(errno::ENOENT) => self
                .open_meta(ino)
                .map(|meta| (meta, true))
                .ok_or(errno::ENOENT),
            Err(e) => Err(e),
        }
    }

    /// Whether the kernel must not keep `meta` as the attributes of `ino`:
    /// handles of another version read through the page cache, and the
    /// kernel cuts their reads at the size it knows. Asked again at each
    /// read past that size, with the handle, the mount answers the handle's
    /// version, so that it reads its own bytes (or ESTALE), never a false end.
    pub fn attr_volatile(&self, ino: u64, meta: &FileMeta) -> bool {
        self.page_caches
            .lock()
            .unwrap()
            .get(&ino)
            .is_some_and(|cache| {
                cache.handles > 0 && cache.version.as_deref() != Some(&version_of(meta))
            })
    }

    /// `ino` as its open handles have it, once its name is gone: the file
    /// this mount writes there (removed or renamed over while open), else
    /// the version a handle reads.
    fn open_meta(&self, ino: u64) -> Option<FileMeta> {
        let (staged, read) = {
            let handles = self.handles.lock().unwrap();
            let open = || handles.values().filter(|h| h.ino == ino);
            (
                open().find_map(|h| h.staged()),
                open()
                    .filter(|h| h.staged().is_none())
                    .max_by_key(|h| h.page_cache.load(Ordering::Relaxed))
                    .map(|h| h.meta.clone()),
            )
        };
        staged.map(|staged| staged_meta_of(&staged)).or(read)
    }

    /// Every entry of the directory (paged from the server, with the files
    /// this mount is writing or uploading there), with inodes, by name.
    pub async fn readdir(&self, ino: u64) -> FsResult<Vec<(u64, String, EntryKind)>> {
        let dir = self.path(ino)?;
        let version = self.inodes.version();
        let mut written = self.entries_written_in(&dir);
        let entries = match self.client.list(&dir, false).await {
            Ok(entries) => entries,
            // See `stat`: the directory holds only what this mount writes.
            Err(e) if e.code() == ErrorCode::NotFound && !written.is_empty() => Vec::new(),
            Err(e) => return Err(errno_of(&e)),
        };
        let mut out = Vec::with_capacity(entries.len() + written.len());
        for entry in entries {
            written.remove(&entry.name);
            let Ok(path) = dir.join(&entry.name) else {
                continue;
            };
            let meta = FileMeta {
                path,
                kind: entry.kind,
                size: entry.size,
                mtime: entry.mtime,
                etag: entry.etag,
            };
            let ino = self.inodes.remember_unless_changed(&meta, version);
            out.push((ino, entry.name, entry.kind));
        }
        for (name, kind) in written {
            if let Ok(path) = dir.join(&name) {
                out.push((self.inodes.ino(&path), name, kind));
            }
        }
        // One order whichever side lists a name, so that a kernel reading
        // the directory in parts misses none while an upload lands.
        out.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(out)
    }

    /// Opens `ino` for reading. Returns the handle and how the kernel is to
    /// read through it (see [`PageCache`]).
    pub async fn open(&self, ino: u64, write: bool, truncate: bool) -> FsResult<(u64, CacheMode)> {
        if write {
            return self.open_for_write(ino, truncate).await;
        }
        let path = self.path(ino)?;
        if let Some(staged) = self.staged_for(&path) {
            // Read what this mount wrote, even before it is committed.
            staged.state.lock().unwrap().open_handles += 1;
            return Ok((
                self.add_handle(ino, staged_meta_of(&staged), staged, false),
                CacheMode::Drop,
            ));
        }
        let version = self.inodes.version();
        let meta = self.client.stat(&path).await.map_err(|e| errno_of(&e))?;
        if meta.kind == EntryKind::Dir {
            return Err(21); // EISDIR
        }
        self.inodes.remember_unless_changed(&meta, version);
        let etag = version_of(&meta);
        // Decided and counted under one lock with the handle's insertion, so
        // that no two versions ever both read through the page cache.
        let mut caches = self.page_caches.lock().unwrap();
        let mode = match caches.get_mut(&ino) {
            Some(cache) if cache.version.as_deref() == Some(&etag) => {
                cache.handles += 1;
                if cache.settled {
                    CacheMode::Keep
                } else {
                    CacheMode::Drop
                }
            }
            Some(cache) if cache.handles > 0 => CacheMode::Direct,
            _ => {
                caches.insert(
                    ino,
                    PageCache {
                        version: Some(etag),
                        handles: 1,
                        settled: false,
                    },
                );
                CacheMode::Drop
            }
        };
        let fh = self.insert_handle(Handle {
            ino,
            meta,
            page_cache: (mode != CacheMode::Direct).into(),
            settles: (mode == CacheMode::Drop).into(),
            readahead: Mutex::default(),
            staged: Mutex::default(),
            writes: false,
        });
        drop(caches);
        // Staged by an open for writing while this one asked the server.
        if let Some(staged) = self.staged_for(&path) {
            self.follow_writes(ino, &staged, None);
            if self.handle(fh)?.staged().is_some() {
                return Ok((fh, CacheMode::Drop));
            }
        }
        Ok((fh, mode))
    }

    /// A handle on `staged`, counted open on it already (among its
    /// writers too if it `writes`).
    fn add_handle(&self, ino: u64, meta: FileMeta, staged: Arc<Staged>, writes: bool) -> u64 {
        self.insert_handle(Handle {
            ino,
            meta,
            page_cache: false.into(),
            settles: false.into(),
            readahead: Mutex::default(),
            staged: Mutex::new(Some(staged)),
            writes,
        })
    }

    /// This mount starts writing `staged`, the file `ino`: the handles open
    /// on the version it starts from read what is written from now on, as
    /// on a local disk (`tail -f` of a log appended to here), and count
    /// among its open descriptors. Left on their version, each read at its
    /// end would have the kernel take that version's size for the file's,
    /// and place the next `O_APPEND` write there, over bytes written.
    ///
    /// So do the handles still reading `replaced`, the staged file of an
    /// earlier writing whose writers have all closed, when `staged` starts
    /// from the version that writing committed: its content, which they
    /// read on in `staged`.
    pub(super) fn follow_writes(
        &self,
        ino: u64,
        staged: &Arc<Staged>,
        replaced: Option<&Arc<Staged>>,
    ) {
        let carried_over = replaced.filter(|replaced| {
            let content = replaced.content_version();
            content.is_some() && staged.base.as_ref().and_then(|b| b.etag.clone()) == content
        });
        let mut left_page_cache = 0;
        {
            // Under the lock `release` removes a handle with: a handle
            // counted open here is one whose release will see it staged.
            let handles = self.handles.lock().unwrap();
            for handle in handles.values() {
                if handle.ino != ino {
                    continue;
                }
                let mut current = handle.staged.lock().unwrap();
                match &*current {
                    None if handle.reads_version_of(staged) => {}
                    Some(on) if carried_over.is_some_and(|r| Arc::ptr_eq(r, on)) => {
                        on.state.lock().unwrap().open_handles -= 1;
                    }
                    _ => continue,
                }
                staged.state.lock().unwrap().open_handles += 1;
                *current = Some(staged.clone());
                if handle.page_cache.swap(false, Ordering::Relaxed) {
                    left_page_cache += 1;
                }
            }
        }
        if left_page_cache > 0
            && let Some(cache) = self.page_caches.lock().unwrap().get_mut(&ino)
        {
            cache.handles -= left_page_cache;
        }
    }

    /// The size of `ino` as this mount writes it, if it does.
    fn staged_size(&self, ino: u64) -> Option<u64> {
        let path = self.inodes.path(ino)?;
        self.staged_for(&path).map(|staged| staged.size())
    }

    /// The kernel's pages of `ino` hold no version a later open may keep.
    fn forget_page_cache(&self, ino: u64) {
        if let Some(cache) = self.page_caches.lock().unwrap().get_mut(&ino) {
            cache.version = None;
        }
    }

    fn insert_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, Arc::new(handle));
        fh
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.handles
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(errno::EBADF)
    }

    /// Closes `fh`; the last close of a written file queues its upload.
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let handle = self.handles.lock().unwrap().remove(&fh);
        if let Some(handle) = handle
            .as_ref()
            .filter(|h| h.page_cache.swap(false, Ordering::Relaxed))
            && let Some(cache) = self.page_caches.lock().unwrap().get_mut(&handle.ino)
        {
            cache.handles -= 1;
        }
        match handle.and_then(|h| h.staged().map(|staged| (staged, h.writes))) {
            Some((staged, writes)) => self.release_staged(staged, writes).await,
            None => Ok(()),
        }
    }

    /// Up to `size` bytes at `offset` of the version opened as `fh`.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let handle = self.handle(fh)?;
        if let Some(staged) = handle.staged() {
            return staged.read(self, offset, size).await;
        }
        if handle.settles.swap(false, Ordering::Relaxed) {
            // The kernel completed this handle's open, dropping the pages
            // of earlier versions: later opens of this version may keep
            // what the page cache holds.
            if let Some(cache) = self.page_caches.lock().unwrap().get_mut(&handle.ino)
                && cache.version.as_deref() == Some(&version_of(&handle.meta))
            {
                cache.settled = true;
            }
        }
        let file_size = handle.meta.size;
        if offset >= file_size || size == 0 {
            return Ok(Bytes::new());
        }
        let deadline = ReadDeadline::new(self.client.retry_policy().give_up_after);
        let end = (offset + size as u64).min(file_size);
        let window = handle
            .readahead
            .lock()
            .unwrap()
            .observe(offset, end - offset, BLOCK_SIZE);
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        if window > 0 {
            // Prefetched blocks must not push out those about to be read.
            let window = window.min(self.cache.capacity() as u64 / 4);
            let prefetch_end = end.saturating_add(window).min(file_size);
            for block in last + 1..=(prefetch_end.saturating_sub(1)) / BLOCK_SIZE {
                self.prefetch(&handle.meta, block);
            }
        }
        // Reads arriving out of order near blocks already wanted (the
        // kernel's parallel readahead) are not seeks.
        let near_cached = (first.saturating_sub(1)..=last + 1).any(|block| {
            let key = Self::block_key(&handle.meta, block);
            self.cache.has_or_fetching(&key)
                || self.disk.as_ref().is_some_and(|disk| disk.contains(&key))
        });
        if window == 0 && !near_cached {
            // A read after a seek: fetch only the bytes asked for (a player
            // probing an index should not pay for whole blocks). Blocks are
            // cached once reads turn sequential.
            let fetch = self.fetch_range(&handle.meta, offset, end - offset);
            let data = self.within(&deadline, fetch).await.map_err(|e| {
                tracing::warn!(path = %handle.meta.path, offset, error = %e.message, "read failed");
                e.errno
            })?;
            if data.len() as u64 != end - offset {
                // The server sent less than the size promised.
                return Err(errno::EIO);
            }
            return Ok(data);
        }
        let mut pieces = Vec::with_capacity((last - first + 1) as usize);
        for block in first..=last {
            let data = self.block_within(&deadline, &handle.meta, block).await.map_err(|e| {
                tracing::warn!(path = %handle.meta.path, block, error = %e.message, "read failed");
                e.errno
            })?;
            let block_start = block * BLOCK_SIZE;
            let from = offset.max(block_start) - block_start;
            let to = (end - block_start).min(data.len() as u64);
            if from >= to {
                // The server sent less than the size promised.
                return Err(errno::EIO);
            }
            pieces.push(data.slice(from as usize..to as usize));
        }
        // A read inside one block (most are) is a view of the cached block,
        // not a copy.
        Ok(match <[Bytes; 1]>::try_from(pieces) {
            Ok([one]) => one,
            Err(pieces) => pieces.concat().into(),
        })
    }

    fn block_key(meta: &FileMeta, block: u64) -> BlockKey {
        BlockKey {
            path: meta.path.clone(),
            etag: meta.etag.clone().unwrap_or_default(),
            block,
        }
    }

    fn fetch(
        &self,
        meta: &FileMeta,
        block: u64,
    ) -> futures::future::BoxFuture<'static, Result<Bytes, FetchError>> {
        let (disk, key) = (self.disk.clone(), Self::block_key(meta, block));
        let start = block * BLOCK_SIZE;
        let fetch = self.fetch_range(meta, start, BLOCK_SIZE.min(meta.size - start));
        async move {
            if let Some(disk) = &disk
                && let Some(data) = disk.get(&key).await
            {
                return Ok(data);
            }
            let data = fetch.await?;
            if let Some(disk) = &disk {
                disk.put(key, data.clone());
            }
            Ok(data)
        }
        .boxed()
    }

    /// `len` bytes at `start` of the version in `meta`, from the server.
    fn fetch_range(
        &self,
        meta: &FileMeta,
        start: u64,
        len: u64,
    ) -> impl Future<Output = Result<Bytes, FetchError>> + Send + 'static {
        let (client, fetches, path, etag) = (
            self.client.clone(),
            self.fetches.clone(),
            meta.path.clone(),
            meta.etag.clone(),
        );
        let fetched = self.fetched_bytes.clone();
        async move {
            let _permit = fetches.acquire_owned().await.expect("never closed");
            client
                .read_range(&path, start, len, etag.as_deref())
                .await
                .inspect(|data| {
                    fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
                })
                .map_err(|e| {
                    if matches!(
                        e.code(),
                        ErrorCode::PreconditionFailed | ErrorCode::NotFound
                    ) {
                        // Replaced or removed since it was opened: this
                        // handle's version is gone.
                        FetchError {
                            errno: errno::ESTALE,
                            message: e.to_string(),
                        }
                    } else {
                        FetchError::from(e)
                    }
                })
        }
    }

    async fn block(&self, meta: &FileMeta, block: u64) -> Result<Bytes, FetchError> {
        let fetch = self.fetch(meta, block);
        self.cache
            .get_or_fetch(Self::block_key(meta, block), || fetch)
            .await
    }

    /// The block for a read: the read waits for it (its turn among the
    /// fetches in flight included) until `deadline`. A fetch it joined
    /// that gave up earlier (a prefetch that began retrying before the
    /// read did) is tried again while the deadline allows.
    async fn block_within(
        &self,
        deadline: &ReadDeadline,
        meta: &FileMeta,
        block: u64,
    ) -> Result<Bytes, FetchError> {
        loop {
            match self.within(deadline, self.block(meta, block)).await {
                Err(e) if e.errno == errno::EIO && !deadline.passed(self.last_heard()) => {
                    tracing::debug!(path = %meta.path, block, error = %e.message, "fetching again");
                    tokio::time::sleep(REFETCH_PAUSE).await;
                }
                result => return result,
            }
        }
    }

    /// What `work` returns, or EIO once the read's `deadline` passes.
    async fn within(
        &self,
        deadline: &ReadDeadline,
        work: impl Future<Output = Result<Bytes, FetchError>>,
    ) -> Result<Bytes, FetchError> {
        let last_heard = || self.last_heard();
        match deadline.wait(last_heard, work).await {
            Some(result) => result,
            None => Err(FetchError {
                errno: errno::EIO,
                message: format!(
                    "no answer from the server in {:.1?}",
                    deadline.quiet_for(self.last_heard())
                ),
            }),
        }
    }

    /// When the server last answered or sent a piece of a body.
    fn last_heard(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.client.last_heard())
    }

    fn prefetch(&self, meta: &FileMeta, block: u64) {
        self.cache
            .prefetch(Self::block_key(meta, block), || self.fetch(meta, block));
    }

    pub fn cache_stats(&self) -> super::block_cache::CacheStats {
        self.cache.stats()
    }

    /// What `--metrics-addr` exports.
    pub fn metrics(&self) -> Vec<crate::metrics_export::Sample> {
        use crate::metrics_export::Sample;
        let cache = self.cache.stats();
        let pending = self.uploads.get().map_or(0, |q| q.pending().len());
        vec![
            Sample::counter(
                "ferry_mount_cache_hits",
                "Block reads answered from memory",
                cache.hits,
            ),
            Sample::counter(
                "ferry_mount_cache_misses",
                "Block reads that waited for a fetch",
                cache.misses,
            ),
            Sample::gauge(
                "ferry_mount_cached_bytes",
                "Bytes of file blocks held in memory",
                cache.cached_bytes as u64,
            ),
            Sample::counter(
                "ferry_mount_fetched_bytes",
                "File bytes fetched from the server by reads",
                self.fetched_bytes.load(Ordering::Relaxed),
            ),
            Sample::gauge(
                "ferry_mount_pending_uploads",
                "Closed files not yet committed on the server",
                pending as u64,
            ),
        ]
    }

    fn writable(&self) -> FsResult<()> {
        if self.options.read_only {
            Err(errno::EROFS)
        } else {
            Ok(())
        }
    }

    pub async fn mkdir(&self, parent: u64, name: &str) -> FsResult<(u64, FileMeta)> {
        self.writable()?;
        let path = self.new_child(parent, name)?;
        let meta = self
            .client
            .mkdir(&path, false)
            .await
            .map_err(|e| errno_of(&e))?;
        self.inodes.invalidate(&self.path(parent)?);
        Ok((self.inodes.remember(&meta), meta))
    }

    pub async fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        self.writable()?;
        let path = self.child(parent, name)?;
        let meta = match self.stat(&path).await {
            Ok((_, meta)) => meta,
            // A directory that existed only through its files (no `mkdir`)
            // went with the last of them, which `rm -r` has just removed:
            // the kernel still has it, so it was here.
            Err(errno::ENOENT) if self.inodes.known(&path).is_some() => {
                self.inodes.remove(&path);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if meta.kind != EntryKind::Dir {
            return Err(20); // ENOTDIR
        }
        // Files being written or uploaded beneath it are there already,
        // though the server does not have them yet.
        if self.writes_beneath(&path) {
            return Err(39); // ENOTEMPTY
        }
        match self.client.rmdir(&path, false).await {
            Ok(()) => {}
            // Gone since the stat, with its last file.
            Err(e) if e.code() == ErrorCode::NotFound => {}
            Err(e) => return Err(errno_of(&e)),
        }
        self.inodes.remove(&path);
        Ok(())
    }

    pub async fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        self.writable()?;
        let path = self.child(parent, name)?;
        match self.quiesce(&path).await {
            Some(open) => {
                if open.staged.exists_on_server() {
                    self.client.delete(&path).await.map_err(|e| errno_of(&e))?;
                }
                self.drop_unlinked(open);
            }
            None => self.client.delete(&path).await.map_err(|e| errno_of(&e))?,
        }
        self.inodes.remove(&path);
        Ok(())
    }

    /// rename(2): replaces a file at the destination; `no_replace` refuses to.
    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        no_replace: bool,
    ) -> FsResult<()> {
        self.writable()?;
        let from = self.child(parent, name)?;
        let to = self.new_child(new_parent, new_name)?;
        if from == to {
            return Ok(());
        }
        // Into itself: EINVAL, as the kernel answers before asking (and the
        // waits below would hold `to` while waiting for it).
        if to.is_beneath(&from) {
            return Err(errno::EINVAL);
        }
        // A pending upload to either name must land before the names move,
        // and a file open under either waits with its last close until they
        // have.
        let replaced = self.quiesce(&to).await;
        if no_replace && replaced.is_some() {
            return Err(errno::EEXIST);
        }
        let moving = self.quiesce(&from).await;
        // A directory moves with the files being written beneath it.
        let beneath = match moving {
            Some(_) => Vec::new(),
            None => self.quiesce_beneath(&from).await,
        };
        let on_server = moving
            .as_ref()
            .is_none_or(|open| open.staged.exists_on_server());
        if no_replace && !on_server && self.stat(&to).await.is_ok() {
            return Err(errno::EEXIST);
        }
        if on_server {
            let request = MoveRequest {
                from: from.clone(),
                to: to.clone(),
                overwrite: !no_replace,
                // An open file is a file; a directory may hold anything.
                recursive: moving.is_none(),
            };
            self.client
                .rename(&request)
                .await
                .map_err(|e| errno_of(&e))?;
        }
        if let Some(replaced) = replaced {
            self.drop_unlinked(replaced);
        }
        if let Some(open) = &moving {
            // Still being written: its upload goes to the new name.
            self.restage(open, &to).await;
        }
        for open in &beneath {
            if let Some(moved) = open.staged.path().moved(&from, &to) {
                self.restage(open, &moved).await;
            }
        }
        self.inodes.rename(&from, &to);
        Ok(())
    }

    /// Drops what is cached about `path` after a change made elsewhere.
    pub fn forget_path(&self, path: &RemotePath) {
        self.inodes.invalidate(path);
        if let Some(parent) = path.parent() {
            self.inodes.invalidate(&parent);
        }
    }

    pub fn root_ino(&self) -> u64 {
        ROOT_INO
    }
}

/// The version of a file whose pages the kernel may cache.
fn version_of(meta: &FileMeta) -> String {
    meta.etag.clone().unwrap_or_default()
}

/// A directory the server does not have, as the mount shows it.
fn unlisted_dir(path: &RemotePath) -> FileMeta {
    FileMeta {
        path: path.clone(),
        kind: EntryKind::Dir,
        size: 0,
        mtime: None,
        etag: None,
    }
}

impl RemoteBlocks for MountCore {
    fn fetch(
        &self,
        meta: &FileMeta,
        block: u64,
    ) -> futures::future::BoxFuture<'_, Result<Bytes, FetchError>> {
        let meta = meta.clone();
        async move { self.block(&meta, block).await }.boxed()
    }
}
