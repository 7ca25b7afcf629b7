//! `/v1/ops/{mkdir,rmdir,rename,copy}`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::AppState;
use super::auth::{Caller, Scope};
use super::extract::ApiJson;
use crate::error::Result;
use crate::protocol::{FileMeta, MkdirRequest, MoveRequest, RmdirRequest};

pub async fn mkdir(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiJson(req): ApiJson<MkdirRequest>,
) -> Result<(StatusCode, Json<FileMeta>)> {
    grant.allow(&req.path, Scope::Write)?;
    let meta = app.store().mkdir(&req.path, req.parents).await?;
    Ok((StatusCode::CREATED, Json(meta)))
}

pub async fn rmdir(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiJson(req): ApiJson<RmdirRequest>,
) -> Result<StatusCode> {
    grant.allow(&req.path, Scope::Write)?;
    app.store().rmdir(&req.path, req.recursive).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn rename(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<FileMeta>> {
    grant.allow(&req.from, Scope::Write)?;
    grant.allow(&req.to, Scope::Write)?;
    let meta = app
        .store()
        .rename(&req.from, &req.to, req.overwrite, req.recursive)
        .await?;
    Ok(Json(meta))
}

pub async fn copy(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<FileMeta>> {
    grant.allow(&req.from, Scope::Read)?;
    grant.allow(&req.to, Scope::Write)?;
    let meta = app
        .store()
        .copy(&req.from, &req.to, req.overwrite, req.recursive)
        .await?;
    Ok(Json(meta))
}
