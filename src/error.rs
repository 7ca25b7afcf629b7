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
    /// The storage backend failed, by its own account (`detail`), which may
    /// name the server's paths (a local store's absolute ones) or a cloud
    /// store's URLs: only the server's log gets it; clients get `cause`.
    #[error("storage backend failed: {cause}")]
    Backend { cause: String, detail: String },
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
            Error::InvalidPath(e) if e.is_too_long() => ErrorCode::NameTooLong,
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
            Error::Storage(_) | Error::Backend { .. } => ErrorCode::StorageError,
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
            ErrorCode::NameTooLong => libc_errno::ENAMETOOLONG,
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

    /// A failure of the server's own storage (a session's staged data) while
    /// `doing`: the backend's, with the system's reason (`No space left on
    /// device`) for the client.
    pub(crate) fn storage_io(doing: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |e| Error::Backend {
            cause: format!("{doing}: {}", io_cause(&e)),
            detail: format!("{doing}: {e}"),
        }
    }

    /// A failure of a local store's filesystem at `path` while `doing`
    /// something: a name too long for it is the request's fault; anything
    /// else is the backend's, and `path` goes only to the log.
    pub(crate) fn local_store(doing: &str, path: &std::path::Path, e: std::io::Error) -> Error {
        if name_too_long(&e) {
            return Error::InvalidPath(PathError::NameTooLongForFilesystem);
        }
        Error::Backend {
            cause: format!("{doing}: {}", io_cause(&e)),
            detail: format!("{doing} ({}): {e}", path.display()),
        }
    }

    /// What the server's log says of an error beyond its message, if anything.
    pub fn log_detail(&self) -> Option<&str> {
        match self {
            Error::Backend { detail, .. } => Some(detail),
            _ => None,
        }
    }
}

/// `ENAMETOOLONG`: a name (or the whole path) longer than the filesystem takes.
fn name_too_long(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc_errno::ENAMETOOLONG)
}

/// What a client may be told of an I/O error: the system's text for an OS
/// error (which names no path), else only its kind.
fn io_cause(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(_) => e.to_string(),
        None => e.kind().to_string(),
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

/// The backend's own paths (a local store's are absolute) stay out of the
/// messages: callers know the logical path, and the log has the rest.
impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        use object_store::Error as E;
        use std::io::ErrorKind;
        match e {
            E::NotFound { .. } => Error::NotFound("the store has no such object".into()),
            E::AlreadyExists { .. } => Error::AlreadyExists("the store has an object there".into()),
            E::Precondition { .. } => {
                Error::PreconditionFailed("the object changed meanwhile".into())
            }
            E::InvalidPath { source } => Error::BadRequest(source.to_string()),
            other => match first_io_error(&other) {
                // A local path through a file ("a.txt/b") does not exist.
                Some(io) if io.kind() == ErrorKind::NotADirectory => {
                    Error::NotFound("the store has no such object".into())
                }
                Some(io) if name_too_long(io) => {
                    Error::InvalidPath(PathError::NameTooLongForFilesystem)
                }
                io => Error::Backend {
                    cause: io.map_or_else(|| "the server's log has the details".into(), io_cause),
                    detail: other.to_string(),
                },
            },
        }
    }
}

/// The first I/O error in `e`'s source chain.
fn first_io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
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
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOTEMPTY: i32 = 39;
}
