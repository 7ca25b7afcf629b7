//! `/v1/uploads…`: resumable chunk sessions over HTTP.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use futures::{StreamExt, TryStreamExt};

use super::AppState;
use super::extract::{ApiJson, ApiPath};
use crate::error::{Error, Result};
use crate::protocol::FileMeta;
use crate::protocol::upload::{
    CRC32C_HEADER, CreateUpload, UploadCreated, UploadStatus, parse_crc32c_header,
};

pub async fn create(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<CreateUpload>,
) -> Result<(StatusCode, Json<UploadCreated>)> {
    Ok((StatusCode::CREATED, Json(app.uploads().create(req).await?)))
}

pub async fn put_chunk(
    State(app): State<AppState>,
    ApiPath((id, index)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode> {
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
    let body = body
        .into_data_stream()
        .map_err(|e| Error::BadRequest(format!("chunk body interrupted: {e}")))
        .boxed();
    app.uploads()
        .put_chunk(&id, index, crc, declared, body)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn status(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<UploadStatus>> {
    Ok(Json(app.uploads().status(&id).await?))
}

pub async fn complete(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<FileMeta>> {
    Ok(Json(app.uploads().complete(&id).await?))
}

pub async fn abort(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    app.uploads().abort(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
