//! Request extractors whose rejections are ferry's JSON errors.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::Uri;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::protocol::path::noting_refused_paths;
use crate::protocol::{PathError, RemotePath};

/// The logical path in the URL after a route prefix such as `/v1/files`.
///
/// Taken from the raw URI (not a router capture) so that nothing normalises
/// it before [`RemotePath::from_url_path`] decodes and validates it.
pub struct UrlPath(pub RemotePath);

impl<S: Send + Sync> FromRequestParts<S> for UrlPath {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        path_after_route(&parts.uri).map(UrlPath)
    }
}

/// What [`UrlPath`] extracts from `uri`.
pub fn path_after_route(uri: &Uri) -> Result<RemotePath, Error> {
    // "/v1/<route>" then optionally "/<path>".
    let raw = uri.path();
    let after_version = raw.strip_prefix("/v1/").unwrap_or(raw);
    let rest = match after_version.find('/') {
        Some(i) => &after_version[i + 1..],
        None => "",
    };
    Ok(RemotePath::from_url_path(rest)?)
}

/// Largest JSON request body (operation bodies are small).
const MAX_JSON_BYTES: usize = 64 * 1024;

/// A JSON body of at most 64 KiB; anything else is a 400 or 413 in ferry's
/// error format.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, _: &S) -> Result<Self, Error> {
        let body = small_body(req).await?;
        parse_json(&body).map(ApiJson)
    }
}

/// Like [`ApiJson`], but an empty body is `T::default()`.
pub struct ApiJsonOrEmpty<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for ApiJsonOrEmpty<T> {
    type Rejection = Error;

    async fn from_request(req: Request, _: &S) -> Result<Self, Error> {
        let body = small_body(req).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(ApiJsonOrEmpty(T::default()));
        }
        parse_json(&body).map(ApiJsonOrEmpty)
    }
}

/// A JSON request body, whole: at most [`MAX_JSON_BYTES`].
pub(super) async fn small_body(req: Request) -> Result<bytes::Bytes, Error> {
    axum::body::to_bytes(req.into_body(), MAX_JSON_BYTES)
        .await
        .map_err(|_| Error::PayloadTooLarge {
            limit: MAX_JSON_BYTES as u64,
        })
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    from_json(body).map_err(|refused| refused.into_error("JSON body"))
}

/// Parses a JSON request body or WebSocket message, noting a path it refused.
pub(super) fn from_json<T: DeserializeOwned>(json: &[u8]) -> Result<T, JsonRefused> {
    match noting_refused_paths(|| serde_json::from_slice(json)) {
        (Ok(value), _) => Ok(value),
        (Err(error), path) => Err(JsonRefused { error, path }),
    }
}

/// Why [`from_json`] refused some JSON.
#[derive(Debug)]
pub(super) struct JsonRefused {
    error: serde_json::Error,
    /// The path in it that broke the path rules, if that is why.
    path: Option<PathError>,
}

impl JsonRefused {
    /// Whether a path in it was refused (rather than the JSON, or a field
    /// other than a path, being malformed).
    pub(super) fn is_path(&self) -> bool {
        self.path.is_some()
    }

    /// The request's error: `name_too_long` for a path too long, as in a
    /// URL; `bad_request` for anything else (docs/API.md, Paths). `what`
    /// names what was parsed.
    pub(super) fn into_error(self, what: &str) -> Error {
        match self.path {
            Some(path) if path.is_too_long() => Error::InvalidPath(path),
            _ => Error::BadRequest(format!("bad {what}: {self}")),
        }
    }
}

/// What the JSON parser said.
impl std::fmt::Display for JsonRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// `Query<T>` whose rejection is a 400 in ferry's error format.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        query_of(&parts.uri).map(ApiQuery)
    }
}

/// What [`ApiQuery`] extracts from `uri`.
pub fn query_of<T: DeserializeOwned>(uri: &Uri) -> Result<T, Error> {
    serde_urlencoded::from_str(uri.query().unwrap_or_default())
        .map_err(|e| Error::BadRequest(format!("bad query string: {e}")))
}

/// `Path<T>` whose rejection is a 400 in ferry's error format.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(Error::BadRequest(rejection.body_text())),
        }
    }
}
