//! `ferry serve`: the HTTP API over a [`Store`].
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let store = ferry::server::Store::open("./ferry-data")?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await?;
//! let state = ferry::server::AppState::new(store, ferry::server::ServerConfig::default());
//! ferry::server::run(listener, state, std::future::pending()).await?;
//! # Ok(()) }
//! ```

mod conditional;
mod events;
mod extract;
pub mod feed;
mod files;
mod listing;
mod ops;
mod response;
pub mod store;
mod uploads;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::error::Error;
pub use store::Store;
use store::uploads::UploadSessions;
use tokio_util::sync::CancellationToken;

use crate::protocol::upload::MAX_CHUNK_SIZE;

/// Largest body accepted by default: S3's largest object.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 5 << 40;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest file (`PUT`, form upload, upload session) accepted; larger gets 413.
    pub max_body_bytes: u64,
    /// How long an upload session lives after its creation.
    pub upload_ttl: Duration,
    /// How often expired upload sessions are collected.
    pub gc_interval: Duration,
    /// How often WebSocket peers are pinged; silent for 2.5 times this, they are dropped.
    pub ws_ping_interval: Duration,
    /// Largest WebSocket message accepted.
    pub ws_max_message: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            upload_ttl: Duration::from_secs(24 * 3600),
            gc_interval: Duration::from_secs(600),
            ws_ping_interval: Duration::from_secs(30),
            ws_max_message: (MAX_CHUNK_SIZE as usize) + (1 << 20),
        }
    }
}

/// Shared by every request.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    store: Store,
    uploads: UploadSessions,
    config: ServerConfig,
    /// Cancelled when the server starts shutting down (ends WebSockets).
    shutdown: CancellationToken,
}

impl AppState {
    pub fn new(store: Store, config: ServerConfig) -> Self {
        let uploads = UploadSessions::new(store.clone(), config.upload_ttl, config.max_body_bytes);
        Self {
            inner: Arc::new(Shared {
                store,
                uploads,
                config,
                shutdown: CancellationToken::new(),
            }),
        }
    }

    fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    fn uploads(&self) -> &UploadSessions {
        &self.inner.uploads
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    fn config(&self) -> &ServerConfig {
        &self.inner.config
    }
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let files = get(files::get_file)
        .head(files::get_file)
        .put(files::put_file)
        .post(files::post_form)
        .delete(files::delete_file);
    let list = get(listing::list);
    let stat = get(listing::stat);
    Router::new()
        .route("/v1/files", files.clone())
        .route("/v1/files/", files.clone())
        .route("/v1/files/{*path}", files)
        .route("/v1/list", list.clone())
        .route("/v1/list/", list.clone())
        .route("/v1/list/{*path}", list)
        .route("/v1/stat", stat.clone())
        .route("/v1/stat/", stat.clone())
        .route("/v1/stat/{*path}", stat)
        .route("/v1/ops/mkdir", post(ops::mkdir))
        .route("/v1/ops/rmdir", post(ops::rmdir))
        .route("/v1/ops/rename", post(ops::rename))
        .route("/v1/ops/copy", post(ops::copy))
        .route("/v1/uploads", post(uploads::create))
        .route(
            "/v1/uploads/{id}",
            get(uploads::status).delete(uploads::abort),
        )
        .route("/v1/uploads/{id}/chunks/{index}", put(uploads::put_chunk))
        .route("/v1/uploads/{id}/complete", post(uploads::complete))
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/events", get(events::events))
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .fallback(|| async { Error::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { response::method_not_allowed() })
        // Bodies are streamed and limited by `max_body_bytes`, not buffered.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Serves until `shutdown` completes, then lets in-flight requests finish.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let collector = tokio::spawn(collect_expired_uploads(state.clone()));
    let token = state.shutdown_token();
    let shutdown = async move {
        shutdown.await;
        token.cancel();
    };
    // Small control messages (WebSocket acks, progress) must not wait for
    // Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY failed");
        }
    });
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await;
    collector.abort();
    served
}

/// Frees abandoned upload sessions, at start-up and then periodically.
async fn collect_expired_uploads(state: AppState) {
    let mut ticks = tokio::time::interval(state.config().gc_interval);
    loop {
        ticks.tick().await;
        match state.uploads().collect_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "collected expired upload sessions"),
            Err(e) => tracing::warn!(error = %e, "collecting expired upload sessions failed"),
        }
    }
}
