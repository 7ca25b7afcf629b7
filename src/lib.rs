//! ferry makes remote storage feel local.
//!
//! - [`protocol`]: the wire types every program shares.
//! - [`server`]: `ferry serve`, the HTTP API over an object store.
//! - [`client`]: the client library every program uses.
//! - [`fs`]: `ferry mount`, the FUSE filesystem.
//! - [`cli`]: the `ferry` command line.

pub mod cli;
pub mod client;
pub mod error;
pub mod fs;
pub mod metrics_export;
mod page_cache;
pub mod protocol;
pub mod server;
pub mod tls;

pub use error::{Error, Result};
