//! A file opened for writing is staged in a sparse local file. Blocks of the
//! remote version are copied in only when a partial write needs them (and,
//! at upload time, those still missing), never the whole file up front.
//! Every byte that gains content is charged to the [`StagingSpace`] first.

mod extents;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use self::extents::Extents;
use super::block_cache::{BLOCK_SIZE, FetchError};
use super::core::{FsResult, errno};
use super::pending::JournalEntry;
use super::staging_space::{Charge, StagingSpace};
use super::tail_copy::{self, TailCopy};
use super::write_behind::{Handover, WriteBehind};
use crate::client::Client;
use crate::page_cache;
use crate::protocol::{FileMeta, RemotePath};

/// Where the remote blocks come from.
pub trait RemoteBlocks: Send + Sync {
    fn fetch(
        &self,
        meta: &FileMeta,
        block: u64,
    ) -> futures::future::BoxFuture<'_, Result<Bytes, FetchError>>;
}

pub struct Staged {
    pub local: PathBuf,
    file: Arc<File>,
    /// The remote version the file started from; `None` for a new file.
    pub base: Option<FileMeta>,
    /// Shared with the blocking threads that write the staging file.
    pub state: Arc<Mutex<StagedState>>,
    /// Held shared by writes; exclusively while the current content is
    /// completed and journaled (a close) or uploaded (fsync).
    pub gate: tokio::sync::RwLock<()>,
    /// Held while the file's name or fate is decided: by the last close as
    /// it starts the upload under the current name, by an `fsync` until it
    /// has started one (taken before [`gate`](Self::gate)), and by a rename
    /// or unlink of the file across their check that it is open, the
    /// server call and the move. FUSE sends a close's release
    /// asynchronously, so without it a release arriving mid-rename uploads
    /// to the old name; an `fsync` racing an unlink would bring the file
    /// back.
    pub naming: Arc<tokio::sync::Mutex<()>>,
    space: Arc<StagingSpace>,
    /// The staging space this file's content takes, until it is discarded
    /// or handed to its upload.
    charge: Mutex<Charge>,
    /// The space the copy of the file's tail takes (see [`Staged::complete`]),
    /// kept apart so that a later close's copy replaces it.
    tail_charge: Mutex<Charge>,
    early_sync: EarlySync,
    write_behind: Option<Arc<WriteBehind>>,
}

/// Bytes written to a staging file between the marks that [`EarlySync`]
/// writes back by: a 1 GiB write took 0.9 s more in the sync at `close`
/// when nothing was written back before it.
const EARLY_SYNC_EVERY: u64 = 64 << 20;

/// How old written bytes get before [`EarlySync`] writes them back. A
/// writer that calls `fsync` soon after writing (`dd conv=fsync`, a copy
/// ending with a sync) needs none of its bytes on the local disk, as
/// `fsync` waits for the commit on the server instead; what was written
/// back early had only taken the disk from the upload (1 GiB more for a
/// 1 GiB dd, bench/RESULTS.md, mount-write notes). A `close` waits for at
/// most about this long's worth of writes.
const EARLY_SYNC_AFTER: Duration = Duration::from_secs(1);

/// Writes a staging file's data back in the background as it is written,
/// once it is [`EARLY_SYNC_AFTER`] old, so that the sync at `close` finds
/// little left to write. Bytes that write-behind's session holds or will
/// likely hold by the close are left out (see
/// [`WriteBehind::spared_locally`]). Only an I/O hint: what a crash leaves
/// behind still depends on the sync in [`Staged::complete`] alone.
#[derive(Default)]
struct EarlySync {
    marks: Mutex<WrittenMarks>,
    running: Arc<AtomicBool>,
}

#[derive(Default)]
struct WrittenMarks {
    /// The end of the bytes written so far.
    end: u64,
    /// Bytes written since the last mark.
    unmarked: u64,
    /// When the written end was where, one mark per [`EARLY_SYNC_EVERY`]
    /// bytes written, oldest first.
    marks: VecDeque<(Instant, u64)>,
}

impl WrittenMarks {
    /// Notes the write of `offset..end`; returns the end of the bytes
    /// written at least [`EARLY_SYNC_AFTER`] ago, once there is a new one.
    fn wrote(&mut self, offset: u64, end: u64, now: Instant) -> Option<u64> {
        self.end = self.end.max(end);
        self.unmarked += end - offset;
        if self.unmarked >= EARLY_SYNC_EVERY {
            self.unmarked = 0;
            self.marks.push_back((now, self.end));
        }
        let mut due = None;
        while let Some(&(at, upto)) = self.marks.front() {
            if now.duration_since(at) < EARLY_SYNC_AFTER {
                break;
            }
            due = Some(upto);
            self.marks.pop_front();
        }
        due
    }
}

impl EarlySync {
    /// After a write of `offset..end`; `spared` tells which bytes to leave
    /// out, asked only when a write-back is due.
    fn wrote(
        &self,
        local: &Path,
        offset: u64,
        end: u64,
        spared: impl FnOnce() -> Option<Range<u64>>,
    ) {
        let Some(upto) = self
            .marks
            .lock()
            .unwrap()
            .wrote(offset, end, Instant::now())
        else {
            return;
        };
        let ranges = write_back_ranges(upto, spared());
        if ranges.is_empty() || self.running.swap(true, Ordering::AcqRel) {
            // The next mark due covers these bytes as well.
            return;
        }
        let (local, running) = (local.to_path_buf(), self.running.clone());
        tokio::task::spawn_blocking(move || {
            // A descriptor of its own: a write-back error this meets is
            // still reported to the staging file's descriptor, whose sync is
            // the one that counts. From 0, as writes may not be sequential;
            // pages already clean cost nothing.
            if let Ok(file) = File::open(&local) {
                for range in ranges {
                    page_cache::write_back(&file, range.start, range.end - range.start, true);
                }
            }
            running.store(false, Ordering::Release);
        });
    }
}

/// The non-empty parts of `0..upto` outside `spared`.
pub(super) fn write_back_ranges(upto: u64, spared: Option<Range<u64>>) -> Vec<Range<u64>> {
    let held = spared.unwrap_or(upto..upto);
    [0..held.start.min(upto), held.end..upto]
        .into_iter()
        .filter(|r| r.start < r.end)
        .collect()
}

pub struct StagedState {
    pub path: RemotePath,
    pub size: u64,
    /// Bytes below this are the remote's where `content` does not cover them.
    remote_size: u64,
    /// What the staging file holds: written bytes and remote bytes copied in.
    content: Extents,
    pub dirty: bool,
    /// Written (or truncated) since it was staged: it no longer holds the
    /// content of `base`.
    written: bool,
    /// The journal has a record of the current content (written at the
    /// last `flush`), so the last close only has to start its upload.
    pub journaled: bool,
    /// How the journaled content was made durable, when only in part.
    pub tail_copy: Option<TailCopy>,
    pub mtime: SystemTime,
    pub open_handles: u32,
    /// How many of `open_handles` can write the file (opened for writing,
    /// or staging it for a truncate): the last of them to close starts
    /// the upload, whether handles only reading it are still open or not.
    pub writers: u32,
    /// Unlinked while open: discarded at the last close, never uploaded.
    pub unlinked: bool,
    /// The write-behind session the upload of the current content
    /// continues, once handed over and until an upload takes it (see
    /// [`Staged::upload_session`]).
    upload_session: Option<Handover>,
    /// The version an upload of this file committed since it was opened
    /// (an `fsync`'s, or a close's while another descriptor stays open),
    /// by its etag: the server has the file under its name now, and the
    /// next upload commits over that version, not over `base`.
    committed: Option<Committed>,
    /// How many uploads committed the file under its name since it was
    /// opened.
    commits: u64,
    /// Renamed while open: its upload replaces whatever its new name holds,
    /// as `rename(2)` does, rather than only creating the file.
    pub renamed: bool,
    /// Ranges being written through the mount right now: a fill from the
    /// remote version leaves them alone (see [`fill_gaps`]).
    storing: Vec<(u64, u64)>,
}

/// A version of a staged file that one of its uploads committed.
#[derive(Debug)]
struct Committed {
    /// Its etag, where the store gives one.
    etag: Option<String>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> FsResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| errno::EIO)?
        .map_err(|e| errno::of_io(&e))
}

/// The first and last block of `offset..end` (one block twice if it is
/// one), for those that the write covers only in part.
fn partly_written(offset: u64, end: u64) -> impl Iterator<Item = u64> {
    let (first, last) = (offset / BLOCK_SIZE, (end - 1) / BLOCK_SIZE);
    [first, last].into_iter().filter(move |block| {
        let (bs, be) = (block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE);
        offset > bs || end < be
    })
}

impl Staged {
    /// A staging file at `local` for `path`; `base` is the remote version to
    /// start from, `truncate` starts empty instead.
    pub fn create(
        local: PathBuf,
        path: RemotePath,
        base: Option<FileMeta>,
        truncate: bool,
        space: &Arc<StagingSpace>,
    ) -> FsResult<Staged> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&local)
            .map_err(|e| errno::of_io(&e))?;
        let size = if truncate {
            0
        } else {
            base.as_ref().map_or(0, |b| b.size)
        };
        // Sized only when not empty: on ext4, truncating a file to nothing
        // (even one already empty) makes every later close of it start the
        // write-back of all its dirty pages (`auto_da_alloc`), a whole
        // gigabyte written to the local disk for a file whose content then
        // only goes to the server.
        if size > 0 {
            file.set_len(size).map_err(|e| errno::of_io(&e))?;
        }
        Ok(Staged {
            local,
            file: Arc::new(file),
            base,
            state: Arc::new(Mutex::new(StagedState {
                path,
                size,
                remote_size: size,
                content: Extents::default(),
                dirty: truncate,
                written: truncate,
                journaled: false,
                tail_copy: None,
                mtime: SystemTime::now(),
                open_handles: 0,
                writers: 0,
                unlinked: false,
                upload_session: None,
                committed: None,
                commits: 0,
                renamed: false,
                storing: Vec::new(),
            })),
            gate: tokio::sync::RwLock::new(()),
            naming: Arc::default(),
            space: space.clone(),
            charge: Mutex::new(space.empty()),
            tail_charge: Mutex::new(space.empty()),
            early_sync: EarlySync::default(),
            write_behind: None,
        })
    }

    /// Sends the file's chunks to the server while it is being written
    /// (see [`WriteBehind`]). Only for a file whose whole content is
    /// local: new, or truncated at open.
    /// `server_pace`: see [`DEFAULT_SERVER_PACE`](super::write_behind::DEFAULT_SERVER_PACE).
    pub fn with_write_behind(mut self, client: Client, server_pace: u64) -> Staged {
        let condition = (self.server_etag(), !self.exists_on_server());
        let state = Arc::get_mut(&mut self.state)
            .expect("not shared yet")
            .get_mut()
            .unwrap();
        debug_assert!(state.remote_size == 0);
        self.write_behind = WriteBehind::new(
            client,
            self.file.clone(),
            state.path.clone(),
            condition,
            server_pace,
        );
        self
    }

    /// Ends write-behind and names the session the upload of the current
    /// content continues, if there is one. Asked again before the next
    /// write, it names the same one.
    pub fn upload_session(&self) -> Option<Handover> {
        let mut state = self.state.lock().unwrap();
        if state.upload_session.is_none() {
            state.upload_session = self.write_behind.as_ref().and_then(|wb| wb.hand_over());
        }
        state.upload_session.clone()
    }

    /// The session the upload of the current content would continue, for
    /// a journal record written while the file may still be written (see
    /// [`WriteBehind::current`]); write-behind goes on.
    pub fn current_upload_session(&self) -> Option<Handover> {
        let state = self.state.lock().unwrap();
        match &state.upload_session {
            Some(handover) => Some(handover.clone()),
            None => self.write_behind.as_ref()?.current(),
        }
    }

    /// [`upload_session`](Self::upload_session), for the upload that now
    /// owns it.
    pub fn take_upload_session(&self) -> Option<Handover> {
        self.upload_session();
        self.state.lock().unwrap().upload_session.take()
    }

    /// The journal record of this file was replaced or dropped: a session
    /// only that record counted on is aborted (see
    /// [`WriteBehind::release_retired`]).
    pub fn release_retired_session(&self) {
        if let Some(wb) = &self.write_behind {
            wb.release_retired();
        }
    }

    /// The journal record of this file was dropped: nothing counts on the
    /// copy of its tail or on a session given up since.
    pub fn record_dropped(&self) {
        {
            let mut state = self.state.lock().unwrap();
            state.journaled = false;
            state.tail_copy = None;
        }
        *self.tail_charge.lock().unwrap() = self.space.empty();
        self.release_retired_session();
    }

    /// The file was removed (or renamed over) while open: none of it is to
    /// reach the server, so write-behind stops sending it and its session
    /// goes.
    pub fn stop_write_behind(&self) {
        if let Some(wb) = &self.write_behind {
            wb.cancel();
        }
    }

    /// A session handed over for content that has changed since: of no use.
    fn drop_upload_session(&self, state: &mut StagedState) {
        if let (Some(handover), Some(wb)) = (state.upload_session.take(), &self.write_behind) {
            wb.abort(handover.session);
        }
    }

    /// The etag of the file's version on the server that the next upload
    /// commits over: the last one this mount committed, else the one it
    /// was opened from; `None` for a file the server does not have.
    pub fn server_etag(&self) -> Option<String> {
        match &self.state.lock().unwrap().committed {
            Some(committed) => committed.etag.clone(),
            None => self.base.as_ref().and_then(|b| b.etag.clone()),
        }
    }

    /// A journal record of an upload of this file's content from `local`,
    /// committed only over the version it replaces ([`server_etag`]), or
    /// only where there is no file if the server has none of it (and it was
    /// not renamed over another).
    ///
    /// [`server_etag`]: Self::server_etag
    pub fn journal_entry(&self, local: PathBuf) -> JournalEntry {
        let renamed = self.state.lock().unwrap().renamed;
        JournalEntry::new(self.path(), local, self.server_etag())
            .create_only(!self.exists_on_server() && !renamed)
    }

    /// Whether the server has a version of the file under its name (it was
    /// opened from one, or an upload committed one since).
    pub fn exists_on_server(&self) -> bool {
        self.base.is_some() || self.state.lock().unwrap().committed.is_some()
    }

    /// An upload of this file committed `etag` under its name.
    pub fn committed(&self, etag: Option<String>) {
        let mut state = self.state.lock().unwrap();
        state.committed = Some(Committed { etag });
        state.commits += 1;
    }

    /// The version on the server whose content this file holds, by its
    /// etag: the one its last upload committed (nothing written since), or
    /// the one it was opened from if it was never written. `None` when the
    /// server has no such version (or gives no etags).
    pub fn content_version(&self) -> Option<String> {
        let state = self.state.lock().unwrap();
        if state.dirty {
            return None;
        }
        match &state.committed {
            Some(committed) => committed.etag.clone(),
            None if !state.written => self.base.as_ref().and_then(|b| b.etag.clone()),
            None => None,
        }
    }

    /// How many uploads committed the file under its name so far.
    pub fn commits(&self) -> u64 {
        self.state.lock().unwrap().commits
    }

    pub fn size(&self) -> u64 {
        self.state.lock().unwrap().size
    }

    /// The part of remote block `block` the staging file still lacks, if any.
    fn unfilled(&self, block: u64) -> Option<(u64, u64)> {
        let state = self.state.lock().unwrap();
        let start = block * BLOCK_SIZE;
        let end = (start + BLOCK_SIZE).min(state.remote_size);
        (start < end && !state.content.covers(start, end)).then_some((start, end))
    }

    /// The parts of remote block `block` within `offset..end` that the
    /// staging file holds no content for: they read as the remote's.
    fn remote_gaps(&self, block: u64, offset: u64, end: u64) -> Vec<(u64, u64)> {
        let state = self.state.lock().unwrap();
        let start = (block * BLOCK_SIZE).max(offset);
        let stop = ((block + 1) * BLOCK_SIZE).min(state.remote_size).min(end);
        match start < stop {
            true => state.content.gaps(start, stop, &[]),
            false => Vec::new(),
        }
    }

    /// Copies remote block `block` into the staging file if it is still missing.
    async fn fill(&self, remote: &dyn RemoteBlocks, block: u64) -> FsResult<()> {
        let Some((start, end)) = self.unfilled(block) else {
            return Ok(());
        };
        let base = self
            .base
            .as_ref()
            .expect("only a file with a base has remote blocks");
        let data = remote.fetch(base, block).await.map_err(|e| e.errno)?;
        if (data.len() as u64) < end - start {
            // The server sent less than the size promised.
            return Err(errno::EIO);
        }
        let growth = self.growth(start, end);
        let reserved = self.space.reserve(growth).await?;
        let (file, state) = (self.file.clone(), self.state.clone());
        let data = data.slice(..(end - start) as usize);
        let added = blocking(move || fill_gaps(&file, &state, start, &data)).await;
        self.stored(end, growth, reserved, added)
    }

    /// Writes `data` at `offset` in the staging file, charging the bytes that
    /// gain content first.
    async fn store(&self, offset: u64, data: Bytes) -> FsResult<()> {
        let end = offset + data.len() as u64;
        let growth = self.growth(offset, end);
        let reserved = self.space.reserve(growth).await?;
        let (file, state) = (self.file.clone(), self.state.clone());
        // On a blocking thread, which runs it to the end even if this
        // request is dropped: the range is never left marked as storing.
        let added = blocking(move || write_content(&file, &state, offset, &data)).await;
        self.stored(end, growth, reserved, added)
    }

    /// [`store`](Self::store) on the calling thread, if the space is there
    /// without waiting for uploads to drain; `None` otherwise.
    fn store_now(&self, offset: u64, data: &[u8]) -> Option<FsResult<()>> {
        let end = offset + data.len() as u64;
        let growth = self.growth(offset, end);
        let reserved = self.space.try_reserve(growth)?;
        let added =
            write_content(&self.file, &self.state, offset, data).map_err(|e| errno::of_io(&e));
        Some(self.stored(end, growth, reserved, added))
    }

    /// Bytes of `offset..end` the staging file holds nothing for yet.
    fn growth(&self, offset: u64, end: u64) -> u64 {
        self.state.lock().unwrap().content.missing(offset, end)
    }

    /// Accounts for a write ending at `end` that charged `reserved` for its
    /// `growth` and `added` that many bytes of content.
    fn stored(
        &self,
        end: u64,
        growth: u64,
        reserved: Charge,
        added: FsResult<u64>,
    ) -> FsResult<()> {
        let added = match added {
            Ok(added) => added,
            Err(e) => {
                // A failed write leaves the size as it was, as on a local disk.
                let size = self.state.lock().unwrap().size;
                if end > size {
                    let _ = self.file.set_len(size);
                }
                return Err(e);
            }
        };
        let mut charge = self.charge.lock().unwrap();
        charge.merge(reserved);
        // Concurrent stores of one range each reserved it; one kept it.
        charge.release(growth - added);
        Ok(())
    }

    pub async fn write(
        &self,
        remote: &dyn RemoteBlocks,
        offset: u64,
        data: Bytes,
    ) -> FsResult<u32> {
        let _shared = self.gate.read().await;
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset + data.len() as u64;
        // Blocks only partly overwritten need their remote bytes first.
        for block in partly_written(offset, end) {
            self.fill(remote, block).await?;
        }
        self.store(offset, data).await?;
        Ok(self.wrote(offset, end))
    }

    /// [`write`](Self::write) on the calling thread when it needs no waiting:
    /// no remote block to fetch first, staging space free, no close or fsync
    /// holding the file. `None`: it must go through `write`.
    ///
    /// A FUSE write done here is answered without handing its data to other
    /// threads (or copying it), which for large sequential writes is most of
    /// their cost.
    pub fn write_now(&self, offset: u64, data: &[u8]) -> Option<FsResult<u32>> {
        let _shared = self.gate.try_read().ok()?;
        if data.is_empty() {
            return Some(Ok(0));
        }
        let end = offset + data.len() as u64;
        if partly_written(offset, end).any(|block| self.unfilled(block).is_some()) {
            return None;
        }
        Some(
            self.store_now(offset, data)?
                .map(|()| self.wrote(offset, end)),
        )
    }

    /// Records a write of `offset..end`; its length.
    fn wrote(&self, offset: u64, end: u64) -> u32 {
        self.early_sync.wrote(&self.local, offset, end, || {
            self.write_behind
                .as_ref()
                .and_then(|wb| wb.spared_locally())
        });
        if let Some(wb) = &self.write_behind {
            wb.wrote(offset, end);
        }
        let mut state = self.state.lock().unwrap();
        self.drop_upload_session(&mut state);
        state.size = state.size.max(end);
        state.dirty = true;
        state.written = true;
        state.journaled = false;
        state.mtime = SystemTime::now();
        (end - offset) as u32
    }

    pub async fn truncate(&self, remote: &dyn RemoteBlocks, new_size: u64) -> FsResult<()> {
        let _shared = self.gate.read().await;
        if new_size % BLOCK_SIZE != 0 {
            self.fill(remote, new_size / BLOCK_SIZE).await?;
        }
        let file = self.file.clone();
        blocking(move || file.set_len(new_size)).await?;
        if let Some(wb) = &self.write_behind {
            wb.truncated(new_size);
        }
        let released = {
            let mut state = self.state.lock().unwrap();
            self.drop_upload_session(&mut state);
            state.remote_size = state.remote_size.min(new_size);
            state.size = new_size;
            state.dirty = true;
            state.written = true;
            state.journaled = false;
            state.mtime = SystemTime::now();
            state.content.truncate(new_size)
        };
        self.charge.lock().unwrap().release(released);
        Ok(())
    }

    /// Bytes the staging file lacks come from the remote version (through
    /// the block cache) without being copied in: reading takes no staging
    /// space.
    pub async fn read(&self, remote: &dyn RemoteBlocks, offset: u64, len: u32) -> FsResult<Bytes> {
        let size = self.size();
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + len as u64).min(size);
        // Decided before the staging file is read: a block filled meanwhile
        // reads as its remote version, as if this read had come first.
        let missing: Vec<(u64, Vec<(u64, u64)>)> = (offset / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE)
            .filter_map(|block| {
                let gaps = self.remote_gaps(block, offset, end);
                (!gaps.is_empty()).then_some((block, gaps))
            })
            .collect();
        let file = self.file.clone();
        let mut buf = blocking(move || {
            let mut buf = vec![0u8; (end - offset) as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await?;
        for (block, gaps) in missing {
            let base = self
                .base
                .as_ref()
                .expect("only a file with a base has remote blocks");
            let data = remote.fetch(base, block).await.map_err(|e| e.errno)?;
            let start = block * BLOCK_SIZE;
            for (from, to) in gaps {
                let Some(remote_bytes) = data.get((from - start) as usize..(to - start) as usize)
                else {
                    // The server sent less than the size promised.
                    return Err(errno::EIO);
                };
                buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(remote_bytes);
            }
        }
        Ok(Bytes::from(buf))
    }

    /// Fills every block still missing and makes the file durable: after
    /// this the staging file is the whole new content. Write-behind first
    /// gets the chance to send the rest (see [`WriteBehind::settle`]);
    /// where its session then holds most of the file, only what it lacks is
    /// made durable locally, as a copy beside the file, described by what
    /// this returns (see [`tail_copy`](super::tail_copy)).
    pub async fn complete(&self, remote: &dyn RemoteBlocks) -> FsResult<Option<TailCopy>> {
        self.fill_all(remote).await?;
        let size = self.size();
        if let Some(wb) = &self.write_behind {
            wb.settle(size).await;
        }
        let held = self.write_behind.as_ref().and_then(|wb| wb.hold(size));
        // The copy takes staging space of its own (up to half the file, see
        // `WriteBehind::hold`); without room for it, the file is synced whole.
        let room = held
            .as_ref()
            .and_then(|held| self.space.try_reserve(tail_copy::copied_bytes(size, held)));
        let (held, tail_charge) = match room {
            Some(charge) => (held, charge),
            None => (None, self.space.empty()),
        };
        tracing::debug!(path = %self.path(), size, on_server = ?held.as_ref().map(|h| &h.bytes),
            "making a closed file durable");
        let (file, local) = (self.file.clone(), self.local.clone());
        let copy = blocking(move || {
            if let Some(held) = held {
                match tail_copy::write(&file, &local, size, held) {
                    Ok(Some(copy)) => return Ok(Some(copy)),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "copying a closed file's tail failed; syncing all of it");
                        discard(&tail_copy::path_for(&local));
                    }
                }
            }
            file.sync_all()?;
            Ok(None)
        })
        .await?;
        // The last copy made is the one on disk; one not made takes nothing.
        *self.tail_charge.lock().unwrap() = match copy {
            Some(_) => tail_charge,
            None => self.space.empty(),
        };
        Ok(copy)
    }

    /// Fills every block still missing: after this the staging file holds
    /// the whole new content, though perhaps only in the page cache.
    pub async fn fill_all(&self, remote: &dyn RemoteBlocks) -> FsResult<()> {
        let remote_size = self.state.lock().unwrap().remote_size;
        for block in 0..remote_size.div_ceil(BLOCK_SIZE) {
            self.fill(remote, block).await?;
        }
        let (file, mtime) = (self.file.clone(), self.state.lock().unwrap().mtime);
        blocking(move || file.set_modified(mtime)).await
    }

    pub fn path(&self) -> RemotePath {
        self.state.lock().unwrap().path.clone()
    }

    /// Hands the space this file takes to its upload, which frees it once
    /// the server has the file.
    pub fn charge_for_upload(&self) -> Charge {
        let mut charge = self.charge.lock().unwrap().take();
        charge.merge(self.tail_charge.lock().unwrap().take());
        charge.into_draining()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(wb) = &self.write_behind {
            wb.cancel();
        }
        // A blocking write may hold the state a moment longer.
        let handover = self.state.lock().unwrap().upload_session.take();
        if let (Some(handover), Some(wb)) = (handover, &self.write_behind) {
            // Handed over, but no upload took it (the file was discarded).
            wb.abort(handover.session);
        }
    }
}

/// Writes `data` at `offset` of the staging `file` and records it as
/// content; how many bytes were not content before. While it writes, the
/// range is marked as storing, so that a fill that runs meanwhile does not
/// put the remote's bytes over it.
fn write_content(
    file: &File,
    state: &Mutex<StagedState>,
    offset: u64,
    data: &[u8],
) -> std::io::Result<u64> {
    let range = (offset, offset + data.len() as u64);
    state.lock().unwrap().storing.push(range);
    let written = file.write_all_at(data, offset);
    let mut state = state.lock().unwrap();
    let at = state
        .storing
        .iter()
        .position(|r| *r == range)
        .expect("marked above");
    state.storing.swap_remove(at);
    written?;
    Ok(state.content.insert(range.0, range.1))
}

/// Copies the remote bytes `data` of the block at `start` into the parts
/// of it the staging file holds no content for and no write is storing;
/// how many bytes that was. Under the state's lock, so that a write that
/// starts later lands after it, and within the remote region only (a
/// truncate may have cut it).
fn fill_gaps(
    file: &File,
    state: &Mutex<StagedState>,
    start: u64,
    data: &[u8],
) -> std::io::Result<u64> {
    let mut state = state.lock().unwrap();
    let end = (start + data.len() as u64).min(state.remote_size);
    let mut added = 0;
    for (from, to) in state.content.gaps(start, end, &state.storing) {
        file.write_all_at(&data[(from - start) as usize..(to - start) as usize], from)?;
        added += state.content.insert(from, to);
    }
    Ok(added)
}

/// Removes a staging file (and a copy of its tail), ignoring one already
/// gone.
pub fn discard(local: &Path) {
    let _ = std::fs::remove_file(local);
    let _ = std::fs::remove_file(tail_copy::path_for(local));
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::protocol::EntryKind;

    const MIB: usize = 1 << 20;

    /// A remote version of `blocks` blocks, each byte its block's number.
    struct Remote {
        blocks: u64,
        fetched: AtomicUsize,
    }

    impl RemoteBlocks for Remote {
        fn fetch(
            &self,
            _meta: &FileMeta,
            block: u64,
        ) -> futures::future::BoxFuture<'_, Result<Bytes, FetchError>> {
            self.fetched.fetch_add(1, Ordering::SeqCst);
            assert!(block < self.blocks);
            Box::pin(async move { Ok(Bytes::from(vec![block as u8; MIB])) })
        }
    }

    fn staged(dir: &tempfile::TempDir, blocks: u64, limit: Option<u64>) -> (Staged, Remote) {
        let path = RemotePath::parse("f.bin").unwrap();
        let base = (blocks > 0).then(|| FileMeta {
            path: path.clone(),
            kind: EntryKind::File,
            size: blocks * BLOCK_SIZE,
            mtime: None,
            etag: Some("v1".into()),
        });
        let space = StagingSpace::new(dir.path().to_path_buf(), limit);
        let staged = Staged::create(dir.path().join("staged"), path, base, false, &space).unwrap();
        let remote = Remote {
            blocks,
            fetched: AtomicUsize::new(0),
        };
        (staged, remote)
    }

    #[tokio::test]
    async fn a_write_needing_nothing_is_done_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (staged, remote) = staged(&dir, 0, None);
        assert_eq!(staged.write_now(0, &[7; MIB]), Some(Ok(MIB as u32)));
        assert_eq!(staged.write_now(MIB as u64, &[8; 10]), Some(Ok(10)));
        assert_eq!(staged.size(), MIB as u64 + 10);
        assert!(staged.state.lock().unwrap().dirty);
        let back = staged.read(&remote, MIB as u64 - 2, 12).await.unwrap();
        assert_eq!(&back[..], &[7, 7, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]);
        assert_eq!(staged.charge.lock().unwrap().bytes(), MIB as u64 + 10);
    }

    #[tokio::test]
    async fn a_partial_block_of_the_remote_version_waits_for_its_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let (staged, remote) = staged(&dir, 2, None);
        // Part of block 1: its remote bytes must come first.
        assert_eq!(staged.write_now(MIB as u64 + 5, b"abc"), None);
        assert_eq!(staged.size(), 2 * BLOCK_SIZE, "nothing written");
        // A whole block needs nothing from the remote.
        assert_eq!(staged.write_now(0, &[9; MIB]), Some(Ok(MIB as u32)));
        assert_eq!(remote.fetched.load(Ordering::SeqCst), 0);
        // The slow path fetches block 1; after it, that block takes writes
        // at once.
        let data = Bytes::from_static(b"abc");
        assert_eq!(staged.write(&remote, MIB as u64 + 5, data).await, Ok(3));
        assert_eq!(remote.fetched.load(Ordering::SeqCst), 1);
        assert_eq!(staged.write_now(MIB as u64 + 100, b"z"), Some(Ok(1)));
        let back = staged.read(&remote, MIB as u64 + 3, 98).await.unwrap();
        let mut want = [1u8; 98];
        want[2..5].copy_from_slice(b"abc");
        want[97] = b'z';
        assert_eq!(&back[..], &want[..]);
        assert_eq!(&staged.read(&remote, 0, 2).await.unwrap()[..], &[9, 9]);
    }

    /// A remote version whose fetches each wait for a permit, in the order
    /// they were asked.
    struct GatedRemote {
        inner: Remote,
        permits: tokio::sync::Semaphore,
    }

    impl RemoteBlocks for GatedRemote {
        fn fetch(
            &self,
            meta: &FileMeta,
            block: u64,
        ) -> futures::future::BoxFuture<'_, Result<Bytes, FetchError>> {
            let fetched = self.inner.fetch(meta, block);
            Box::pin(async move {
                self.permits.acquire().await.unwrap().forget();
                fetched.await
            })
        }
    }

    async fn until(check: impl Fn() -> bool) {
        while !check() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Writes into one block of the remote version at once (the pages of
    /// an msync of a shared mapping, say): a fill that lands after another
    /// write's data never puts the remote's bytes over it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_fill_never_overwrites_what_a_write_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (staged, inner) = staged(&dir, 2, None);
        let staged = Arc::new(staged);
        let remote = Arc::new(GatedRemote {
            inner,
            permits: tokio::sync::Semaphore::new(0),
        });
        let fetches = || remote.inner.fetched.load(Ordering::SeqCst);
        let write = |offset: u64, data: &'static [u8]| {
            let (staged, remote) = (staged.clone(), remote.clone());
            tokio::spawn(async move {
                staged
                    .write(&*remote, offset, Bytes::from_static(data))
                    .await
            })
        };
        // Two writes in block 0, each waiting for its fill.
        let hello = write(100, b"HELLO");
        until(|| fetches() == 1).await;
        let world = write(9995, b"WORLD");
        until(|| fetches() == 2).await;
        // A write of all of block 1 needs no fill, and lands while one waits.
        let partial = write(MIB as u64 + 5, b"abc");
        until(|| fetches() == 3).await;
        assert_eq!(
            staged.write_now(MIB as u64, &[9; MIB]),
            Some(Ok(MIB as u32))
        );
        for pending in [hello, world, partial] {
            remote.permits.add_permits(1);
            assert!(pending.await.unwrap().is_ok());
        }
        let back = staged.read(&*remote, 0, 2 * MIB as u32).await.unwrap();
        let mut want = vec![0u8; MIB];
        want[100..105].copy_from_slice(b"HELLO");
        want[9995..10000].copy_from_slice(b"WORLD");
        want.extend_from_slice(&[9; MIB]);
        want[MIB + 5..MIB + 8].copy_from_slice(b"abc");
        let wrong = back.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(wrong, 0, "bytes differ from the writes");
        assert_eq!(staged.charge.lock().unwrap().bytes(), 2 * MIB as u64);
    }

    #[tokio::test]
    async fn a_write_that_would_wait_for_space_or_the_gate_is_declined() {
        let dir = tempfile::tempdir().unwrap();
        let (staged, remote) = staged(&dir, 0, Some(MIB as u64));
        assert_eq!(staged.write_now(0, &[1; MIB + 1]), None);
        assert_eq!(staged.size(), 0);
        assert_eq!(staged.space.used(), 0, "declined: nothing charged");
        // The slow path tells why: nothing can drain, so no space.
        let data = Bytes::from(vec![1; MIB + 1]);
        assert_eq!(staged.write(&remote, 0, data).await, Err(errno::ENOSPC));
        // A close or fsync holding the file: writes wait for it.
        let closing = staged.gate.write().await;
        assert_eq!(staged.write_now(0, b"x"), None);
        drop(closing);
        assert_eq!(staged.write_now(0, b"x"), Some(Ok(1)));
    }

    #[test]
    fn write_back_leaves_out_what_the_server_holds() {
        let mib = 1 << 20;
        assert_eq!(write_back_ranges(64 * mib, None), vec![0..64 * mib]);
        let held = Some(8 * mib..40 * mib);
        assert_eq!(
            write_back_ranges(64 * mib, held.clone()),
            vec![0..8 * mib, 40 * mib..64 * mib]
        );
        assert_eq!(write_back_ranges(32 * mib, held.clone()), vec![0..8 * mib]);
        assert_eq!(write_back_ranges(40 * mib, held), vec![0..8 * mib]);
        assert_eq!(
            write_back_ranges(4 * mib, Some(8 * mib..16 * mib)),
            vec![0..4 * mib]
        );
    }

    #[test]
    fn early_sync_writes_back_only_bytes_a_second_old() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut marks = WrittenMarks::default();
        let mib = MIB as u64;
        // 256 MiB written in about half a second, marked every 64 MiB (at
        // 126, 254, 382 and 510 ms): nothing is a second old yet.
        for i in 0..256 {
            assert_eq!(marks.wrote(i * mib, (i + 1) * mib, at(i * 2)), None);
        }
        // A second after the first mark, bytes up to it are due, but not
        // the later ones.
        assert_eq!(marks.wrote(256 * mib, 257 * mib, at(1000)), None);
        assert_eq!(marks.wrote(257 * mib, 258 * mib, at(1127)), Some(64 * mib));
        assert_eq!(marks.wrote(258 * mib, 259 * mib, at(1130)), None);
        // Much later, everything marked so far at once: the newest mark.
        assert_eq!(marks.wrote(259 * mib, 260 * mib, at(5000)), Some(256 * mib));
        // A rewrite far below the end marks the end, not its own range.
        let mut rewrites = WrittenMarks::default();
        rewrites.wrote(0, 512 * mib, at(0));
        rewrites.wrote(0, 64 * mib, at(10));
        assert_eq!(rewrites.wrote(0, 1, at(2000)), Some(512 * mib));
    }
}
