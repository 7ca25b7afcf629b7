//! `/v1/list/{prefix}` and `/v1/stat/{path}`.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;

use super::AppState;
use super::auth::{Caller, Scope};
use super::extract::{ApiQuery, UrlPath};
use super::store::namespace::ListQuery;
use crate::error::Result;
use crate::protocol::{FileMeta, ListPage};

#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    #[serde(default)]
    recursive: bool,
    limit: Option<usize>,
    cursor: Option<String>,
}

pub async fn list(
    State(app): State<AppState>,
    Caller(grant): Caller,
    UrlPath(dir): UrlPath,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<ListPage>> {
    grant.allow(&dir, Scope::Read)?;
    let query = ListQuery {
        recursive: params.recursive,
        limit: params.limit,
        cursor: params.cursor,
    };
    Ok(Json(app.store().list(&dir, &query).await?))
}

pub async fn stat(
    State(app): State<AppState>,
    Caller(grant): Caller,
    UrlPath(path): UrlPath,
) -> Result<Json<FileMeta>> {
    grant.allow(&path, Scope::Read)?;
    Ok(Json(app.store().stat(&path).await?))
}
