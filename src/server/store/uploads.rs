//! Resumable chunk sessions: create, receive chunks in any order, report
//! status, complete atomically, abort, and collect expired sessions.
//!
//! Guarantees: an acknowledged chunk survives a server crash; `complete`
//! commits the whole file atomically or nothing; every node serving the same
//! backend sees the same sessions (their state lives under `.ferry/uploads/`).

mod local_staging;
mod manifest;
mod multipart_staging;
mod running_digest;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use futures::stream::BoxStream;
use object_store::{ObjectMeta, ObjectStoreExt};

use self::local_staging::LocalStaging;
use self::manifest::{Committing, Manifest, StagingRecord, UPLOADS_PREFIX};
use self::multipart_staging::MultipartStaging;
use self::running_digest::{HeldBudget, RunningDigest};
use super::{Store, keys};
use crate::error::{Error, Result};
use crate::protocol::upload::{
    ChunkLayout, CreateUpload, DeclareSize, MAX_CHUNK_SIZE, MAX_MULTIPART_CHUNKS, MIN_CHUNK_SIZE,
    MIN_MULTIPART_CHUNK_SIZE, UploadCreated, UploadState, UploadStatus, default_chunk_size,
    open_ended_chunk_size, runs,
};
use crate::protocol::{FileMeta, RemotePath};

/// Bytes of arrived chunks all sessions together hold for hashing.
const HELD_BY_ALL_SESSIONS: usize = 256 << 20;

/// How long the state of a session without a manifest must have gone
/// untouched before the sweep removes it. A session's manifest is written
/// last at creation (after its staging file and chunk map) and removed with
/// the rest of it, so such state is either a creation under way, on this
/// node or another on the store, or what a server killed during a creation
/// or a removal left. A creation takes moments; an hour leaves room for a
/// stalled disk and for the clocks of other nodes.
pub const DEBRIS_AFTER: Duration = Duration::from_secs(3600);

/// What one sweep of the sessions removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Sessions past their expiry.
    pub expired: usize,
    /// Leftovers of sessions without a manifest (see [`DEBRIS_AFTER`]).
    pub debris: usize,
}

/// What a chunk must be: its length and CRC32C.
#[derive(Debug, Clone, Copy)]
pub struct ChunkCheck {
    pub expected_len: u64,
    pub crc32c: u32,
}

impl ChunkCheck {
    fn too_long(&self) -> Error {
        Error::BadRequest(format!("chunk longer than its {} bytes", self.expected_len))
    }

    fn verify(&self, len: u64, crc: u32) -> Result<()> {
        if len != self.expected_len {
            return Err(Error::BadRequest(format!(
                "chunk has {len} bytes, expected {}",
                self.expected_len
            )));
        }
        if crc != self.crc32c {
            return Err(Error::ChecksumMismatch(format!(
                "chunk CRC32C is {crc:08x}, header says {:08x}; chunk not kept",
                self.crc32c
            )));
        }
        Ok(())
    }
}

/// The upload sessions of one store.
pub struct UploadSessions {
    store: Store,
    ttl: Duration,
    max_size: u64,
    /// Manifests read or written by this node; their fixed fields never change.
    manifests: Mutex<HashMap<String, Arc<Manifest>>>,
    /// Serialises `complete` of one session within this node.
    completing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Open sessions: those created here, plus those found by the last
    /// sweep of the backend (other nodes' included).
    open: Mutex<HashMap<String, OpenSession>>,
    /// Most open sessions one token may have (`None`: no limit).
    max_per_owner: Option<usize>,
    /// SHA-256 computed as chunks arrive, for local sessions created here.
    digests: Mutex<HashMap<String, Arc<RunningDigest>>>,
    /// Memory the digests may hold chunks in, across sessions.
    held: HeldBudget,
}

/// What the per-token limit needs to know of an open session.
struct OpenSession {
    owner: Option<String>,
    created_at: DateTime<Utc>,
}

impl UploadSessions {
    pub fn new(store: Store, ttl: Duration, max_size: u64, max_per_owner: Option<usize>) -> Self {
        Self {
            store,
            ttl,
            max_size,
            manifests: Mutex::default(),
            completing: Mutex::default(),
            open: Mutex::default(),
            max_per_owner,
            digests: Mutex::default(),
            held: HeldBudget::new(HELD_BY_ALL_SESSIONS),
        }
    }

    /// Sessions known to be open.
    pub fn open_count(&self) -> usize {
        self.open.lock().unwrap().len()
    }

    /// Refuses a new session for a token at its limit.
    fn check_owner_limit(&self, owner: Option<&str>) -> Result<()> {
        let (Some(owner), Some(max)) = (owner, self.max_per_owner) else {
            return Ok(());
        };
        let open = self.open.lock().unwrap();
        let count = open
            .values()
            .filter(|s| s.owner.as_deref() == Some(owner))
            .count();
        if count >= max {
            return Err(Error::LimitReached(format!(
                "token {owner:?} has {count} open upload sessions, its limit; complete or abort one"
            )));
        }
        Ok(())
    }

    /// The chunk size a session for `req` gets: the one asked for, if this
    /// backend takes it, else the server's choice.
    pub fn chunk_size_for(&self, req: &CreateUpload) -> Result<u64> {
        let floor = if self.store.multipart.is_some() {
            MIN_MULTIPART_CHUNK_SIZE
        } else {
            0
        };
        match (req.chunk_size, req.size) {
            (None, Some(size)) => Ok(default_chunk_size(size, floor)),
            (None, None) => Ok(open_ended_chunk_size(floor)),
            (Some(cs), _) if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) => {
                Err(Error::BadRequest(format!(
                    "chunk_size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
                )))
            }
            (Some(cs), size) if cs < floor && size.is_none_or(|size| size > cs) => {
                Err(Error::BadRequest(format!(
                    "this backend needs chunks of at least {floor} bytes"
                )))
            }
            (Some(cs), _) => Ok(cs),
        }
    }

    /// Opens a session for `req`, owned by the token named `owner`.
    pub async fn create(&self, req: CreateUpload, owner: Option<&str>) -> Result<UploadCreated> {
        if req.path.is_root() {
            return Err(Error::IsADirectory("/".into()));
        }
        if req.size.is_some_and(|size| size > self.max_size) {
            return Err(Error::PayloadTooLarge {
                limit: self.max_size,
            });
        }
        let sha256 = parse_sha256(req.sha256.clone())?;
        let verify = sha256.is_some() || req.sha256_at_complete;
        self.check_owner_limit(owner)?;
        let multipart = self.store.multipart.is_some();
        let chunk_size = self.chunk_size_for(&req)?;
        let layout = req.size.map(|size| ChunkLayout { size, chunk_size });
        if multipart && layout.is_some_and(|l| l.chunk_count() > MAX_MULTIPART_CHUNKS) {
            return Err(Error::PayloadTooLarge {
                limit: MAX_MULTIPART_CHUNKS * chunk_size,
            });
        }
        self.store.check_file_writable(&req.path).await?;
        let if_match = req.if_match.map(|e| plain_tag(&e));
        if let Some(expected) = &if_match {
            self.check_if_match(&req.path, expected).await?;
        }
        let create_only = match req.if_none_match.as_deref().map(str::trim) {
            None => false,
            Some("*") => true,
            Some(other) => {
                return Err(Error::BadRequest(format!(
                    "if_none_match takes only \"*\" (no file at the path), not {other:?}"
                )));
            }
        };
        if create_only {
            self.check_absent(&req.path).await?;
        }

        // The staging first, the manifest last: a session exists once its
        // manifest does, and a creation that fails undoes what it staged.
        let id = manifest::new_id();
        let staging = self.stage(&id, &req.path, verify, layout).await?;
        let now = Utc::now();
        let manifest = Manifest {
            id: id.clone(),
            path: req.path,
            size: req.size,
            chunk_size,
            sha256,
            sha256_at_complete: req.sha256_at_complete,
            if_match,
            create_only,
            mtime: req.mtime,
            created_at: now,
            expires_at: now + self.ttl,
            staging,
            state: UploadState::Open,
            result: None,
            owner: owner.map(str::to_owned),
            committing: None,
        };
        if let Err(e) = manifest::write(&self.store, &manifest).await {
            self.unstage(&id, &manifest.staging).await;
            return Err(e);
        }
        self.open.lock().unwrap().insert(
            id.clone(),
            OpenSession {
                owner: manifest.owner.clone(),
                created_at: manifest.created_at,
            },
        );
        if verify && self.local_staging(&id).is_some() {
            let digest = RunningDigest::new(self.chunks_of(&manifest), self.held.clone());
            self.digests
                .lock()
                .unwrap()
                .insert(id.clone(), Arc::new(digest));
        }
        let created = UploadCreated {
            id: id.clone(),
            chunk_size,
            chunk_count: layout.map(|l| l.chunk_count()),
            expires_at: manifest.expires_at,
        };
        self.manifests
            .lock()
            .unwrap()
            .insert(id, Arc::new(manifest));
        Ok(created)
    }

    /// Prepares where a new session's chunks go: on a local directory its
    /// staging file and chunk map, on a multipart backend the multipart
    /// upload. On failure nothing of it is left.
    async fn stage(
        &self,
        id: &str,
        path: &RemotePath,
        verify: bool,
        layout: Option<ChunkLayout>,
    ) -> Result<StagingRecord> {
        let Some(store) = &self.store.multipart else {
            let local = self.local_staging(id).expect("a local backend");
            if let Err(e) = local.create(layout).await {
                self.unstage(id, &StagingRecord::LocalFile).await;
                return Err(e);
            }
            return Ok(StagingRecord::LocalFile);
        };
        // With a checksum to verify, the parts assemble at a private key
        // first; without one, straight at the destination.
        let key = if verify {
            manifest::session_prefix(id).join("object")
        } else {
            keys::object_path(path)
        };
        let upload_id = store.create_multipart(&key).await?;
        Ok(StagingRecord::Multipart {
            key: key.to_string(),
            upload_id,
        })
    }

    /// Frees what [`Self::stage`] prepared for a session whose creation
    /// failed. What cannot be freed now is logged; the sweep removes a
    /// local session's leftovers later (see [`Self::collect_expired`]).
    async fn unstage(&self, id: &str, staging: &StagingRecord) {
        let freed = match staging {
            StagingRecord::LocalFile => match self.local_staging(id) {
                Some(local) => local.remove().await,
                None => Ok(()),
            },
            StagingRecord::Multipart { key, upload_id } => {
                MultipartStaging::new(&self.store, id, key, upload_id)
                    .abort()
                    .await
            }
        };
        if let Err(e) = freed {
            tracing::warn!(upload = id, error = %e, "freeing what a failed session creation staged failed");
        }
    }

    pub async fn put_chunk(
        &self,
        id: &str,
        index: u64,
        crc32c: u32,
        declared_len: Option<u64>,
        body: &mut BoxStream<'static, Result<Bytes>>,
    ) -> Result<()> {
        let mut manifest = self.manifest(id).await?;
        if manifest.size.is_none() && declared_len != Some(manifest.chunk_size) {
            // Not a whole chunk: the short last one, if another node
            // declared the size since.
            manifest = self.fresh_manifest(id).await?;
        }
        if manifest.state == UploadState::Committed {
            return Err(Error::Conflict(format!("upload {id} is already committed")));
        }
        let layout = self.chunks_of(&manifest);
        let Some(expected_len) = layout.chunk_len(index) else {
            return Err(Error::BadRequest(match manifest.size {
                Some(_) => format!(
                    "chunk {index} is past the end (the upload has {} chunks)",
                    layout.chunk_count()
                ),
                None => format!(
                    "chunk {index} is past the end (the size limit allows {} chunks)",
                    layout.chunk_count()
                ),
            }));
        };
        if declared_len.is_some_and(|n| n != expected_len) {
            return Err(Error::BadRequest(format!(
                "chunk {index} must be {expected_len} bytes, Content-Length says {}",
                declared_len.unwrap_or_default()
            )));
        }
        let check = ChunkCheck {
            expected_len,
            crc32c,
        };
        let written = match &manifest.staging {
            StagingRecord::LocalFile => {
                let staging = self.local_staging(id).expect("a local backend");
                let digest = self.running_digest(&manifest);
                let room = digest
                    .as_ref()
                    .and_then(|d| d.room_for(expected_len as usize));
                let keep = room.is_some();
                // Not held: the digest reads it back, from the page cache
                // while it is there, and drops it then.
                let stay_cached = digest.is_some() && !keep;
                let written = staging
                    .write_chunk(layout, index, check, body, keep, stay_cached)
                    .await;
                written.map(|pieces| {
                    let Some(digest) = digest else {
                        return;
                    };
                    digest.written(index, pieces.zip(room));
                    // Off the request's path: the ack does not wait for hashing.
                    let data = staging.data();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = digest.advance(&data) {
                            tracing::debug!(error = %e, "hashing arriving chunks stopped");
                        }
                    });
                })
            }
            StagingRecord::Multipart { key, upload_id } => {
                MultipartStaging::new(&self.store, id, key, upload_id)
                    .write_chunk(layout, index, check, body)
                    .await
            }
        };
        match written {
            Err(Error::NotFound(_)) => Err(self.gone(id).await),
            other => other,
        }
    }

    pub async fn status(&self, id: &str) -> Result<UploadStatus> {
        let mut manifest = self.fresh_manifest(id).await?;
        if manifest.committing.is_some() && manifest.state == UploadState::Open {
            let _guard = self.completion_lock(id).await;
            manifest = self.settle_commit(self.fresh_manifest(id).await?).await?;
        }
        let layout = self.chunks_of(&manifest);
        let received = match manifest.state {
            UploadState::Committed => (0..layout.chunk_count()).collect(),
            UploadState::Open => self.received(&manifest).await?,
        };
        let bytes_received = received.iter().filter_map(|i| layout.chunk_len(*i)).sum();
        Ok(UploadStatus {
            id: manifest.id.clone(),
            path: manifest.path.clone(),
            size: manifest.size,
            chunk_size: manifest.chunk_size,
            chunk_count: manifest.layout().map(|l| l.chunk_count()),
            received: runs(received),
            bytes_received,
            expires_at: manifest.expires_at,
            state: manifest.state,
            meta: manifest.result.clone(),
        })
    }

    /// Fixes the size (and the modification time) of an open-ended
    /// session. Every chunk it already holds must lie whole within the
    /// size. Declaring the size a session already has changes nothing.
    pub async fn declare_size(&self, id: &str, declared: DeclareSize) -> Result<UploadStatus> {
        let guard = self.completion_lock(id).await;
        let mut manifest = (*self.fresh_manifest(id).await?).clone();
        if manifest.state == UploadState::Committed {
            return Err(Error::Conflict(format!("upload {id} is already committed")));
        }
        match manifest.size {
            Some(size) if size == declared.size => {}
            Some(size) => {
                return Err(Error::Conflict(format!(
                    "upload {id} already has its size, {size} bytes"
                )));
            }
            None => {
                self.fix_size(&mut manifest, declared).await?;
                let manifest = Arc::new(manifest);
                self.manifests
                    .lock()
                    .unwrap()
                    .insert(id.to_owned(), manifest);
            }
        }
        drop(guard);
        self.status(id).await
    }

    async fn fix_size(&self, manifest: &mut Manifest, declared: DeclareSize) -> Result<()> {
        let id = manifest.id.clone();
        let size = declared.size;
        if size > self.max_size {
            return Err(Error::PayloadTooLarge {
                limit: self.max_size,
            });
        }
        let layout = ChunkLayout {
            size,
            chunk_size: manifest.chunk_size,
        };
        if self.store.multipart.is_some() && layout.chunk_count() > MAX_MULTIPART_CHUNKS {
            return Err(Error::PayloadTooLarge {
                limit: MAX_MULTIPART_CHUNKS * manifest.chunk_size,
            });
        }
        let received = self.received(manifest).await?;
        if let Some(past) = received
            .iter()
            .find(|index| (*index + 1) * layout.chunk_size > size)
        {
            return Err(Error::Conflict(format!(
                "upload {id} holds chunk {past} whole, which reaches past {size} bytes; start a new session"
            )));
        }
        if let Some(local) = self.local_staging(&id) {
            local.fix_size(layout).await?;
        }
        manifest.size = Some(size);
        if declared.mtime.is_some() {
            manifest.mtime = declared.mtime;
        }
        manifest::write(&self.store, manifest).await?;
        Ok(())
    }

    /// Commits the upload. Repeating it on a committed session returns the
    /// same metadata.
    /// Commits the session; `sha256` is the file's digest when it was not
    /// given at creation.
    pub async fn complete(&self, id: &str, sha256: Option<String>) -> Result<FileMeta> {
        let given = parse_sha256(sha256)?;
        let _guard = self.completion_lock(id).await;
        let settled = self.settle_commit(self.fresh_manifest(id).await?).await?;
        let mut manifest = (*settled).clone();
        if let Some(meta) = &manifest.result {
            return Ok(meta.clone());
        }
        manifest.sha256 = match (manifest.sha256.take(), given) {
            (Some(created), Some(given)) if created != given => {
                return Err(Error::BadRequest(format!(
                    "sha256 {given} differs from the {created} given when the session was created"
                )));
            }
            (None, None) if manifest.sha256_at_complete => {
                return Err(Error::BadRequest(
                    "this session was created to receive its sha256 with complete".into(),
                ));
            }
            // A multipart session assembles at its destination unless told
            // at creation that a digest will be checked.
            (None, Some(_))
                if !manifest.sha256_at_complete
                    && !matches!(manifest.staging, StagingRecord::LocalFile) =>
            {
                return Err(Error::BadRequest(
                    "to check a sha256 given with complete, create the session with sha256_at_complete".into(),
                ));
            }
            (created, given) => created.or(given),
        };
        let Some(layout) = manifest.layout() else {
            return Err(Error::BadRequest(format!(
                "upload {id} is open-ended and its size is not declared yet; PATCH /v1/uploads/{id} with the size first"
            )));
        };
        let received = self.received(&manifest).await?;
        if received.len() as u64 != layout.chunk_count() {
            let missing = (0..layout.chunk_count()).filter(|i| received.binary_search(i).is_err());
            return Err(Error::MissingChunks(runs(missing)));
        }
        self.store.check_file_writable(&manifest.path).await?;
        if let Some(expected) = &manifest.if_match {
            self.check_if_match(&manifest.path, expected).await?;
        }
        if manifest.create_only {
            self.check_absent(&manifest.path).await?;
        }
        let existed = self.store.try_head_file(&manifest.path).await?.is_some();
        if matches!(manifest.staging, StagingRecord::LocalFile) {
            manifest.committing = Some(Committing { replaces: existed });
            manifest::write(&self.store, &manifest).await?;
        }
        let committed = match &manifest.staging {
            StagingRecord::LocalFile => self.commit_local(&manifest).await,
            StagingRecord::Multipart { key, upload_id } => {
                self.commit_multipart(
                    &manifest,
                    MultipartStaging::new(&self.store, id, key, upload_id),
                )
                .await
            }
        };
        match committed {
            Ok(()) => {}
            Err(Error::NotFound(_)) => return Err(self.gone(id).await),
            Err(e) => return Err(e),
        }
        let meta = self.store.head_file(&manifest.path).await?;
        self.record_committed(manifest, meta.clone(), existed)
            .await?;
        if self.local_staging(id).is_none() {
            // Part records; the manifest stays so a repeated `complete` answers.
            self.delete_session_objects(id, |key| !key.ends_with("manifest.json"))
                .await?;
        }
        Ok(meta)
    }

    /// Marks the session committed as `meta` and announces the change.
    async fn record_committed(
        &self,
        mut manifest: Manifest,
        meta: FileMeta,
        existed: bool,
    ) -> Result<Arc<Manifest>> {
        self.store.feed.written(&meta, existed);
        manifest.state = UploadState::Committed;
        manifest.result = Some(meta);
        manifest.committing = None;
        self.open.lock().unwrap().remove(&manifest.id);
        manifest::write(&self.store, &manifest).await?;
        let manifest = Arc::new(manifest);
        self.manifests
            .lock()
            .unwrap()
            .insert(manifest.id.clone(), manifest.clone());
        Ok(manifest)
    }

    /// Serialises the commit of one session within this node.
    async fn completion_lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .completing
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Finishes the record of a commit cut short (the server killed) after
    /// the staged file was moved into place and before the manifest said
    /// so. The move is one rename, so a session marked committing whose
    /// staged data is gone was committed. Call with the completion lock.
    async fn settle_commit(&self, manifest: Arc<Manifest>) -> Result<Arc<Manifest>> {
        let (Some(committing), UploadState::Open, Some(staging)) = (
            &manifest.committing,
            manifest.state,
            self.local_staging(&manifest.id),
        ) else {
            return Ok(manifest);
        };
        if staging.has_data().await? {
            return Ok(manifest);
        }
        let Some(meta) = self.store.try_head_file(&manifest.path).await? else {
            return Ok(manifest);
        };
        tracing::info!(upload = manifest.id, path = %manifest.path, "recorded a commit that was cut short");
        let replaces = committing.replaces;
        let settled = self
            .record_committed((*manifest).clone(), meta, replaces)
            .await?;
        let _ = staging.remove_map().await;
        Ok(settled)
    }

    async fn commit_local(&self, manifest: &Manifest) -> Result<()> {
        let staging = self.local_staging(&manifest.id).expect("a local backend");
        if let Some(expected) = &manifest.sha256 {
            let running = self.running_digest(manifest);
            self.digests.lock().unwrap().remove(&manifest.id);
            let actual = match running {
                Some(digest) => {
                    let data = staging.data();
                    tokio::task::spawn_blocking(move || digest.finish(&data))
                        .await
                        .map_err(|e| Error::Storage(format!("hashing staged data: {e}")))??
                }
                // Created before a restart, or by another node.
                None => staging.sha256().await?,
            };
            if &actual != expected {
                self.abort(&manifest.id).await?;
                return Err(sha_mismatch(expected, &actual));
            }
        }
        let target = self
            .store
            .local_path(&manifest.path)
            .expect("a local backend");
        let size = manifest.size.expect("complete checks the size is known");
        staging
            .commit(target, size, manifest.mtime.map(Into::into))
            .await
    }

    async fn commit_multipart(
        &self,
        manifest: &Manifest,
        staging: MultipartStaging<'_>,
    ) -> Result<()> {
        let layout = manifest
            .layout()
            .expect("complete checks the size is known");
        staging.complete(layout).await?;
        let target = keys::object_path(&manifest.path);
        if staging.key() == &target {
            return Ok(());
        }
        if let Some(expected) = &manifest.sha256 {
            let actual = staging.sha256().await?;
            if &actual != expected {
                // The parts are already assembled at the private key: drop it.
                self.store.objects.delete(staging.key()).await?;
                self.forget(&manifest.id).await?;
                return Err(sha_mismatch(expected, &actual));
            }
        }
        self.store.objects.rename(staging.key(), &target).await?;
        Ok(())
    }

    /// Aborts the session and frees everything it staged.
    pub async fn abort(&self, id: &str) -> Result<()> {
        let manifest = self.stored_manifest(id).await?;
        if let (StagingRecord::Multipart { key, upload_id }, UploadState::Open) =
            (&manifest.staging, manifest.state)
        {
            MultipartStaging::new(&self.store, id, key, upload_id)
                .abort()
                .await?;
        }
        self.forget(id).await
    }

    /// Removes every session past its expiry, and the leftovers of sessions
    /// whose creation or removal was cut short (see [`DEBRIS_AFTER`]).
    pub async fn collect_expired(&self) -> Result<Swept> {
        let listing = self
            .store
            .objects
            .list_with_delimiter(Some(&object_store::path::Path::from(UPLOADS_PREFIX)))
            .await?;
        let now = Utc::now();
        let mut swept = Swept::default();
        let mut open = HashMap::new();
        for prefix in listing.common_prefixes {
            let Some(id) = prefix.filename().filter(|id| manifest::valid_id(id)) else {
                continue;
            };
            match manifest::read(&self.store, id).await {
                Ok(Some(m)) if m.is_expired(now) => {
                    if let Err(e) = self.abort(id).await {
                        tracing::warn!(upload = id, error = %e, "collecting an expired upload failed");
                    } else {
                        swept.expired += 1;
                    }
                }
                Ok(Some(m)) if m.state == UploadState::Open => {
                    let session = OpenSession {
                        owner: m.owner,
                        created_at: m.created_at,
                    };
                    open.insert(m.id, session);
                }
                Ok(Some(_)) => {}
                Ok(None) => match self.collect_debris(id, now - DEBRIS_AFTER).await {
                    Ok(true) => swept.debris += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(upload = id, error = %e, "removing a session's leftovers failed")
                    }
                },
                Err(e) => {
                    tracing::warn!(upload = id, error = %e, "reading an upload manifest failed")
                }
            }
        }
        // Sessions created while the sweep ran stay counted.
        let mut known = self.open.lock().unwrap();
        known.retain(|id, session| open.contains_key(id) || session.created_at >= now);
        known.extend(open);
        Ok(swept)
    }

    /// Removes what session `id`, found without a manifest, holds, if
    /// nothing of it changed since `cutoff`; whether it did.
    async fn collect_debris(&self, id: &str, cutoff: DateTime<Utc>) -> Result<bool> {
        if let Some(local) = self.local_staging(id) {
            return local.remove_if_untouched_since(cutoff.into()).await;
        }
        let listed = self.session_objects(id).await?;
        if listed.is_empty() || listed.iter().any(|o| o.last_modified >= cutoff) {
            return Ok(false);
        }
        self.delete_session_objects(id, |_| true).await?;
        Ok(true)
    }

    /// Chunks received and persisted; of an open-ended session whose size
    /// was declared, only those within it (one sent past the end as the
    /// size was declared is never part of the file).
    async fn received(&self, manifest: &Manifest) -> Result<Vec<u64>> {
        let count = self.chunks_of(manifest).chunk_count();
        let found = match &manifest.staging {
            StagingRecord::LocalFile => {
                self.local_staging(&manifest.id)
                    .expect("a local backend")
                    .received()
                    .await
            }
            StagingRecord::Multipart { key, upload_id } => {
                MultipartStaging::new(&self.store, &manifest.id, key, upload_id)
                    .received()
                    .await
            }
        };
        match found {
            Err(Error::NotFound(_)) => Err(self.gone(&manifest.id).await),
            Ok(mut found) => {
                found.retain(|index| *index < count);
                Ok(found)
            }
            Err(e) => Err(e),
        }
    }

    /// The digest this node computes as the session's chunks arrive, if
    /// any, told the size if another node declared it.
    fn running_digest(&self, manifest: &Manifest) -> Option<Arc<RunningDigest>> {
        let digest = self.digests.lock().unwrap().get(&manifest.id).cloned()?;
        if let Some(size) = manifest.size {
            digest.fix_size(size);
        }
        Some(digest)
    }

    /// The chunks a session takes: those of its file once the size is
    /// known; before, whole chunks, as many as the size limit (and the
    /// backend's part count) allow.
    fn chunks_of(&self, manifest: &Manifest) -> ChunkLayout {
        manifest.layout().unwrap_or_else(|| {
            let mut most = self.max_size / manifest.chunk_size;
            if self.store.multipart.is_some() {
                most = most.min(MAX_MULTIPART_CHUNKS);
            }
            ChunkLayout {
                size: most * manifest.chunk_size,
                chunk_size: manifest.chunk_size,
            }
        })
    }

    /// The session's target path and owning token, for access checks.
    pub async fn target(&self, id: &str) -> Result<(RemotePath, Option<String>)> {
        let m = self.manifest(id).await?;
        Ok((m.path.clone(), m.owner.clone()))
    }

    /// The manifest, from this node's cache when possible.
    async fn manifest(&self, id: &str) -> Result<Arc<Manifest>> {
        if let Some(m) = self.manifests.lock().unwrap().get(id).cloned() {
            return self.unexpired(m);
        }
        self.fresh_manifest(id).await
    }

    /// The manifest as the backend has it now.
    async fn fresh_manifest(&self, id: &str) -> Result<Arc<Manifest>> {
        let m = self.stored_manifest(id).await?;
        self.unexpired(m)
    }

    /// The manifest as the backend has it now, expired or not.
    async fn stored_manifest(&self, id: &str) -> Result<Arc<Manifest>> {
        if !manifest::valid_id(id) {
            return Err(Error::NotFound(format!("upload {id}")));
        }
        let Some(m) = manifest::read(&self.store, id).await? else {
            self.manifests.lock().unwrap().remove(id);
            return Err(Error::NotFound(format!("upload {id}")));
        };
        let m = Arc::new(m);
        self.manifests
            .lock()
            .unwrap()
            .insert(id.to_owned(), m.clone());
        Ok(m)
    }

    fn unexpired(&self, m: Arc<Manifest>) -> Result<Arc<Manifest>> {
        if m.is_expired(Utc::now()) {
            return Err(Error::NotFound(format!("upload {} (expired)", m.id)));
        }
        Ok(m)
    }

    /// Explains why a session's staged data vanished under a request.
    async fn gone(&self, id: &str) -> Error {
        match self.fresh_manifest(id).await {
            Ok(m) if m.state == UploadState::Committed => {
                Error::Conflict(format!("upload {id} is already committed"))
            }
            // Nothing can complete it: the client starts a new session.
            Ok(_) => Error::NotFound(format!(
                "upload {id} (its staged data is missing; start a new session)"
            )),
            Err(e) => e,
        }
    }

    async fn check_if_match(
        &self,
        path: &crate::protocol::RemotePath,
        expected: &str,
    ) -> Result<()> {
        let current = self.store.try_head_file(path).await?;
        if current.as_ref().and_then(|m| m.etag.as_deref()) != Some(expected) {
            return Err(Error::PreconditionFailed(format!(
                "{path} no longer has etag {expected}"
            )));
        }
        Ok(())
    }

    async fn check_absent(&self, path: &crate::protocol::RemotePath) -> Result<()> {
        if self.store.try_head_file(path).await?.is_some() {
            return Err(Error::PreconditionFailed(format!(
                "{path} exists (the upload was to create it)"
            )));
        }
        Ok(())
    }

    fn local_staging(&self, id: &str) -> Option<LocalStaging> {
        let root = self.store.local_root.as_ref()?;
        Some(LocalStaging::new(root.join(UPLOADS_PREFIX).join(id)))
    }

    /// Deletes everything the session holds, manifest last.
    async fn forget(&self, id: &str) -> Result<()> {
        if let Some(local) = self.local_staging(id) {
            local.remove().await?;
        } else {
            self.delete_session_objects(id, |key| !key.ends_with("manifest.json"))
                .await?;
            self.delete_session_objects(id, |_| true).await?;
        }
        self.manifests.lock().unwrap().remove(id);
        self.completing.lock().unwrap().remove(id);
        self.open.lock().unwrap().remove(id);
        self.digests.lock().unwrap().remove(id);
        Ok(())
    }

    /// Every object under session `id`'s prefix.
    async fn session_objects(&self, id: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self
            .store
            .objects
            .list(Some(&manifest::session_prefix(id)))
            .try_collect()
            .await?)
    }

    /// Deletes the session's objects whose key satisfies `select`.
    async fn delete_session_objects(&self, id: &str, select: impl Fn(&str) -> bool) -> Result<()> {
        let listed = self.session_objects(id).await?;
        for object in listed.iter().filter(|o| select(o.location.as_ref())) {
            match self.store.objects.delete(&object.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

fn sha_mismatch(expected: &str, actual: &str) -> Error {
    Error::ChecksumMismatch(format!(
        "sha256 of the assembled file is {actual}, expected {expected}; nothing was committed and the session was discarded"
    ))
}

/// An etag as a client may send it (quoted, weak) reduced to ferry's form.
fn plain_tag(tag: &str) -> String {
    tag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_owned()
}

/// A client's hex SHA-256, lowercased; anything but 64 hex digits is refused.
fn parse_sha256(sha256: Option<String>) -> Result<Option<String>> {
    match sha256 {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(h.to_ascii_lowercase()))
        }
        Some(_) => Err(Error::BadRequest("sha256 must be 64 hex digits".into())),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use object_store::PutPayload;

    use super::*;

    /// On an object store, what a session without a manifest holds goes
    /// once all of it is older than the cutoff; a real session stays.
    #[tokio::test]
    async fn objects_of_a_session_without_a_manifest_go_once_old() {
        let store = Store::open("memory://").unwrap();
        let sessions = UploadSessions::new(store.clone(), Duration::from_secs(60), 1 << 30, None);
        let req = serde_json::from_value(serde_json::json!({"path": "real.bin", "size": 10}));
        let real = sessions.create(req.unwrap(), None).await.unwrap().id;
        let orphan = manifest::new_id();
        let part = manifest::session_prefix(&orphan).join("parts").join("0");
        store
            .objects
            .put(&part, PutPayload::from_static(b"id"))
            .await
            .unwrap();

        let just_before = Utc::now() - chrono::Duration::seconds(1);
        assert!(!sessions.collect_debris(&orphan, just_before).await.unwrap());
        assert!(store.objects.head(&part).await.is_ok());
        assert_eq!(sessions.collect_expired().await.unwrap(), Swept::default());

        let later = Utc::now() + chrono::Duration::seconds(1);
        assert!(sessions.collect_debris(&orphan, later).await.unwrap());
        assert!(store.objects.head(&part).await.is_err());
        assert!(sessions.status(&real).await.is_ok());
    }
}
