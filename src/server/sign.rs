//! `POST /v1/sign`: signed URLs that read one file without a token.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use chrono::{TimeZone, Utc};

use super::AppState;
use super::auth::{Caller, Grant, SIGNED_EXPIRES, SIGNED_SIGNATURE, Scope, unix_now};
use super::extract::ApiJson;
use crate::error::{Error, Result};
use crate::protocol::meta::MAX_SIGNED_SECONDS;
use crate::protocol::{SignRequest, SignedUrl};

pub async fn sign(
    State(app): State<AppState>,
    Caller(grant): Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<SignRequest>,
) -> Result<Json<SignedUrl>> {
    if matches!(grant, Grant::Signed { .. }) {
        return Err(Error::Forbidden("a signed URL cannot sign".into()));
    }
    grant.allow(&req.path, Scope::Read)?;
    if req.path.is_root() {
        return Err(Error::BadRequest("only a file can be signed".into()));
    }
    if req.expires_in == 0 || req.expires_in > MAX_SIGNED_SECONDS {
        return Err(Error::BadRequest(format!(
            "expires_in must be 1 to {MAX_SIGNED_SECONDS} seconds"
        )));
    }
    let expires = unix_now() + req.expires_in;
    let signature = app.auth().signature(&req.path, expires);
    let base = match &app.config().public_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|host| format!("{}://{host}", app.config().scheme()))
            .unwrap_or_default(),
    };
    let url = format!(
        "{base}/v1/files/{}?{SIGNED_EXPIRES}={expires}&{SIGNED_SIGNATURE}={signature}",
        req.path.to_url_path()
    );
    let expires_at = Utc
        .timestamp_opt(expires as i64, 0)
        .single()
        .ok_or_else(|| Error::BadRequest("expiry out of range".into()))?;
    Ok(Json(SignedUrl { url, expires_at }))
}
