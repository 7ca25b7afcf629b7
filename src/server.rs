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

pub mod auth;
mod body;
mod conditional;
mod direct_read;
mod events;
mod extract;
pub mod feed;
mod file_region;
mod files;
mod idempotency;
pub mod limits;
pub mod listen;
mod listing;
mod metrics;
mod ops;
mod response;
mod sign;
pub mod store;
mod uploads;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post, put};
use limits::{RateLimit, RateLimiter, TransferLimiter};
use listen::Listening;
use metrics::Metrics;
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::error::Error;
use auth::Authenticator;
pub use store::Store;
use store::uploads::UploadSessions;
use tokio_util::sync::CancellationToken;

use crate::protocol::FileMeta;
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
    /// Channels (uploads, downloads, watches) one WebSocket connection may
    /// have in use at once.
    pub ws_max_channels: usize,
    /// Tokens and the URL-signing key; without tokens, anyone is served.
    pub auth: Arc<Authenticator>,
    /// The address clients reach this server at (for signed URLs); without
    /// it, the request's `Host` is used.
    pub public_url: Option<String>,
    /// TLS and the deadline for request headers.
    pub listening: Listening,
    /// Longest pause inside a request body before the request fails.
    pub body_timeout: Duration,
    /// Browser origins allowed to call the API (`*` for any); none: no CORS.
    pub cors_origins: Vec<String>,
    /// Requests per client address; `None`: unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Open upload sessions per token; `None`: unlimited.
    pub max_sessions_per_token: Option<usize>,
    /// Concurrent transfers per token; `None`: unlimited.
    pub max_transfers_per_token: Option<usize>,
}

impl ServerConfig {
    fn scheme(&self) -> &'static str {
        if self.listening.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            upload_ttl: Duration::from_secs(24 * 3600),
            gc_interval: Duration::from_secs(600),
            ws_ping_interval: Duration::from_secs(30),
            ws_max_message: (MAX_CHUNK_SIZE as usize) + (1 << 20),
            // A download its reader does not keep up with holds a file and
            // about 400 KB (a read and its frame): 64 of them, about 25 MB.
            ws_max_channels: 64,
            auth: Arc::default(),
            public_url: None,
            listening: Listening::default(),
            body_timeout: Duration::from_secs(60),
            cors_origins: Vec::new(),
            rate_limit: None,
            max_sessions_per_token: None,
            max_transfers_per_token: None,
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
    metrics: Arc<Metrics>,
    rate_limiter: Option<Arc<RateLimiter>>,
    transfer_limiter: Option<Arc<TransferLimiter>>,
    /// Answers kept for requests sent again with an `Idempotency-Key`.
    replays: idempotency::Replays,
}

impl AppState {
    pub fn new(store: Store, config: ServerConfig) -> Self {
        let uploads = UploadSessions::new(
            store.clone(),
            config.upload_ttl,
            config.max_body_bytes,
            config.max_sessions_per_token,
        );
        Self {
            inner: Arc::new(Shared {
                store,
                uploads,
                metrics: Arc::default(),
                rate_limiter: config.rate_limit.and_then(RateLimiter::new),
                transfer_limiter: config
                    .max_transfers_per_token
                    .filter(|n| *n > 0)
                    .map(TransferLimiter::new),
                config,
                shutdown: CancellationToken::new(),
                replays: idempotency::Replays::default(),
            }),
        }
    }

    fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    fn uploads(&self) -> &UploadSessions {
        &self.inner.uploads
    }

    /// Commits an upload session in a task of its own, so that a client
    /// dropping the request or its WebSocket cannot cut a commit short.
    async fn complete_upload(
        &self,
        id: &str,
        sha256: Option<String>,
    ) -> crate::error::Result<FileMeta> {
        let (app, id) = (self.clone(), id.to_owned());
        tokio::spawn(async move { app.uploads().complete(&id, sha256).await })
            .await
            .map_err(|e| Error::Storage(format!("commit task failed: {e}")))?
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    fn auth(&self) -> &Authenticator {
        &self.inner.config.auth
    }

    fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    fn replays(&self) -> &idempotency::Replays {
        &self.inner.replays
    }

    fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.inner.rate_limiter.as_deref()
    }

    fn transfer_limiter(&self) -> Option<&TransferLimiter> {
        self.inner.transfer_limiter.as_deref()
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
    let mut api = Router::new()
        .route("/v1/files", files.clone())
        .route("/v1/files/", files.clone())
        .route("/v1/files/{*path}", files)
        .route("/v1/list", list.clone())
        .route("/v1/list/", list.clone())
        .route("/v1/list/{*path}", list)
        .route("/v1/stat", stat.clone())
        .route("/v1/stat/", stat.clone())
        .route("/v1/stat/{*path}", stat)
        .route(
            "/v1/uploads/{id}",
            get(uploads::status)
                .patch(uploads::declare_size)
                .delete(uploads::abort),
        )
        .route("/v1/uploads/{id}/chunks/{index}", put(uploads::put_chunk))
        .route("/v1/sign", post(sign::sign))
        .route(
            "/v1/whoami",
            get(
                |State(app): State<AppState>, auth::Caller(grant): auth::Caller| async move {
                    let mut access = grant.access().ok_or_else(|| {
                        Error::Forbidden("a signed URL only reads its file".into())
                    })?;
                    access.limits = Some(crate::protocol::WriteLimits {
                        max_stored_name_bytes: app.store().max_written_name_bytes(),
                    });
                    Ok::<_, Error>(axum::Json(access))
                },
            ),
        )
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/events", get(events::events))
        .route("/metrics", get(metrics::metrics))
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        // Requests that create, move or commit something may be sent again
        // with the same `Idempotency-Key` after a lost answer.
        .merge(
            Router::new()
                .route("/v1/ops/mkdir", post(ops::mkdir))
                .route("/v1/ops/rmdir", post(ops::rmdir))
                .route("/v1/ops/rename", post(ops::rename))
                .route("/v1/ops/copy", post(ops::copy))
                .route("/v1/uploads", post(uploads::create))
                .route("/v1/uploads/{id}/complete", post(uploads::complete))
                .route_layer(from_fn_with_state(state.clone(), idempotency::replay)),
        )
        .fallback(|| async { Error::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { response::method_not_allowed() });
    // Layers run from the last added to the first. Limits and CORS that are
    // not configured are not installed: every layer costs every request a
    // service clone and a boxed future.
    if state.transfer_limiter().is_some() {
        api = api.layer(from_fn_with_state(state.clone(), limits::limit_transfers));
    }
    api = api.layer(from_fn_with_state(state.clone(), auth::authenticate));
    if state.rate_limiter().is_some() {
        api = api.layer(from_fn_with_state(state.clone(), limits::rate_limit));
    }
    api = api
        .layer(RequestBodyTimeoutLayer::new(state.config().body_timeout))
        .layer(from_fn_with_state(state.clone(), metrics::measure));
    if let Some(cors) = cors(&state.config().cors_origins) {
        api = api.layer(cors);
    }
    // Bodies are streamed and limited by `max_body_bytes`, not buffered.
    api.layer(DefaultBodyLimit::disable()).with_state(state)
}

/// Whether [`router`] installs a layer that exists only by configuration.
/// File reads skip the router only when it does not
/// ([`direct_read::DirectReads`]): keep the two in step.
fn has_optional_layers(state: &AppState) -> bool {
    state.transfer_limiter().is_some()
        || state.rate_limiter().is_some()
        || !state.config().cors_origins.is_empty()
}

/// Answers preflights and lets the listed origins read the headers a player
/// or an uploader needs. No origins: no CORS at all (no layer).
fn cors(origins: &[String]) -> Option<CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok()),
        )
    };
    let crc = HeaderName::from_static(crate::protocol::upload::CRC32C_HEADER);
    let layer = CorsLayer::new()
        .allow_origin(allow_origin)
        // Every method a route of `router` takes (PATCH declares an
        // open-ended upload's size).
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::RANGE,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::IF_RANGE,
            header::IF_MODIFIED_SINCE,
            header::IF_UNMODIFIED_SINCE,
            crc.clone(),
        ])
        .expose_headers([
            header::CONTENT_RANGE,
            header::ACCEPT_RANGES,
            header::CONTENT_LENGTH,
            header::ETAG,
            header::LAST_MODIFIED,
            header::LOCATION,
            header::RETRY_AFTER,
            crc,
        ])
        .max_age(Duration::from_secs(3600));
    Some(layer)
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
    let listening = state.config().listening.clone();
    let direct = direct_read::DirectReads::new(&state);
    let served = listen::serve(listener, router(state), direct, listening, shutdown).await;
    collector.abort();
    served
}

/// Frees abandoned upload sessions and the temporaries of writes a killed
/// server left, at start-up and then periodically.
async fn collect_expired_uploads(state: AppState) {
    let mut ticks = tokio::time::interval(state.config().gc_interval);
    loop {
        ticks.tick().await;
        if let Some(limiter) = state.rate_limiter() {
            limiter.forget_idle();
        }
        match state.uploads().collect_expired().await {
            Ok(swept) => {
                if swept.expired > 0 {
                    tracing::info!(
                        sessions = swept.expired,
                        "collected expired upload sessions"
                    );
                }
                if swept.debris > 0 {
                    tracing::info!(
                        sessions = swept.debris,
                        "removed the leftovers of upload sessions without a manifest"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "collecting expired upload sessions failed"),
        }
        match state.store().collect_stray_temporaries().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                temporaries = n,
                "removed temporaries left by interrupted writes"
            ),
            Err(e) => tracing::warn!(error = %e, "removing leftover temporaries failed"),
        }
    }
}
