//! One synced folder: passes that bring the remote in line with the local
//! tree, and the loop that runs them on start-up, on file-system events and
//! periodically.

use crate::output::say;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};
use crossbeam_utils::sync::WaitGroup;
use ferry::client::retry::RetryPolicy;
use ferry::protocol::upload::UploadState;
use ferry::protocol::{ErrorCode, FileMeta};
use futures::StreamExt;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::filter::{Filter, IGNORE_FILE};
use crate::journal::{FileStamp, Journal, Pending, PendingMove, Record, now_text};
use crate::memory;
use crate::pipeline::{Outcome, Pass, Pipeline};
use crate::plan::{Candidate, Move, RemoteFile, plan, still_pushed, strictly_under, under};
use crate::remote::Remote;
use crate::scan::{scan, stat_file};
use crate::settle::{Closed, QUIET, Waiting, now_ns};
use crate::watch::{self, Notice};

/// Past this many separate changed paths, one full pass is cheaper.
const MAX_SCOPES: usize = 256;
/// Deletes sent at once.
const PARALLEL_DELETES: usize = 8;
/// Rescan interval while file watching is unavailable.
const FALLBACK_RESCAN: Duration = Duration::from_secs(60);
/// How long `once` waits for a file to stop changing, beyond the maximum
/// delay (after which a snapshot of it is pushed; this is for one whose
/// snapshot cannot be read consistently either).
const ONCE_SETTLE_GRACE: Duration = Duration::from_secs(30);
/// Files pushed as snapshots listed for `status`.
const SNAPSHOTS_LISTED: usize = 20;
/// Longest a deletion waits for a new file that may be the same file.
const RENAME_HOLD: Duration = Duration::from_secs(30);
/// Waits between attempts at a failing path or pass: 1 s doubling up to a
/// minute, with jitter.
const BACKOFF: RetryPolicy = RetryPolicy {
    base_delay: Duration::from_secs(1),
    max_delay: Duration::from_secs(60),
    give_up_after: Duration::MAX,
};
/// After the last directory move of a burst, when the whole folder is
/// compared again: events of quick sequences of moves can be lost.
const VERIFY_AFTER: Duration = Duration::from_secs(10);
/// When a path still being pushed is looked at again.
const BUSY_RETRY: Duration = Duration::from_secs(1);
/// How often a folder that was moved or removed is looked for again.
const REWATCH_RETRY: Duration = Duration::from_secs(2);
/// Attempts per failing path before `once` gives up.
const ONCE_ATTEMPTS: u32 = 4;

pub struct Folder {
    pub root: PathBuf,
    pub journal: Journal,
    pub remote: Remote,
    pub filter: Filter,
    pub dry_run: bool,
    pub max_delete: Option<u64>,
    pub rt: Handle,
    pub stop: CancellationToken,
    /// Vanished paths whose deletion waits for settling new files, and since when.
    held_for_renames: Mutex<HashMap<String, Instant>>,
    /// Paths with work queued or running; a pass leaves them alone.
    busy: Mutex<HashSet<String>>,
    /// Files whose writer closed them, pushed without waiting to settle.
    pub closed: Closed,
    /// How long a file that keeps changing waits before a snapshot of it is
    /// pushed anyway.
    pub max_settle_delay: Duration,
    /// Files waiting to settle, and since when.
    pub waiting: Waiting,
    /// Files whose last push was a snapshot taken while they kept changing,
    /// with what it was (for `status`), until a settled version is pushed.
    snapshots: Mutex<BTreeMap<String, String>>,
    /// `once`: a file pushed as a snapshot is not waited for afterwards.
    pub once: bool,
    notes: (Sender<Note>, Receiver<Note>),
}

/// What the transfer threads tell the folder's loop.
enum Note {
    /// Look at this path again: after a delay, or with backoff (`None`).
    Retry(String, Option<Duration>),
    /// Work on a path ended.
    Done,
}

/// A path marked busy; unmarked when dropped (its work ended).
pub struct Busy {
    folder: Arc<Folder>,
    path: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.folder.busy.lock().unwrap().remove(&self.path);
        let _ = self.folder.notes.0.send(Note::Done);
    }
}

/// What a folder is made of, besides its run-time state.
pub struct FolderParts {
    pub root: PathBuf,
    pub journal: Journal,
    pub remote: Remote,
    pub filter: Filter,
    pub dry_run: bool,
    pub max_delete: Option<u64>,
    pub rt: Handle,
    pub stop: CancellationToken,
    pub max_settle_delay: Duration,
    pub once: bool,
}

#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// One full pass (and whatever it had to wait for), then return.
    pub once: bool,
    pub rescan_interval: Duration,
}

impl Folder {
    pub fn new(parts: FolderParts) -> Arc<Folder> {
        Arc::new(Folder {
            root: parts.root,
            journal: parts.journal,
            remote: parts.remote,
            filter: parts.filter,
            dry_run: parts.dry_run,
            max_delete: parts.max_delete,
            rt: parts.rt,
            stop: parts.stop,
            held_for_renames: Mutex::default(),
            busy: Mutex::default(),
            closed: Closed::default(),
            max_settle_delay: parts.max_settle_delay,
            waiting: Waiting::default(),
            snapshots: Mutex::default(),
            once: parts.once,
            notes: crossbeam_channel::unbounded(),
        })
    }

    /// Marks `path` busy, unless it already is.
    pub fn claim(self: &Arc<Self>, path: &str) -> Option<Busy> {
        self.busy
            .lock()
            .unwrap()
            .insert(path.to_owned())
            .then(|| Busy {
                folder: self.clone(),
                path: path.to_owned(),
            })
    }

    fn is_busy(&self, path: &str) -> bool {
        self.busy.lock().unwrap().contains(path)
    }

    /// Whether no work is queued or running.
    pub fn idle(&self) -> bool {
        self.busy.lock().unwrap().is_empty()
    }

    /// A snapshot of `path`, still changing, was committed: `status` lists
    /// it until a settled version is pushed.
    pub fn note_snapshot(&self, path: &str, bytes: u64) {
        let mut snapshots = self.snapshots.lock().unwrap();
        snapshots.insert(path.to_owned(), format!("{bytes} bytes at {}", now_text()));
        self.save_snapshots(&snapshots);
    }

    /// `path` was pushed settled, or is gone: no longer a snapshot.
    pub fn note_settled(&self, path: &str) {
        self.waiting.settled(path);
        let mut snapshots = self.snapshots.lock().unwrap();
        if snapshots.remove(path).is_some() {
            self.save_snapshots(&snapshots);
        }
    }

    /// Files pushed as snapshots, within `scopes`, that have settled since
    /// as their snapshot (a pass finds them unchanged): no longer listed.
    /// Returns those unchanged but not quiet for long enough yet, with when
    /// to look again.
    fn forget_settled_snapshots(&self, scopes: &[String]) -> Vec<(String, Option<Duration>)> {
        let mut again = Vec::new();
        let paths: Vec<String> = self
            .snapshots
            .lock()
            .unwrap()
            .keys()
            .filter(|p| scopes.iter().any(|s| under(p, s)))
            .cloned()
            .collect();
        for path in paths {
            if self.is_busy(&path) {
                continue;
            }
            let current = stat_file(&self.root.join(&path));
            let recorded = self.journal.record(&path).ok().flatten().map(|r| r.stamp);
            match current {
                None => self.note_settled(&path),
                // Changed since: the pass, or a later one, pushes it.
                Some(stamp) if Some(stamp) != recorded => {}
                Some(stamp) => {
                    let quiet_for = now_ns() - stamp.mtime_ns;
                    let quiet = QUIET.as_nanos() as i64;
                    if quiet_for >= quiet {
                        self.note_settled(&path);
                    } else if !self.once {
                        let rest = Duration::from_nanos((quiet - quiet_for) as u64);
                        again.push((path, Some(rest)));
                    }
                }
            }
        }
        again
    }

    fn save_snapshots(&self, snapshots: &BTreeMap<String, String>) {
        let mut text = format!("{}", snapshots.len());
        for (path, what) in snapshots.iter().take(SNAPSHOTS_LISTED) {
            // One line each (no remote path has a backslash to confuse).
            let path = path
                .replace('\n', "\\n")
                .replace('\r', "\\r")
                .replace('\t', "\\t");
            text.push_str(&format!("\n{path}\t{what}"));
        }
        if let Err(e) = self.journal.set_meta("snapshots", &text) {
            tracing::warn!(error = %e, "writing the journal failed");
        }
    }

    /// Asks the loop to look at `path` again (after `after`, or with backoff).
    pub fn note_retry(&self, path: &str, after: Option<Duration>) {
        let _ = self.notes.0.send(Note::Retry(path.to_owned(), after));
    }

    /// One pass over `scopes` (folder-relative; `""` is everything).
    /// `others_waiting`: paths outside this pass wait to settle (one of them
    /// may be a vanished file, renamed).
    pub fn pass(
        self: &Arc<Self>,
        pipeline: &Pipeline,
        scopes: &[String],
        full: bool,
        others_waiting: bool,
    ) -> Result<Outcome> {
        let started = Instant::now();
        if full {
            self.filter.reload();
        }
        let accept = |rel: &str| match self.remote.path(rel) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(path = rel, error = %e, "cannot be a remote path; not synced");
                false
            }
        };
        let mut all_scopes = scopes.to_vec();
        let mut local = BTreeMap::new();
        let mut unreadable = Vec::new();
        let mut records = BTreeMap::new();
        let mut remote = BTreeMap::new();
        let mut looked = 0;
        loop {
            for scope in &all_scopes[looked..] {
                let tree = scan(&self.root, scope, &self.filter, &accept);
                local.extend(tree.files);
                unreadable.extend(tree.unreadable);
                records.extend(self.journal.records_under(scope)?);
                let listed = self
                    .rt
                    .block_on(self.remote.index(scope))
                    .with_context(|| format!("listing {}", self.remote.describe()))?;
                remote.extend(listed);
            }
            if looked > 0 || all_scopes.iter().any(|s| s.is_empty()) {
                break;
            }
            // A file written through one of its hard links changed under
            // every name, but the events name only the one written to: its
            // other names join this pass.
            looked = all_scopes.len();
            let covered = |path: &str| all_scopes.iter().any(|s| under(path, s));
            let linked = other_links(&self.root, &self.journal, &local, &records, &covered)?;
            if linked.is_empty() {
                break;
            }
            for (path, changed) in linked {
                tracing::debug!(
                    path,
                    changed,
                    "another name (hard link) of a changed file; looked at too"
                );
                // A close of the file is a close of it under every name.
                self.closed.share(&changed, &path);
                all_scopes.push(path);
            }
        }
        let scopes = all_scopes.as_slice();
        let kept = |path: &str| {
            unreadable.iter().any(|dir| under(path, dir))
                || self.is_busy(path)
                || self.filter.is_ignored(Path::new(path), false)
        };
        let seen_at = now_ns();
        let busy = |path: &str| self.is_busy(path);
        let plan = plan(scopes, &local, &records, &remote, &kept, &busy);
        let snapshots_to_recheck = if self.dry_run {
            Vec::new()
        } else {
            self.forget_settled_snapshots(scopes)
        };
        for path in &plan.changed_elsewhere {
            tracing::debug!(path, "changed on the server, unchanged here; left as it is");
        }
        let mut outcome = Outcome {
            unchanged: plan.unchanged,
            retry: snapshots_to_recheck,
            ..Outcome::default()
        };
        let mut candidates = plan.candidates;
        let mut vanished = plan.vanished;
        if self.dry_run {
            for m in &plan.moves {
                let slash = if m.dir { "/" } else { "" };
                say!("rename {}{slash} -> {}{slash}", m.from, m.to);
            }
        } else {
            self.apply_moves(
                &plan.moves,
                &records,
                &local,
                &remote,
                &mut candidates,
                &mut vanished,
                &mut outcome,
            );
        }

        // A file that takes the name of a directory of ours goes up after
        // the files that were in it are deleted: until then the name is a
        // directory on the server, and the upload a conflict with ourselves.
        let (replacing, candidates): (Vec<Candidate>, Vec<Candidate>) = candidates
            .into_iter()
            .partition(|c| vanished.iter().any(|r| strictly_under(&r.path, &c.path)));
        let pass = Arc::new(Pass {
            folder: self.clone(),
            remote,
            vanished: Mutex::new(vanished),
            outcome: Mutex::new(outcome),
        });
        self.submit(pipeline, &pass, candidates, seen_at);
        let vanished = std::mem::take(&mut *pass.vanished.lock().unwrap());
        let vanished = self.hold_for_renames(&pass, vanished, others_waiting);
        if !self.stop.is_cancelled() {
            self.delete(&pass, vanished, full);
        }
        let (ready, blocked): (Vec<Candidate>, Vec<Candidate>) =
            replacing.into_iter().partition(|c| {
                self.dry_run
                    || self
                        .journal
                        .records_under(&c.path)
                        .is_ok_and(|records| !records.keys().any(|p| strictly_under(p, &c.path)))
            });
        {
            let mut outcome = pass.outcome.lock().unwrap();
            for c in blocked {
                // Back with the deletes held for renames; after a backoff
                // when they failed or the delete limit held them.
                let wait = outcome
                    .retry
                    .iter()
                    .filter(|(p, _)| strictly_under(p, &c.path))
                    .filter_map(|(_, w)| *w)
                    .max();
                tracing::debug!(
                    path = c.path,
                    "waits for the files of the directory it replaces to be deleted"
                );
                outcome.retry.push((c.path, wait));
            }
        }
        self.submit(pipeline, &pass, ready, seen_at);
        let outcome = std::mem::take(&mut *pass.outcome.lock().unwrap());
        self.report(&outcome, full, started.elapsed());
        Ok(outcome)
    }

    /// Hands the candidates to the pipeline; returns once each is decided.
    fn submit(
        self: &Arc<Self>,
        pipeline: &Pipeline,
        pass: &Arc<Pass>,
        candidates: Vec<Candidate>,
        seen_at: i64,
    ) {
        let pending = WaitGroup::new();
        for candidate in candidates {
            if self.stop.is_cancelled() {
                break;
            }
            let Some(busy) = self.claim(&candidate.path) else {
                // Still being pushed: looked at again once that is done.
                pass.outcome
                    .lock()
                    .unwrap()
                    .retry
                    .push((candidate.path, Some(BUSY_RETRY)));
                continue;
            };
            match self.confirm(candidate) {
                Some(candidate) => pipeline.submit(pass, candidate, seen_at, busy, &pending),
                None => {
                    let path = busy.path.clone();
                    drop(busy);
                    pass.outcome
                        .lock()
                        .unwrap()
                        .retry
                        .push((path, Some(BUSY_RETRY)));
                }
            }
        }
        pending.wait();
    }

    /// Settles the upload sessions a stopped or killed run left.
    ///
    /// One the server committed is recorded: otherwise its version would
    /// look like a change made elsewhere, and later local deletes and
    /// renames of the file would not be passed on. One still open whose file
    /// is gone or no longer the version it was sending is aborted and
    /// forgotten: nothing would resume it, and the server would keep what it
    /// staged until it expires.
    fn settle_interrupted_uploads(&self) {
        let Ok(pending) = self.journal.all_pending() else {
            return;
        };
        for p in pending {
            let status = (!p.session_id.is_empty())
                .then(|| self.rt.block_on(self.remote.upload_status(&p.session_id)));
            tracing::debug!(path = p.path, session = p.session_id, status = ?status.as_ref().map(|s| s.as_ref().map(|s| s.state)), "upload left by the last run");
            let open = match status {
                Some(Ok(status)) if status.state == UploadState::Committed => {
                    self.record_committed(p, status.meta.and_then(|m| m.etag));
                    continue;
                }
                Some(Ok(_)) => true,
                // Expired, or never created.
                Some(Err(e)) if e.code() == ErrorCode::NotFound => false,
                None => false,
                // Not known now: settled on the next start.
                Some(Err(_)) => continue,
            };
            if stat_file(&self.root.join(&p.path)) == Some(p.stamp) {
                continue;
            }
            if open {
                self.rt.block_on(self.remote.abort(&p.session_id));
            }
            match self.journal.clear_pending(&p.path) {
                Ok(()) => tracing::info!(
                    path = p.path,
                    session = p.session_id,
                    "dropped an interrupted upload: the file is gone or changed since"
                ),
                Err(e) => tracing::warn!(path = p.path, error = %e, "writing the journal failed"),
            }
        }
    }

    /// Records the version a session of a stopped run committed at its path
    /// (a conflict copy's session is left to resume, which finds it
    /// committed: the path keeps the other writer's version).
    fn record_committed(&self, p: Pending, etag: Option<String>) {
        let to_path = self
            .remote
            .path(&p.path)
            .is_ok_and(|path| path.as_str() == p.target);
        let Some(etag) = etag.filter(|_| to_path) else {
            return;
        };
        let record = Record {
            diverged: false,
            path: p.path.clone(),
            stamp: p.stamp,
            sha256: p.sha256,
            etag,
        };
        match self.journal.commit(&record) {
            Ok(()) => tracing::info!(
                path = p.path,
                "recorded an upload committed before the last stop"
            ),
            Err(e) => tracing::warn!(path = p.path, error = %e, "writing the journal failed"),
        }
    }

    /// A server-side rename, noted in the journal first: a run killed before
    /// it records the result leaves the note for the next start to settle.
    /// The caller moves the journal's records on success, which clears it.
    pub fn rename_on_server(&self, from: &str, to: &str, dir: bool) -> Result<FileMeta> {
        self.journal.begin_move(&PendingMove {
            from: from.to_owned(),
            to: to.to_owned(),
            dir,
        })?;
        let renamed = self.rt.block_on(self.remote.rename(from, to, dir));
        if renamed.is_err()
            && let Err(e) = self.journal.clear_move(from)
        {
            // The note stays; the next start finds the source still there.
            tracing::warn!(path = from, error = %e, "writing the journal failed");
        }
        Ok(renamed?)
    }

    /// Settles the renames a stopped or killed run sent and could not
    /// record. The server made one if its source is gone and its target is
    /// there; the journal then follows, so later local changes of those files
    /// are passed on. Otherwise it was never made and is forgotten.
    fn record_made_renames(&self) {
        let Ok(moves) = self.journal.pending_moves() else {
            return;
        };
        for m in moves {
            let (Ok(source), Ok(target)) = (
                self.rt.block_on(self.remote.index(&m.from)),
                self.rt.block_on(self.remote.index(&m.to)),
            ) else {
                continue;
            };
            let made = source.is_empty() && !target.is_empty();
            let result = if made {
                self.journal
                    .rename(&m.from, &m.to)
                    .and_then(|()| self.set_etags(&target))
            } else {
                self.journal.clear_move(&m.from)
            };
            match result {
                Ok(()) if made => tracing::info!(
                    from = m.from,
                    to = m.to,
                    "recorded a rename made before the last stop"
                ),
                Ok(()) => {}
                Err(e) => tracing::warn!(path = m.from, error = %e, "writing the journal failed"),
            }
        }
    }

    /// Takes the etags of the files at or below `scope` from the server.
    fn refresh_etags(&self, scope: &str) -> Result<()> {
        let listed = self.rt.block_on(self.remote.index(scope))?;
        self.set_etags(&listed)
    }

    fn set_etags(&self, files: &BTreeMap<String, RemoteFile>) -> Result<()> {
        for (path, file) in files {
            self.journal.set_etag(path, &file.etag)?;
        }
        Ok(())
    }

    /// Checks a candidate against the present, now that its path is busy
    /// (nothing else commits it meanwhile): `None` if work of an earlier pass
    /// committed it since this pass read the journal. An apparent change on
    /// the remote is confirmed with a fresh look, as the listing may predate
    /// the agent's own last upload.
    fn confirm(&self, mut candidate: Candidate) -> Option<Candidate> {
        let record = self.journal.record(&candidate.path).ok()?;
        if record != candidate.record {
            return None;
        }
        let moved_on = match (&candidate.record, &candidate.remote) {
            (Some(rec), Some(remote)) => remote.etag != rec.etag,
            (None, Some(_)) => true,
            _ => false,
        };
        if moved_on && !self.dry_run {
            let fresh = self.rt.block_on(self.remote.stat(&candidate.path)).ok()?;
            candidate.remote = fresh.and_then(|meta| {
                Some(RemoteFile {
                    size: meta.size,
                    etag: meta.etag?,
                    mtime: meta.mtime,
                })
            });
        }
        Some(candidate)
    }

    /// Server-side renames; a rename the server refuses becomes an upload of
    /// the new path and a delete of the old one.
    #[allow(clippy::too_many_arguments)]
    fn apply_moves(
        &self,
        moves: &[Move],
        records: &BTreeMap<String, Record>,
        local: &BTreeMap<String, FileStamp>,
        remote: &BTreeMap<String, RemoteFile>,
        candidates: &mut Vec<Candidate>,
        vanished: &mut Vec<Record>,
        outcome: &mut Outcome,
    ) {
        for m in moves {
            if self.stop.is_cancelled() {
                return;
            }
            let moved: Vec<&Record> = records
                .values()
                .filter(|r| under(&r.path, &m.from))
                .collect();
            let result = self
                .rename_on_server(&m.from, &m.to, m.dir)
                .and_then(|meta| {
                    self.journal.rename(&m.from, &m.to)?;
                    if m.dir {
                        self.refresh_etags(&m.to)
                    } else {
                        // Etags survive a rename on some stores and not on others.
                        if let Some(etag) = meta.etag {
                            self.journal.set_etag(&m.to, &etag)?;
                        }
                        Ok(())
                    }
                });
            match result {
                Ok(()) => {
                    tracing::info!(
                        from = m.from,
                        to = m.to,
                        files = moved.len(),
                        "renamed on the server"
                    );
                    outcome.renamed += moved.len();
                    for c in candidates.iter_mut().filter(|c| under(&c.path, &m.to)) {
                        if let Ok(Some(record)) = self.journal.record(&c.path) {
                            c.remote = Some(RemoteFile {
                                size: record.stamp.size,
                                etag: record.etag.clone(),
                                mtime: None,
                            });
                            c.record = Some(record);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(from = m.from, to = m.to, error = %e, "server-side rename failed; uploading instead");
                    for record in moved {
                        let to = format!("{}{}", m.to, &record.path[m.from.len()..]);
                        vanished.push(record.clone());
                        candidates.retain(|c| c.path != to);
                        if let Some(stamp) = local.get(&to) {
                            candidates.push(Candidate {
                                path: to.clone(),
                                stamp: *stamp,
                                record: None,
                                remote: remote.get(&to).cloned(),
                            });
                        }
                    }
                }
            }
        }
    }

    /// Keeps vanished files from being deleted while new files of the same
    /// pass are still being written (for at most [`RENAME_HOLD`]): a copy
    /// followed by a delete is a rename once the copy has settled and its
    /// content matches. Held paths come back, due with the settling files.
    fn hold_for_renames(
        &self,
        pass: &Pass,
        vanished: Vec<Record>,
        others_waiting: bool,
    ) -> Vec<Record> {
        let mut held_since = self.held_for_renames.lock().unwrap();
        let mut outcome = pass.outcome.lock().unwrap();
        if !(outcome.new_file_settling || others_waiting) || vanished.is_empty() {
            for record in &vanished {
                held_since.remove(&record.path);
            }
            return vanished;
        }
        let now = Instant::now();
        let (hold, go): (Vec<Record>, Vec<Record>) = vanished.into_iter().partition(|r| {
            now.duration_since(*held_since.entry(r.path.clone()).or_insert(now)) < RENAME_HOLD
        });
        if !hold.is_empty() {
            tracing::debug!(paths = ?hold.iter().map(|r| &r.path).collect::<Vec<_>>(), "deletions wait for settling files");
            let wait = outcome
                .retry
                .iter()
                .filter_map(|(_, w)| *w)
                .max()
                .unwrap_or(QUIET);
            for (_, w) in outcome.retry.iter_mut().filter(|(_, w)| w.is_some()) {
                *w = Some(wait);
            }
            outcome
                .retry
                .extend(hold.into_iter().map(|r| (r.path, Some(wait))));
        }
        for record in &go {
            held_since.remove(&record.path);
        }
        go
    }

    /// Deletes the remote copies of vanished files, unless there are more
    /// than the safeguard allows.
    fn delete(&self, pass: &Pass, vanished: Vec<Record>, full: bool) {
        if vanished.is_empty() {
            return;
        }
        // Only what is still gone here and still recorded as it was (work of
        // later passes may have run meanwhile).
        let (vanished, moved_on): (Vec<Record>, Vec<Record>) =
            vanished.into_iter().partition(|r| {
                !self.is_busy(&r.path)
                    && stat_file(&self.root.join(&r.path)).is_none()
                    && (self.dry_run
                        || self
                            .journal
                            .record(&r.path)
                            .ok()
                            .flatten()
                            .is_some_and(|now| now.etag == r.etag))
            });
        for record in &vanished {
            // Gone here: no longer a file that keeps changing.
            self.note_settled(&record.path);
        }
        // Looked at again once that work is done.
        pass.outcome
            .lock()
            .unwrap()
            .retry
            .extend(moved_on.into_iter().map(|r| (r.path, Some(BUSY_RETRY))));
        let (ours, gone): (Vec<Record>, Vec<Record>) = vanished
            .into_iter()
            .partition(|r| still_pushed(r, pass.remote.get(&r.path)));
        if !self.dry_run {
            for record in &gone {
                // Deleted or replaced on the server already: nothing to delete.
                tracing::info!(
                    path = record.path,
                    "gone here and changed or gone on the server; left as it is there"
                );
                let _ = self.journal.forget(&record.path);
            }
        }
        if ours.is_empty() {
            return;
        }
        let tracked = self.journal.count_records().map(|(n, _)| n).unwrap_or(0);
        let remote_files = if full { pass.remote.len() as u64 } else { 0 };
        let limit = delete_limit(self.max_delete, tracked, remote_files);
        if ours.len() as u64 > limit {
            let why = match self.max_delete {
                Some(n) => format!("--max-delete {n}"),
                None => format!("half of the {} remote files", tracked.max(remote_files)),
            };
            let message = format!(
                "refusing to delete {} remote files in one pass (more than {why}); nothing was deleted. \
                 If the deletions are intended, run with --max-delete {}",
                ours.len(),
                ours.len()
            );
            tracing::error!("{message}");
            if self.dry_run {
                say!("refuse {message}");
            } else {
                let _ = self.journal.add_error("", &message);
                let _ = self
                    .journal
                    .set_meta("held_deletes", &ours.len().to_string());
            }
            pass.outcome.lock().unwrap().deletes_held = ours.len();
            return;
        }
        if self.dry_run {
            for record in &ours {
                say!("delete {}", record.path);
            }
            return;
        }
        let _ = self.journal.set_meta("held_deletes", "0");
        let results: Vec<(Record, ferry::Result<()>)> = self.rt.block_on(
            futures::stream::iter(ours)
                .map(|record| async move {
                    let result = self.remote.delete(&record.path, &record.etag).await;
                    (record, result)
                })
                .buffer_unordered(PARALLEL_DELETES)
                .collect(),
        );
        let mut outcome = pass.outcome.lock().unwrap();
        for (record, result) in results {
            match result {
                Ok(()) => {
                    tracing::info!(path = record.path, "deleted");
                    outcome.deleted += 1;
                    let _ = self.journal.forget(&record.path);
                }
                Err(e) if e.code() == ErrorCode::NotFound => {
                    let _ = self.journal.forget(&record.path);
                }
                Err(e) if e.code() == ErrorCode::PreconditionFailed => {
                    tracing::warn!(
                        path = record.path,
                        "changed on the server since the last sync; not deleted there"
                    );
                    let _ = self.journal.forget(&record.path);
                }
                Err(e) => {
                    tracing::warn!(path = record.path, error = %e, "delete failed; will retry");
                    let _ = self.journal.add_error(&record.path, &e.to_string());
                    outcome.failed += 1;
                    outcome.retry.push((record.path.clone(), None));
                }
            }
        }
    }

    fn report(&self, outcome: &Outcome, full: bool, took: Duration) {
        let summary = format!(
            "{} pass: {} unchanged, {} to upload ({} bytes), {} renamed, {} deleted, {} failed, {} waiting",
            if full { "full" } else { "partial" },
            outcome.unchanged,
            outcome.queued,
            outcome.queued_bytes,
            outcome.renamed,
            outcome.deleted,
            outcome.failed,
            outcome.retry.len(),
        );
        let busy = outcome.queued + outcome.renamed + outcome.deleted + outcome.failed > 0;
        if full || busy {
            tracing::info!(folder = %self.root.display(), took = ?took, "{summary}");
        } else {
            tracing::debug!(folder = %self.root.display(), took = ?took, "{summary}");
        }
        if self.dry_run {
            for (path, _) in &outcome.retry {
                say!("wait {path} (still being written)");
            }
            return;
        }
        let now = now_text();
        let _ = self.journal.set_meta("last_pass_at", &now);
        let _ = self.journal.set_meta("last_pass", &summary);
        if full && outcome.failed == 0 {
            let _ = self.journal.set_meta("last_full_sync_at", &now);
        }
    }

    /// Runs passes until stopped (or, with `once`, until one full pass and
    /// what it waited for are done). Returns whether everything was pushed
    /// (deletes held back by the safeguard count as not pushed).
    pub fn run(
        self: &Arc<Self>,
        pipeline: &Pipeline,
        options: &LoopOptions,
        shutdown: &Receiver<()>,
    ) -> Result<bool> {
        let mut fallback = false;
        let fallback_every = options.rescan_interval.min(FALLBACK_RESCAN);
        let mut watch = if options.once || self.dry_run {
            None
        } else {
            match watch::start(&self.root) {
                Ok(w) => Some(w),
                Err(e) if watch::is_watch_limit(&e) => {
                    report_watch_limit(&self.root, fallback_every);
                    fallback = true;
                    None
                }
                Err(e) => anyhow::bail!("cannot watch {}: {e}", self.root.display()),
            }
        };
        if !self.dry_run {
            self.settle_interrupted_uploads();
            self.record_made_renames();
            // Snapshots listed by an earlier run: this one has seen none.
            self.save_snapshots(&self.snapshots.lock().unwrap());
        }
        let mut events = watch
            .as_ref()
            .map_or_else(crossbeam_channel::never, |w| w.events.clone());
        // When to watch the folder anew, after it was moved or removed.
        let mut rewatch_at: Option<Instant> = None;
        let mut dirty: HashMap<String, Instant> = HashMap::new();
        let mut failures: HashMap<String, u32> = HashMap::new();
        let mut pass_failures = 0u32;
        let mut next_full = Instant::now();
        // A full pass once things are quiet after directory moves.
        let mut verify_at: Option<Instant> = None;
        let mut full_done = false;
        let mut deletes_held = false;
        // `once`: files that never settle (a log being appended) are given up on.
        let mut changing_since: HashMap<String, Instant> = HashMap::new();
        let mut gave_up = false;
        // A full pass held maps of every path; its work is done once idle.
        let mut trim_due = false;
        // Stopped by a signal: a clean end for `run`; for `once`, not
        // everything was pushed.
        let stopped = !options.once;
        loop {
            if self.stop.is_cancelled() {
                return Ok(stopped);
            }
            let now = Instant::now();
            if rewatch_at.is_some_and(|at| at <= now) {
                rewatch_at = None;
                // The old watches follow the directory that was moved away.
                drop(watch.take());
                events = crossbeam_channel::never();
                match watch::start(&self.root) {
                    Ok(w) => {
                        tracing::info!(folder = %self.root.display(), "watching the folder again");
                        events = watch.insert(w).events.clone();
                        next_full = now;
                    }
                    Err(e) if watch::is_watch_limit(&e) => {
                        report_watch_limit(&self.root, fallback_every);
                        fallback = true;
                        next_full = now;
                    }
                    Err(e) => {
                        tracing::debug!(folder = %self.root.display(), error = %e, "cannot watch the folder yet");
                        rewatch_at = Some(now + REWATCH_RETRY);
                    }
                }
            }
            if verify_at.is_some_and(|at| at <= now) {
                verify_at = None;
                next_full = now;
            }
            let (scopes, full) = if now >= next_full {
                dirty.clear();
                (vec![String::new()], true)
            } else {
                let due: Vec<String> = dirty
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(p, _)| p.clone())
                    .collect();
                for path in &due {
                    dirty.remove(path);
                }
                let scopes = collapse(due);
                if scopes.len() > MAX_SCOPES {
                    (vec![String::new()], true)
                } else {
                    (scopes, false)
                }
            };
            if !scopes.is_empty() {
                let others_waiting = !dirty.is_empty();
                match self.pass(pipeline, &scopes, full, others_waiting) {
                    Ok(outcome) => {
                        pass_failures = 0;
                        deletes_held |= outcome.deletes_held > 0;
                        if full {
                            full_done = true;
                            trim_due = true;
                            let every = if fallback {
                                fallback_every
                            } else {
                                options.rescan_interval
                            };
                            next_full = Instant::now() + every;
                        }
                        let retried: HashSet<String> =
                            outcome.retry.iter().map(|(p, _)| p.clone()).collect();
                        changing_since.retain(|p, _| {
                            retried.contains(p) || !scopes.iter().any(|s| under(p, s))
                        });
                        for (path, after) in outcome.retry {
                            schedule(path, after, &mut dirty, &mut failures, &mut changing_since);
                        }
                    }
                    Err(_) if self.stop.is_cancelled() => return Ok(stopped),
                    Err(e) => {
                        pass_failures += 1;
                        let delay = BACKOFF
                            .delay(pass_failures, None)
                            .max(Duration::from_secs(1));
                        tracing::warn!(folder = %self.root.display(), error = %format!("{e:#}"), retry_in = ?delay, "pass failed");
                        if !self.dry_run {
                            let _ = self.journal.add_error("", &format!("{e:#}"));
                        }
                        if self.dry_run || (options.once && pass_failures >= ONCE_ATTEMPTS) {
                            return Err(e);
                        }
                        let at = Instant::now() + delay;
                        if full {
                            next_full = at;
                        } else {
                            for scope in scopes {
                                dirty.insert(scope, at);
                            }
                        }
                    }
                }
                if !self.dry_run {
                    let _ = self.journal.set_meta("waiting", &dirty.len().to_string());
                }
            }
            if self.dry_run {
                return Ok(true);
            }
            if trim_due && self.idle() {
                trim_due = false;
                memory::release_freed();
            }
            while let Ok(note) = self.notes.1.try_recv() {
                if let Note::Retry(path, after) = note {
                    schedule(path, after, &mut dirty, &mut failures, &mut changing_since);
                }
            }
            if options.once && full_done {
                let limit = self.max_settle_delay + ONCE_SETTLE_GRACE;
                changing_since.retain(|path, since| {
                    let stuck = since.elapsed() >= limit;
                    if stuck {
                        tracing::warn!(
                            path,
                            "still changing after {} s, and no consistent snapshot of it could be read; not pushed this time",
                            limit.as_secs()
                        );
                        dirty.remove(path);
                        gave_up = true;
                    }
                    !stuck
                });
                if dirty.is_empty() && self.idle() {
                    return Ok(!deletes_held && !gave_up);
                }
                if failures.values().any(|n| *n >= ONCE_ATTEMPTS) {
                    tracing::error!(
                        paths = failures.len(),
                        "giving up on files that keep failing"
                    );
                    return Ok(false);
                }
            }
            let wake = dirty
                .values()
                .copied()
                .chain(verify_at)
                .chain(rewatch_at)
                .min()
                .unwrap_or(next_full)
                .min(next_full);
            let timeout = wake.saturating_duration_since(Instant::now());
            crossbeam_channel::select! {
                recv(shutdown) -> _ => return Ok(stopped),
                recv(self.notes.1) -> note => {
                    if let Ok(Note::Retry(path, after)) = note {
                        schedule(path, after, &mut dirty, &mut failures, &mut changing_since);
                    }
                }
                recv(events) -> delivery => {
                    let Ok(delivery) = delivery else { continue };
                    let mut notices = watch::interpret(&self.root, delivery);
                    while let Ok(more) = events.try_recv() {
                        notices.extend(watch::interpret(&self.root, more));
                    }
                    for notice in notices {
                        if matches!(notice, Notice::Recheck(_)) {
                            verify_at = Some(Instant::now() + VERIFY_AFTER);
                        }
                        if notice == Notice::RootGone {
                            tracing::warn!(
                                folder = %self.root.display(),
                                "the folder was moved or removed; watching what is at its path again and comparing it"
                            );
                            rewatch_at = Some(Instant::now());
                            continue;
                        }
                        self.notice(notice, &mut dirty, &mut next_full, &mut fallback, fallback_every);
                    }
                }
                default(timeout) => {}
            }
        }
    }

    fn notice(
        &self,
        notice: Notice,
        dirty: &mut HashMap<String, Instant>,
        next_full: &mut Instant,
        fallback: &mut bool,
        fallback_every: Duration,
    ) {
        let now = Instant::now();
        match notice {
            Notice::Changed(paths) => {
                tracing::trace!(?paths, "changed");
                for abs in paths {
                    let Some(rel) = abs.strip_prefix(&self.root).ok().and_then(|p| p.to_str())
                    else {
                        continue;
                    };
                    let mut rel = rel.to_owned();
                    if abs.file_name().is_some_and(|n| n == IGNORE_FILE) {
                        self.filter.reload();
                        rel = Path::new(&rel)
                            .parent()
                            .and_then(|p| p.to_str())
                            .unwrap_or("")
                            .to_owned();
                    } else if self.filter.is_ignored(Path::new(&rel), abs.is_dir()) {
                        continue;
                    }
                    // A path already waiting to settle keeps its turn; one
                    // backing off after a failure is tried again soon.
                    dirty
                        .entry(rel)
                        .and_modify(|at| *at = (*at).min(now + QUIET))
                        .or_insert(now);
                }
            }
            Notice::Closed(paths) => {
                let seen_at = now_ns();
                for abs in paths {
                    let Some(rel) = abs.strip_prefix(&self.root).ok().and_then(|p| p.to_str())
                    else {
                        continue;
                    };
                    // Only paths `Changed` put on the list (not ignored):
                    // a finished file waits no longer.
                    if let Some(at) = dirty.get_mut(rel) {
                        *at = now;
                        self.closed.note(rel.to_owned(), seen_at);
                    }
                }
            }
            Notice::Recheck(dirs) => {
                for abs in dirs {
                    let Some(rel) = abs.strip_prefix(&self.root).ok().and_then(|p| p.to_str())
                    else {
                        continue;
                    };
                    let at = now + QUIET;
                    dirty
                        .entry(rel.to_owned())
                        .and_modify(|t| *t = (*t).min(at))
                        .or_insert(at);
                }
            }
            Notice::Rescan(why) => {
                tracing::warn!(folder = %self.root.display(), "{why}");
                *next_full = now;
            }
            // Handled by the loop, which holds the watch.
            Notice::RootGone => {}
            Notice::WatchLimit(why) => {
                tracing::error!(
                    folder = %self.root.display(),
                    "{why}; until then the folder is rescanned every {} s",
                    fallback_every.as_secs()
                );
                *fallback = true;
                *next_full = (*next_full).min(now + fallback_every);
            }
        }
    }
}

/// Puts `path` back on the list: after `after` (it is still changing), or
/// after a backoff that grows with each failure (`None`).
fn schedule(
    path: String,
    after: Option<Duration>,
    dirty: &mut HashMap<String, Instant>,
    failures: &mut HashMap<String, u32>,
    changing_since: &mut HashMap<String, Instant>,
) {
    let now = Instant::now();
    let delay = match after {
        Some(wait) => {
            changing_since.entry(path.clone()).or_insert(now);
            wait
        }
        None => {
            let n = failures.entry(path.clone()).or_insert(0);
            *n += 1;
            BACKOFF.delay(*n, None).max(Duration::from_millis(500))
        }
    };
    let at = now + delay;
    dirty
        .entry(path)
        .and_modify(|t| *t = (*t).min(at))
        .or_insert(at);
}

/// The other names of files that changed, when a pass covers only part of
/// the folder: a file written through one of its hard links changed under
/// every name. For each file of `local` that is new or differs from its
/// record and has more than one link, the paths the journal holds with its
/// inode, outside what the pass `covered`, that are still that very file
/// (same device and inode: not an unrelated file of another file system
/// below the folder) and whose record is not this version yet. Links
/// outside the folder are not in the journal and play no part. Each comes
/// with the changed path it was found through.
fn other_links(
    root: &Path,
    journal: &Journal,
    local: &BTreeMap<String, FileStamp>,
    records: &BTreeMap<String, Record>,
    covered: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, String)>> {
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    for (path, stamp) in local {
        if records.get(path).is_some_and(|r| r.stamp == *stamp) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(root.join(path)) else {
            continue;
        };
        if meta.nlink() < 2 || meta.ino() != stamp.inode {
            continue;
        }
        for record in journal.records_with_inode(stamp.inode)? {
            if record.stamp == *stamp
                || record.path == *path
                || covered(&record.path)
                || found.contains_key(&record.path)
            {
                continue;
            }
            let same_file = std::fs::symlink_metadata(root.join(&record.path)).is_ok_and(|m| {
                m.file_type().is_file() && m.dev() == meta.dev() && m.ino() == meta.ino()
            });
            if same_file {
                found.insert(record.path, path.clone());
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// Deletes allowed in one pass: `--max-delete`, or half of the files known
/// on the remote.
pub fn delete_limit(max_delete: Option<u64>, tracked: u64, remote_files: u64) -> u64 {
    max_delete.unwrap_or(tracked.max(remote_files) / 2)
}

/// The paths, minus those inside another one.
fn collapse(mut paths: Vec<String>) -> Vec<String> {
    paths.sort();
    let mut out: Vec<String> = Vec::new();
    for path in paths {
        if !out.last().is_some_and(|last| under(&path, last)) {
            out.push(path);
        }
    }
    out
}

/// The folder cannot be watched for the kernel's limit: it is rescanned
/// every `every` instead.
fn report_watch_limit(root: &Path, every: Duration) {
    tracing::error!(
        folder = %root.display(),
        "{}; until then the folder is rescanned every {} s",
        watch::watch_limit_message(),
        every.as_secs()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_delete_limit_is_half_the_remote_files() {
        assert_eq!(delete_limit(None, 10, 0), 5);
        assert_eq!(delete_limit(None, 10, 30), 15);
        assert_eq!(delete_limit(None, 1, 0), 0);
        assert_eq!(delete_limit(Some(3), 1000, 1000), 3);
    }

    #[test]
    fn the_other_links_of_a_changed_file_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir(root.join("b")).unwrap();
        std::fs::write(root.join("a"), b"old").unwrap();
        std::fs::hard_link(root.join("a"), root.join("b/link")).unwrap();
        std::fs::hard_link(root.join("a"), root.join("b/new-link")).unwrap();
        std::fs::write(root.join("single"), b"old").unwrap();
        let stamp_of = |rel: &str| stat_file(&root.join(rel)).unwrap();
        let journal = Journal::in_memory().unwrap();
        let record = |path: &str, stamp: FileStamp| Record {
            path: path.into(),
            stamp,
            sha256: "h".into(),
            etag: "e".into(),
            diverged: false,
        };
        for path in ["a", "b/link", "single"] {
            journal.commit(&record(path, stamp_of(path))).unwrap();
        }
        // A record of a file gone since, which had the same inode number.
        journal
            .commit(&record(
                "gone",
                FileStamp {
                    size: 9,
                    ..stamp_of("a")
                },
            ))
            .unwrap();
        let nothing_covered = |_: &str| false;
        let others = |changed: &[&str]| {
            let local: BTreeMap<String, FileStamp> = changed
                .iter()
                .map(|p| (p.to_string(), stamp_of(p)))
                .collect();
            let records = changed
                .iter()
                .filter_map(|p| journal.record(p).unwrap().map(|r| (p.to_string(), r)))
                .collect();
            other_links(root, &journal, &local, &records, &nothing_covered).unwrap()
        };
        assert!(others(&["a"]).is_empty(), "unchanged: nothing to look at");

        std::fs::write(root.join("a"), b"new content").unwrap();
        std::fs::write(root.join("single"), b"new content").unwrap();
        assert_eq!(others(&["a", "single"]), [("b/link".into(), "a".into())]);
        // Written through the link: the first name is found the same way.
        assert_eq!(others(&["b/link"]), [("a".into(), "b/link".into())]);
        // A new link of a changed file finds the recorded ones.
        assert_eq!(
            others(&["b/new-link"]),
            [
                ("a".into(), "b/new-link".into()),
                ("b/link".into(), "b/new-link".into())
            ]
        );
        // What the pass covers already is not added again.
        let local: BTreeMap<String, FileStamp> = [("a".to_string(), stamp_of("a"))].into();
        let covered = |p: &str| under(p, "b");
        let found = other_links(root, &journal, &local, &BTreeMap::new(), &covered).unwrap();
        assert!(found.is_empty(), "{found:?}");

        // The other name removed: nothing to look at but the changed file.
        std::fs::remove_file(root.join("b/link")).unwrap();
        std::fs::remove_file(root.join("b/new-link")).unwrap();
        assert!(others(&["a"]).is_empty());
    }

    #[test]
    fn collapse_keeps_the_outermost_paths() {
        let paths = ["a/b", "a", "ab", "c/d/e", "c/d"]
            .map(String::from)
            .to_vec();
        assert_eq!(collapse(paths), ["a", "ab", "c/d"]);
        assert_eq!(collapse(vec!["x".into(), String::new()]), [""]);
    }
}
