//! Write-behind: while an application is still writing a new file (or one
//! it truncated), the chunks it has written from the start are sent to an
//! open-ended upload session, so that the upload at `fsync` or the last
//! close finds most of the file on the server already and only declares
//! the size, sends the rest and commits.
//!
//! Only what cannot change the outcome is sent early:
//! - chunks whole below the front of the bytes written contiguously from
//!   the start, less one chunk of lag for writers that reorder a little;
//! - never chunk 0 while the file is open: formats that patch their header
//!   once the body is written (MP4, WAV, AVI) seek back there.
//!
//! At a close the content is final: every whole chunk, chunk 0 first, goes
//! to the session, and the close waits for them while the server takes them
//! at least at its pace ([`WriteBehind::settle`]). What the server then
//! acknowledged is durable there, so the close writes only the last,
//! partial chunk to the local disk (`fs::tail_copy`) instead of the whole
//! file a second time. A server slower than that pace (a remote link, a
//! stalled server), or too far behind the writer to catch up within a few
//! seconds, leaves the close to sync locally as before.
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

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::ops::{Range, RangeInclusive};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
/// Chunk requests in flight at once per file: 32 MiB, as many bytes as an
/// upload keeps in flight by default. The server syncs each chunk before
/// acknowledging it, and a disk takes concurrent syncs faster than one at
/// a time: a 1 GiB cp committed in 3.7 s against 4.2 s with 2 in flight
/// (bench/RESULTS.md, mount-write notes).
const IN_FLIGHT: usize = 4;

/// The default rate of acknowledgements (bytes per second) at which the
/// server is as good a place as the local disk to make a closed file
/// durable: about what a spinning disk writes. Below it a close syncs
/// locally (see [`WriteBehind::settle`]).
pub const DEFAULT_SERVER_PACE: u64 = 100 << 20;
/// The span over which that rate is measured.
const PACE_WINDOW: Duration = Duration::from_millis(500);
/// How long a close waits for the server at most, about. A file written
/// much faster than the server takes it (gigabytes on a fast disk) would
/// otherwise hold its close for the whole upload: its close syncs locally,
/// and what the server will not hold by then is written back early as it
/// is written (see [`WriteBehind::spared_locally`]).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The write-behind of one staged file.
pub struct WriteBehind {
    client: Client,
    file: Arc<File>,
    path: RemotePath,
    /// Commit only over this version (the one the file was opened from).
    if_match: Option<String>,
    /// Commit only where there is no file (a new one, not on the server
    /// when it was created).
    create_only: bool,
    /// Bytes per second; see [`DEFAULT_SERVER_PACE`].
    server_pace: u64,
    state: Mutex<State>,
    wake: Notify,
    /// Told of every acknowledgement, and of the end.
    acked_news: Notify,
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
    /// When the last acknowledgements came.
    pace: Pace,
    /// Where chunk 0 is.
    head: Head,
    /// A journal record counts on the acknowledged chunks (see
    /// [`WriteBehind::hold`]): the session is never aborted for a failure,
    /// only once no record counts on it (see `retired`) or the file is
    /// discarded.
    held: bool,
    /// A held session write-behind gave up (a later write reached a chunk
    /// sent to it): no use to the file's new content, but the record of
    /// the content closed before still counts on it. Aborted once that
    /// record is replaced or dropped ([`WriteBehind::release_retired`]).
    retired: Option<String>,
}

impl State {
    /// Where the run of acknowledged chunks from chunk 1 ends.
    fn acked_front(&self) -> u64 {
        self.acked.run_end.max(1) * CHUNK_SIZE
    }

    /// The bytes the server acknowledged: chunk 0 if it was sent, and the
    /// run from chunk 1.
    fn on_server(&self) -> Option<Range<u64>> {
        let head = (self.head == Head::Acknowledged).then_some(0..CHUNK_SIZE);
        match (head, self.acked.bytes()) {
            (Some(head), Some(run)) => Some(head.start..run.end),
            (head, run) => run.or(head),
        }
    }
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

/// Chunk 0, kept back until the file's content is final (see the module's
/// description).
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Head {
    #[default]
    Kept,
    /// To be sent next.
    Due,
    Sent,
    Acknowledged,
}

/// When the acknowledgements of the last [`PACE_WINDOW`] came.
#[derive(Default)]
struct Pace {
    acks: VecDeque<Instant>,
}

impl Pace {
    fn ack(&mut self, now: Instant) {
        self.acks.push_back(now);
        while self
            .acks
            .front()
            .is_some_and(|at| now.duration_since(*at) > PACE_WINDOW)
        {
            self.acks.pop_front();
        }
    }

    /// The bytes per second acknowledged over the last [`PACE_WINDOW`]
    /// before `now`, if at least `pace` (never, for 0); else 0: a server
    /// that slow is not waited for.
    fn rate(&self, now: Instant, pace: u64) -> u64 {
        let recent = self
            .acks
            .iter()
            .filter(|at| now.duration_since(**at) <= PACE_WINDOW)
            .count() as u64;
        let rate = recent * CHUNK_SIZE * 1000 / PACE_WINDOW.as_millis() as u64;
        if pace > 0 && rate >= pace { rate } else { 0 }
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
    /// local (new, or truncated at open), read from `file`; committed only
    /// over etag `if_match`, or only where there is no file if `create_only`;
    /// `server_pace`:
    /// see [`DEFAULT_SERVER_PACE`].
    pub fn new(
        client: Client,
        file: Arc<File>,
        path: RemotePath,
        (if_match, create_only): (Option<String>, bool),
        server_pace: u64,
    ) -> Option<Arc<WriteBehind>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(Arc::new(WriteBehind {
            client,
            file,
            path,
            if_match,
            create_only,
            server_pace,
            state: Mutex::default(),
            wake: Notify::new(),
            acked_news: Notify::new(),
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

    /// The bytes of the file a write-back to the local disk may leave out:
    /// those the server holds in write-behind's session, as long as that
    /// session is to be used (an `fsync` never needs them locally), and
    /// while the server keeps its pace, those it would take within
    /// [`CLOSE_WAIT`] (a close will likely find them held there, see
    /// [`settle`](Self::settle)).
    pub fn spared_locally(&self) -> Option<Range<u64>> {
        let state = self.state.lock().unwrap();
        if state.over && !state.handed_over {
            return None;
        }
        let rate = match state.over {
            true => 0,
            false => state.pace.rate(Instant::now(), self.server_pace),
        };
        if rate > 0 {
            let reach = rate.saturating_mul(CLOSE_WAIT.as_secs());
            return Some(0..state.acked_front().saturating_add(reach));
        }
        state.on_server()
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
        let bytes = state.on_server().filter(|b| b.end <= size)?;
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

    /// At a close, the file's content final (its writes wait): hands every
    /// whole chunk to the session and waits while the server acknowledges
    /// them at its pace (see [`DEFAULT_SERVER_PACE`]) and would have them
    /// all within [`CLOSE_WAIT`], so that what it then holds need not go to
    /// the local disk as well (see [`hold`](Self::hold)). Returns once they
    /// are all acknowledged, write-behind is over, or the server falls
    /// behind; the close then syncs the rest locally.
    pub async fn settle(self: &Arc<Self>, size: u64) {
        // Chunks 1..last are whole.
        let last = size / CHUNK_SIZE;
        {
            let mut state = self.state.lock().unwrap();
            // Of use only if the session comes to hold half the file.
            let worth_it = last >= 2 && (last - 1) * CHUNK_SIZE * 2 >= size;
            if state.over || state.hash_broken || self.server_pace == 0 || !worth_it {
                return;
            }
            if state.head == Head::Kept {
                state.head = Head::Due;
            }
            if last > state.sealed {
                let first = state.sealed <= 1;
                state.sealed = last;
                if first {
                    let this = self.clone();
                    self.runtime.spawn(async move { this.pump().await });
                }
            }
        }
        self.wake.notify_one();
        let since = Instant::now();
        let front_then = self.state.lock().unwrap().acked_front();
        loop {
            let news = self.acked_news.notified();
            {
                let state = self.state.lock().unwrap();
                if state.over || (state.acked.run_end >= last && state.head == Head::Acknowledged) {
                    return;
                }
                let now = Instant::now();
                // The rest is reckoned at the rate since the close began,
                // steadier than the last half second's count of chunks.
                let front = state.acked_front();
                let rate = match state.pace.rate(now, self.server_pace) {
                    0 => 0,
                    _ => (front - front_then) * 1000 / (since.elapsed().as_millis() as u64).max(1),
                };
                let left = (last * CHUNK_SIZE).saturating_sub(front);
                if !worth_waiting(since, now, rate, left) {
                    tracing::debug!(path = %self.path, held = ?state.on_server(), rate, left,
                        "the server would not take the file in time; the close syncs locally");
                    return;
                }
            }
            let _ = tokio::time::timeout(PACE_WINDOW / 5, news).await;
        }
    }

    /// Ends write-behind without an upload to give its session to (the
    /// file was discarded, and any record with it).
    pub fn cancel(self: &Arc<Self>) {
        let mut state = self.state.lock().unwrap();
        state.held = false;
        let retired = state.retired.take();
        if !state.over {
            self.abandon(state, "the file was discarded");
        } else {
            drop(state);
        }
        if let Some(id) = retired {
            self.abort(id);
        }
    }

    /// The journal record that counted on a session given up since (see
    /// `State::retired`) was replaced or dropped: the session goes too.
    pub fn release_retired(&self) {
        let retired = self.state.lock().unwrap().retired.take();
        if let Some(id) = retired {
            tracing::debug!(path = %self.path, session = id, "aborting a session no journal record counts on any more");
            self.abort(id);
        }
    }

    fn abandon(&self, mut state: std::sync::MutexGuard<'_, State>, why: &str) {
        state.over = true;
        let session = state.session.take();
        if let Some(id) = &session {
            tracing::debug!(path = %self.path, session = id, why, "write-behind abandoned");
        }
        let unheld = match state.held {
            true => {
                state.retired = session;
                None
            }
            false => session,
        };
        drop(state);
        self.wake.notify_one();
        self.acked_news.notify_waiters();
        if let Some(id) = unheld {
            self.abort(id);
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
        let send = |index: u64, data: Bytes| {
            let put = self.client.put_chunk(&id, index, data);
            async move { (index, put.await) }
        };
        loop {
            let (sealed, over, handed_over, head) = {
                let state = self.state.lock().unwrap();
                (state.sealed, state.over, state.handed_over, state.head)
            };
            if over {
                if handed_over {
                    // The upload counts on what is acknowledged; let the
                    // chunks on their way land.
                    while sending.next().await.is_some() {}
                }
                return;
            }
            if head == Head::Due && sending.len() < IN_FLIGHT {
                // Sent as soon as it may be: the server hashes the chunks
                // that follow it as they arrive, not read back at the end.
                self.state.lock().unwrap().head = Head::Sent;
                match self.read_head().await {
                    Ok(data) => {
                        sending.push(send(0, data));
                    }
                    Err(e) => {
                        let state = self.state.lock().unwrap();
                        if !state.over {
                            self.abandon(state, &format!("reading a chunk failed: {e}"));
                        }
                    }
                }
                continue;
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
                sending.push(send(next, data));
                next += 1;
                continue;
            }
            tokio::select! {
                Some((index, sent)) = sending.next(), if !sending.is_empty() => {
                    let mut state = self.state.lock().unwrap();
                    match sent {
                        Ok(()) if index == 0 => {
                            state.head = Head::Acknowledged;
                            drop(state);
                            self.acked_news.notify_waiters();
                        }
                        Ok(()) => {
                            state.acked.ack(index);
                            state.pace.ack(Instant::now());
                            drop(state);
                            self.acked_news.notify_waiters();
                        }
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
            if_none_match: self.create_only.then(|| "*".to_owned()),
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

    /// Reads chunk 0, hashed already with chunk 1.
    async fn read_head(&self) -> crate::error::Result<Bytes> {
        let (head, _) = read_chunks(self.file.clone(), 0..=0, None).await?;
        Ok(head)
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
        let (data, taken) = read_chunks(self.file.clone(), from..=index, hasher.take()).await?;
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

/// Reads `chunks` of the staging file in order, each into `hasher` if
/// any, on the blocking pool; returns the last chunk and the hasher.
async fn read_chunks(
    file: Arc<File>,
    chunks: RangeInclusive<u64>,
    mut hasher: Option<Sha256>,
) -> crate::error::Result<(Bytes, Option<Sha256>)> {
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        for chunk in chunks {
            buf.clear();
            append_exact_at(&file, &mut buf, chunk * CHUNK_SIZE, CHUNK_SIZE as usize)?;
            if let Some(hasher) = &mut hasher {
                hasher.update(&buf);
            }
        }
        Ok::<_, std::io::Error>((Bytes::from(buf), hasher))
    })
    .await
    .map_err(|e| crate::error::Error::Storage(format!("read task failed: {e}")))?
    .map_err(crate::error::Error::io("reading the staging file"))
}

/// Whether a close that began at `since` goes on waiting for a server that
/// has acknowledged `rate` bytes per second since (0: lately below its
/// pace) with `left` bytes still to take. Judged on what came since the
/// close began: a session just opened has nothing to show before.
fn worth_waiting(since: Instant, now: Instant, rate: u64, left: u64) -> bool {
    if now.duration_since(since) < PACE_WINDOW {
        return true;
    }
    rate > 0 && now + Duration::from_secs_f64(left as f64 / rate as f64) <= since + CLOSE_WAIT
}

/// Whether `offset..end` overlaps a chunk handed to the session.
fn touches_sealed(state: &State, offset: u64, end: u64) -> bool {
    let from = match state.head {
        Head::Kept => CHUNK_SIZE,
        _ => 0,
    };
    state.sealed > 1 && offset < state.sealed * CHUNK_SIZE && end > from
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
    fn the_pace_counts_only_the_last_window_of_acknowledgements() {
        let pace = DEFAULT_SERVER_PACE;
        let start = Instant::now();
        let mut acks = Pace::default();
        assert_eq!(acks.rate(start, pace), 0, "nothing acknowledged yet");
        // 7 chunks of 8 MiB in half a second: 112 MiB/s.
        for i in 0..7 {
            acks.ack(start + Duration::from_millis(i * 60));
        }
        let last = start + Duration::from_millis(360);
        assert_eq!(acks.rate(last, pace), 112 << 20);
        assert_eq!(acks.rate(last, 0), 0, "a pace of 0 is never kept");
        assert_eq!(acks.rate(last, 120 << 20), 0, "slower than asked");
        // Half a second after the first, it drops out: 96 MiB/s.
        let later = start + PACE_WINDOW + Duration::from_millis(1);
        assert_eq!(acks.rate(later, pace), 0);
        assert_eq!(acks.rate(later, 1 << 20), 96 << 20);
        // Long silent: nothing recent.
        assert_eq!(acks.rate(last + PACE_WINDOW * 2, 1), 0);
        acks.ack(last + PACE_WINDOW * 2);
        assert_eq!(acks.acks.len(), 1, "older acknowledgements are forgotten");
    }

    #[test]
    fn a_close_waits_while_the_server_would_take_the_rest_in_time() {
        let since = Instant::now();
        let at = |ms| since + Duration::from_millis(ms);
        let gib = 1 << 30;
        assert!(worth_waiting(since, at(100), 0, gib), "too early to judge");
        assert!(!worth_waiting(since, at(500), 0, gib), "below pace");
        assert!(
            worth_waiting(since, at(500), 250 << 20, gib),
            "done in 4.6 s"
        );
        assert!(
            !worth_waiting(since, at(500), 150 << 20, gib),
            "done in 7.3 s"
        );
        assert!(worth_waiting(since, at(4500), 150 << 20, 64 << 20));
        assert!(
            !worth_waiting(since, at(5100), 150 << 20, 8 << 20),
            "past the wait"
        );
    }

    #[test]
    fn a_fast_server_spares_the_local_disk_only_what_it_would_take_before_a_close() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let path = RemotePath::parse("f").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let client = Client::new("http://127.0.0.1:9").unwrap();
        let wb = WriteBehind::new(client, file, path, (None, true), DEFAULT_SERVER_PACE).unwrap();
        assert_eq!(wb.spared_locally(), None, "nothing on the server yet");
        {
            let mut state = wb.state.lock().unwrap();
            let now = Instant::now();
            // Chunks 1 to 12 in the last half second: 192 MiB/s.
            for index in 1..=12 {
                state.acked.ack(index);
                state.pace.ack(now);
            }
        }
        let reach = 13 * CHUNK_SIZE + (192 << 20) * CLOSE_WAIT.as_secs();
        assert_eq!(wb.spared_locally(), Some(0..reach));
        // A server that slowed down is not counted on beyond what it holds.
        wb.state.lock().unwrap().pace = Pace::default();
        assert_eq!(wb.spared_locally(), Some(CHUNK_SIZE..13 * CHUNK_SIZE));
    }

    #[test]
    fn only_writes_into_sent_chunks_count() {
        let cs = CHUNK_SIZE;
        // Nothing sealed yet: anything goes.
        assert!(!touches_sealed(&state(0), 0, 10 * cs));
        // Chunks 1 and 2 sealed.
        let mut s = state(3);
        assert!(!touches_sealed(&s, 0, cs), "chunk 0 is never sent early");
        assert!(!touches_sealed(&s, 3 * cs, 4 * cs));
        assert!(touches_sealed(&s, cs - 1, cs + 1));
        assert!(touches_sealed(&s, 3 * cs - 1, 3 * cs));
        assert!(!touches_sealed(&s, 40, 41));
        // Chunk 0 too, once a close let it go.
        s.head = Head::Sent;
        assert!(touches_sealed(&s, 40, 41));
    }
}
