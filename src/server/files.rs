//! `/v1/files/{path}`: download, one-shot upload, form upload, delete.

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::AppState;
use super::auth::{Caller, Grant, Scope};
use super::conditional::{self, Verdict};
use super::extract::{ApiQuery, UrlPath};
use super::store::StoreWriter;
use crate::error::{Error, Result};
use crate::protocol::{ByteRange, FileMeta, RangeRequest, RemotePath};

#[derive(Debug, Default, Deserialize)]
pub struct DownloadQuery {
    /// `?download=1`: ask the browser to save rather than display.
    #[serde(default)]
    download: Option<String>,
}

/// Times a download re-opens the file when it changes between the metadata
/// read and the data read (only possible on non-local backends).
const READ_ATTEMPTS: usize = 3;

pub async fn get_file(
    State(app): State<AppState>,
    Caller(grant): Caller,
    method: Method,
    headers: HeaderMap,
    UrlPath(path): UrlPath,
    ApiQuery(query): ApiQuery<DownloadQuery>,
) -> Result<Response> {
    read_file(&app, &grant, &method, &headers, &path, &query).await
}

/// `GET` or `HEAD` of the file at `path`.
pub(super) async fn read_file(
    app: &AppState,
    grant: &Grant,
    method: &Method,
    headers: &HeaderMap,
    path: &RemotePath,
    query: &DownloadQuery,
) -> Result<Response> {
    grant.allow(path, Scope::Read)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let opened = app.store().open_read(path).await?;
        let meta = &opened.meta;
        match conditional::evaluate(headers, Some(meta), true) {
            Verdict::Proceed => {}
            Verdict::NotModified => return Ok(not_modified(meta)),
            Verdict::Failed(why) => return Err(Error::PreconditionFailed(why.into())),
        }
        let range = match requested_range(headers, meta) {
            RangeRequest::Unsatisfiable => {
                return Err(Error::RangeNotSatisfiable { size: meta.size });
            }
            RangeRequest::Partial(r) => Some(r),
            RangeRequest::Full => None,
        };
        let mut response_headers = file_headers(meta, range);
        if query.download.as_deref().is_some_and(|v| v != "0") {
            response_headers.insert(header::CONTENT_DISPOSITION, attachment(path));
        }
        let status = if range.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        if *method == Method::HEAD {
            return Ok((status, response_headers).into_response());
        }
        let region = opened.region(range);
        match opened.stream(range).await {
            Ok(stream) => {
                let mut response =
                    (status, response_headers, Body::from_stream(stream)).into_response();
                if let Some(region) = region {
                    response.extensions_mut().insert(region);
                }
                return Ok(response);
            }
            // Replaced between the two reads: start over with the new version.
            Err(Error::PreconditionFailed(_) | Error::NotFound(_)) if attempt < READ_ATTEMPTS => {
                continue;
            }
            Err(e) => return Err(e),
        }
    }
}

fn requested_range(headers: &HeaderMap, meta: &FileMeta) -> RangeRequest {
    let Some(value) = headers.get(header::RANGE) else {
        return RangeRequest::Full;
    };
    if !conditional::if_range_allows(headers, meta) {
        return RangeRequest::Full;
    }
    RangeRequest::resolve(value.to_str().ok(), meta.size)
}

/// Headers common to 200, 206 and HEAD, whichever connection driver sends
/// them.
fn file_headers(meta: &FileMeta, range: Option<ByteRange>) -> HeaderMap {
    let mut h = validator_headers(meta);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // Stored files are data, never to be reinterpreted as active content.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The table's own string: no parsing or copying per request.
    let mime = media_type(meta.path.as_str());
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    // Anyone who can upload (or holds a signed URL) chooses these bytes: a
    // page or an SVG opened from here runs no script and gets an opaque
    // origin, never this server's, whose API it could call. Media and
    // downloads are unaffected; browsers' PDF viewers refuse to render under
    // a sandbox, and run no script on the origin anyway.
    if mime != "application/pdf" {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox"),
        );
    }
    let length = range.map_or(meta.size, |r| r.len());
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let Some(r) = range
        && let Ok(v) = HeaderValue::from_str(&r.content_range(meta.size))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    h
}

/// Streaming media whose common guess is not what players and browsers
/// take: a `.ts` segment as `video/vnd.dlna.mpeg-tts` or an `.m3u8`
/// playlist as `audio/x-mpegurl` is refused by HLS players that check.
const MEDIA_TYPES: [(&str, &str); 4] = [
    ("ts", "video/mp2t"),
    ("m3u8", "application/vnd.apple.mpegurl"),
    ("m4a", "audio/mp4"),
    ("mpd", "application/dash+xml"),
];

/// The `Content-Type` of a stored file, from its extension.
fn media_type(path: &str) -> &'static str {
    let extension = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    if let Some(e) = &extension
        && let Some((_, mime)) = MEDIA_TYPES.iter().find(|(ext, _)| ext == e)
    {
        return mime;
    }
    mime_guess::from_path(path)
        .first_raw()
        .unwrap_or("application/octet-stream")
}

fn validator_headers(meta: &FileMeta) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(v) = conditional::http_etag(meta).and_then(|e| HeaderValue::from_str(&e).ok()) {
        h.insert(header::ETAG, v);
    }
    if let Some(v) = conditional::http_date(meta).and_then(|d| HeaderValue::from_str(&d).ok()) {
        h.insert(header::LAST_MODIFIED, v);
    }
    h
}

fn not_modified(meta: &FileMeta) -> Response {
    (StatusCode::NOT_MODIFIED, validator_headers(meta)).into_response()
}

/// `Content-Disposition: attachment` with the name encoded per RFC 6266/8187,
/// so no file name can inject header syntax.
fn attachment(path: &RemotePath) -> HeaderValue {
    let name = path.name().unwrap_or("download");
    let encoded = utf8_percent_encode(name, NON_ALPHANUMERIC);
    HeaderValue::from_str(&format!("attachment; filename*=UTF-8''{encoded}"))
        .unwrap_or(HeaderValue::from_static("attachment"))
}

pub async fn put_file(
    State(app): State<AppState>,
    Caller(grant): Caller,
    headers: HeaderMap,
    UrlPath(path): UrlPath,
    body: Body,
) -> Result<Response> {
    grant.allow(&path, Scope::Write)?;
    let limit = app.config().max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Error::PayloadTooLarge { limit });
    }
    // Before the preconditions look the file up: refused as every write is.
    app.store().check_writable_names(&path)?;
    let before = check_write_preconditions(&app, &headers, &path).await?;
    let mut writer = app.store().writer(&path).await?;
    copy_body(&mut writer, body.into_data_stream(), limit).await?;
    if declared.is_some_and(|n| n != writer.written()) {
        return Err(Error::BadRequest(
            "body shorter than its Content-Length".into(),
        ));
    }
    // Re-checked just before commit to narrow the window for a racing writer.
    check_write_preconditions(&app, &headers, &path).await?;
    let meta = writer.commit().await?;
    let status = if before.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, validator_headers(&meta), axum::Json(meta)).into_response())
}

async fn check_write_preconditions(
    app: &AppState,
    headers: &HeaderMap,
    path: &RemotePath,
) -> Result<Option<FileMeta>> {
    let current = app.store().try_head_file(path).await?;
    match conditional::evaluate(headers, current.as_ref(), false) {
        Verdict::Failed(why) => Err(Error::PreconditionFailed(why.into())),
        _ => Ok(current),
    }
}

/// Streams a request body into `writer`, refusing more than `limit` bytes in all.
async fn copy_body<E: std::fmt::Display>(
    writer: &mut StoreWriter,
    mut body: impl Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    limit: u64,
) -> Result<()> {
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| Error::BadRequest(format!("request body interrupted: {e}")))?;
        if writer.written() + chunk.len() as u64 > limit {
            return Err(Error::PayloadTooLarge { limit });
        }
        writer.write(chunk).await?;
    }
    Ok(())
}

/// `multipart/form-data` upload into the directory in the URL: each file field
/// becomes `{dir}/{filename}`. Every file is committed only once complete.
pub async fn post_form(
    State(app): State<AppState>,
    Caller(grant): Caller,
    UrlPath(dir): UrlPath,
    form: std::result::Result<Multipart, MultipartRejection>,
) -> Result<Response> {
    grant.allow(&dir, Scope::Write)?;
    let mut form = form.map_err(|e| Error::BadRequest(e.body_text()))?;
    let limit = app.config().max_body_bytes;
    let mut created = Vec::new();
    let mut total = 0;
    while let Some(mut field) = form
        .next_field()
        .await
        .map_err(|e| Error::BadRequest(format!("malformed multipart body: {e}")))?
    {
        let Some(name) = field.file_name().map(str::to_owned) else {
            continue; // plain form fields carry no file
        };
        let path = dir.join(&name)?;
        let mut writer = app.store().writer(&path).await?;
        copy_body(&mut writer, &mut field, limit - total).await?;
        total += writer.written();
        created.push(writer.commit().await?);
    }
    if created.is_empty() {
        return Err(Error::BadRequest("the form carried no file field".into()));
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "files": created })),
    )
        .into_response())
}

pub async fn delete_file(
    State(app): State<AppState>,
    Caller(grant): Caller,
    headers: HeaderMap,
    UrlPath(path): UrlPath,
) -> Result<StatusCode> {
    grant.allow(&path, Scope::Write)?;
    let current = app.store().head_file(&path).await?;
    if let Verdict::Failed(why) = conditional::evaluate(&headers, Some(&current), false) {
        return Err(Error::PreconditionFailed(why.into()));
    }
    app.store().delete_file(&path).await?;
    Ok(StatusCode::NO_CONTENT)
}
