//! Resumable chunk sessions: request and response bodies, chunk arithmetic
//! and the `X-Ferry-Crc32c` header.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{FileMeta, RemotePath};

/// Header carrying the CRC32C of a chunk: base64 of the big-endian `u32`.
pub const CRC32C_HEADER: &str = "x-ferry-crc32c";
pub const MIN_CHUNK_SIZE: u64 = 1 << 20;
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// S3's smallest part (every part but the last).
pub const MIN_MULTIPART_CHUNK_SIZE: u64 = 5 << 20;
/// S3's largest part count.
pub const MAX_MULTIPART_CHUNKS: u64 = 10_000;

/// `POST /v1/uploads`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateUpload {
    pub path: RemotePath,
    /// The file's size. Without it the session is open-ended: it takes
    /// whole chunks while the file is still being written, and the size is
    /// declared later with [`DeclareSize`], before the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
    /// Hex SHA-256 of the whole file, checked at `complete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The SHA-256 will come with `complete` instead (a client hashing while
    /// it sends); the session is then staged so it can be checked before
    /// anything is committed, and `complete` without it is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sha256_at_complete: bool,
    /// Commit only if the destination still has this etag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_match: Option<String>,
    /// `*`: commit only if no file exists at the destination (a new file
    /// never replaces one another client created meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_none_match: Option<String>,
    /// Modification time to give the committed file, where the backend can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<DateTime<Utc>>,
}

/// The optional body of `POST /v1/uploads/{id}/complete`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteUpload {
    /// Hex SHA-256 of the whole file, when not given at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `PATCH /v1/uploads/{id}`: fixes the size of an open-ended session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclareSize {
    pub size: u64,
    /// Modification time to give the committed file, where the backend can
    /// (replaces the one given at creation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<DateTime<Utc>>,
}

/// 201 answer to `POST /v1/uploads`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadCreated {
    pub id: String,
    pub chunk_size: u64,
    /// `None` while the size is not known (an open-ended session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_count: Option<u64>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadState {
    Open,
    Committed,
}

/// `GET /v1/uploads/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadStatus {
    pub id: String,
    pub path: RemotePath,
    /// `None` until an open-ended session's size is declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub chunk_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_count: Option<u64>,
    /// Received chunk indices as inclusive `[first, last]` runs.
    pub received: Vec<[u64; 2]>,
    pub bytes_received: u64,
    pub expires_at: DateTime<Utc>,
    pub state: UploadState,
    /// The committed file, once `state` is `committed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<FileMeta>,
}

impl UploadStatus {
    /// What `GET /v1/uploads/{id}` would answer right after `request`
    /// created the session `created`: open, nothing received.
    pub fn of_new_session(request: &CreateUpload, created: &UploadCreated) -> Self {
        UploadStatus {
            id: created.id.clone(),
            path: request.path.clone(),
            size: request.size,
            chunk_size: created.chunk_size,
            chunk_count: created.chunk_count,
            received: Vec::new(),
            bytes_received: 0,
            expires_at: created.expires_at,
            state: UploadState::Open,
            meta: None,
        }
    }
}

/// Chunk geometry of one upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLayout {
    pub size: u64,
    pub chunk_size: u64,
}

impl ChunkLayout {
    /// Number of chunks; an empty file has one empty chunk, so every upload
    /// sends at least one PUT.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size).max(1)
    }

    /// Byte range `[start, end)` of chunk `index`, or `None` past the end.
    pub fn chunk_range(&self, index: u64) -> Option<(u64, u64)> {
        if index >= self.chunk_count() {
            return None;
        }
        let start = index * self.chunk_size;
        Some((start, (start + self.chunk_size).min(self.size)))
    }

    pub fn chunk_len(&self, index: u64) -> Option<u64> {
        self.chunk_range(index).map(|(s, e)| e - s)
    }
}

/// Chunks the server aims at when it picks the size: few enough that
/// per-chunk overhead (a request, two fsyncs) stays small, many enough that a
/// resumed upload re-sends little.
const TARGET_CHUNKS: u64 = 256;

/// The chunk size the server picks: a power of two between 1 MiB and 64 MiB
/// aiming at about 256 chunks, never below `floor`.
pub fn default_chunk_size(size: u64, floor: u64) -> u64 {
    size.div_ceil(TARGET_CHUNKS)
        .next_power_of_two()
        .clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
        .max(floor.next_power_of_two())
}

/// The chunk size the server picks for an open-ended session, whose size
/// it cannot aim at: large enough that a file of gigabytes takes a few
/// hundred chunks, never below `floor`.
pub fn open_ended_chunk_size(floor: u64) -> u64 {
    (8 << 20u64).max(floor.next_power_of_two())
}

/// Collapses sorted indices into inclusive runs.
pub fn runs(indices: impl IntoIterator<Item = u64>) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for i in indices {
        match out.last_mut() {
            Some(run) if run[1] + 1 == i => run[1] = i,
            _ => out.push([i, i]),
        }
    }
    out
}

/// Expands inclusive runs back into indices.
pub fn expand_runs(runs: &[[u64; 2]]) -> impl Iterator<Item = u64> + '_ {
    runs.iter().flat_map(|[a, b]| *a..=*b)
}

pub fn crc32c_header_value(crc: u32) -> String {
    STANDARD.encode(crc.to_be_bytes())
}

pub fn parse_crc32c_header(value: &str) -> Option<u32> {
    let bytes = STANDARD.decode(value.trim()).ok()?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_geometry() {
        let l = ChunkLayout {
            size: 10,
            chunk_size: 4,
        };
        assert_eq!(l.chunk_count(), 3);
        assert_eq!(l.chunk_range(0), Some((0, 4)));
        assert_eq!(l.chunk_range(2), Some((8, 10)));
        assert_eq!(l.chunk_range(3), None);
        let empty = ChunkLayout {
            size: 0,
            chunk_size: 4,
        };
        assert_eq!((empty.chunk_count(), empty.chunk_len(0)), (1, Some(0)));
    }

    #[test]
    fn chunk_size_choice() {
        assert_eq!(default_chunk_size(0, 0), 1 << 20);
        assert_eq!(default_chunk_size(1 << 30, 0), 4 << 20);
        assert_eq!(default_chunk_size(1 << 40, 0), 64 << 20);
        assert_eq!(
            default_chunk_size(1 << 20, MIN_MULTIPART_CHUNK_SIZE),
            8 << 20
        );
    }

    #[test]
    fn runs_round_trip() {
        let r = runs([0, 1, 2, 5, 7, 8]);
        assert_eq!(r, [[0, 2], [5, 5], [7, 8]]);
        assert_eq!(expand_runs(&r).collect::<Vec<_>>(), [0, 1, 2, 5, 7, 8]);
    }

    #[test]
    fn crc_header() {
        let v = crc32c_header_value(0xDEADBEEF);
        assert_eq!(parse_crc32c_header(&v), Some(0xDEADBEEF));
        assert_eq!(parse_crc32c_header("nope"), None);
    }
}
