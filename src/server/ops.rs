//! `/v1/ops/{mkdir,rmdir,rename,copy}`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::AppState;
use super::extract::ApiJson;
use crate::error::Result;
use crate::protocol::{FileMeta, MkdirRequest, MoveRequest, RmdirRequest};

pub async fn mkdir(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<MkdirRequest>,
) -> Result<(StatusCode, Json<FileMeta>)> {
    let meta = app.store().mkdir(&req.path, req.parents).await?;
    Ok((StatusCode::CREATED, Json(meta)))
}

pub async fn rmdir(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<RmdirRequest>,
) -> Result<StatusCode> {
    app.store().rmdir(&req.path, req.recursive).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn rename(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<FileMeta>> {
    let meta = app
        .store()
        .rename(&req.from, &req.to, req.overwrite, req.recursive)
        .await?;
    Ok(Json(meta))
}

pub async fn copy(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<FileMeta>> {
    let meta = app
        .store()
        .copy(&req.from, &req.to, req.overwrite, req.recursive)
        .await?;
    Ok(Json(meta))
}
