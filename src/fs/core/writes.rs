//! The write path of [`MountCore`]: create, open for writing, write,
//! truncate, fsync, flush and the last close, over [`Staged`] files and the
//! [`UploadQueue`].

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use bytes::Bytes;

use super::{FsResult, MountCore, errno};
use crate::fs::pending::{JournalEntry, UploadQueue};
use crate::fs::staging::{Staged, discard};
use crate::fs::staging_space::Charge;
use crate::protocol::{EntryKind, FileMeta, RemotePath};

/// A staged file found open before a rename or unlink of it, its naming
/// lock held (see [`Staged::naming`]).
pub(super) struct OpenStaged {
    pub staged: Arc<Staged>,
    _naming: tokio::sync::OwnedMutexGuard<()>,
}

/// Metadata of a staged file as the mount shows it.
pub(super) fn staged_meta_of(staged: &Staged) -> FileMeta {
    let etag = staged.server_etag();
    let state = staged.state.lock().unwrap();
    FileMeta {
        path: state.path.clone(),
        kind: EntryKind::File,
        size: state.size,
        mtime: Some(state.mtime.into()),
        etag,
    }
}

impl MountCore {
    /// Enables writing: opens the journal and resumes uploads an earlier
    /// mount left unfinished. Returns how many it resumed.
    pub fn start_writes(self: &Arc<Self>) -> std::io::Result<usize> {
        let Some(dir) = self.options.state_dir.clone() else {
            return Ok(0);
        };
        let weak: Weak<MountCore> = Arc::downgrade(self);
        let queue = UploadQueue::open(
            self.client.clone(),
            &dir,
            self.options.max_staging,
            Box::new(move |path, committed| {
                if let Some(core) = weak.upgrade() {
                    core.settled(path, committed);
                }
            }),
        )?;
        let resumed = queue.recover();
        let _ = self.uploads.set(queue);
        Ok(resumed)
    }

    fn queue(&self) -> FsResult<&Arc<UploadQueue>> {
        if self.options.read_only {
            return Err(errno::EROFS);
        }
        self.uploads.get().ok_or(errno::ENOTSUP)
    }

    /// Why file contents cannot be written here, if they cannot.
    pub fn write_refusal(&self) -> Option<i32> {
        self.queue().err()
    }

    pub(super) fn staged_for(&self, path: &RemotePath) -> Option<Arc<Staged>> {
        self.staged.lock().unwrap().get(path).cloned()
    }

    /// True while this mount is writing or uploading `path`.
    pub fn writes_in_flight(&self, path: &RemotePath) -> bool {
        self.staged_for(path).is_some()
    }

    /// The file at `path` as this mount writes it: being written, or
    /// closed and not yet committed (also by an upload an earlier mount
    /// left, which has no staged file here).
    pub(super) fn staged_meta(&self, path: &RemotePath) -> Option<FileMeta> {
        match self.staged_for(path) {
            Some(staged) => Some(staged_meta_of(&staged)),
            None => self.queue().ok()?.pending_file(path),
        }
    }

    /// Before a namespace change of `path`: lets a pending upload to it
    /// land first (a closed file's, or an `fsync`'s of a file still open,
    /// so that the change applies to what it commits). Returns the staged
    /// file if it is still open, held so that its last close waits until
    /// the change is done and then uploads under the name it leaves.
    pub(super) async fn quiesce(&self, path: &RemotePath) -> Option<OpenStaged> {
        loop {
            let Some(staged) = self.staged_for(path) else {
                // An upload an earlier mount left has no staged file.
                if let Ok(queue) = self.queue() {
                    queue.wait(path).await;
                }
                return None;
            };
            let naming = staged.naming.clone().lock_owned().await;
            if staged.path() != *path {
                // Renamed while this waited: whatever has the name now.
                continue;
            }
            // A last close that came first has announced its upload.
            if let Ok(queue) = self.queue() {
                queue.wait(path).await;
            }
            let open = staged.state.lock().unwrap().open_handles > 0;
            return open.then_some(OpenStaged {
                staged,
                _naming: naming,
            });
        }
    }

    /// Paths beneath `dir` that this mount is writing or uploading.
    fn writes_beneath_paths(&self, dir: &RemotePath) -> Vec<RemotePath> {
        let mut paths: Vec<RemotePath> = self
            .staged
            .lock()
            .unwrap()
            .keys()
            .filter(|p| p.is_beneath(dir))
            .cloned()
            .collect();
        if let Ok(queue) = self.queue() {
            // Uploads an earlier mount left have no staged file here.
            paths.extend(queue.pending_beneath(dir));
        }
        paths
    }

    /// The entries of `dir` that this mount's writes make, by name: each
    /// file it is writing or uploading there, and each directory holding
    /// such a file further down. The server may not list them yet.
    pub(super) fn entries_written_in(&self, dir: &RemotePath) -> BTreeMap<String, EntryKind> {
        let mut entries = BTreeMap::new();
        for path in self.writes_beneath_paths(dir) {
            match path.strip_prefix(dir).and_then(|rest| rest.split_once('/')) {
                Some((child, _)) => {
                    entries.entry(child.to_owned()).or_insert(EntryKind::Dir);
                }
                None => {
                    if let Some(name) = path.name() {
                        entries.insert(name.to_owned(), EntryKind::File);
                    }
                }
            }
        }
        entries
    }

    /// True while this mount is writing or uploading a file beneath `dir`.
    pub(super) fn writes_beneath(&self, dir: &RemotePath) -> bool {
        !self.writes_beneath_paths(dir).is_empty()
    }

    /// Before a directory `dir` moves: lets every pending upload beneath it
    /// land (each commits under the old name, which the move then takes
    /// along), and returns the files beneath it still open, each held as
    /// [`quiesce`](Self::quiesce) holds one, to move with it.
    pub(super) async fn quiesce_beneath(&self, dir: &RemotePath) -> Vec<OpenStaged> {
        let mut paths = self.writes_beneath_paths(dir);
        // One order for every caller, so that two moves never wait on
        // each other's files.
        paths.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        paths.dedup();
        let mut open = Vec::new();
        for path in paths {
            if let Ok(queue) = self.queue() {
                queue.wait(&path).await;
            }
            open.extend(self.quiesce(&path).await);
        }
        open
    }

    /// Moves an open staged file to a new name. A close that journaled it
    /// already had its record name the old path: the record is written
    /// again, so that a crash before the last close uploads it under the
    /// new name.
    pub(super) async fn restage(&self, open: &OpenStaged, to: &RemotePath) {
        let staged = &open.staged;
        let rejournal = {
            let mut map = self.staged.lock().unwrap();
            let mut state = staged.state.lock().unwrap();
            map.remove(&state.path);
            map.insert(to.clone(), staged.clone());
            state.path = to.clone();
            state.renamed = true;
            std::mem::take(&mut state.journaled) && state.dirty
        };
        if rejournal && let Ok(queue) = self.queue() {
            // On failure the last close journals it again, and says so.
            if let Err(errno) = self.journal(queue, staged, false).await {
                tracing::warn!(path = %to, errno,
                    "the journal record of a renamed file could not be rewritten; until its last close, a crash would upload it under its old name");
            }
        }
    }

    /// An open staged file was removed (or replaced by a rename): nothing of
    /// it is uploaded (write-behind stops sending it too), and the name
    /// shows the server's entry again. A record a close of one of its
    /// descriptors left goes now, not at the last close: a crash before
    /// that must not bring the file back.
    pub(super) fn drop_unlinked(&self, open: OpenStaged) {
        let staged = &open.staged;
        {
            let mut map = self.staged.lock().unwrap();
            let mut state = staged.state.lock().unwrap();
            state.unlinked = true;
            if map.get(&state.path).is_some_and(|s| Arc::ptr_eq(s, staged)) {
                map.remove(&state.path);
            }
        }
        if let Ok(queue) = self.queue() {
            drop_record(queue, staged);
        }
        staged.stop_write_behind();
    }

    /// An upload to `path` finished: the server now has the file, at the
    /// version `committed` when the upload committed it there.
    fn settled(&self, path: &RemotePath, committed: Option<&FileMeta>) {
        let mut staged = self.staged.lock().unwrap();
        if let Some(s) = staged.get(path) {
            if let Some(meta) = committed {
                s.committed(meta.etag.clone());
            }
            let state = s.state.lock().unwrap();
            if state.open_handles == 0 && !state.dirty {
                drop(state);
                staged.remove(path);
            }
        }
        drop(staged);
        self.inodes.invalidate(path);
    }

    /// Forgets a staged file whose changes cannot be uploaded: the mount
    /// shows the server's version again.
    fn unstage(&self, staged: &Arc<Staged>) {
        let path = staged.path();
        let mut map = self.staged.lock().unwrap();
        if map.get(&path).is_some_and(|s| Arc::ptr_eq(s, staged)) {
            map.remove(&path);
        }
        drop(map);
        discard(&staged.local);
        if let Some(ino) = self.inodes.known(&path) {
            // Pages the kernel cached hold the dropped writes.
            self.forget_page_cache(ino);
        }
        self.inodes.invalidate(&path);
    }

    /// Creates (or truncates) `name` in `parent` and opens it for writing.
    pub async fn create(&self, parent: u64, name: &str) -> FsResult<(u64, FileMeta, u64)> {
        let queue = self.queue()?.clone();
        let path = self.new_child(parent, name)?;
        let (_, dir) = self.stat(&self.path(parent)?).await?;
        if dir.kind != EntryKind::Dir {
            return Err(20); // ENOTDIR
        }
        queue.wait(&path).await;
        let staged = Staged::create(
            queue.new_staging_path(),
            path.clone(),
            None,
            true,
            queue.space(),
        )?;
        let staged = Arc::new(self.writing_behind(staged));
        // Counted open before anyone can find it: a file in the map with no
        // writer open is one that is closed.
        {
            let mut state = staged.state.lock().unwrap();
            state.open_handles += 1;
            state.writers += 1;
        }
        self.staged
            .lock()
            .unwrap()
            .insert(path.clone(), staged.clone());
        let meta = staged_meta_of(&staged);
        let ino = self.inodes.ino(&path);
        Ok((ino, meta.clone(), self.add_handle(ino, meta, staged, true)))
    }

    pub(super) async fn open_for_write(
        &self,
        ino: u64,
        truncate: bool,
    ) -> FsResult<(u64, super::CacheMode)> {
        let staged = self.stage(ino, truncate).await?;
        if truncate && let Err(e) = staged.truncate(self, 0).await {
            self.release_staged(staged, true).await?;
            return Err(e);
        }
        Ok((
            self.add_handle(ino, staged_meta_of(&staged), staged, true),
            super::CacheMode::Drop,
        ))
    }

    /// The staged file of `ino`, staging it from its remote version if
    /// needed, with one more writer counted open on it. Two opens of a file
    /// at once get the same staged file, so neither's writes are lost. One
    /// whose writers have all closed (uploading, or followed only by
    /// readers) is not written again: its upload lands first, and a new
    /// staged file starts from what it committed.
    async fn stage(&self, ino: u64, truncate: bool) -> FsResult<Arc<Staged>> {
        let queue = self.queue()?.clone();
        let path = self.path(ino)?;
        let mut replaced = None;
        loop {
            if let Some(staged) = self.staged_for(&path) {
                let opened = {
                    let mut state = staged.state.lock().unwrap();
                    let open = state.writers > 0;
                    state.open_handles += u32::from(open);
                    state.writers += u32::from(open);
                    open
                };
                if opened {
                    return Ok(staged);
                }
                // Closed by its writers and uploading: let that version
                // land first.
                queue.wait(&path).await;
                let mut map = self.staged.lock().unwrap();
                if map.get(&path).is_some_and(|s| Arc::ptr_eq(s, &staged)) {
                    map.remove(&path);
                    drop(map);
                    // Gone with its upload, unless that never started (the
                    // last close failed): the remote version is the truth
                    // now. Handles still reading it keep its staging file
                    // open, and move on to the new one if it starts from
                    // the same content (see `follow_writes`).
                    drop_unuploaded(&queue, &staged);
                    replaced = Some(staged);
                }
                continue;
            }
            let base = self.client.stat(&path).await.map_err(|e| e.errno())?;
            if base.kind == EntryKind::Dir {
                return Err(21); // EISDIR
            }
            let mut map = self.staged.lock().unwrap();
            if map.contains_key(&path) {
                // Another open staged it while this one asked the server.
                continue;
            }
            let staged = Staged::create(
                queue.new_staging_path(),
                path.clone(),
                Some(base),
                truncate,
                queue.space(),
            )?;
            // Content from the remote version takes no write-behind.
            let staged = Arc::new(match truncate {
                true => self.writing_behind(staged),
                false => staged,
            });
            {
                let mut state = staged.state.lock().unwrap();
                state.open_handles += 1;
                state.writers += 1;
            }
            map.insert(path, staged.clone());
            drop(map);
            self.follow_writes(ino, &staged, replaced.as_ref());
            return Ok(staged);
        }
    }

    /// `staged`, sending its chunks while it is written unless the mount
    /// was asked not to.
    fn writing_behind(&self, staged: Staged) -> Staged {
        match self.options.write_behind {
            true => staged.with_write_behind(self.client.clone(), self.options.server_pace),
            false => staged,
        }
    }

    pub async fn write(&self, fh: u64, offset: u64, data: Bytes) -> FsResult<u32> {
        let handle = self.handle(fh)?;
        let staged = handle
            .staged()
            .filter(|_| handle.writes)
            .ok_or(errno::EBADF)?;
        staged.write(self, offset, data).await
    }

    /// Where an `O_APPEND` write that the kernel placed at `offset`, through
    /// a handle it keeps no page cache for, goes: at the end of the file as
    /// this mount has it, as on a local disk. The kernel placed it at the
    /// size it last heard, which may be another version's: a handle of a
    /// version replaced on the server answers its own when it reads at its
    /// end (see `getattr_for`), until this mount writes the file.
    pub fn append_offset(&self, fh: u64, offset: u64) -> u64 {
        match self.handle(fh).ok().and_then(|h| h.staged()) {
            Some(staged) => staged.size(),
            None => offset,
        }
    }

    /// [`write`](Self::write) on the calling thread, if it needs no waiting
    /// (see [`Staged::write_now`]); `None`: call `write`.
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<FsResult<u32>> {
        let staged = match self.handle(fh) {
            Ok(handle) => handle.staged().filter(|_| handle.writes),
            Err(e) => return Some(Err(e)),
        };
        match staged {
            Some(staged) => staged.write_now(offset, data),
            None => Some(Err(errno::EBADF)),
        }
    }

    /// `truncate(2)`/`ftruncate(2)`: through the open staged file, or staging
    /// the file just for this change (uploaded at once). With `fh`, a
    /// descriptor's own: the file may have no name left to find it by
    /// (removed while open).
    pub async fn set_size(&self, ino: u64, fh: Option<u64>, size: u64) -> FsResult<FileMeta> {
        let open = fh
            .and_then(|fh| self.handle(fh).ok())
            .filter(|handle| handle.ino == ino && handle.writes)
            .and_then(|handle| handle.staged());
        if let Some(staged) = open {
            staged.truncate(self, size).await?;
            return Ok(staged_meta_of(&staged));
        }
        let staged = self.stage(ino, false).await?;
        let result = staged.truncate(self, size).await;
        let meta = staged_meta_of(&staged);
        self.release_staged(staged, true).await?;
        result.map(|()| meta)
    }

    /// Waits until the file's current content is committed on the server.
    /// A file unlinked (or renamed over) while open has no name to commit
    /// under: it stays in its staging file until the last close drops it,
    /// as a local disk keeps an unlinked file only for its descriptors.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let handle = self.handle(fh)?;
        let Some(staged) = handle.staged() else {
            return Ok(());
        };
        let queue = self.queue()?.clone();
        // Held until the upload is announced, as the last close holds it:
        // an unlink or rename either comes first (and is seen here) or
        // waits for the upload and applies to what it commits.
        let naming = staged.naming.lock().await;
        if staged.state.lock().unwrap().unlinked {
            return Ok(());
        }
        let _exclusive = staged.gate.write().await;
        if !staged.state.lock().unwrap().dirty {
            let path = staged.path();
            drop(naming);
            return queue.wait_unless_refused(&path).await;
        }
        // Not synced locally: what fsync waits for is the commit on the
        // server, so syncing here too would write the file to the local disk
        // for nothing. Its record says so (`JournalEntry::unsynced`), and a
        // close of the file syncs it.
        staged.fill_all(self).await?;
        // Writes wait for the commit (the gate is held), so the upload reads
        // the staging file itself, through a second name the upload removes.
        let (local, link) = (staged.local.clone(), queue.new_staging_path());
        let entry = staged
            .journal_entry(link.clone())
            .continuing(staged.take_upload_session());
        let entry = tokio::task::spawn_blocking(move || {
            std::fs::hard_link(local, link)?;
            entry.unsynced()
        })
        .await
        .map_err(|_| errno::EIO)?
        .map_err(|e| errno::of_io(&e))?;
        let path = entry.path.clone();
        let commits = staged.commits();
        // The open file keeps the space charged.
        queue
            .enqueue(path.clone(), entry, Charge::none())
            .map_err(|e| errno::of_io(&e))?;
        // Clean only once the upload is recorded: a close before this
        // journals the file itself (after waiting for this fsync), one after
        // makes the upload's file durable.
        staged.state.lock().unwrap().dirty = false;
        drop(naming);
        queue.wait_unless_refused(&path).await?;
        if staged.commits() > commits {
            // A record an earlier close of the file left (with `> file`, a
            // shell's) is of no use now. Kept, a crash of the machine would
            // have it upload the staging file, written but not synced since,
            // over this version.
            drop_record(&queue, &staged);
        }
        Ok(())
    }

    /// `close(2)` of a descriptor. At the close of the file's last writer
    /// (descriptors only reading it may stay open), its content is
    /// completed and journaled here, so that what can fail (no space for the
    /// blocks still to fetch, the server unreachable for them, a full disk
    /// for the record) is what `close` returns, and a crash after it
    /// uploads the file.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let handle = self.handle(fh)?;
        let Some(staged) = handle.staged().filter(|_| handle.writes) else {
            // A reader's close: the writers' closes journal what they wrote.
            return Ok(());
        };
        let queue = self.queue()?.clone();
        {
            let state = staged.state.lock().unwrap();
            if state.writers > 1 || state.unlinked || (state.dirty && state.journaled) {
                return Ok(());
            }
        }
        if !staged.state.lock().unwrap().dirty {
            // An upload that fsync started may still be running, its file
            // unsynced: closed, the file must outlive a crash of the machine.
            return queue
                .make_durable(&staged.path())
                .await
                .map_err(|e| errno::of_io(&e));
        }
        // Perhaps not the last close (a descriptor dup'ed before): the
        // record names write-behind's session without ending it.
        self.journal(&queue, &staged, false).await.map(drop)
    }

    /// Makes the staging file the whole new content, durable locally, and
    /// records its upload in the journal. `last_close`: write-behind ends
    /// here, handing its session to the upload.
    async fn journal(
        &self,
        queue: &UploadQueue,
        staged: &Staged,
        last_close: bool,
    ) -> FsResult<JournalEntry> {
        let _exclusive = staged.gate.write().await;
        // Journaled already (by the last descriptor's flush, perhaps while
        // this waited for the gate): nothing was written since, as a write
        // clears the mark, so the record stands.
        let journaled = staged.state.lock().unwrap().journaled;
        if !journaled {
            let tail_copy = staged.complete(self).await?;
            staged.state.lock().unwrap().tail_copy = tail_copy;
        }
        let session = match last_close {
            true => staged.upload_session(),
            false => staged.current_upload_session(),
        };
        let tail_copy = staged.state.lock().unwrap().tail_copy.clone();
        let entry = staged
            .journal_entry(staged.local.clone())
            .continuing(session)
            .with_tail_copy(tail_copy);
        if journaled {
            return Ok(entry);
        }
        let entry = queue.journal(entry).map_err(|e| errno::of_io(&e))?;
        // The record this one replaced may have counted on a session given
        // up since; none does now.
        staged.release_retired_session();
        let mut state = staged.state.lock().unwrap();
        if state.unlinked {
            // Removed while this wrote it: it goes too (see `drop_unlinked`).
            drop(state);
            drop_record(queue, staged);
            return Ok(entry);
        }
        // Renamed meanwhile: the record must be written again, with the
        // new name.
        if state.path == entry.path {
            state.journaled = true;
        }
        Ok(entry)
    }

    /// A handle on `staged` closed; `writes`: one that could write it. The
    /// close of its last writer starts the upload of what was written, even
    /// while handles only reading it stay open: they read on in its staging
    /// file, which the upload leaves to them (see `follow_writes` for where
    /// they go once the file is written again).
    pub(super) async fn release_staged(&self, staged: Arc<Staged>, writes: bool) -> FsResult<()> {
        let queue = self.queue()?.clone();
        // Not while a rename or unlink of the file is under way: the upload
        // goes to the name it leaves, or nowhere.
        let naming = staged.naming.lock().await;
        let path = staged.path();
        // Announced before the last writer goes, so that anyone who then
        // finds the file closed also finds its upload on the way.
        let (last, last_writer, reservation) = {
            let mut state = staged.state.lock().unwrap();
            let last = state.open_handles <= 1;
            let last_writer = writes && state.writers <= 1;
            let reservation =
                (last_writer && state.dirty && !state.unlinked).then(|| queue.reserve(&path));
            state.open_handles = state.open_handles.saturating_sub(1);
            if writes {
                state.writers = state.writers.saturating_sub(1);
            }
            (last, last_writer, reservation)
        };
        drop(naming);
        if !last && !last_writer {
            return Ok(());
        }
        let (dirty, unlinked) = {
            let state = staged.state.lock().unwrap();
            (state.dirty, state.unlinked)
        };
        if unlinked {
            // Discarded once no handle reads it any more.
            if last {
                drop_unuploaded(&queue, &staged);
            }
            return Ok(());
        }
        if !dirty || !last_writer {
            if last && !queue.is_pending(&path) {
                // An upload in progress owns the staging file until it
                // settles; another staged file may have the name by now.
                let mut map = self.staged.lock().unwrap();
                if map.get(&path).is_some_and(|s| Arc::ptr_eq(s, &staged)) {
                    map.remove(&path);
                }
                drop(map);
                drop_unuploaded(&queue, &staged);
            }
            return Ok(());
        }
        let reservation = reservation.expect("a dirty file's last writer reserves its upload");
        // Journaled at the flush of the last writer, unless written since.
        let entry = match self.journal(&queue, &staged, true).await {
            Ok(entry) => entry,
            Err(e) => {
                tracing::error!(%path, errno = e,
                    "the last close could not complete the file; its changes are dropped and the server's version stays");
                self.unstage(&staged);
                return Err(e);
            }
        };
        staged.state.lock().unwrap().dirty = false;
        // The upload owns the session now.
        staged.take_upload_session();
        reservation.start_journaled(entry, staged.charge_for_upload());
        Ok(())
    }
}

/// Drops the journal record of `staged`, and with it the copy of its tail
/// and a session only that record counted on.
fn drop_record(queue: &UploadQueue, staged: &Staged) {
    queue.unjournal(&staged.local);
    staged.record_dropped();
}

/// Drops the journal record and the staging file of `staged`, whose
/// content is not to be uploaded (or was, by an upload that settled).
fn drop_unuploaded(queue: &UploadQueue, staged: &Staged) {
    drop_record(queue, staged);
    discard(&staged.local);
}
