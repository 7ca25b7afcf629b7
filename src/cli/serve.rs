//! `ferry serve`: flags, the TOML config file, and the safe default for
//! servers without tokens.

mod config;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

pub use self::config::ServeFile;
use crate::server::auth::Authenticator;
use crate::server::limits::RateLimit;
use crate::server::listen::Listening;
use crate::server::{self, AppState, DEFAULT_MAX_BODY_BYTES, ServerConfig, Store};
use tokio_rustls::TlsAcceptor;

/// Flags win over the config file, which wins over the defaults shown.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML config file (see docs/CONFIG.md); every flag can be set there.
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where files live: a directory, file://, memory://, or with the `cloud`
    /// feature s3://, gs://, az:// URLs. [default: ./ferry-data]
    #[arg(long, env = "FERRY_STORE")]
    store: Option<String>,
    /// Address to listen on (port 0 picks a free port). [default: 127.0.0.1:7070]
    #[arg(long, env = "FERRY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Serve without tokens on a non-loopback address (anyone who can reach
    /// it may read and write everything).
    #[arg(long)]
    allow_anonymous: bool,
    /// The URL clients reach this server at, used in signed URLs
    /// [default: from each request's Host]
    #[arg(long)]
    public_url: Option<String>,
    /// Largest file accepted by PUT, a form upload or an upload session, in
    /// bytes. [default: 5 TiB]
    #[arg(long)]
    max_body_bytes: Option<u64>,
    /// Seconds an upload session lives before it is collected. [default: 86400]
    #[arg(long)]
    upload_ttl: Option<u64>,
    /// Seconds between sweeps for expired upload sessions. [default: 600]
    #[arg(long)]
    gc_interval: Option<u64>,
    /// Seconds between WebSocket pings; a peer silent for 2.5 times this is
    /// dropped. [default: 30]
    #[arg(long)]
    ws_ping_interval: Option<u64>,
    /// Largest WebSocket message, in bytes. [default: the largest chunk + 1 MiB]
    #[arg(long)]
    ws_max_message: Option<usize>,
    /// Channels (uploads, downloads, watches) one WebSocket connection may
    /// have in use at once. [default: 64]
    #[arg(long)]
    ws_max_channels: Option<usize>,
    /// Seconds a client has to send a request's headers. [default: 30]
    #[arg(long)]
    header_timeout: Option<u64>,
    /// Seconds a shutdown (SIGTERM, SIGINT) waits for requests in flight
    /// before it cuts them; their clients resume. [default: 10]
    #[arg(long)]
    shutdown_grace: Option<u64>,
    /// Longest pause, in seconds, inside a request body. [default: 60]
    #[arg(long)]
    body_timeout: Option<u64>,
    /// A browser origin allowed to call the API (repeat for several; `*` for
    /// any). [default: none]
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Requests per second per client address. [default: unlimited]
    #[arg(long)]
    rate_limit: Option<u32>,
    /// Requests a client may make at once above the rate. [default: the rate]
    #[arg(long)]
    rate_burst: Option<u32>,
    /// Open upload sessions per token. [default: unlimited]
    #[arg(long)]
    max_sessions_per_token: Option<usize>,
    /// Concurrent transfers per token. [default: unlimited]
    #[arg(long)]
    max_transfers_per_token: Option<usize>,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// The settings in force, after flags, file and defaults.
struct Settings {
    store: String,
    listen: SocketAddr,
    allow_anonymous: bool,
    config: ServerConfig,
}

fn settings(args: &ServeArgs) -> anyhow::Result<Settings> {
    let file = match &args.config {
        Some(path) => ServeFile::load(path)?,
        None => ServeFile::default(),
    };
    let auth = Authenticator::new(&file.token, file.signing_secret.as_deref())
        .context("in the config's tokens")?;
    if !file.token.is_empty() && file.signing_secret.is_none() {
        tracing::warn!(
            "no signing_secret in the config: signed URLs stop working when the server restarts"
        );
    }
    let tls = tls_acceptor(args, &file)?;
    let defaults = ServerConfig::default();
    let secs = |flag: Option<u64>, file: Option<u64>, default: Duration| {
        flag.or(file).map(Duration::from_secs).unwrap_or(default)
    };
    let config = ServerConfig {
        max_body_bytes: args
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(DEFAULT_MAX_BODY_BYTES),
        upload_ttl: secs(args.upload_ttl, file.upload_ttl, defaults.upload_ttl),
        gc_interval: secs(args.gc_interval, file.gc_interval, defaults.gc_interval)
            .max(Duration::from_secs(1)),
        ws_ping_interval: secs(
            args.ws_ping_interval,
            file.ws_ping_interval,
            defaults.ws_ping_interval,
        )
        .max(Duration::from_secs(1)),
        ws_max_message: args
            .ws_max_message
            .or(file.ws_max_message)
            .unwrap_or(defaults.ws_max_message),
        ws_max_channels: args
            .ws_max_channels
            .or(file.ws_max_channels)
            .unwrap_or(defaults.ws_max_channels)
            .max(1),
        auth: Arc::new(auth),
        public_url: args.public_url.clone().or(file.public_url),
        listening: Listening {
            header_timeout: secs(
                args.header_timeout,
                file.header_timeout,
                defaults.listening.header_timeout,
            )
            .max(Duration::from_secs(1)),
            tls,
            shutdown_grace: secs(
                args.shutdown_grace,
                file.shutdown_grace,
                defaults.listening.shutdown_grace,
            ),
        },
        body_timeout: secs(args.body_timeout, file.body_timeout, defaults.body_timeout)
            .max(Duration::from_secs(1)),
        cors_origins: if args.cors_origins.is_empty() {
            file.cors_origins
        } else {
            args.cors_origins.clone()
        },
        rate_limit: args
            .rate_limit
            .or(file.rate_limit)
            .map(|per_second| RateLimit {
                per_second,
                burst: args.rate_burst.or(file.rate_burst).unwrap_or(per_second),
            }),
        max_sessions_per_token: args.max_sessions_per_token.or(file.max_sessions_per_token),
        max_transfers_per_token: args
            .max_transfers_per_token
            .or(file.max_transfers_per_token),
    };
    Ok(Settings {
        store: args
            .store
            .clone()
            .or(file.store)
            .unwrap_or_else(|| "./ferry-data".into()),
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:7070".parse().expect("a valid address")),
        allow_anonymous: args.allow_anonymous || file.allow_anonymous.unwrap_or(false),
        config,
    })
}

fn tls_acceptor(args: &ServeArgs, file: &ServeFile) -> anyhow::Result<Option<TlsAcceptor>> {
    let cert = args.tls_cert.as_ref().or(file.tls_cert.as_ref());
    let key = args.tls_key.as_ref().or(file.tls_key.as_ref());
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(crate::tls::server_acceptor(cert, key)?)),
        (None, None) => Ok(None),
        _ => bail!("TLS needs both tls_cert and tls_key"),
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let settings = settings(&args)?;
    if settings.config.auth.is_anonymous()
        && !settings.listen.ip().is_loopback()
        && !settings.allow_anonymous
    {
        bail!(
            "refusing to serve {} without tokens: anyone who can reach it could read and \
             write everything. Add tokens to the config file (`ferry token new`), listen on \
             a loopback address, or pass --allow-anonymous if that is really what you want",
            settings.listen
        );
    }
    let store = Store::open(&settings.store)
        .with_context(|| format!("opening store {}", settings.store))?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    if settings.config.auth.is_anonymous() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving anonymously on a non-loopback address (--allow-anonymous)");
    }
    let scheme = if settings.config.listening.tls.is_some() {
        "https"
    } else {
        "http"
    };
    // Scripts and tests read this line to learn the address.
    println!("ferry serving {} at {scheme}://{addr}", store.describe());
    std::io::stdout().flush()?;
    tracing::info!(store = store.describe(), %addr, "serving");
    let state = AppState::new(store, settings.config);
    server::run(listener, state, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
