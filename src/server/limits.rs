//! Limits on callers: a request rate per client address (token bucket,
//! answered with 429 and `Retry-After`) and concurrent transfers per token.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use super::auth::Grant;
use super::body::ObservedBody;
use crate::error::Error;

/// Requests each client address may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests allowed at once before the sustained rate applies.
    pub burst: u32,
}

/// The buckets of every client seen recently.
pub struct RateLimiter {
    buckets: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Option<Arc<Self>> {
        let per_second = NonZeroU32::new(limit.per_second)?;
        let burst = NonZeroU32::new(limit.burst).unwrap_or(per_second);
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Some(Arc::new(Self {
            buckets: governor::RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }))
    }

    /// `Err(seconds to wait)` when `client` is over its rate.
    fn check(&self, client: IpAddr) -> Result<(), u64> {
        self.buckets.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    /// Forgets clients whose buckets are full again (bounds memory).
    pub fn forget_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

/// Middleware: refuses a client over its rate before anything else runs.
pub async fn rate_limit(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let (Some(limiter), Some(client)) = (app.rate_limiter(), peer_ip(&request)) else {
        return next.run(request).await;
    };
    match limiter.check(client) {
        Ok(()) => next.run(request).await,
        Err(retry_after) => {
            app.metrics().rate_limited();
            Error::RateLimited {
                retry_after: retry_after.max(1),
            }
            .into_response()
        }
    }
}

fn peer_ip(request: &Request) -> Option<IpAddr> {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Concurrent transfers (file downloads and uploads, chunk uploads, and
/// WebSocket download and upload channels) one token may have at once.
pub struct TransferLimiter {
    per_token: usize,
    active: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl TransferLimiter {
    pub fn new(per_token: usize) -> Arc<Self> {
        Arc::new(Self {
            per_token,
            active: Mutex::default(),
        })
    }

    /// A slot for one more transfer by `token`, or 429 when all are in use.
    pub fn start(&self, token: &str) -> Result<OwnedSemaphorePermit, Error> {
        let semaphore = {
            let mut active = self.active.lock().unwrap();
            // Forget tokens with nothing in flight (bounds the map).
            active.retain(|_, s| s.available_permits() < self.per_token);
            active
                .entry(token.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_token)))
                .clone()
        };
        semaphore.try_acquire_owned().map_err(|_| {
            Error::LimitReached(format!(
                "token {token:?} already has {} transfers in flight, its limit",
                self.per_token
            ))
        })
    }
}

/// Middleware (after authentication): holds a transfer slot for the whole
/// exchange, response body included.
pub async fn limit_transfers(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(grant) = request.extensions().get::<Grant>() else {
        return next.run(request).await;
    };
    if !is_transfer(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    match TransferSlot::take(&app, grant) {
        Ok(Some(slot)) => {
            let response = next.run(request).await;
            // The body's closure owns the slot: it frees when the body is done.
            response.map(|body| {
                Body::new(ObservedBody::new(body, move |_| {
                    let _held = &slot;
                }))
            })
        }
        Ok(None) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// One of a token's transfers in flight (a request, see [`limit_transfers`],
/// or a WebSocket channel); freed when dropped.
pub struct TransferSlot {
    _permit: OwnedSemaphorePermit,
}

impl TransferSlot {
    /// A slot for one more transfer by `grant`'s token: `None` when its
    /// transfers are not limited (no limit set, or no token), 429
    /// (`rate_limited`) when all its slots are in use.
    pub fn take(app: &AppState, grant: &Grant) -> Result<Option<Self>, Error> {
        let (Some(limiter), Grant::Token { name, .. }) = (app.transfer_limiter(), grant) else {
            return Ok(None);
        };
        let permit = limiter.start(name)?;
        Ok(Some(Self { _permit: permit }))
    }
}

fn is_transfer(method: &Method, path: &str) -> bool {
    let files = path.starts_with("/v1/files/");
    (files && (method == Method::GET || method == Method::PUT || method == Method::POST))
        || (path.starts_with("/v1/uploads/") && path.contains("/chunks/"))
}
