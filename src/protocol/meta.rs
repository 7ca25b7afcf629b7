//! Metadata and operation bodies of the file API.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::RemotePath;

/// The header naming a request that creates, moves or commits something,
/// so that sending it again after a lost answer gets the first answer
/// (API.md, "Retrying safely").
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
}

/// What `stat`, `PUT` and the ops return about one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub path: RemotePath,
    pub kind: EntryKind,
    /// Bytes; 0 for directories.
    pub size: u64,
    /// Last modification; absent for directories that exist only implicitly.
    pub mtime: Option<DateTime<Utc>>,
    /// Opaque version tag (without HTTP quotes); absent for directories.
    pub etag: Option<String>,
}

/// One entry of a listing. `name` is relative to the listed prefix: a single
/// segment, or a relative path in recursive listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime: Option<DateTime<Utc>>,
    pub etag: Option<String>,
}

/// A page of a listing, sorted by `name` (byte order). `cursor`, when present,
/// fetches the next page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPage {
    pub entries: Vec<ListEntry>,
    pub cursor: Option<String>,
}

/// `POST /v1/ops/mkdir`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MkdirRequest {
    pub path: RemotePath,
    /// Create missing parents instead of failing with `not_found`.
    #[serde(default)]
    pub parents: bool,
}

/// `POST /v1/ops/rename` and `POST /v1/ops/copy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveRequest {
    pub from: RemotePath,
    pub to: RemotePath,
    /// Replace an existing destination file.
    #[serde(default)]
    pub overwrite: bool,
    /// Required to move or copy a directory with everything under it.
    #[serde(default)]
    pub recursive: bool,
}

/// `POST /v1/ops/rmdir`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RmdirRequest {
    pub path: RemotePath,
    /// Remove everything under the directory as well.
    #[serde(default)]
    pub recursive: bool,
}

/// `POST /v1/sign`: a URL that reads `path` without a token until it expires.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignRequest {
    pub path: RemotePath,
    /// Seconds the URL stays valid (default one hour, at most seven days).
    #[serde(default = "default_expires_in")]
    pub expires_in: u64,
}

fn default_expires_in() -> u64 {
    3600
}

/// The longest a signed URL may live.
pub const MAX_SIGNED_SECONDS: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedUrl {
    /// Absolute when the server knows its public address, else from `/v1/`.
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// `GET /v1/whoami`: what the caller's credentials allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// The token's name; absent on a server without tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub read: bool,
    pub write: bool,
    /// The only part of the store reachable (`""`: all of it).
    pub prefix: RemotePath,
    /// What the server writes; absent from servers older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<WriteLimits>,
}

/// What a server writes, so that a client can refuse at once what the server
/// would refuse later (a mount: ENAMETOOLONG when the file is made, not a
/// failed upload after its close).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteLimits {
    /// The longest name written, counted in bytes as a local-directory store
    /// keeps it ([`stored_name_len`](super::path::stored_name_len)); absent
    /// when any valid name is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stored_name_bytes: Option<usize>,
}

impl WriteLimits {
    /// Whether a file or directory named `name` can be written.
    pub fn name_fits(&self, name: &str) -> bool {
        match self.max_stored_name_bytes {
            // A byte takes at most three: most names need no count.
            Some(max) => name.len() * 3 <= max || super::path::stored_name_len(name) <= max,
            None => true,
        }
    }
}
