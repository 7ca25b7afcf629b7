//! Arguments shared by the commands that talk to a server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::protocol::RemotePath;

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The ferry server.
    #[arg(
        long,
        env = "FERRY_SERVER",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub server: String,
    /// Give up on an unreachable server (or one that stops answering)
    /// after this many seconds of retrying. Only time in which no byte
    /// moves counts: a `get` or `put` over a link that keeps dropping the
    /// connection but makes progress in between goes on.
    #[arg(long, default_value_t = 120, global = true)]
    pub retry_for: u64,
    /// A file holding the access token (else `FERRY_TOKEN`).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificates to trust for an https:// server, besides the system's.
    #[arg(long, env = "FERRY_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
}

impl ServerArgs {
    pub fn client(&self) -> Result<Client> {
        let mut config = crate::client::ClientConfig::default();
        config.retry.give_up_after = Duration::from_secs(self.retry_for);
        config.token = read_token(self.token_file.as_deref())?;
        config.ca_file = self.ca_file.clone();
        Client::with_config(&self.server, config)
    }
}

/// The token from `file` (first line, trimmed) or else from `FERRY_TOKEN`.
pub fn read_token(file: Option<&Path>) -> Result<Option<String>> {
    let token = match file {
        Some(file) => std::fs::read_to_string(file).map_err(|source| Error::Io {
            context: format!("reading the token file {}", file.display()),
            source,
        })?,
        None => match std::env::var("FERRY_TOKEN") {
            Ok(token) => token,
            Err(_) => return Ok(None),
        },
    };
    let token = token.lines().next().unwrap_or_default().trim().to_owned();
    if token.is_empty() {
        return Err(Error::BadRequest("the token is empty".into()));
    }
    Ok(Some(token))
}

/// A remote path as typed: a leading `/` is allowed and means the root.
pub fn parse_remote(text: &str) -> Result<RemotePath> {
    Ok(RemotePath::parse(text.strip_prefix('/').unwrap_or(text))?)
}

/// A byte count such as `1048576`, `512K`, `10M` or `1G` (powers of 1024).
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let scale: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (use K, M or G)")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{text:?} is not a byte count"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("10M"), Ok(10 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert!(parse_bytes("5X").is_err());
        assert!(parse_bytes("M").is_err());
    }

    #[test]
    fn remote_paths() {
        assert_eq!(parse_remote("/a/b").unwrap().as_str(), "a/b");
        assert!(parse_remote("/").unwrap().is_root());
        assert!(parse_remote("../x").is_err());
    }
}
