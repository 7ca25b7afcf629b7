//! The `ferry serve --config FILE` format (TOML). Documented, with an
//! example, in docs/CONFIG.md.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::server::auth::TokenConfig;

/// Every field is optional; a flag given on the command line wins.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    pub store: Option<String>,
    pub listen: Option<SocketAddr>,
    pub allow_anonymous: Option<bool>,
    pub public_url: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub upload_ttl: Option<u64>,
    pub gc_interval: Option<u64>,
    pub ws_ping_interval: Option<u64>,
    pub ws_max_message: Option<usize>,
    pub ws_max_channels: Option<usize>,
    pub header_timeout: Option<u64>,
    pub shutdown_grace: Option<u64>,
    pub body_timeout: Option<u64>,
    #[serde(default)]
    pub cors_origins: Vec<String>,
    pub rate_limit: Option<u32>,
    pub rate_burst: Option<u32>,
    pub max_sessions_per_token: Option<usize>,
    pub max_transfers_per_token: Option<usize>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// `human` (default) or `json`.
    pub log_format: Option<crate::cli::LogFormat>,
    /// Key for signed URLs (at least 16 characters).
    pub signing_secret: Option<String>,
    #[serde(default)]
    pub token: Vec<TokenConfig>,
}

impl ServeFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in the config file {}", path.display()))
    }
}
