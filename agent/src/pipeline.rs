//! The stages every candidate file goes through, connected by channels:
//! the pass (scanner) sends candidates to hasher threads, which wait for
//! files to settle, hash them and decide; transfer threads then rename,
//! upload or record. Several files (and several chunks of each) are in
//! flight at once. A pass waits for its decisions, not for its uploads: a
//! long upload does not hold back the next changes.
//!
//! Nothing half-written is committed: a file is hashed only once it has
//! settled, its stamp is checked again after hashing and after the upload,
//! and the server checks the hash at commit, so content that changed under
//! the upload fails and is retried.
//!
//! A file that keeps changing past the maximum delay is pushed as a
//! snapshot instead: its first `size` bytes, as its stamp had them, hashed
//! and then sent with that hash, so the server commits them only if they
//! read the same both times (what a file that is appended to gives). The
//! journal records the stamp as of the snapshot: the file, changed since,
//! is pushed again once it settles or once it has waited the delay again.

use crate::output::say;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use crossbeam_utils::sync::WaitGroup;
use ferry::client::upload::SessionFn;
use ferry::fs::pending::{conflict_path, is_conflict};
use ferry::protocol::upload::UploadState;
use ferry::protocol::{ErrorCode, RemotePath};
use sha2::{Digest, Sha256};

use crate::folder::{Busy, Folder};
use crate::journal::{FileStamp, Pending, Record};
use crate::plan::{Candidate, RemoteFile, still_pushed};
use crate::remote::Push;
use crate::scan::stat_file;
use crate::settle::{QUIET, Settle, now_ns, settle};

/// Files below this size are sent in one chunk: latency, not bandwidth,
/// limits them.
const SMALL_FILE: u64 = 1 << 20;
/// How many times more small transfers than large ones run at once.
pub const SMALL_LANE_FACTOR: usize = 4;

/// One pass over some scopes of a folder, shared by the jobs it started.
pub struct Pass {
    pub folder: Arc<Folder>,
    pub remote: std::collections::BTreeMap<String, RemoteFile>,
    /// Records whose file is gone, until a candidate claims one by content.
    pub vanished: Mutex<Vec<Record>>,
    pub outcome: Mutex<Outcome>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    /// Uploads handed to the transfer threads.
    pub queued: usize,
    pub queued_bytes: u64,
    pub renamed: usize,
    pub deleted: usize,
    pub unchanged: usize,
    pub failed: usize,
    pub deletes_held: usize,
    /// A new file is still being written: it may be a vanished one, copied
    /// or moved in, so deletions wait for it.
    pub new_file_settling: bool,
    /// Paths to look at again: after a delay (still changing), or with
    /// backoff after a failure (`None`).
    pub retry: Vec<(String, Option<Duration>)>,
}

impl Pass {
    fn retry(&self, path: &str, after: Option<Duration>) {
        self.outcome
            .lock()
            .unwrap()
            .retry
            .push((path.to_owned(), after));
    }

    /// Whether a vanished record has this size: a new file of that size may
    /// be it, renamed, and must be hashed to know.
    fn may_be_renamed(&self, size: u64) -> bool {
        let vanished = self.vanished.lock().unwrap();
        vanished.iter().any(|r| r.stamp.size == size)
    }

    /// Takes a vanished record with this content, if one is still on the
    /// remote as recorded.
    fn claim(&self, sha256: &str, size: u64) -> Option<Record> {
        let mut vanished = self.vanished.lock().unwrap();
        let i = vanished.iter().position(|r| {
            r.sha256 == sha256 && r.stamp.size == size && still_pushed(r, self.remote.get(&r.path))
        })?;
        Some(vanished.swap_remove(i))
    }
}

struct HashJob {
    pass: Arc<Pass>,
    candidate: Candidate,
    seen_at_ns: i64,
    busy: Busy,
    _pending: WaitGroup,
}

/// What to do with a hashed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Same content as recorded (or as found on the remote): record only.
    Record(Record),
    /// A file whose content matches a vanished record: renamed on the server.
    Rename {
        from: Record,
        to: String,
        stamp: FileStamp,
    },
    Upload(Upload),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub path: String,
    pub stamp: FileStamp,
    /// `None`: a new file, hashed while it is sent.
    pub sha256: Option<String>,
    pub if_match: Option<String>,
    /// The remote file at `path` changed elsewhere (this is its etag): the
    /// local version goes beside it under a conflict name.
    pub conflict_with: Option<String>,
    /// The file keeps changing: its first `stamp.size` bytes are sent, with
    /// `sha256` as they were hashed, and committed though it changed since.
    pub snapshot: bool,
}

impl Upload {
    /// The digest as the journal keeps it for a pending session (empty:
    /// computed while sending).
    fn pending_sha256(&self) -> &str {
        self.sha256.as_deref().unwrap_or("")
    }
}

struct TransferJob {
    folder: Arc<Folder>,
    work: Work,
    _busy: Busy,
    /// A rename's old path, kept from other passes meanwhile.
    _from: Option<Busy>,
}

/// The hasher and transfer threads, shared by every folder.
#[derive(Clone)]
pub struct Pipeline {
    hash_tx: Sender<HashJob>,
}

impl Pipeline {
    /// `transfers` files in flight, each with several chunks; small files,
    /// renames and journal updates, which wait on round trips rather than
    /// bandwidth, go in a lane [`SMALL_LANE_FACTOR`] times as wide.
    pub fn start(hashers: usize, transfers: usize) -> Pipeline {
        let (hash_tx, hash_rx) = crossbeam_channel::bounded::<HashJob>(256);
        let transfers = transfers.max(1);
        let (large_tx, large_rx) = crossbeam_channel::bounded::<TransferJob>(transfers);
        let small = transfers * SMALL_LANE_FACTOR;
        let (small_tx, small_rx) = crossbeam_channel::bounded::<TransferJob>(small);
        for i in 0..hashers.max(1) {
            let lanes = Lanes {
                large: large_tx.clone(),
                small: small_tx.clone(),
            };
            let rx = hash_rx.clone();
            std::thread::Builder::new()
                .name(format!("hasher-{i}"))
                .spawn(move || hasher(rx, lanes))
                .expect("spawning a hasher thread");
        }
        for (lane, rx, threads) in [("large", large_rx, transfers), ("small", small_rx, small)] {
            for i in 0..threads {
                let rx: Receiver<TransferJob> = rx.clone();
                std::thread::Builder::new()
                    .name(format!("transfer-{lane}-{i}"))
                    .spawn(move || transfer(rx))
                    .expect("spawning a transfer thread");
            }
        }
        Pipeline { hash_tx }
    }

    /// Queues a candidate; `pending` is released once it is decided, `busy`
    /// once it is fully handled.
    pub fn submit(
        &self,
        pass: &Arc<Pass>,
        candidate: Candidate,
        seen_at_ns: i64,
        busy: Busy,
        pending: &WaitGroup,
    ) {
        let job = HashJob {
            pass: pass.clone(),
            candidate,
            seen_at_ns,
            busy,
            _pending: pending.clone(),
        };
        if self.hash_tx.send(job).is_err() {
            tracing::error!("the hasher threads are gone");
        }
    }
}

struct Lanes {
    large: Sender<TransferJob>,
    small: Sender<TransferJob>,
}

fn hasher(jobs: Receiver<HashJob>, lanes: Lanes) {
    for job in jobs {
        if job.pass.folder.stop.is_cancelled() {
            continue;
        }
        let path = job.candidate.path.clone();
        let Some(mut work) = hash_and_decide(&job) else {
            continue;
        };
        let mut from_busy = None;
        if let Work::Rename { from, to, stamp } = &work {
            from_busy = job.pass.folder.claim(&from.path);
            if from_busy.is_none() {
                // The old path is being worked on: upload instead; a later
                // pass deletes the old path.
                work = Work::Upload(Upload {
                    path: to.clone(),
                    stamp: *stamp,
                    sha256: Some(from.sha256.clone()),
                    if_match: None,
                    conflict_with: None,
                    snapshot: false,
                });
            }
        }
        if job.pass.folder.dry_run {
            announce(&work);
            continue;
        }
        if let Work::Upload(u) = &work {
            let mut outcome = job.pass.outcome.lock().unwrap();
            outcome.queued += 1;
            outcome.queued_bytes += u.stamp.size;
        }
        let lane = match &work {
            Work::Upload(u) if u.stamp.size >= SMALL_FILE => &lanes.large,
            _ => &lanes.small,
        };
        let next = TransferJob {
            folder: job.pass.folder.clone(),
            work,
            _busy: job.busy,
            _from: from_busy,
        };
        if lane.send(next).is_err() {
            tracing::error!(path, "the transfer threads are gone");
        }
    }
}

fn hash_and_decide(job: &HashJob) -> Option<Work> {
    let (pass, c) = (&job.pass, &job.candidate);
    let folder = &pass.folder;
    let abs = folder.root.join(&c.path);
    // Gone already: the event that removed it brings it back to a pass.
    let Some(current) = stat_file(&abs) else {
        folder.note_settled(&c.path);
        return None;
    };
    let quiet = folder.closed.quiet_time(&c.path, c.stamp, current);
    let now = now_ns();
    let snapshot = match settle(c.stamp, job.seen_at_ns, current, now, quiet) {
        Settle::Ready => {
            folder.note_settled(&c.path);
            false
        }
        Settle::Wait(_)
            if folder
                .waiting
                .overdue(&c.path, now, folder.max_settle_delay) =>
        {
            let waited = folder.waiting.waited(&c.path, now).unwrap_or_default();
            tracing::info!(
                path = c.path,
                bytes = current.size,
                waited_s = waited.as_secs(),
                "still changing after the maximum delay; pushing a snapshot of it as it is"
            );
            true
        }
        Settle::Wait(wait) => {
            tracing::debug!(path = c.path, ?wait, "still being written; waiting");
            pass.retry(&c.path, Some(wait));
            if c.record.is_none() {
                pass.outcome.lock().unwrap().new_file_settling = true;
            }
            return None;
        }
    };
    if snapshot {
        return snapshot_and_decide(job, current, Instant::now());
    }
    if c.record.is_none() && c.remote.is_none() && !pass.may_be_renamed(current.size) {
        // New here and on the server: the digest is computed while the file
        // is sent, instead of reading it twice. The upload checks the stamp
        // again and the server the digest, so a change meanwhile is caught.
        return Some(Work::Upload(Upload {
            path: c.path.clone(),
            stamp: current,
            sha256: None,
            if_match: None,
            conflict_with: None,
            snapshot: false,
        }));
    }
    let known = folder
        .journal
        .pending(&c.path)
        .ok()
        .flatten()
        .filter(|p| p.stamp == current && !p.sha256.is_empty())
        .map(|p| p.sha256);
    let sha256 = match known {
        Some(sha) => sha,
        None => match hash_file(&abs) {
            Ok(sha) => sha,
            Err(e) => return unreadable(pass, &c.path, &e),
        },
    };
    if stat_file(&abs) != Some(current) {
        tracing::debug!(path = c.path, "changed while being hashed; waiting");
        pass.retry(&c.path, Some(QUIET));
        return None;
    }
    let ours = unrecorded_commit(folder, c);
    Some(decide(
        c,
        current,
        sha256,
        ours.as_ref(),
        &mut |sha, size| pass.claim(sha, size),
    ))
}

/// A file that cannot be read (its permissions, an I/O error): logged,
/// journaled for `status` and tried again later. Nothing to do now.
fn unreadable(pass: &Pass, path: &str, e: &std::io::Error) -> Option<Work> {
    tracing::warn!(path, error = %e, "cannot read the file");
    let _ = pass
        .folder
        .journal
        .add_error(path, &format!("cannot read the file: {e}"));
    pass.retry(path, None);
    None
}

/// The decision for a file that keeps changing, pushed as it is: its first
/// `current.size` bytes are hashed now and sent with that hash later, so
/// the server commits them only if they read the same both times.
fn snapshot_and_decide(job: &HashJob, current: FileStamp, started: Instant) -> Option<Work> {
    let (pass, c) = (&job.pass, &job.candidate);
    let folder = &pass.folder;
    let abs = folder.root.join(&c.path);
    // Whatever comes of it, the next snapshot waits the delay again (and
    // as long as reading this one took); the upload, if any, sets the
    // clock again when it ends.
    let ended = || {
        folder.waiting.snapshot_ended(
            &c.path,
            now_ns(),
            started.elapsed(),
            folder.max_settle_delay,
        );
    };
    let sha256 = match hash_prefix(&abs, current.size) {
        Ok(sha) => sha,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::info!(
                path = c.path,
                "truncated while its snapshot was read; trying again later"
            );
            ended();
            pass.retry(&c.path, Some(QUIET));
            return None;
        }
        Err(e) => return unreadable(pass, &c.path, &e),
    };
    ended();
    let ours = unrecorded_commit(folder, c);
    let work = decide(c, current, sha256, ours.as_ref(), &mut |sha, size| {
        pass.claim(sha, size)
    });
    Some(match work {
        Work::Upload(u) => Work::Upload(Upload {
            snapshot: true,
            ..u
        }),
        Work::Record(r) => {
            // Touched, not changed: looked at again, as it keeps changing
            // (`once` is done with it).
            if !folder.once {
                pass.retry(&c.path, Some(QUIET));
            }
            Work::Record(r)
        }
        other => other,
    })
}

/// The session of ours that committed the remote version at `c`'s path
/// without the journal recording it (a run stopped between the two), if the
/// server says so: the session is journaled for this path and committed the
/// very version the remote has now. Size and mtime alike prove nothing:
/// another writer's edit can share them.
fn unrecorded_commit(folder: &Folder, c: &Candidate) -> Option<Pending> {
    let (Some(record), Some(remote)) = (&c.record, &c.remote) else {
        return None;
    };
    if remote.etag == record.etag {
        return None;
    }
    let pending = folder.journal.pending(&c.path).ok().flatten()?;
    let to_path = folder
        .remote
        .path(&c.path)
        .is_ok_and(|path| path.as_str() == pending.target);
    if !to_path || pending.session_id.is_empty() {
        return None;
    }
    let status = folder
        .rt
        .block_on(folder.remote.upload_status(&pending.session_id))
        .ok()?;
    let committed = status.state == UploadState::Committed
        && status.meta.and_then(|m| m.etag).as_deref() == Some(remote.etag.as_str());
    committed.then_some(pending)
}

/// The decision for a settled, hashed candidate. `ours`: the session of
/// ours that committed the remote version unrecorded (see
/// [`unrecorded_commit`]). `claim` takes a vanished record with the same
/// content, if any.
fn decide(
    c: &Candidate,
    stamp: FileStamp,
    sha256: String,
    ours: Option<&Pending>,
    claim: &mut dyn FnMut(&str, u64) -> Option<Record>,
) -> Work {
    let upload = |if_match: Option<String>, conflict_with: Option<String>| {
        Work::Upload(Upload {
            path: c.path.clone(),
            stamp,
            sha256: Some(sha256.clone()),
            if_match,
            conflict_with,
            snapshot: false,
        })
    };
    // `diverged`: see `Record::diverged`.
    let record = |etag: &str, diverged: bool| {
        Work::Record(Record {
            path: c.path.clone(),
            stamp,
            sha256: sha256.clone(),
            etag: etag.to_owned(),
            diverged,
        })
    };
    match (&c.record, &c.remote) {
        // Touched, not changed.
        (Some(rec), Some(_)) if rec.sha256 == sha256 => record(&rec.etag, rec.diverged),
        (Some(_), None) => upload(None, None),
        (Some(rec), Some(remote)) if remote.etag != rec.etag => match ours {
            // Committed by a session of ours that a stopped run could not
            // record: this very version, or one the local file changed from.
            Some(p) if p.sha256 == sha256 => record(&remote.etag, false),
            Some(_) => upload(Some(remote.etag.clone()), None),
            // Changed on both sides.
            None => upload(None, Some(remote.etag.clone())),
        },
        (Some(rec), Some(_)) => upload(Some(rec.etag.clone()), None),
        (None, None) => match claim(&sha256, stamp.size) {
            Some(from) => Work::Rename {
                from,
                to: c.path.clone(),
                stamp,
            },
            None => upload(None, None),
        },
        // Already there (a journal lost, or a first sync onto a copy).
        (None, Some(remote)) if same_file(remote, stamp) => record(&remote.etag, false),
        (None, Some(remote)) => upload(None, Some(remote.etag.clone())),
    }
}

/// Same size and the same mtime to the second.
fn same_file(remote: &RemoteFile, stamp: FileStamp) -> bool {
    remote.size == stamp.size
        && remote.mtime.is_some_and(|m| {
            let remote_ns = m.timestamp_nanos_opt().unwrap_or(i64::MIN);
            (remote_ns - stamp.mtime_ns).abs() < 1_000_000_000
        })
}

/// What a dry run prints instead of acting.
fn announce(work: &Work) {
    match work {
        Work::Record(_) => {}
        Work::Rename { from, to, .. } => say!("rename {} -> {to}", from.path),
        Work::Upload(u) if u.conflict_with.is_some() => say!(
            "conflict {} (changed on the server; the local version would be uploaded beside it)",
            u.path
        ),
        Work::Upload(u) => say!("upload {} ({} bytes)", u.path, u.stamp.size),
    }
}

fn transfer(jobs: Receiver<TransferJob>) {
    for job in jobs {
        if job.folder.stop.is_cancelled() {
            continue;
        }
        run_transfer(&job.folder, job.work);
    }
}

fn run_transfer(folder: &Arc<Folder>, work: Work) {
    match work {
        Work::Record(record) => {
            if let Err(e) = folder.journal.commit(&record) {
                tracing::error!(path = record.path, error = %e, "writing the journal failed");
            }
        }
        Work::Rename { from, to, stamp } => match folder.rename_on_server(&from.path, &to, false) {
            Ok(meta) => {
                let moved = Record {
                    path: to.clone(),
                    stamp,
                    etag: meta.etag.unwrap_or_else(|| from.etag.clone()),
                    sha256: from.sha256.clone(),
                    diverged: false,
                };
                let saved = folder
                    .journal
                    .rename(&from.path, &to)
                    .and_then(|()| folder.journal.commit(&moved));
                if let Err(e) = saved {
                    tracing::error!(path = to, error = %e, "writing the journal failed");
                }
                tracing::info!(from = from.path, to, "renamed on the server (same content)");
            }
            Err(e) => {
                tracing::warn!(from = from.path, to, error = %e, "server-side rename failed; uploading instead");
                let pushed = upload(
                    folder,
                    Upload {
                        path: to,
                        stamp,
                        sha256: Some(from.sha256.clone()),
                        if_match: None,
                        conflict_with: None,
                        snapshot: false,
                    },
                );
                if pushed {
                    delete_replaced(folder, &from);
                }
            }
        },
        Work::Upload(u) => {
            upload(folder, u);
        }
    }
}

/// Deletes the remote copy of a file that was renamed locally, after its new
/// name was uploaded instead (only while it is still the recorded version).
fn delete_replaced(folder: &Folder, from: &Record) {
    match folder
        .rt
        .block_on(folder.remote.delete(&from.path, &from.etag))
    {
        Ok(()) => tracing::info!(path = from.path, "deleted"),
        Err(e)
            if matches!(
                e.code(),
                ErrorCode::NotFound | ErrorCode::PreconditionFailed
            ) => {}
        Err(e) => {
            tracing::warn!(path = from.path, error = %e, "delete failed; will retry");
            folder.note_retry(&from.path, None);
            return;
        }
    }
    let _ = folder.journal.forget(&from.path);
}

/// Uploads and records; returns whether the file was committed.
fn upload(folder: &Arc<Folder>, mut u: Upload) -> bool {
    let started = Instant::now();
    let pushed = upload_attempts(folder, &mut u);
    if u.snapshot {
        folder.waiting.snapshot_ended(
            &u.path,
            now_ns(),
            started.elapsed(),
            folder.max_settle_delay,
        );
    }
    pushed
}

fn upload_attempts(folder: &Arc<Folder>, u: &mut Upload) -> bool {
    let abs = folder.root.join(&u.path);
    // At most: the upload, a retry after a 412 over a deleted file, the conflict copy.
    for _ in 0..3 {
        let Some(target) = target_of(folder, u) else {
            return false;
        };
        let resume_id = match folder.journal.pending(&u.path).ok().flatten() {
            Some(p)
                if p.target == target.as_str()
                    && p.stamp == u.stamp
                    && p.sha256 == u.pending_sha256() =>
            {
                Some(p.session_id)
            }
            // A session for an older version: free what it staged.
            Some(p) => {
                folder.rt.block_on(folder.remote.abort(&p.session_id));
                None
            }
            None => None,
        };
        if let Some(id) = &resume_id {
            tracing::info!(
                path = u.path,
                session = id,
                "resuming an interrupted upload"
            );
        }
        let on_session: SessionFn = {
            let (folder, pending) = (folder.clone(), pending_of(u, &target));
            Arc::new(move |id: &str| {
                let pending = Pending {
                    session_id: id.to_owned(),
                    ..pending.clone()
                };
                if let Err(e) = folder.journal.set_pending(&pending) {
                    tracing::warn!(path = pending.path, error = %e, "recording the upload session failed");
                }
            })
        };
        let pushed = folder.rt.block_on(folder.remote.upload(Push {
            local: &abs,
            target: &target,
            sha256: u.sha256.as_deref(),
            if_match: u.if_match.clone(),
            length: u.snapshot.then_some(u.stamp.size),
            resume_id,
            on_session,
        }));
        match pushed {
            Ok(report) => {
                let etag = match &u.conflict_with {
                    Some(theirs) => theirs.clone(),
                    None => report.meta.etag.clone().unwrap_or_default(),
                };
                let record = Record {
                    path: u.path.clone(),
                    stamp: u.stamp,
                    sha256: u.sha256.clone().or(report.sha256).unwrap_or_default(),
                    etag,
                    diverged: u.conflict_with.is_some(),
                };
                if let Err(e) = folder.journal.commit(&record) {
                    tracing::error!(path = u.path, error = %e, "writing the journal failed");
                }
                if u.conflict_with.is_some() {
                    let message = format!(
                        "changed on the server since the last sync; the local version was uploaded as {target}"
                    );
                    tracing::warn!(path = u.path, kept_as = %target, "conflict: the remote file changed elsewhere; keeping both");
                    let _ = folder.journal.add_error(&u.path, &message);
                } else if u.snapshot {
                    tracing::info!(
                        path = u.path,
                        bytes = u.stamp.size,
                        resumed_bytes = report.resumed_bytes,
                        "uploaded a snapshot; the file is still changing"
                    );
                } else {
                    tracing::info!(
                        path = u.path,
                        bytes = u.stamp.size,
                        resumed_bytes = report.resumed_bytes,
                        "uploaded"
                    );
                }
                if u.snapshot {
                    folder.note_snapshot(&u.path, u.stamp.size);
                }
                if u.snapshot {
                    // Looked at again even if unchanged since: a pass then
                    // finds it settled. `once` pushes a file that keeps
                    // changing once, as a snapshot, and is done with it.
                    if !folder.once {
                        folder.note_retry(&u.path, Some(QUIET));
                    }
                } else if stat_file(&abs) != Some(u.stamp) {
                    // What the server has is whole and recorded as such;
                    // the newer local version goes in a later pass.
                    folder.note_retry(&u.path, Some(QUIET));
                }
                return true;
            }
            Err(e) if is_conflict(&e) && u.conflict_with.is_none() => {
                // A session commits on the conditions it was made with: a
                // resumed one keeps those of the upload that started it
                // (before a delete elsewhere, or a rename of the agent's
                // own). Refused once, it is refused for ever: the next
                // attempt makes a new one, on the conditions that hold now.
                drop_session(folder, &u.path);
                match folder.rt.block_on(folder.remote.stat(&u.path)) {
                    // Deleted meanwhile: nothing to conflict with.
                    Ok(None) => u.if_match = None,
                    // Still the version this upload replaces: the refusal
                    // was the session's, not a change made elsewhere.
                    Ok(Some(meta)) if u.if_match.is_some() && meta.etag == u.if_match => {}
                    Ok(Some(meta)) => {
                        u.if_match = None;
                        // No etag: a directory took the name.
                        u.conflict_with = Some(meta.etag.unwrap_or_else(|| "-".to_owned()));
                    }
                    Err(e) => return failed(folder, &u.path, &e.to_string()),
                }
            }
            Err(ferry::Error::Cancelled) => return false,
            // Not a change under the upload: retried with backoff, and
            // listed by `status` until it can be read.
            Err(e) if is_unreadable(&e) => {
                return failed(folder, &u.path, &format!("cannot read the file: {e}"));
            }
            Err(e)
                if e.code() == ErrorCode::ChecksumMismatch
                    || matches!(e, ferry::Error::Io { .. }) =>
            {
                // The file changed under the upload: start over once it
                // settles (a snapshot: once it has waited the delay again).
                if u.snapshot {
                    tracing::info!(path = u.path, error = %e, "the snapshot's bytes changed while they were read (the file is rewritten, not only appended to); trying again later");
                } else {
                    tracing::info!(path = u.path, error = %e, "the file changed during the upload; trying again");
                }
                drop_session(folder, &u.path);
                folder.note_retry(&u.path, Some(QUIET));
                return false;
            }
            Err(e) => return failed(folder, &u.path, &e.to_string()),
        }
    }
    failed(folder, &u.path, "the remote path keeps refusing the file")
}

/// Aborts the upload session journaled for `path`, if any, so that the
/// server frees what it staged, and forgets it.
fn drop_session(folder: &Folder, path: &str) {
    if let Ok(Some(p)) = folder.journal.pending(path) {
        folder.rt.block_on(folder.remote.abort(&p.session_id));
    }
    if let Err(e) = folder.journal.clear_pending(path) {
        tracing::warn!(path, error = %e, "writing the journal failed");
    }
}

/// Where an upload commits: the path, or a conflict name beside it (the one
/// an interrupted run already chose, when resuming).
fn target_of(folder: &Folder, u: &Upload) -> Option<RemotePath> {
    let path = match folder.remote.path(&u.path) {
        Ok(path) => path,
        Err(e) => {
            failed(folder, &u.path, &format!("not a valid remote path: {e}"));
            return None;
        }
    };
    if u.conflict_with.is_none() {
        return Some(path);
    }
    let earlier = folder
        .journal
        .pending(&u.path)
        .ok()
        .flatten()
        .filter(|p| {
            p.target != path.as_str() && p.stamp == u.stamp && p.sha256 == u.pending_sha256()
        })
        .and_then(|p| RemotePath::parse(&p.target).ok());
    Some(earlier.unwrap_or_else(|| conflict_path(&path)))
}

fn pending_of(u: &Upload, target: &RemotePath) -> Pending {
    Pending {
        path: u.path.clone(),
        target: target.as_str().to_owned(),
        session_id: String::new(),
        stamp: u.stamp,
        sha256: u.pending_sha256().to_owned(),
    }
}

/// Logs and records a failed push, to be retried with backoff; false.
fn failed(folder: &Folder, path: &str, message: &str) -> bool {
    tracing::warn!(path, error = message, "push failed; will retry");
    let _ = folder.journal.add_error(path, message);
    folder.note_retry(path, None);
    false
}

/// The local file cannot be read (its permissions), as opposed to changed.
fn is_unreadable(e: &ferry::Error) -> bool {
    matches!(e, ferry::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied)
}

/// Hex SHA-256 of a file's first `len` bytes (an `UnexpectedEof` error if
/// it is shorter).
pub fn hash_prefix(path: &Path, len: u64) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file).take(len);
    if std::io::copy(&mut reader, &mut hasher)? < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Hex SHA-256 of a file's content.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    std::io::copy(&mut reader, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64) -> FileStamp {
        FileStamp {
            size,
            mtime_ns: 5_000_000_000,
            inode: 1,
        }
    }

    fn remote(etag: &str, size: u64, mtime_s: Option<i64>) -> RemoteFile {
        RemoteFile {
            size,
            etag: etag.into(),
            mtime: mtime_s.map(|s| chrono::DateTime::from_timestamp(s, 0).unwrap()),
        }
    }

    fn record(etag: &str, sha: &str) -> Record {
        Record {
            path: "f".into(),
            stamp: stamp(3),
            sha256: sha.into(),
            etag: etag.into(),
            diverged: false,
        }
    }

    fn candidate(record: Option<Record>, remote: Option<RemoteFile>) -> Candidate {
        Candidate {
            path: "f".into(),
            stamp: stamp(9),
            record,
            remote,
        }
    }

    fn decision(c: &Candidate, sha: &str) -> Work {
        decide(c, stamp(9), sha.into(), None, &mut |_, _| None)
    }

    /// A session of ours for `f` that committed content `sha`.
    fn session_of(sha: &str) -> Pending {
        Pending {
            path: "f".into(),
            target: "f".into(),
            session_id: "s1".into(),
            stamp: stamp(9),
            sha256: sha.into(),
        }
    }

    fn upload_of(work: Work) -> Upload {
        match work {
            Work::Upload(u) => u,
            other => panic!("expected an upload, got {other:?}"),
        }
    }

    #[test]
    fn a_touched_file_is_only_recorded() {
        let c = candidate(Some(record("e1", "h1")), Some(remote("e1", 3, None)));
        assert!(
            matches!(decision(&c, "h1"), Work::Record(r) if r.etag == "e1" && r.stamp == stamp(9))
        );
    }

    #[test]
    fn a_changed_file_uploads_over_the_version_it_replaces() {
        let c = candidate(Some(record("e1", "h1")), Some(remote("e1", 3, None)));
        let u = upload_of(decision(&c, "h2"));
        assert_eq!(u.if_match.as_deref(), Some("e1"));
        assert_eq!(u.conflict_with, None);
    }

    #[test]
    fn a_change_on_both_sides_keeps_both() {
        let c = candidate(Some(record("e1", "h1")), Some(remote("e2", 3, None)));
        let u = upload_of(decision(&c, "h2"));
        assert_eq!(u.conflict_with.as_deref(), Some("e2"));
        // A new local file over an unknown remote one, too.
        let c = candidate(None, Some(remote("e7", 100, Some(1))));
        assert_eq!(
            upload_of(decision(&c, "h2")).conflict_with.as_deref(),
            Some("e7")
        );
    }

    #[test]
    fn a_version_committed_but_not_recorded_is_recorded() {
        let c = candidate(Some(record("e1", "h1")), Some(remote("e2", 9, Some(5))));
        let ours = session_of("h2");
        let work = decide(&c, stamp(9), "h2".into(), Some(&ours), &mut |_, _| None);
        assert!(matches!(work, Work::Record(r) if r.etag == "e2" && !r.diverged));
        // Changed here since that session: pushed over it, no conflict.
        let work = decide(&c, stamp(9), "h3".into(), Some(&ours), &mut |_, _| None);
        let u = upload_of(work);
        assert_eq!((u.if_match.as_deref(), u.conflict_with), (Some("e2"), None));
    }

    #[test]
    fn an_edit_elsewhere_of_the_same_size_and_second_is_a_conflict() {
        // Size and mtime as the local file, but no session of ours made it:
        // another writer's version (it used to be recorded as ours, and
        // the local edit was lost).
        let c = candidate(Some(record("e1", "h1")), Some(remote("e2", 9, Some(5))));
        assert_eq!(
            upload_of(decision(&c, "h2")).conflict_with.as_deref(),
            Some("e2")
        );
    }

    #[test]
    fn a_same_size_edit_within_the_second_of_the_last_upload_is_uploaded() {
        // The remote is still the recorded version, whose size and mtime
        // the new content happens to share.
        let c = candidate(Some(record("e1", "h1")), Some(remote("e1", 9, Some(5))));
        assert_eq!(
            upload_of(decision(&c, "h2")).if_match.as_deref(),
            Some("e1")
        );
    }

    #[test]
    fn a_new_file_already_on_the_remote_is_adopted() {
        let c = candidate(None, Some(remote("e7", 9, Some(5))));
        assert!(matches!(decision(&c, "h"), Work::Record(r) if r.etag == "e7"));
    }

    #[test]
    fn a_file_deleted_elsewhere_is_pushed_again() {
        let c = candidate(Some(record("e1", "h1")), None);
        let u = upload_of(decision(&c, "h1"));
        assert_eq!((u.if_match, u.conflict_with), (None, None));
    }

    #[test]
    fn a_new_file_with_vanished_content_is_a_rename() {
        let c = candidate(None, None);
        let gone = record("e1", "h1");
        let mut pool = vec![gone.clone()];
        let work = decide(&c, stamp(9), "h1".into(), None, &mut |sha, _| {
            pool.iter()
                .position(|r| r.sha256 == sha)
                .map(|i| pool.remove(i))
        });
        assert_eq!(
            work,
            Work::Rename {
                from: gone,
                to: "f".into(),
                stamp: stamp(9)
            }
        );
    }

    #[test]
    fn same_file_compares_size_and_mtime_to_the_second() {
        assert!(same_file(&remote("e", 3, Some(5)), stamp(3)));
        assert!(!same_file(&remote("e", 4, Some(5)), stamp(3)));
        assert!(!same_file(&remote("e", 3, Some(7)), stamp(3)));
        assert!(!same_file(&remote("e", 3, None), stamp(3)));
    }
}
