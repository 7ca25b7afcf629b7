//! Write-behind: while an application is still writing a new file (or one
//! it truncated), the chunks it has written from the start are sent to an
//! open-ended upload session, so that the upload at `fsync` or the last
//! close finds most of the file on the server already and only declares
//! the size, sends the rest and commits.
//!
//! Only what cannot change the outcome is sent early:
//! - chunks whole below the front of the bytes written contiguously from
//!   the start, less one chunk of lag for writers that reorder a little;
//! - never chunk 0: formats that patch their header once the body is
//!   written (MP4, WAV, AVI) seek back there.
//!
//! A later write or truncate into a chunk already handed to the session
//! makes the session useless (the server never rewrites a chunk it
//! acknowledged): it is aborted, and the upload at close sends the whole
//! file as before. So write-behind can cost bandwidth, never correctness.
//!
//! The chunks sent are hashed in order as they are read (chunk 0 with
//! them, unsent), so the upload does not read them again for the SHA-256
//! it commits with; a later write into the hashed part only drops that
//! head start.

use std::collections::BTreeSet;
use std::fs::File;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::Notify;

use sha2::{Digest, Sha256};

use crate::client::Client;
use crate::client::digest::DigestPrefix;
use crate::client::upload::append_exact_at;
use crate::protocol::RemotePath;
use crate::protocol::upload::CreateUpload;

/// Chunk size of a write-behind session: large enough that a file of
/// gigabytes takes a few hundred chunk requests.
pub const CHUNK_SIZE: u64 = 8 << 20;
/// Chunk requests in flight at once per file.
const IN_FLIGHT: usize = 2;

/// The write-behind of one staged file.
pub struct WriteBehind {
    client: Client,
    file: Arc<File>,
    path: RemotePath,
    /// Commit only over this version (the one the file was opened from).
    if_match: Option<String>,
    state: Mutex<State>,
    wake: Notify,
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
struct State {
    /// Bytes written contiguously from the start of the file.
    contiguous: u64,
    /// Chunks `1..sealed` may be sent; a write into them ends write-behind.
    sealed: u64,
    /// The session, once created.
    session: Option<String>,
    /// Over: handed to the upload, abandoned, or never possible.
    over: bool,
    /// Over because the session went to the upload (in-flight chunks finish).
    handed_over: bool,
    /// Bytes from the start being hashed or hashed; a write below this
    /// breaks the hash.
    hashing_to: u64,
    hash_broken: bool,
    /// The hash of the bytes hashed so far.
    prefix: Option<DigestPrefix>,
    /// Chunks the server acknowledged.
    acked: Acked,
    /// A journal record counts on the acknowledged chunks (see
    /// [`WriteBehind::hold`]): the session is never aborted for a failure,
    /// only when the file is discarded.
    held: bool,
}

/// The chunks acknowledged by the server, as a run from chunk 1: with
/// [`IN_FLIGHT`] chunks on their way, they may be acknowledged out of
/// order.
#[derive(Default)]
struct Acked {
    /// Chunks `1..run_end` are acknowledged (0 or 1: none).
    run_end: u64,
    /// Acknowledged chunks past the run.
    beyond: BTreeSet<u64>,
}

impl Acked {
    fn ack(&mut self, index: u64) {
        self.beyond.insert(index);
        let mut end = self.run_end.max(1);
        while self.beyond.remove(&end) {
            end += 1;
        }
        self.run_end = end;
    }

    /// The bytes of the acknowledged run.
    fn bytes(&self) -> Option<Range<u64>> {
        (self.run_end > 1).then(|| CHUNK_SIZE..self.run_end * CHUNK_SIZE)
    }
}

/// What the server holds of a file in write-behind's session, for a close
/// that makes only the rest durable locally (see `fs::tail_copy`).
#[derive(Debug, Clone)]
pub struct HeldOnServer {
    pub session: String,
    /// The bytes of the acknowledged run.
    pub bytes: Range<u64>,
    /// The hash of the file's start.
    pub prefix: DigestPrefix,
}

/// What write-behind gives the upload of a file.
#[derive(Debug, Clone)]
pub struct Handover {
    pub session: String,
    /// The hash of the file's start, when no write changed it since.
    pub prefix: Option<DigestPrefix>,
}

impl WriteBehind {
    /// Write-behind for a staged file of `path` whose content is entirely
    /// local (new, or truncated at open), read from `file`.
    pub fn new(
        client: Client,
        file: Arc<File>,
        path: RemotePath,
        if_match: Option<String>,
    ) -> Option<Arc<WriteBehind>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(Arc::new(WriteBehind {
            client,
            file,
            path,
            if_match,
            state: Mutex::default(),
            wake: Notify::new(),
            runtime,
        }))
    }

    /// After `offset..end` was written to the staging file.
    pub fn wrote(self: &Arc<Self>, offset: u64, end: u64) {
        let mut state = self.state.lock().unwrap();
        if state.over {
            return;
        }
        if touches_sealed(&state, offset, end) {
            return self.abandon(state, "a write reached a chunk already sent");
        }
        if offset < state.hashing_to {
            state.hash_broken = true;
        }
        if offset <= state.contiguous {
            state.contiguous = state.contiguous.max(end);
        }
        let ready = state.contiguous.saturating_sub(CHUNK_SIZE) / CHUNK_SIZE;
        if ready <= state.sealed.max(1) {
            return;
        }
        // The first chunk to send: time to start sending.
        let first = state.sealed <= 1;
        state.sealed = ready;
        if first {
            let this = self.clone();
            self.runtime.spawn(async move { this.pump().await });
        }
        drop(state);
        self.wake.notify_one();
    }

    /// After the file was truncated to `size`.
    pub fn truncated(self: &Arc<Self>, size: u64) {
        let mut state = self.state.lock().unwrap();
        if state.over {
            return;
        }
        if state.sealed > 1 && size < state.sealed * CHUNK_SIZE {
            return self.abandon(state, "the file was truncated below a chunk already sent");
        }
        if size < state.hashing_to {
            state.hash_broken = true;
        }
        state.contiguous = state.contiguous.min(size);
    }

    /// Ends write-behind and gives its session to the upload of the file's
    /// current content (`None`: there is none to give; upload from scratch).
    /// Chunks on their way still arrive.
    pub fn hand_over(&self) -> Option<Handover> {
        let mut state = self.state.lock().unwrap();
        if state.over {
            return None;
        }
        state.over = true;
        state.handed_over = true;
        let session = state.session.take();
        let prefix = state.prefix.take().filter(|_| !state.hash_broken);
        drop(state);
        self.wake.notify_one();
        Some(Handover {
            session: session?,
            prefix,
        })
    }

    /// The session chunks are being sent to, for a journal record written
    /// while the file stays open (a `flush` that may not be the last close:
    /// a shell's `> file` closes its first descriptor after `dup2`).
    /// Write-behind goes on.
    pub fn current(&self) -> Option<Handover> {
        let state = self.state.lock().unwrap();
        let session = state.session.clone().filter(|_| !state.over)?;
        Some(Handover {
            session,
            prefix: None,
        })
    }

    /// The bytes of the file the server holds in write-behind's session,
    /// as long as that session is to be used: an `fsync` never needs them
    /// on the local disk.
    pub fn bytes_on_server(&self) -> Option<Range<u64>> {
        let state = self.state.lock().unwrap();
        if state.over && !state.handed_over {
            return None;
        }
        state.acked.bytes()
    }

    /// What the server holds of a file `size` long, if that is at least
    /// half of it and the hash of the file's start is intact; the session
    /// is kept for the journal record that counts on it from now on, even
    /// if write-behind ends in a failure. Called once the file's content is
    /// final (its writes wait).
    pub fn hold(&self, size: u64) -> Option<HeldOnServer> {
        let mut state = self.state.lock().unwrap();
        if state.over || state.hash_broken {
            return None;
        }
        let bytes = state.acked.bytes().filter(|b| b.end <= size)?;
        let prefix = state.prefix.clone().filter(|p| p.len <= size)?;
        if (bytes.end - bytes.start) * 2 < size {
            return None;
        }
        let session = state.session.clone()?;
        state.held = true;
        Some(HeldOnServer {
            session,
            bytes,
            prefix,
        })
    }

    /// Ends write-behind without an upload to give its session to (the
    /// file was discarded, and any record with it).
    pub fn cancel(self: &Arc<Self>) {
        let mut state = self.state.lock().unwrap();
        if !state.over {
            state.held = false;
            self.abandon(state, "the file was discarded");
        }
    }

    fn abandon(&self, mut state: std::sync::MutexGuard<'_, State>, why: &str) {
        state.over = true;
        let session = state.session.take();
        let held = state.held;
        drop(state);
        self.wake.notify_one();
        if let Some(id) = session {
            tracing::debug!(path = %self.path, session = id, why, "write-behind abandoned");
            if !held {
                self.abort(id);
            }
        }
    }

    /// Aborts session `id` in the background.
    pub fn abort(&self, id: String) {
        let client = self.client.clone();
        self.runtime.spawn(async move {
            if let Err(e) = client.abort_upload(&id).await {
                tracing::debug!(session = id, error = %e, "aborting a write-behind session failed; it expires");
            }
        });
    }

    /// Sends sealed chunks in order, [`IN_FLIGHT`] at a time, until
    /// write-behind is over.
    async fn pump(self: Arc<Self>) {
        let Some(id) = self.open_session().await else {
            return;
        };
        let mut next = 1u64;
        let mut hasher = Some(Sha256::new());
        let mut sending = FuturesUnordered::new();
        loop {
            let (sealed, over, handed_over) = {
                let state = self.state.lock().unwrap();
                (state.sealed, state.over, state.handed_over)
            };
            if over {
                if handed_over {
                    // The upload counts on what is acknowledged; let the
                    // chunks on their way land.
                    while sending.next().await.is_some() {}
                }
                return;
            }
            if next < sealed && sending.len() < IN_FLIGHT {
                let data = match self.read_chunk(next, &mut hasher).await {
                    Ok(data) => data,
                    Err(e) => {
                        let state = self.state.lock().unwrap();
                        if !state.over {
                            self.abandon(state, &format!("reading a chunk failed: {e}"));
                        }
                        continue;
                    }
                };
                let (index, put) = (next, self.client.put_chunk(&id, next, data));
                sending.push(async move { (index, put.await) });
                next += 1;
                continue;
            }
            tokio::select! {
                Some((index, sent)) = sending.next(), if !sending.is_empty() => {
                    let mut state = self.state.lock().unwrap();
                    match sent {
                        Ok(()) => state.acked.ack(index),
                        Err(e) if !state.over => {
                            self.abandon(state, &format!("sending a chunk failed: {e}"));
                        }
                        Err(_) => {}
                    }
                }
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Creates the open-ended session; `None` when write-behind is over
    /// (meanwhile, or because the server refused).
    async fn open_session(&self) -> Option<String> {
        let request = CreateUpload {
            path: self.path.clone(),
            size: None,
            chunk_size: Some(CHUNK_SIZE),
            sha256: None,
            sha256_at_complete: true,
            if_match: self.if_match.clone(),
            mtime: None,
        };
        let created = self.client.create_upload(&request).await;
        let mut state = self.state.lock().unwrap();
        match created {
            Ok(created) if state.over => {
                drop(state);
                self.abort(created.id);
                None
            }
            Ok(created) => {
                state.session = Some(created.id.clone());
                Some(created.id)
            }
            Err(e) => {
                tracing::debug!(path = %self.path, error = %e, "no write-behind session; the file uploads at close");
                state.over = true;
                None
            }
        }
    }

    /// Reads chunk `index` (the next to send) and, while the hash of the
    /// file's start is intact, hashes it (after chunk 0, first time round).
    /// `hasher` is `None` once the hash is given up.
    async fn read_chunk(
        &self,
        index: u64,
        hasher: &mut Option<Sha256>,
    ) -> crate::error::Result<Bytes> {
        let from = {
            let mut state = self.state.lock().unwrap();
            let hashed = state.prefix.as_ref().map_or(0, |p| p.len);
            // In order from the start, or not at all.
            if state.hash_broken || (hashed != index * CHUNK_SIZE && index != 1) {
                *hasher = None;
            }
            if hasher.is_some() {
                // Announced before the read: a write from now on below
                // this breaks the hash, one before is read.
                state.hashing_to = (index + 1) * CHUNK_SIZE;
            }
            if index == 1 && hasher.is_some() {
                0
            } else {
                index
            }
        };
        let (file, mut taken) = (self.file.clone(), hasher.take());
        let (data, taken) = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            for chunk in from..=index {
                buf.clear();
                append_exact_at(&file, &mut buf, chunk * CHUNK_SIZE, CHUNK_SIZE as usize)?;
                if let Some(hasher) = &mut taken {
                    hasher.update(&buf);
                }
            }
            Ok::<_, std::io::Error>((Bytes::from(buf), taken))
        })
        .await
        .map_err(|e| crate::error::Error::Storage(format!("read task failed: {e}")))?
        .map_err(crate::error::Error::io("reading the staging file"))?;
        *hasher = taken;
        if let Some(hasher) = hasher {
            let mut state = self.state.lock().unwrap();
            state.prefix = Some(DigestPrefix {
                hasher: hasher.clone(),
                len: (index + 1) * CHUNK_SIZE,
            });
        }
        Ok(data)
    }
}

/// Whether `offset..end` overlaps a chunk handed to the session.
fn touches_sealed(state: &State, offset: u64, end: u64) -> bool {
    state.sealed > 1 && offset < state.sealed * CHUNK_SIZE && end > CHUNK_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(sealed: u64) -> State {
        State {
            sealed,
            ..State::default()
        }
    }

    #[test]
    fn the_acknowledged_run_grows_only_without_gaps() {
        let mut acked = Acked::default();
        assert_eq!(acked.bytes(), None);
        acked.ack(2);
        assert_eq!(acked.bytes(), None, "chunk 1 is still on its way");
        acked.ack(1);
        assert_eq!(acked.bytes(), Some(CHUNK_SIZE..3 * CHUNK_SIZE));
        acked.ack(4);
        assert_eq!(acked.bytes(), Some(CHUNK_SIZE..3 * CHUNK_SIZE));
        acked.ack(3);
        assert_eq!(acked.bytes(), Some(CHUNK_SIZE..5 * CHUNK_SIZE));
        assert!(acked.beyond.is_empty());
    }

    #[test]
    fn only_writes_into_sent_chunks_count() {
        let cs = CHUNK_SIZE;
        // Nothing sealed yet: anything goes.
        assert!(!touches_sealed(&state(0), 0, 10 * cs));
        // Chunks 1 and 2 sealed.
        let s = state(3);
        assert!(!touches_sealed(&s, 0, cs), "chunk 0 is never sent early");
        assert!(!touches_sealed(&s, 3 * cs, 4 * cs));
        assert!(touches_sealed(&s, cs - 1, cs + 1));
        assert!(touches_sealed(&s, 3 * cs - 1, 3 * cs));
        assert!(!touches_sealed(&s, 40, 41));
    }
}
