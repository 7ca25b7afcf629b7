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

use super::staging_space::{Charge, StagingSpace};
use super::write_behind::Handover;
use crate::client::Client;
use crate::client::digest::DigestPrefix;
use crate::client::upload::{Transport, UploadOptions, upload_file};
use crate::error::Error;
use crate::protocol::{ErrorCode, RemotePath};

/// One journaled upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    pub path: RemotePath,
    pub local: PathBuf,
    /// Commit only over this version (the one the file was opened from).
    pub base_etag: Option<String>,
    pub session_id: Option<String>,
    pub queued_at: DateTime<Utc>,
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
            session_id: None,
            queued_at: Utc::now(),
            digest_prefix: None,
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
}

type Done = Shared<BoxFuture<'static, ()>>;

pub struct UploadQueue {
    client: Client,
    journal: PathBuf,
    staging: PathBuf,
    running: Mutex<HashMap<RemotePath, Done>>,
    /// Told how uploads go, so that writers waiting for room know whether
    /// to keep waiting.
    space: Arc<StagingSpace>,
    /// Called with each path once its upload is committed (or given up).
    on_settled: Box<dyn Fn(&RemotePath) + Send + Sync>,
}

impl UploadQueue {
    /// Opens (creating) `state/journal` and `state/staging`.
    /// Staged bytes are bounded by `max_staging` (and the disk).
    pub fn open(
        client: Client,
        state: &Path,
        max_staging: Option<u64>,
        on_settled: Box<dyn Fn(&RemotePath) + Send + Sync>,
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
        self.running.lock().unwrap().insert(path.clone(), done);
        Reservation {
            queue: self.clone(),
            path: path.clone(),
            settled: Some(tx),
        }
    }

    /// Journals the upload of `local` to `path`, then starts it. `charge`
    /// (the space `local` takes) is released once the upload is over.
    pub fn enqueue(
        self: &Arc<Self>,
        path: RemotePath,
        local: PathBuf,
        base_etag: Option<String>,
        handover: Option<Handover>,
        charge: Charge,
    ) -> std::io::Result<()> {
        self.reserve(&path)
            .enqueue(local, base_etag, handover, charge)
    }

    /// Journals the upload of `local` to `path` without starting it: from
    /// now on a crash leaves it for the next mount to commit.
    /// `handover`: write-behind's session, which the upload continues.
    pub fn journal(
        &self,
        path: &RemotePath,
        local: PathBuf,
        base_etag: Option<String>,
        handover: Option<Handover>,
    ) -> std::io::Result<JournalEntry> {
        let entry = JournalEntry::new(path.clone(), local, base_etag).continuing(handover);
        write_record(&self.record_of(&entry.local), &entry)?;
        Ok(entry)
    }

    /// Drops the record [`UploadQueue::journal`] wrote for `local`, whose
    /// content is no longer to be uploaded.
    pub fn unjournal(&self, local: &Path) {
        let _ = std::fs::remove_file(self.record_of(local));
    }

    fn record_of(&self, local: &Path) -> PathBuf {
        self.journal.join(format!("{}.json", file_name(local)))
    }

    /// Restarts every journaled upload (after a crash). Returns how many.
    pub fn recover(self: &Arc<Self>) -> usize {
        let mut count = 0;
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
                Some(entry) if entry.local.exists() => {
                    tracing::info!(path = %entry.path, "resuming an upload left by an earlier mount");
                    let charge = self.space.draining(allocated(&entry.local));
                    self.reserve(&entry.path).start(path, entry, charge);
                    count += 1;
                }
                _ => {
                    tracing::warn!(record = %path.display(), "dropping an unusable upload record");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        count
    }

    /// Journaled uploads not yet committed.
    pub fn pending(&self) -> Vec<JournalEntry> {
        list_pending(&self.journal)
    }

    /// Waits until the upload of `path` (if any) has settled.
    pub async fn wait(&self, path: &RemotePath) {
        let done = self.running.lock().unwrap().get(path).cloned();
        if let Some(done) = done {
            done.await;
        }
    }

    pub fn is_pending(&self, path: &RemotePath) -> bool {
        self.running.lock().unwrap().contains_key(path)
    }

    async fn run(self: &Arc<Self>, record: &Path, mut entry: JournalEntry) {
        let mut attempt = 0u32;
        let mut target = entry.path.clone();
        loop {
            let session = {
                let record = record.to_owned();
                let entry = entry.clone();
                Arc::new(move |id: &str| {
                    let mut updated = entry.clone();
                    updated.session_id = Some(id.to_owned());
                    if let Err(e) = write_record(&record, &updated) {
                        tracing::warn!(error = %e, "updating the upload journal failed");
                    }
                })
            };
            let space = self.space.clone();
            let size = std::fs::metadata(&entry.local).map_or(0, |m| m.len());
            let options = UploadOptions {
                if_match: entry.base_etag.clone().filter(|_| target == entry.path),
                resume_id: entry.session_id.take(),
                sha256_prefix: entry.digest_prefix.clone(),
                on_session: Some(session),
                progress: Some(Arc::new(move |_| space.upload_progressed())),
                transport: Transport::for_file_of(size),
                ..Default::default()
            };
            match upload_file(&self.client, &entry.local, &target, options).await {
                Ok(_) => {
                    self.space.upload_progressed();
                    break;
                }
                Err(e) if is_conflict(&e) && target == entry.path => {
                    target = conflict_path(&entry.path);
                    tracing::warn!(path = %entry.path, kept_as = %target, error = %e,
                        "the remote file changed since it was opened; keeping both");
                }
                Err(e) if !entry.local.exists() => {
                    tracing::error!(path = %target, error = %e, "the staged file is gone; this upload cannot be completed");
                    break;
                }
                Err(e) => {
                    self.space.upload_failed();
                    attempt += 1;
                    let delay = self
                        .client
                        .retry_policy()
                        .delay(attempt.min(10), None)
                        .max(Duration::from_millis(200));
                    tracing::warn!(path = %target, error = %e, ?delay, "upload failed; retrying");
                    tokio::time::sleep(delay).await;
                    // The journal holds the latest session id.
                    if let Some(latest) = std::fs::read(record)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<JournalEntry>(&b).ok())
                    {
                        entry.session_id = latest.session_id;
                    }
                }
            }
        }
        let _ = std::fs::remove_file(record);
        let _ = std::fs::remove_file(&entry.local);
        (self.on_settled)(&entry.path);
        if target != entry.path {
            (self.on_settled)(&target);
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
    /// Journals the upload of `local`, then starts it; `charge` is released
    /// once the upload is over.
    pub fn enqueue(
        self,
        local: PathBuf,
        base_etag: Option<String>,
        handover: Option<Handover>,
        charge: Charge,
    ) -> std::io::Result<()> {
        let entry = self.queue.journal(&self.path, local, base_etag, handover)?;
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
        tokio::spawn(async move {
            queue.run(&record, entry).await;
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
