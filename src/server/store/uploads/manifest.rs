//! The persisted record of one upload session, kept in the backend at
//! `.ferry/uploads/{id}/manifest.json` so every node on the store sees it.

use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::protocol::upload::{ChunkLayout, UploadState};
use crate::protocol::{FileMeta, RemotePath};
use crate::server::store::Store;

/// Where session state lives, below the store root.
pub const UPLOADS_PREFIX: &str = ".ferry/uploads";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub path: RemotePath,
    /// `None` until an open-ended session's size is declared.
    pub size: Option<u64>,
    pub chunk_size: u64,
    pub sha256: Option<String>,
    /// The SHA-256 comes with `complete` (see `CreateUpload`).
    #[serde(default)]
    pub sha256_at_complete: bool,
    pub if_match: Option<String>,
    /// Commit only if no file exists at `path` (`if_none_match: "*"`).
    #[serde(default)]
    pub create_only: bool,
    pub mtime: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub staging: StagingRecord,
    pub state: UploadState,
    /// The committed file, once `state` is `committed`.
    pub result: Option<FileMeta>,
    /// The token that created the session; only it may use the session.
    #[serde(default)]
    pub owner: Option<String>,
    /// Written just before the staged file is moved into place, so that a
    /// commit cut short after the move is recognised (see `settle_commit`).
    #[serde(default)]
    pub committing: Option<Committing>,
}

/// A commit under way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Committing {
    /// Whether the target existed before (for the change feed).
    pub replaces: bool,
}

/// How the chunks of a session are staged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StagingRecord {
    /// One sparse file plus a chunk map, in the session's directory.
    LocalFile,
    /// A backend multipart upload at `key`; part ids under `parts/`.
    Multipart { key: String, upload_id: String },
}

impl Manifest {
    /// The chunks of the file, once its size is known.
    pub fn layout(&self) -> Option<ChunkLayout> {
        self.size.map(|size| ChunkLayout {
            size,
            chunk_size: self.chunk_size,
        })
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }
}

/// Session ids are 32 lowercase hex digits; nothing else names a session.
pub fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn new_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

pub fn session_prefix(id: &str) -> Path {
    Path::from(format!("{UPLOADS_PREFIX}/{id}"))
}

fn manifest_key(id: &str) -> Path {
    session_prefix(id).join("manifest.json")
}

pub async fn read(store: &Store, id: &str) -> Result<Option<Manifest>> {
    match store.objects.get(&manifest_key(id)).await {
        Ok(found) => {
            let bytes = found.bytes().await?;
            let manifest = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Storage(format!("corrupt manifest of upload {id}: {e}")))?;
            Ok(Some(manifest))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub async fn write(store: &Store, manifest: &Manifest) -> Result<()> {
    let body = serde_json::to_vec_pretty(manifest).expect("manifests serialize");
    store
        .objects
        .put(&manifest_key(&manifest.id), PutPayload::from(body))
        .await?;
    Ok(())
}
