//! Prometheus metrics: `GET /metrics` in the text exposition format.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::AppState;
use super::auth::{Caller, Grant};
use super::body::ObservedBody;
use super::file_region::FileRegion;
use crate::error::{Error, Result};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

/// The server's counters, shared by every request.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    bytes_in: Counter,
    bytes_out: Counter,
    active_streams: Gauge<i64, std::sync::atomic::AtomicI64>,
    active_sessions: Gauge<i64, std::sync::atomic::AtomicI64>,
    rate_limited: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            // 0.1 ms to ~13 s.
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to the response headers, by route",
            latency.clone(),
        );
        let bytes_in = Counter::default();
        registry.register(
            "received_bytes",
            "Request body bytes received (files, chunks, WebSocket chunk frames)",
            bytes_in.clone(),
        );
        let bytes_out = Counter::default();
        registry.register(
            "sent_bytes",
            "Response body bytes sent (downloads, WebSocket download frames)",
            bytes_out.clone(),
        );
        let active_streams = Gauge::default();
        registry.register(
            "active_streams",
            "Response bodies being sent plus open WebSocket connections",
            active_streams.clone(),
        );
        let active_sessions = Gauge::default();
        registry.register(
            "active_upload_sessions",
            "Upload sessions open (created and neither committed, aborted nor expired)",
            active_sessions.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited_requests",
            "Requests refused with 429 by the per-client rate limit",
            rate_limited.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            bytes_in,
            bytes_out,
            active_streams,
            active_sessions,
            rate_limited,
        }
    }
}

impl Metrics {
    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    pub fn received(&self, bytes: usize) {
        self.bytes_in.inc_by(bytes as u64);
    }

    pub fn sent(&self, bytes: usize) {
        self.bytes_out.inc_by(bytes as u64);
    }

    /// Counts a stream as active until the guard is dropped.
    pub fn stream(self: &Arc<Self>) -> StreamGuard {
        self.active_streams.inc();
        StreamGuard(self.clone())
    }

    fn render(&self, open_sessions: usize) -> Result<String> {
        self.active_sessions.set(open_sessions as i64);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .map_err(|e| Error::BadRequest(format!("encoding metrics: {e}")))?;
        Ok(text)
    }
}

/// Holds one unit of `active_streams`.
pub struct StreamGuard(Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active_streams.dec();
    }
}

/// Middleware: counts each request, its latency and its body bytes.
pub async fn measure(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let method = request.method().clone();
    let metrics = app.metrics().clone();
    let counted_in = metrics.clone();
    let request =
        request.map(|body| Body::new(ObservedBody::new(body, move |n| counted_in.received(n))));
    let response = next.run(request).await;
    metrics.answered(route, &method, started, response)
}

impl Metrics {
    /// Counts `response` to a request for `route`, made since `started`,
    /// and counts its body's bytes as sent while they go.
    pub fn answered(
        self: &Arc<Self>,
        route: String,
        method: &Method,
        started: Instant,
        response: Response,
    ) -> Response {
        let labels = RequestLabels {
            route: route.clone(),
            method: method.to_string(),
            status: response.status().as_u16(),
        };
        self.requests.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(started.elapsed().as_secs_f64());
        // A file sent with `sendfile` never passes through the body below.
        if let Some(region) = response.extensions().get::<FileRegion>() {
            let counted_out = self.clone();
            region.observe(move |n| counted_out.sent(n));
        }
        // The body of a WebSocket upgrade is empty; its frames are counted by
        // the connection itself.
        let guard = self.stream();
        response.map(|body| Body::new(ObservedBody::new(body, move |n| guard.0.sent(n))))
    }
}

/// `GET /metrics`: needs a token (any) when the server has tokens.
pub async fn metrics(State(app): State<AppState>, Caller(grant): Caller) -> Result<Response> {
    if matches!(grant, Grant::Signed { .. }) {
        return Err(Error::Forbidden("a signed URL cannot read metrics".into()));
    }
    let text = app.metrics().render(app.uploads().open_count())?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
