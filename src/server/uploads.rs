//! `/v1/uploads…`: resumable chunk sessions over HTTP.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use super::AppState;
use super::auth::{Caller, Grant, Scope};
use super::extract::{ApiJson, ApiJsonOrEmpty, ApiPath};
use crate::error::{Error, Result};
use crate::protocol::FileMeta;
use crate::protocol::upload::MAX_CHUNK_SIZE;
use crate::protocol::upload::{
    CRC32C_HEADER, CompleteUpload, CreateUpload, DeclareSize, UploadCreated, UploadStatus,
    parse_crc32c_header,
};

const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn create(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiJson(req): ApiJson<CreateUpload>,
) -> Result<(StatusCode, Json<UploadCreated>)> {
    grant.allow(&req.path, Scope::Write)?;
    let created = app.uploads().create(req, grant.owner()).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Refuses a session the caller did not create, or whose target it cannot write.
pub async fn authorize(app: &AppState, grant: &Grant, id: &str) -> Result<()> {
    let (path, owner) = app.uploads().target(id).await?;
    grant.allow_session(owner.as_deref())?;
    grant.allow(&path, Scope::Write)
}

pub async fn put_chunk(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiPath((id, index)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode> {
    let mut body = body
        .into_data_stream()
        .map_err(|e| Error::BadRequest(format!("chunk body interrupted: {e}")))
        .boxed();
    let received = match authorize(&app, &grant, &id).await {
        Ok(()) => receive_chunk(&app, &id, &index, &headers, &mut body).await,
        Err(e) => Err(e),
    };
    if received.is_err() {
        drain(&mut body).await;
    }
    received.map(|()| StatusCode::NO_CONTENT)
}

async fn receive_chunk(
    app: &AppState,
    id: &str,
    index: &str,
    headers: &HeaderMap,
    body: &mut BoxStream<'static, Result<Bytes>>,
) -> Result<()> {
    let index: u64 = index
        .parse()
        .map_err(|_| Error::BadRequest(format!("chunk index {index:?} is not a number")))?;
    let crc = headers
        .get(CRC32C_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_crc32c_header)
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "{CRC32C_HEADER} must carry the base64 big-endian CRC32C of the chunk"
            ))
        })?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    app.uploads()
        .put_chunk(id, index, crc, declared, body)
        .await
}

/// Reads what is left of a refused chunk (up to one chunk's worth, briefly),
/// so that a client still sending gets the error response instead of a reset
/// connection.
async fn drain(body: &mut BoxStream<'static, Result<Bytes>>) {
    let discard = async {
        let mut left = MAX_CHUNK_SIZE + 1;
        while let Some(Ok(piece)) = body.next().await {
            left = left.saturating_sub(piece.len() as u64);
            if left == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, discard).await;
}

pub async fn status(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<UploadStatus>> {
    authorize(&app, &grant, &id).await?;
    Ok(Json(app.uploads().status(&id).await?))
}

/// `PATCH /v1/uploads/{id}`: the size of an open-ended session.
pub async fn declare_size(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<DeclareSize>,
) -> Result<Json<UploadStatus>> {
    authorize(&app, &grant, &id).await?;
    Ok(Json(app.uploads().declare_size(&id, body).await?))
}

pub async fn complete(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJsonOrEmpty(body): ApiJsonOrEmpty<CompleteUpload>,
) -> Result<Json<FileMeta>> {
    authorize(&app, &grant, &id).await?;
    Ok(Json(app.complete_upload(&id, body.sha256).await?))
}

pub async fn abort(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    authorize(&app, &grant, &id).await?;
    app.uploads().abort(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
