//! `Idempotency-Key` on the requests that create, move or commit something
//! (`POST /v1/ops/*`, `POST /v1/uploads`, `POST /v1/uploads/{id}/complete`).
//! A client whose connection broke before the answer arrived cannot tell
//! whether the request took effect; sent again with the same key, it gets
//! the first answer instead of doing it twice (a `mkdir` answered
//! `already_exists`, a `rename` answered `not_found`).
//!
//! Answers are kept in memory on the node that gave them, for
//! [`KEEP_FOR`], at most [`CAPACITY`] of them; a key is the caller's own (a
//! token's name, or nobody on an open server). An answer the client should
//! retry anyway (5xx, 429) is not kept. A request made while the first one
//! with its key is still running waits for its answer. The first one runs to
//! its end even when its client has gone.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, response::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lru::LruCache;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::AppState;
use super::auth::Grant;
use super::extract::small_body;
use crate::error::Error;
use crate::protocol::meta::IDEMPOTENCY_KEY_HEADER as KEY_HEADER;

/// Set (`true`) on an answer given again for a repeated key.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 255;
/// How long an answer is kept.
pub const KEEP_FOR: Duration = Duration::from_secs(600);
/// Answers kept at most (the oldest go first).
const CAPACITY: usize = 10_000;
/// The answers of these routes are small JSON documents; this only bounds
/// what one may hold.
const MAX_KEPT_ANSWER_BYTES: usize = 1 << 20;

/// A key as the caller's own: its token's name (none on an open server)
/// and the key.
type CallerKey = (Option<String>, String);

/// The answers kept, by caller and key.
pub struct Replays {
    entries: Mutex<LruCache<CallerKey, Arc<Entry>>>,
}

impl Default for Replays {
    fn default() -> Self {
        Self {
            entries: Mutex::new(LruCache::new(NonZeroUsize::new(CAPACITY).unwrap())),
        }
    }
}

struct Entry {
    /// SHA-256 of the method, the path and query, and the body.
    fingerprint: [u8; 32],
    since: Instant,
    answer: watch::Sender<Outcome>,
}

#[derive(Clone)]
enum Outcome {
    Running,
    Kept(Arc<Kept>),
    /// Not kept (a 5xx or 429, or the handler failed): the next request
    /// with the key runs again.
    Dropped,
}

struct Kept {
    parts: Parts,
    body: Bytes,
}

enum Claim {
    /// This request runs; its outcome goes to `Entry::answer`.
    Run(Arc<Entry>),
    /// Another request with the key ran or is running.
    Wait(watch::Receiver<Outcome>),
}

impl Replays {
    fn claim(&self, id: CallerKey, fingerprint: [u8; 32]) -> Result<Claim, Error> {
        let mut entries = self.entries.lock().unwrap();
        if let Some(entry) = entries.get(&id)
            && entry.since.elapsed() < KEEP_FOR
            && !matches!(*entry.answer.borrow(), Outcome::Dropped)
        {
            if entry.fingerprint != fingerprint {
                return Err(Error::Conflict(format!(
                    "Idempotency-Key {:?} was used for a different request (method, path or body) in the last {} s",
                    id.1,
                    KEEP_FOR.as_secs()
                )));
            }
            return Ok(Claim::Wait(entry.answer.subscribe()));
        }
        let entry = Arc::new(Entry {
            fingerprint,
            since: Instant::now(),
            answer: watch::channel(Outcome::Running).0,
        });
        entries.put(id, entry.clone());
        Ok(Claim::Run(entry))
    }
}

/// Middleware for the routes listed at the top: requests without the header
/// pass straight through.
pub async fn replay(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = req.headers().get(KEY_HEADER) else {
        return next.run(req).await;
    };
    let key = match parse_key(key) {
        Ok(key) => key,
        Err(e) => return e.into_response(),
    };
    let owner = req
        .extensions()
        .get::<Grant>()
        .and_then(|grant| grant.owner().map(str::to_owned));
    let (parts, body) = req.into_parts();
    // The routes take JSON bodies; theirs is read here the way they read it.
    let body = match small_body(Request::new(body)).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let mut hash = Sha256::new();
    hash.update(parts.method.as_str());
    hash.update([0]);
    hash.update(parts.uri.path_and_query().map_or("", |p| p.as_str()));
    hash.update([0]);
    hash.update(&body);
    let fingerprint: [u8; 32] = hash.finalize().into();
    let replays = app.replays();
    loop {
        let claim = match replays.claim((owner.clone(), key.clone()), fingerprint) {
            Ok(claim) => claim,
            Err(e) => return e.into_response(),
        };
        match claim {
            Claim::Run(entry) => {
                let req = Request::from_parts(parts, Body::from(body));
                return run(entry, req, next).await;
            }
            Claim::Wait(mut answer) => {
                let outcome = answer
                    .wait_for(|o| !matches!(o, Outcome::Running))
                    .await
                    .map(|o| o.clone());
                if let Ok(Outcome::Kept(kept)) = outcome {
                    let mut parts = kept.parts.clone();
                    parts
                        .headers
                        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
                    return Response::from_parts(parts, Body::from(kept.body.clone()));
                }
                // The first one's answer was not kept: run this one.
            }
        }
    }
}

/// Runs the request in a task of its own, so that a client gone before the
/// answer cannot cut it short, and keeps the answer for `entry`.
async fn run(entry: Arc<Entry>, req: Request, next: Next) -> Response {
    let task = tokio::spawn(async move {
        let (parts, body) = next.run(req).await.into_parts();
        let keep = keeps(parts.status);
        match axum::body::to_bytes(body, MAX_KEPT_ANSWER_BYTES).await {
            Ok(body) if keep => {
                let kept = Arc::new(Kept { parts, body });
                entry.answer.send_replace(Outcome::Kept(kept.clone()));
                Response::from_parts(kept.parts.clone(), Body::from(kept.body.clone()))
            }
            Ok(body) => {
                entry.answer.send_replace(Outcome::Dropped);
                Response::from_parts(parts, Body::from(body))
            }
            Err(e) => {
                entry.answer.send_replace(Outcome::Dropped);
                Error::Storage(format!("reading the answer: {e}")).into_response()
            }
        }
    });
    task.await.unwrap_or_else(|e| {
        Error::Storage(format!("the request's task failed: {e}")).into_response()
    })
}

/// Whether an answer is final: a client retries 5xx and 429 answers, and
/// those retries should run again.
fn keeps(status: StatusCode) -> bool {
    !(status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
}

fn parse_key(value: &HeaderValue) -> Result<String, Error> {
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > MAX_KEY_BYTES
        || !bytes.iter().all(|b| b.is_ascii_graphic())
    {
        return Err(Error::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_BYTES} visible ASCII characters"
        )));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(parse_key(&HeaderValue::from_static("abc-123_XYZ")).is_ok());
        assert!(parse_key(&HeaderValue::from_static("")).is_err());
        assert!(parse_key(&HeaderValue::from_static("a b")).is_err());
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(parse_key(&HeaderValue::from_str(&long).unwrap()).is_err());
    }

    #[test]
    fn a_key_is_the_callers_own_and_tied_to_its_request() {
        let replays = Replays::default();
        let id = |owner: Option<&str>| (owner.map(str::to_owned), "k1".to_owned());
        let Ok(Claim::Run(first)) = replays.claim(id(Some("alice")), [1; 32]) else {
            panic!("the first request runs");
        };
        assert!(matches!(
            replays.claim(id(Some("alice")), [1; 32]),
            Ok(Claim::Wait(_))
        ));
        assert!(matches!(
            replays.claim(id(Some("alice")), [2; 32]),
            Err(Error::Conflict(_))
        ));
        // Another caller's key of the same name is another key.
        assert!(matches!(
            replays.claim(id(Some("bob")), [2; 32]),
            Ok(Claim::Run(_))
        ));
        // An answer not kept lets the next request run.
        first.answer.send_replace(Outcome::Dropped);
        assert!(matches!(
            replays.claim(id(Some("alice")), [2; 32]),
            Ok(Claim::Run(_))
        ));
    }

    #[test]
    fn retryable_answers_are_not_kept() {
        assert!(keeps(StatusCode::CREATED));
        assert!(keeps(StatusCode::CONFLICT));
        assert!(!keeps(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!keeps(StatusCode::TOO_MANY_REQUESTS));
    }
}
