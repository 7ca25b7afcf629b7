//! The Rust client every ferry program uses: file and namespace calls, a
//! ranged reader, resumable downloads and resumable chunked uploads.
//!
//! ```no_run
//! # async fn example() -> ferry::Result<()> {
//! use ferry::client::{Client, upload::{upload_file, UploadOptions}};
//! let client = Client::new("http://127.0.0.1:7070")?;
//! let remote = "videos/talk.mp4".parse()?;
//! let report = upload_file(&client, "talk.mp4".as_ref(), &remote, UploadOptions::default()).await?;
//! println!("committed {} bytes", report.meta.size);
//! # Ok(()) }
//! ```

pub mod digest;
pub mod download;
mod http;
pub mod ranged;
pub mod retry;
pub mod throttle;
pub mod upload;
pub mod watch;
pub mod ws;

use std::sync::Arc;

pub use http::{Client, ClientConfig};

/// How far a transfer has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes known to be on the other side (or on disk, for downloads).
    pub done: u64,
    pub total: u64,
}

/// Called as a transfer advances. Must be cheap: it runs on the transfer's task.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;
