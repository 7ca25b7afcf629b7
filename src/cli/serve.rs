//! `ferry serve`.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::server::{self, AppState, DEFAULT_MAX_BODY_BYTES, ServerConfig, Store};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where files live: a directory, file://, memory://, or with the `cloud`
    /// feature s3://, gs://, az:// URLs.
    #[arg(long, env = "FERRY_STORE", default_value = "./ferry-data")]
    store: String,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "FERRY_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Largest file accepted by PUT, a form upload or an upload session, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: u64,
    /// Seconds an upload session lives before it is collected.
    #[arg(long, default_value_t = 24 * 3600)]
    upload_ttl: u64,
    /// Seconds between sweeps for expired upload sessions.
    #[arg(long, default_value_t = 600)]
    gc_interval: u64,
    /// Seconds between WebSocket pings; a peer silent for 2.5 times this is dropped.
    #[arg(long, default_value_t = 30)]
    ws_ping_interval: u64,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let store =
        Store::open(&args.store).with_context(|| format!("opening store {}", args.store))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let config = ServerConfig {
        max_body_bytes: args.max_body_bytes,
        upload_ttl: Duration::from_secs(args.upload_ttl),
        gc_interval: Duration::from_secs(args.gc_interval.max(1)),
        ws_ping_interval: Duration::from_secs(args.ws_ping_interval.max(1)),
        ..ServerConfig::default()
    };
    // Scripts and tests read this line to learn the address.
    println!("ferry serving {} at http://{addr}", store.describe());
    std::io::stdout().flush()?;
    tracing::info!(store = store.describe(), %addr, "serving");
    server::run(listener, AppState::new(store, config), shutdown_signal()).await?;
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
