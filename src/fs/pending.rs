//! Uploads of closed files: journaled in the mount's state directory before
//! `close` returns, sent in the background as resumable chunk sessions, and
//! resumed by the next mount of the same server after a crash. Nothing
//! written and closed is lost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::{Deserialize, Serialize};

use super::core::errno::EIO;
use super::staging_space::{Charge, StagingSpace};
use super::tail_copy::{self, TailCopy};
use super::write_behind::Handover;
use crate::client::Client;
use crate::client::digest::DigestPrefix;
use crate::client::upload::{Transport, UploadOptions, upload_file};
use crate::error::Error;
use crate::protocol::{ErrorCode, FileMeta, RemotePath};

/// One journaled upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    pub path: RemotePath,
    pub local: PathBuf,
    /// Commit only over this version (the one the file was opened from).
    pub base_etag: Option<String>,
    /// Commit only where there is no file: the file is new, and must not
    /// replace one another client created meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub create_only: bool,
    pub session_id: Option<String>,
    pub queued_at: DateTime<Utc>,
    /// Set when the staging file was not synced before this record was
    /// written: `fsync` starts its upload so, as it waits for the commit on
    /// the server, not for the local disk. The file is then whole only in
    /// the page cache, so the record is trusted only within the boot named
    /// here (a crash of the mount keeps the page cache; one of the machine
    /// does not). A close of the file syncs it and clears this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsynced_boot: Option<String>,
    /// Set when the close synced not the staging file but a copy of what
    /// write-behind's session lacked (see [`super::tail_copy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_copy: Option<TailCopy>,
    /// The hash of the file's start, from write-behind (not journaled:
    /// after a crash the upload hashes the whole file).
    #[serde(skip)]
    pub digest_prefix: Option<DigestPrefix>,
}

impl JournalEntry {
    /// A new upload of `local` to `path`.
    pub fn new(path: RemotePath, local: PathBuf, base_etag: Option<String>) -> JournalEntry {
        JournalEntry {
            path,
            local,
            base_etag,
            create_only: false,
            session_id: None,
            queued_at: Utc::now(),
            unsynced_boot: None,
            tail_copy: None,
            digest_prefix: None,
        }
    }

    /// Committed only where there is no file, if `create_only`.
    pub fn create_only(mut self, create_only: bool) -> JournalEntry {
        self.create_only = create_only;
        self
    }

    /// Made durable as `copy` describes, if given: the upload continues the
    /// session the copy counts on.
    pub fn with_tail_copy(mut self, copy: Option<TailCopy>) -> JournalEntry {
        if let Some(copy) = copy {
            self.session_id = Some(copy.session.clone());
            self.tail_copy = Some(copy);
        }
        self
    }

    /// The file the upload reads: the staging file, unless the machine
    /// restarted since a close that synced only a copy of its tail.
    pub fn source(&self) -> &Path {
        match &self.tail_copy {
            Some(copy) if boot_id().as_deref() != Some(copy.boot.as_str()) => &copy.path,
            _ => &self.local,
        }
    }

    /// Continues write-behind's session, if any.
    pub fn continuing(mut self, handover: Option<Handover>) -> JournalEntry {
        if let Some(handover) = handover {
            self.session_id = Some(handover.session);
            self.digest_prefix = handover.prefix;
        }
        self
    }

    /// Marks the staging file as not synced, whole only within this boot;
    /// without a boot id to name, it is synced here instead.
    pub fn unsynced(mut self) -> std::io::Result<JournalEntry> {
        match boot_id() {
            Some(boot) => self.unsynced_boot = Some(boot),
            None => std::fs::File::open(&self.local)?.sync_all()?,
        }
        Ok(self)
    }

    /// Whether the machine restarted since this record's unsynced staging
    /// file was written, so that it may be torn.
    fn torn_by_reboot(&self) -> bool {
        self.unsynced_boot
            .as_ref()
            .is_some_and(|boot| boot_id().as_ref() != Some(boot))
    }
}

/// This boot's id, which changes whenever the machine starts.
pub(super) fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_owned()).filter(|id| !id.is_empty())
}

type Done = Shared<BoxFuture<'static, ()>>;

/// The record of a running upload as journaled, shared by the upload (which
/// notes its session in it) and a close that makes its file durable (see
/// [`UploadQueue::make_durable`]); `None` once the upload settled.
type LiveRecord = Arc<Mutex<Option<JournalEntry>>>;

/// An upload announced for a path: settled when `done` resolves.
struct Running {
    done: Done,
    /// Once started.
    record: Option<LiveRecord>,
    /// Set (to the errno) once the server refused the upload for good
    /// ([`refused_for_good`]): it is retried still, but `fsync` waits no more.
    refusal: Refusal,
}

type Refusal = Arc<tokio::sync::watch::Sender<Option<i32>>>;

pub struct UploadQueue {
    client: Client,
    journal: PathBuf,
    staging: PathBuf,
    running: Mutex<HashMap<RemotePath, Running>>,
    /// Told how uploads go, so that writers waiting for room know whether
    /// to keep waiting.
    space: Arc<StagingSpace>,
    on_settled: OnSettled,
}

/// Called with each path once its upload is committed (or given up), and
/// with the file's version on the server when it was committed there.
pub type OnSettled = Box<dyn Fn(&RemotePath, Option<&FileMeta>) + Send + Sync>;

impl UploadQueue {
    /// Opens (creating) `state/journal` and `state/staging`.
    /// Staged bytes are bounded by `max_staging` (and the disk).
    pub fn open(
        client: Client,
        state: &Path,
        max_staging: Option<u64>,
        on_settled: OnSettled,
    ) -> std::io::Result<Arc<UploadQueue>> {
        let (journal, staging) = (state.join("journal"), state.join("staging"));
        std::fs::create_dir_all(&journal)?;
        std::fs::create_dir_all(&staging)?;
        Ok(Arc::new(UploadQueue {
            client,
            journal,
            space: StagingSpace::new(staging.clone(), max_staging),
            staging,
            running: Mutex::default(),
            on_settled,
        }))
    }

    /// The space staged files take, bounded.
    pub fn space(&self) -> &Arc<StagingSpace> {
        &self.space
    }

    /// A fresh staging file path.
    pub fn new_staging_path(&self) -> PathBuf {
        self.staging.join(hex::encode(rand::random::<[u8; 12]>()))
    }

    /// Marks `path` as having an upload on its way, before its content is
    /// ready: [`UploadQueue::wait`] waits for it from now on.
    pub fn reserve(self: &Arc<Self>, path: &RemotePath) -> Reservation {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = async move {
            let _ = rx.await;
        }
        .boxed()
        .shared();
        let running = Running {
            done,
            record: None,
            refusal: Arc::new(tokio::sync::watch::channel(None).0),
        };
        self.running.lock().unwrap().insert(path.clone(), running);
        Reservation {
            queue: self.clone(),
            path: path.clone(),
            settled: Some(tx),
        }
    }

    /// Journals the upload `entry` describes, then starts it. `charge` (the
    /// space its staging file takes) is released once the upload is over.
    pub fn enqueue(
        self: &Arc<Self>,
        path: RemotePath,
        entry: JournalEntry,
        charge: Charge,
    ) -> std::io::Result<()> {
        self.reserve(&path).enqueue(entry, charge)
    }

    /// Journals the upload `entry` describes without starting it: from now
    /// on a crash leaves it for the next mount to commit.
    pub fn journal(&self, entry: JournalEntry) -> std::io::Result<JournalEntry> {
        write_record(&self.record_of(&entry.local), &entry)?;
        Ok(entry)
    }

    /// Syncs the file of `path`'s running upload if `fsync` started it
    /// unsynced, and clears that from its record: from then on the upload
    /// survives a crash of the machine too. A close calls this, as a file
    /// closed must never be lost.
    pub async fn make_durable(&self, path: &RemotePath) -> std::io::Result<()> {
        let record = match self.running.lock().unwrap().get(path) {
            Some(Running {
                record: Some(record),
                ..
            }) => record.clone(),
            _ => return Ok(()),
        };
        let local = match &*record.lock().unwrap() {
            Some(entry) if entry.unsynced_boot.is_some() => entry.local.clone(),
            _ => return Ok(()),
        };
        let record_path = self.record_of(&local);
        let sync = move || {
            match std::fs::File::open(&local) {
                Ok(file) => file.sync_all()?,
                // The upload settled meanwhile and took its file along.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
            // Held while written, so that a settling upload removes the
            // record after this, never before.
            let mut live = record.lock().unwrap();
            match live.as_mut() {
                Some(entry) => {
                    entry.unsynced_boot = None;
                    write_record(&record_path, entry)
                }
                None => Ok(()),
            }
        };
        tokio::task::spawn_blocking(sync)
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// Drops the record [`UploadQueue::journal`] wrote for `local`, whose
    /// content is no longer to be uploaded. One dropped is gone for good
    /// before this returns: after a crash of the machine it would upload
    /// content removed or superseded since.
    pub fn unjournal(&self, local: &Path) {
        if std::fs::remove_file(self.record_of(local)).is_ok()
            && let Err(e) = std::fs::File::open(&self.journal).and_then(|d| d.sync_all())
        {
            tracing::warn!(error = %e, "syncing the upload journal after dropping a record failed");
        }
        let _ = std::fs::remove_file(tail_copy::path_for(local));
    }

    fn record_of(&self, local: &Path) -> PathBuf {
        self.journal.join(format!("{}.json", file_name(local)))
    }

    /// Restarts every journaled upload (after a crash). Returns how many.
    pub fn recover(self: &Arc<Self>) -> usize {
        let mut resumable = Vec::new();
        for record in std::fs::read_dir(&self.journal)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = record.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                // A record half-written when the mount died; its upload was
                // never acknowledged to the writer, or a complete record
                // with the same name exists beside it.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<JournalEntry>(&b).ok())
            {
                Some(entry) if entry.source().exists() && !entry.torn_by_reboot() => {
                    resumable.push((path, entry));
                }
                Some(entry) if entry.local.exists() => {
                    // Its writer's fsync never returned, and the file was
                    // never closed: nothing was promised.
                    tracing::warn!(path = %entry.path,
                        "dropping an upload that an fsync started before the machine restarted; its staging file was never synced");
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(&entry.local);
                }
                _ => {
                    tracing::warn!(record = %path.display(), "dropping an unusable upload record");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        // Two records of one path are of one staged file (a close's, then an
        // fsync's of what was written since, or the other way round): its
        // staging file under two names. The newer is the file's content.
        resumable.sort_by_key(|(_, entry)| entry.queued_at);
        let mut newest: HashMap<RemotePath, (PathBuf, JournalEntry)> = HashMap::new();
        for (record, entry) in resumable {
            if let Some((older, superseded)) = newest.insert(entry.path.clone(), (record, entry)) {
                tracing::info!(path = %superseded.path, "dropping an upload record superseded by a newer one of the same file");
                let _ = std::fs::remove_file(older);
                let _ = std::fs::remove_file(&superseded.local);
                let _ = std::fs::remove_file(tail_copy::path_for(&superseded.local));
            }
        }
        let count = newest.len();
        for (record, entry) in newest.into_values() {
            tracing::info!(path = %entry.path, "resuming an upload left by an earlier mount");
            // Its staging file and the copy of its tail, if any: both stay
            // until the upload settles.
            let kept = allocated(&entry.local)
                + entry.tail_copy.as_ref().map_or(0, |c| allocated(&c.path));
            let charge = self.space.draining(kept);
            self.reserve(&entry.path).start(record, entry, charge);
        }
        count
    }

    /// Journaled uploads not yet committed.
    pub fn pending(&self) -> Vec<JournalEntry> {
        list_pending(&self.journal)
    }

    /// Waits until the upload of `path` (if any) has settled.
    pub async fn wait(&self, path: &RemotePath) {
        let done = self
            .running
            .lock()
            .unwrap()
            .get(path)
            .map(|r| r.done.clone());
        if let Some(done) = done {
            done.await;
        }
    }

    /// Waits until `path`'s upload is over, as [`UploadQueue::wait`] does,
    /// or until the server refused it for good: then its errno.
    pub async fn wait_unless_refused(&self, path: &RemotePath) -> Result<(), i32> {
        let Some((done, refusal)) = self
            .running
            .lock()
            .unwrap()
            .get(path)
            .map(|r| (r.done.clone(), r.refusal.subscribe()))
        else {
            return Ok(());
        };
        let mut refusal = refusal;
        tokio::select! {
            () = done => Ok(()),
            Ok(errno) = refusal.wait_for(Option::is_some) => Err((*errno).unwrap_or(EIO)),
        }
    }

    /// Paths strictly beneath `dir` with an upload on its way.
    pub fn pending_beneath(&self, dir: &RemotePath) -> Vec<RemotePath> {
        let running = self.running.lock().unwrap();
        running
            .keys()
            .filter(|p| p.is_beneath(dir))
            .cloned()
            .collect()
    }

    /// The file the running upload to `path` commits, as the mount shows
    /// it until then; `None` when no upload to `path` has started.
    pub fn pending_file(&self, path: &RemotePath) -> Option<FileMeta> {
        let record = self.running.lock().unwrap().get(path)?.record.clone()?;
        let source = record.lock().unwrap().as_ref()?.source().to_owned();
        let local = std::fs::metadata(source).ok()?;
        Some(FileMeta {
            path: path.clone(),
            kind: crate::protocol::EntryKind::File,
            size: local.len(),
            mtime: local.modified().ok().map(DateTime::<Utc>::from),
            etag: None,
        })
    }

    pub fn is_pending(&self, path: &RemotePath) -> bool {
        self.running.lock().unwrap().contains_key(path)
    }

    async fn run(
        self: &Arc<Self>,
        record: &Path,
        live: &LiveRecord,
        refusal: &Refusal,
        mut entry: JournalEntry,
    ) {
        let mut attempt = 0u32;
        let mut target = entry.path.clone();
        let mut committed = None;
        let source = entry.source().to_owned();
        let mut keep_files = false;
        loop {
            let session = {
                let (record, live) = (record.to_owned(), live.clone());
                Arc::new(move |id: &str| {
                    let mut live = live.lock().unwrap();
                    let Some(entry) = live.as_mut() else { return };
                    entry.session_id = Some(id.to_owned());
                    if let Err(e) = write_record(&record, entry) {
                        tracing::warn!(error = %e, "updating the upload journal failed");
                    }
                })
            };
            let space = self.space.clone();
            let size = std::fs::metadata(&source).map_or(0, |m| m.len());
            let options = UploadOptions {
                if_match: entry.base_etag.clone().filter(|_| target == entry.path),
                // A conflict's name is new (and its own).
                create_only: entry.create_only && target == entry.path,
                resume_id: entry.session_id.take(),
                sha256: entry.tail_copy.as_ref().map(|copy| copy.sha256.clone()),
                sha256_prefix: entry.digest_prefix.clone(),
                on_session: Some(session),
                progress: Some(Arc::new(move |_| space.upload_progressed())),
                transport: Transport::for_file_of(size),
                ..Default::default()
            };
            match upload_file(&self.client, &source, &target, options).await {
                Ok(report) => {
                    self.space.upload_progressed();
                    committed = Some(report.meta);
                    break;
                }
                Err(e) if is_conflict(&e) && target == entry.path => {
                    target = conflict_path(&entry.path);
                    tracing::warn!(path = %entry.path, kept_as = %target, error = %e,
                        "the remote file changed since it was opened; keeping both");
                }
                Err(e) if !source.exists() => {
                    tracing::error!(path = %target, error = %e, "the staged file is gone; this upload cannot be completed");
                    break;
                }
                Err(e) if source != entry.local && e.code() == ErrorCode::ChecksumMismatch => {
                    tracing::error!(path = %target, error = %e, staged = %entry.local.display(),
                        copy = %source.display(),
                        "this file cannot be rebuilt: the machine restarted since its close, which synced only the part the server lacked, and the server no longer has the rest; its files are left as they are");
                    keep_files = true;
                    break;
                }
                Err(e) => {
                    if let Some(errno) = refused_for_good(&e, target != entry.path) {
                        // Kept, and tried again: the server may change its
                        // mind (another store behind it); an fsync waiting
                        // for it returns now with the reason.
                        refusal.send_replace(Some(errno));
                    }
                    self.space.upload_failed();
                    attempt += 1;
                    let delay = self
                        .client
                        .retry_policy()
                        .delay(attempt.min(10), None)
                        .max(Duration::from_millis(200));
                    tracing::warn!(path = %target, error = %e, ?delay, "upload failed; retrying");
                    tokio::time::sleep(delay).await;
                    // The record holds the latest session id.
                    if let Some(latest) = live.lock().unwrap().as_ref() {
                        entry.session_id = latest.session_id.clone();
                    }
                }
            }
        }
        {
            let mut live = live.lock().unwrap();
            *live = None;
            let _ = std::fs::remove_file(record);
        }
        if !keep_files {
            let _ = std::fs::remove_file(&entry.local);
            let _ = std::fs::remove_file(tail_copy::path_for(&entry.local));
        }
        if target == entry.path {
            (self.on_settled)(&entry.path, committed.as_ref());
        } else {
            (self.on_settled)(&entry.path, None);
            (self.on_settled)(&target, committed.as_ref());
        }
    }
}

/// An upload announced by [`UploadQueue::reserve`]. Dropped without being
/// enqueued, it releases whoever waits for it.
pub struct Reservation {
    queue: Arc<UploadQueue>,
    path: RemotePath,
    settled: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Reservation {
    /// Journals the upload `entry` describes, then starts it; `charge` is
    /// released once the upload is over.
    pub fn enqueue(self, entry: JournalEntry, charge: Charge) -> std::io::Result<()> {
        let entry = self.queue.journal(entry)?;
        self.start_journaled(entry, charge);
        Ok(())
    }

    /// Starts an upload [`UploadQueue::journal`] recorded.
    pub fn start_journaled(self, entry: JournalEntry, charge: Charge) {
        let record = self.queue.record_of(&entry.local);
        self.start(record, entry, charge);
    }

    fn start(mut self, record: PathBuf, entry: JournalEntry, charge: Charge) {
        let settled = self.settled.take();
        let (queue, path) = (self.queue.clone(), self.path.clone());
        let live: LiveRecord = Arc::new(Mutex::new(Some(entry.clone())));
        let refusal = match queue.running.lock().unwrap().get_mut(&path) {
            Some(running) => {
                running.record = Some(live.clone());
                running.refusal.clone()
            }
            None => Arc::new(tokio::sync::watch::channel(None).0),
        };
        tokio::spawn(async move {
            queue.run(&record, &live, &refusal, entry).await;
            // The staged file is gone: its space is free.
            drop(charge);
            queue.running.lock().unwrap().remove(&path);
            if let Some(tx) = settled {
                let _ = tx.send(());
            }
        });
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(tx) = self.settled.take() {
            self.queue.running.lock().unwrap().remove(&self.path);
            let _ = tx.send(());
        }
    }
}

/// The errno of an upload the server refuses for what it is (its name), not
/// for now (an outage, a limit an operator may raise): asking
/// again gets the same answer. `conflict_copy`: the upload is already going
/// to a conflict copy's name, so a conflict there is no longer one to step
/// aside from.
fn refused_for_good(e: &Error, conflict_copy: bool) -> Option<i32> {
    let for_good = match e.code() {
        ErrorCode::NameTooLong | ErrorCode::InvalidPath => true,
        _ => conflict_copy && is_conflict(e),
    };
    for_good.then(|| e.errno())
}

/// The remote version moved on (412), or the path can no longer hold a file.
pub fn is_conflict(e: &Error) -> bool {
    matches!(
        e.code(),
        ErrorCode::PreconditionFailed | ErrorCode::IsADirectory | ErrorCode::NotADirectory
    )
}

/// `name.conflict-<UTC timestamp>` beside `path`.
pub fn conflict_path(path: &RemotePath) -> RemotePath {
    let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let name = format!("{}.conflict-{stamp}", path.name().unwrap_or("file"));
    let parent = path.parent().unwrap_or_default();
    parent.join(&name).unwrap_or_else(|_| path.clone())
}

/// Bytes a file takes on disk (holes excluded).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| (m.blocks() * 512).min(m.len()))
        .unwrap_or(0)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn write_record(record: &Path, entry: &JournalEntry) -> std::io::Result<()> {
    let tmp = record.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(entry).expect("entries serialize"),
    )?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, record)?;
    std::fs::File::open(record.parent().expect("records live in a directory"))?.sync_all()
}

/// The journaled uploads in a mount's state directory.
pub fn list_pending(journal: &Path) -> Vec<JournalEntry> {
    let mut out: Vec<JournalEntry> = std::fs::read_dir(journal)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    out.sort_by_key(|e| e.queued_at);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> JournalEntry {
        JournalEntry::new(
            RemotePath::parse("a/b.bin").unwrap(),
            PathBuf::from("/nonexistent/staging/abc"),
            None,
        )
    }

    #[test]
    fn records_from_before_unsynced_uploads_read_as_synced() {
        let old = r#"{"path":"a/b.bin","local":"/s/abc","base_etag":null,
            "session_id":"s1","queued_at":"2026-12-01T00:00:00Z"}"#;
        let entry: JournalEntry = serde_json::from_str(old).unwrap();
        assert_eq!(entry.unsynced_boot, None);
        assert!(!entry.torn_by_reboot());
        // And a synced record is written as before.
        let written = serde_json::to_string(&self::entry()).unwrap();
        assert!(!written.contains("unsynced_boot"), "{written}");
    }

    #[test]
    fn an_unsynced_record_is_trusted_only_in_the_boot_it_names() {
        let this_boot = boot_id().expect("Linux names its boot");
        let mut entry = entry();
        entry.unsynced_boot = Some(this_boot);
        let back: JournalEntry =
            serde_json::from_slice(&serde_json::to_vec(&entry).unwrap()).unwrap();
        assert!(!back.torn_by_reboot());
        entry.unsynced_boot = Some("00000000-0000-0000-0000-000000000000".into());
        assert!(entry.torn_by_reboot());
    }

    #[tokio::test]
    async fn recovery_resumes_only_the_newest_record_of_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        // No server answers: the uploads stay pending.
        let client = Client::new("http://127.0.0.1:9").unwrap();
        let queue = UploadQueue::open(client, tmp.path(), None, Box::new(|_, _| {})).unwrap();
        let path = RemotePath::parse("f.txt").unwrap();
        // A close's record, then an fsync's of the same staging file under
        // a second name; and a record of another file.
        let (closed, fsynced) = (queue.new_staging_path(), queue.new_staging_path());
        std::fs::write(&closed, b"content").unwrap();
        std::fs::hard_link(&closed, &fsynced).unwrap();
        let other = queue.new_staging_path();
        std::fs::write(&other, b"other").unwrap();
        queue
            .journal(JournalEntry::new(path.clone(), closed.clone(), None))
            .unwrap();
        queue
            .journal(
                JournalEntry::new(path.clone(), fsynced.clone(), None)
                    .unsynced()
                    .unwrap(),
            )
            .unwrap();
        let other_path = RemotePath::parse("g.txt").unwrap();
        queue
            .journal(JournalEntry::new(other_path, other.clone(), None))
            .unwrap();
        assert_eq!(queue.recover(), 2);
        let mut left: Vec<PathBuf> = queue.pending().into_iter().map(|e| e.local).collect();
        left.sort();
        let mut expected = vec![fsynced.clone(), other];
        expected.sort();
        assert_eq!(left, expected);
        assert!(
            !closed.exists(),
            "the superseded record's name for the file goes"
        );
        assert_eq!(std::fs::read(&fsynced).unwrap(), b"content");
    }

    #[test]
    fn an_unsynced_entry_names_this_boot() {
        let tmp = tempfile::tempdir().unwrap();
        let local = tmp.path().join("staged");
        std::fs::write(&local, b"content").unwrap();
        let entry = JournalEntry::new(RemotePath::parse("f").unwrap(), local, None)
            .unsynced()
            .unwrap();
        assert_eq!(entry.unsynced_boot, boot_id());
    }
}
