//! The JSON error body every route returns: `{"error":{"code":…,"message":…}}`.

use serde::{Deserialize, Serialize};

/// Machine-readable error codes. Each maps to one HTTP status and one errno
/// (see [`crate::Error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    InvalidPath,
    /// A valid-looking path with a name (or the whole path) longer than the
    /// path rules or the store allow.
    NameTooLong,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    /// A signed URL past its expiry.
    Expired,
    AlreadyExists,
    IsADirectory,
    NotADirectory,
    DirectoryNotEmpty,
    Conflict,
    PreconditionFailed,
    PayloadTooLarge,
    RangeNotSatisfiable,
    ChecksumMismatch,
    MissingChunks,
    RateLimited,
    StorageError,
    Internal,
    /// A code this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status that carries this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidPath | ErrorCode::NameTooLong => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Expired => 410,
            ErrorCode::AlreadyExists
            | ErrorCode::IsADirectory
            | ErrorCode::NotADirectory
            | ErrorCode::DirectoryNotEmpty
            | ErrorCode::MissingChunks
            | ErrorCode::Conflict => 409,
            ErrorCode::PreconditionFailed => 412,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RangeNotSatisfiable => 416,
            ErrorCode::ChecksumMismatch => 422,
            ErrorCode::RateLimited => 429,
            ErrorCode::StorageError => 503,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// For `missing_chunks`: the chunk indices not yet received, as inclusive
    /// `[first, last]` runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<[u64; 2]>>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
                missing: None,
            },
        }
    }
}
