//! The crate-wide error type. Each variant maps to one wire code (and so one
//! HTTP status) and one errno, here and nowhere else.

use crate::protocol::{ErrorCode, PathError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid path: {0}")]
    InvalidPath(#[from] PathError),
    #[error("{0}")]
    BadRequest(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("expired: {0}")]
    Expired(String),
    #[error("too many requests; retry in {retry_after} s")]
    RateLimited { retry_after: u64 },
    /// A per-token limit (open sessions, concurrent transfers) is reached.
    #[error("limit reached: {0}")]
    LimitReached(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("is a directory: {0}")]
    IsADirectory(String),
    #[error("not a directory: {0}")]
    NotADirectory(String),
    #[error("directory not empty: {0}")]
    DirectoryNotEmpty(String),
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    #[error("body larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("range not satisfiable for a {size}-byte object")]
    RangeNotSatisfiable { size: u64 },
    #[error("checksum mismatch: {0}")]
    ChecksumMismatch(String),
    #[error("chunks not received yet: {}", describe_runs(.0))]
    MissingChunks(Vec<[u64; 2]>),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("storage backend failed: {0}")]
    Storage(String),
    #[error("network error: {0}")]
    Network(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("{message}")]
    Remote {
        code: ErrorCode,
        status: u16,
        message: String,
    },
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidPath(_) => ErrorCode::InvalidPath,
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::Unauthorized(_) => ErrorCode::Unauthorized,
            Error::Forbidden(_) => ErrorCode::Forbidden,
            Error::Expired(_) => ErrorCode::Expired,
            Error::RateLimited { .. } | Error::LimitReached(_) => ErrorCode::RateLimited,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Error::IsADirectory(_) => ErrorCode::IsADirectory,
            Error::NotADirectory(_) => ErrorCode::NotADirectory,
            Error::DirectoryNotEmpty(_) => ErrorCode::DirectoryNotEmpty,
            Error::PreconditionFailed(_) => ErrorCode::PreconditionFailed,
            Error::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Error::RangeNotSatisfiable { .. } => ErrorCode::RangeNotSatisfiable,
            Error::ChecksumMismatch(_) => ErrorCode::ChecksumMismatch,
            Error::MissingChunks(_) => ErrorCode::MissingChunks,
            Error::Conflict(_) => ErrorCode::Conflict,
            Error::Storage(_) => ErrorCode::StorageError,
            Error::Network(_) | Error::Io { .. } | Error::Cancelled => ErrorCode::Internal,
            Error::Remote { code, .. } => *code,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Error::Remote { status, .. } => *status,
            other => other.code().status(),
        }
    }

    /// The errno a filesystem call reports for this error.
    pub fn errno(&self) -> i32 {
        match self.code() {
            ErrorCode::BadRequest | ErrorCode::InvalidPath => libc_errno::EINVAL,
            ErrorCode::Unauthorized | ErrorCode::Forbidden => libc_errno::EACCES,
            ErrorCode::NotFound => libc_errno::ENOENT,
            ErrorCode::AlreadyExists => libc_errno::EEXIST,
            ErrorCode::IsADirectory => libc_errno::EISDIR,
            ErrorCode::NotADirectory => libc_errno::ENOTDIR,
            ErrorCode::DirectoryNotEmpty => libc_errno::ENOTEMPTY,
            ErrorCode::PayloadTooLarge => libc_errno::EFBIG,
            ErrorCode::RangeNotSatisfiable => libc_errno::EINVAL,
            ErrorCode::Conflict | ErrorCode::PreconditionFailed => libc_errno::EBUSY,
            _ if matches!(self, Error::Cancelled) => libc_errno::EINTR,
            _ => libc_errno::EIO,
        }
    }
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

fn describe_runs(runs: &[[u64; 2]]) -> String {
    runs.iter()
        .map(|[a, b]| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        use object_store::Error as E;
        match e {
            E::NotFound { path, .. } => Error::NotFound(path),
            E::AlreadyExists { path, .. } => Error::AlreadyExists(path),
            E::Precondition { path, .. } => Error::PreconditionFailed(path),
            E::InvalidPath { source } => Error::BadRequest(source.to_string()),
            // A local path through a file ("a.txt/b") does not exist.
            other if io_kind(&other) == Some(std::io::ErrorKind::NotADirectory) => {
                Error::NotFound(other.to_string())
            }
            other => Error::Storage(other.to_string()),
        }
    }
}

/// The kind of the first I/O error in `e`'s source chain.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        current = err.source();
    }
    None
}

/// Linux errno values (stable ABI), kept here so the mapping needs no libc.
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EINTR: i32 = 4;
    pub const EIO: i32 = 5;
    pub const EACCES: i32 = 13;
    pub const EBUSY: i32 = 16;
    pub const EEXIST: i32 = 17;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOTEMPTY: i32 = 39;
}
