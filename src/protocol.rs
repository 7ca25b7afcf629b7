//! Wire types shared by the server and every client.
//!
//! Nothing here does I/O: these are the validated shapes that cross the wire
//! (paths, byte ranges, metadata, operation bodies, the error body), so that the
//! server and the clients agree by construction instead of by copy.

pub mod error;
pub mod events;
pub mod meta;
pub mod path;
pub mod range;
pub mod upload;
pub mod ws;

pub use error::{ErrorBody, ErrorCode};
pub use meta::{
    Access, EntryKind, FileMeta, ListEntry, ListPage, MkdirRequest, MoveRequest, RmdirRequest,
    SignRequest, SignedUrl, WriteLimits,
};
pub use path::{PathError, RemotePath};
pub use range::{ByteRange, RangeRequest};
