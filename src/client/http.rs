//! The HTTP client: one pooled connection set per server, retries with
//! backoff on connection failures, 5xx and 429, and ferry's JSON errors
//! turned back into [`Error`] values.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::retry::RetryPolicy;
use crate::error::{Error, Result};
use crate::protocol::meta::IDEMPOTENCY_KEY_HEADER;
use crate::protocol::upload::{
    CRC32C_HEADER, CreateUpload, UploadCreated, UploadStatus, crc32c_header_value,
};
use crate::protocol::{
    ErrorBody, ErrorCode, FileMeta, ListEntry, ListPage, MkdirRequest, MoveRequest, RemotePath,
    RmdirRequest,
};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Longest wait for response headers and for each part of a body.
    pub read_timeout: Duration,
    pub retry: RetryPolicy,
    /// Sent as `Authorization: Bearer …` on every request.
    pub token: Option<String>,
    /// A PEM file of CA certificates trusted besides the system's, for
    /// `https://` servers.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            token: None,
            ca_file: None,
        }
    }
}

/// A client of one ferry server. Cheap to clone; clones share connections.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    retry: RetryPolicy,
    cancel: CancellationToken,
    chunk_bytes_sent: Arc<AtomicU64>,
    /// When the server last answered a request or sent a piece of a body.
    heard: Arc<Heard>,
    /// The `Authorization` value, also sent at WebSocket upgrades.
    authorization: Option<reqwest::header::HeaderValue>,
    /// For `https://` servers: also used by WebSocket connections.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    pub fn new(server: &str) -> Result<Client> {
        Self::with_config(server, ClientConfig::default())
    }

    pub fn with_config(server: &str, config: ClientConfig) -> Result<Client> {
        let url = url::Url::parse(server)
            .map_err(|e| Error::BadRequest(format!("server URL {server:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::BadRequest(format!(
                "server URL must be http:// or https://, not {server}"
            )));
        }
        let authorization = match &config.token {
            Some(token) => {
                let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| {
                        Error::BadRequest("the token has characters a header cannot carry".into())
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) = &authorization {
            headers.insert(reqwest::header::AUTHORIZATION, value.clone());
        }
        crate::tls::install_default_provider();
        let tls = match url.scheme() {
            "https" => Some(Arc::new(crate::tls::client_config(
                config.ca_file.as_deref(),
            )?)),
            _ => None,
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .default_headers(headers);
        if let Some(tls) = &tls {
            builder = builder.tls_backend_preconfigured((**tls).clone());
        }
        let http = builder.build().map_err(|e| Error::Network(e.to_string()))?;
        Ok(Client {
            http,
            base: server.trim_end_matches('/').to_owned(),
            retry: config.retry,
            cancel: CancellationToken::new(),
            chunk_bytes_sent: Arc::default(),
            heard: Arc::new(Heard::default()),
            authorization,
            tls,
        })
    }

    /// A clone whose requests stop (with [`Error::Cancelled`]) once `token` is cancelled.
    pub fn with_cancel(&self, token: CancellationToken) -> Client {
        Client {
            cancel: token,
            ..self.clone()
        }
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The TLS settings for an `https://` server.
    pub(crate) fn tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// The `Authorization` header value, when the client has a token.
    pub(crate) fn authorization(&self) -> Option<&reqwest::header::HeaderValue> {
        self.authorization.as_ref()
    }

    /// Chunk bytes put on the wire by this client and its clones, retries included.
    pub fn chunk_bytes_sent(&self) -> u64 {
        self.chunk_bytes_sent.load(Ordering::Relaxed)
    }

    /// When the server last answered a request of this client or its
    /// clones, or sent a piece of an answer's body; the client's creation
    /// before that.
    pub fn last_heard(&self) -> Instant {
        self.heard.last()
    }

    pub(crate) fn count_chunk_bytes(&self, bytes: u64) {
        self.chunk_bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn url(&self, route: &str, path: &RemotePath) -> String {
        format!("{}/v1/{route}/{}", self.base, path.to_url_path())
    }

    /// Sends the request built by `build` (called once per attempt), retrying
    /// connection failures, timeouts, 5xx and 429 with backoff. Any other
    /// error status becomes an [`Error`]. Gives up once the server has gone
    /// `give_up_after` without answering or taking any of the request's
    /// body, the attempt in flight included.
    pub(crate) async fn send(&self, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        self.send_tracked(|_| build()).await
    }

    /// [`send`](Self::send) of a request whose body `build` makes with
    /// [`tracked_body`], so that a large body the server is still taking
    /// counts as progress, not as waiting.
    async fn send_tracked(
        &self,
        build: impl Fn(&BodyProgress) -> RequestBuilder,
    ) -> Result<Response> {
        self.send_retrying(&mut Retries::new(self), build).await
    }

    /// [`send_tracked`](Self::send_tracked) as part of a longer exchange:
    /// `retries` holds since when the server has made no progress and how
    /// many attempts were made, across the requests of the exchange.
    async fn send_retrying(
        &self,
        retries: &mut Retries<'_>,
        build: impl Fn(&BodyProgress) -> RequestBuilder,
    ) -> Result<Response> {
        loop {
            let progress = BodyProgress::default();
            let outcome = tokio::select! {
                r = build(&progress).send() => Some(r),
                () = self.stalled(&progress, retries.quiet_since) => None,
                _ = self.cancel.cancelled() => return Err(Error::Cancelled),
            };
            if let Some(last) = progress.last() {
                retries.quiet_since = retries.quiet_since.max(last);
            }
            let (error, retry_after) = match outcome {
                None => (
                    Error::Network(format!(
                        "no answer from the server in {:.1?}",
                        retries.quiet_since.elapsed()
                    )),
                    None,
                ),
                Some(Ok(resp))
                    if resp.status().is_success() || resp.status() == StatusCode::NOT_MODIFIED =>
                {
                    self.heard.note();
                    return Ok(resp);
                }
                Some(Ok(resp)) if retryable_status(resp.status()) => {
                    let retry_after = retry_after(&resp);
                    (error_from_response(resp).await, retry_after)
                }
                Some(Ok(resp)) => return Err(error_from_response(resp).await),
                Some(Err(e)) if retryable_transport(&e) => (Error::Network(describe(&e)), None),
                Some(Err(e)) => return Err(Error::Network(describe(&e))),
            };
            retries.again(error, retry_after).await?;
        }
    }

    /// Resolves once an attempt started now has waited past the give-up
    /// time, counted from `quiet_since` or from the last piece of its body
    /// the connection took, whichever is later. Every attempt gets at
    /// least [`SHORTEST_ATTEMPT`].
    async fn stalled(&self, progress: &BodyProgress, quiet_since: Instant) {
        let floor = Instant::now() + SHORTEST_ATTEMPT;
        loop {
            let since = progress.last().map_or(quiet_since, |t| t.max(quiet_since));
            let Some(give_up) = since.checked_add(self.retry.give_up_after) else {
                return std::future::pending().await;
            };
            let at = give_up.max(floor);
            if Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at.into()).await;
        }
    }

    /// Appends the body of `resp` to `body`, up to `limit` bytes in all.
    /// Fails once the server sends nothing for the give-up time (a body
    /// still arriving is never cut), or when the connection breaks.
    /// Returns when the last piece arrived, if any did.
    async fn body_into(
        &self,
        mut resp: Response,
        body: &mut bytes::BytesMut,
        limit: usize,
    ) -> (Option<Instant>, std::result::Result<(), String>) {
        let patience = self.retry.give_up_after.max(SHORTEST_ATTEMPT);
        let mut last_piece = None;
        while body.len() < limit {
            let piece = tokio::select! {
                piece = tokio::time::timeout(patience, resp.chunk()) => piece,
                _ = self.cancel.cancelled() => return (last_piece, Err("cancelled".into())),
            };
            let outcome = match piece {
                Ok(Ok(Some(piece))) => {
                    last_piece = Some(Instant::now());
                    self.heard.note();
                    let room = limit - body.len();
                    body.extend_from_slice(&piece[..piece.len().min(room)]);
                    continue;
                }
                Ok(Ok(None)) => Ok(()),
                Ok(Err(e)) => Err(describe(&e)),
                Err(_) => Err(format!("the server sent nothing for {patience:?}")),
            };
            return (last_piece, outcome);
        }
        (last_piece, Ok(()))
    }

    /// Resolves once the client is cancelled.
    pub(crate) async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Sleeps unless cancelled first.
    pub(crate) async fn sleep(&self, delay: Duration) -> Result<()> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.cancel.cancelled() => Err(Error::Cancelled),
        }
    }

    /// The JSON answer to a request that may be sent again: an answer cut
    /// short is asked for again, within the same give-up time.
    async fn json<T: DeserializeOwned>(&self, build: impl Fn() -> RequestBuilder) -> Result<T> {
        self.json_tracked(|_| build()).await
    }

    async fn json_tracked<T: DeserializeOwned>(
        &self,
        build: impl Fn(&BodyProgress) -> RequestBuilder,
    ) -> Result<T> {
        self.json_retrying(&mut Retries::new(self), build).await
    }

    /// [`json_tracked`](Self::json_tracked) as part of a longer exchange.
    async fn json_retrying<T: DeserializeOwned>(
        &self,
        retries: &mut Retries<'_>,
        build: impl Fn(&BodyProgress) -> RequestBuilder,
    ) -> Result<T> {
        loop {
            let resp = self.send_retrying(retries, &build).await?;
            let mut body = bytes::BytesMut::new();
            // What came of a body cut short is dropped: not progress.
            match self.body_into(resp, &mut body, usize::MAX).await.1 {
                Ok(()) => return parse_json(&body),
                Err(e) => {
                    retries
                        .again(Error::Network(format!("reading the response: {e}")), None)
                        .await?
                }
            }
        }
    }

    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        self.http.request(method, url)
    }

    /// What this client's credentials allow on the server.
    pub async fn whoami(&self) -> Result<crate::protocol::Access> {
        let url = format!("{}/v1/whoami", self.base);
        self.json(|| self.request(Method::GET, &url)).await
    }

    pub async fn stat(&self, path: &RemotePath) -> Result<FileMeta> {
        self.stat_retrying(&mut Retries::new(self), path).await
    }

    /// [`stat`](Self::stat) as part of a longer exchange (a download).
    pub(crate) async fn stat_retrying(
        &self,
        retries: &mut Retries<'_>,
        path: &RemotePath,
    ) -> Result<FileMeta> {
        let url = self.url("stat", path);
        self.json_retrying(retries, |_| self.request(Method::GET, &url))
            .await
    }

    /// One page of a listing.
    pub async fn list_page(
        &self,
        dir: &RemotePath,
        recursive: bool,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> Result<ListPage> {
        let url = self.url("list", dir);
        let mut query: Vec<(&str, String)> = vec![("recursive", recursive.to_string())];
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_owned()));
        }
        self.json(|| self.request(Method::GET, &url).query(&query))
            .await
    }

    /// The whole listing, every page.
    pub async fn list(&self, dir: &RemotePath, recursive: bool) -> Result<Vec<ListEntry>> {
        let mut entries = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .list_page(dir, recursive, None, cursor.as_deref())
                .await?;
            entries.extend(page.entries);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(entries),
            }
        }
    }

    pub async fn delete(&self, path: &RemotePath) -> Result<()> {
        self.delete_if_match(path, None).await
    }

    /// Deletes a file only while it is still the version `etag` (when given):
    /// a file changed since fails with `precondition_failed`.
    pub async fn delete_if_match(&self, path: &RemotePath, etag: Option<&str>) -> Result<()> {
        let url = self.url("files", path);
        self.send(|| {
            let req = self.request(Method::DELETE, &url);
            match etag {
                Some(tag) => req.header(header::IF_MATCH, format!("\"{tag}\"")),
                None => req,
            }
        })
        .await?;
        Ok(())
    }

    pub async fn mkdir(&self, path: &RemotePath, parents: bool) -> Result<FileMeta> {
        let body = MkdirRequest {
            path: path.clone(),
            parents,
        };
        self.op("mkdir", &body).await
    }

    pub async fn rmdir(&self, path: &RemotePath, recursive: bool) -> Result<()> {
        let body = RmdirRequest {
            path: path.clone(),
            recursive,
        };
        let url = format!("{}/v1/ops/rmdir", self.base);
        self.send(once(|| self.request(Method::POST, &url).json(&body)))
            .await?;
        Ok(())
    }

    pub async fn rename(&self, request: &MoveRequest) -> Result<FileMeta> {
        self.op("rename", request).await
    }

    pub async fn copy(&self, request: &MoveRequest) -> Result<FileMeta> {
        self.op("copy", request).await
    }

    async fn op<B: serde::Serialize, T: DeserializeOwned>(&self, op: &str, body: &B) -> Result<T> {
        let url = format!("{}/v1/ops/{op}", self.base);
        self.json(once(|| self.request(Method::POST, &url).json(body)))
            .await
    }

    /// One-shot upload of a small body.
    pub async fn put_bytes(&self, path: &RemotePath, data: Bytes) -> Result<FileMeta> {
        let url = self.url("files", path);
        self.json_tracked(|progress| {
            self.request(Method::PUT, &url)
                .header(header::CONTENT_LENGTH, data.len())
                .body(tracked_body(data.clone(), progress))
        })
        .await
    }

    /// Bytes `[start, start + len)` of the version `etag` (any version when `None`).
    /// A changed file fails with `precondition_failed`. A body cut short is
    /// asked for again from where it stopped, pinned to the version the
    /// first answer came from (its whole range again when the server named
    /// none), within the same give-up time: the bytes returned are always
    /// of one version.
    pub async fn read_range(
        &self,
        path: &RemotePath,
        start: u64,
        len: u64,
        etag: Option<&str>,
    ) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = start + len - 1;
        let limit = usize::try_from(len)
            .map_err(|_| Error::BadRequest(format!("a range of {len} bytes")))?;
        let mut pinned = etag.map(str::to_owned);
        let mut retries = Retries::new(self);
        // One allocation of the whole range (a mount's block) rather than
        // doubling as it arrives: the freed halves of every block read
        // fragmented the heap, and the mount held about twice its cache.
        let mut body = bytes::BytesMut::with_capacity(limit.min(MAX_RANGE_PREALLOCATION));
        loop {
            let from = start + body.len() as u64;
            let resp = self
                .get_range_retrying(&mut retries, path, from, Some(end), pinned.as_deref())
                .await?;
            if pinned.is_none() {
                pinned = header_etag(&resp);
            }
            let (last_piece, outcome) = self.body_into(resp, &mut body, limit).await;
            match outcome {
                // A whole answer; shorter than asked only where the file ends.
                Ok(()) => return Ok(body.freeze()),
                Err(e) => {
                    if pinned.is_none() {
                        // No version to hold the rest to: all again.
                        body.clear();
                    } else if let Some(at) = last_piece {
                        retries.progressed(at);
                    }
                    retries
                        .again(Error::Network(format!("reading {path}: {e}")), None)
                        .await?;
                }
            }
        }
    }

    /// A GET of `start..=end` (to the end when `None`), pinned to `etag`.
    pub(crate) async fn get_range(
        &self,
        path: &RemotePath,
        start: u64,
        end: Option<u64>,
        etag: Option<&str>,
    ) -> Result<Response> {
        self.get_range_retrying(&mut Retries::new(self), path, start, end, etag)
            .await
    }

    async fn get_range_retrying(
        &self,
        retries: &mut Retries<'_>,
        path: &RemotePath,
        start: u64,
        end: Option<u64>,
        etag: Option<&str>,
    ) -> Result<Response> {
        let url = self.url("files", path);
        let range = match end {
            Some(end) => format!("bytes={start}-{end}"),
            None => format!("bytes={start}-"),
        };
        let resp = self
            .send_retrying(retries, |_| {
                let req = self
                    .request(Method::GET, &url)
                    .header(header::RANGE, &range);
                match etag {
                    Some(tag) => req.header(header::IF_MATCH, format!("\"{tag}\"")),
                    None => req,
                }
            })
            .await?;
        if start > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(Error::Network(format!(
                "{path}: server ignored the range request"
            )));
        }
        Ok(resp)
    }

    /// A GET that continues a download: the rest from `start` if the file is
    /// still `etag` (206), or the whole current file (200). `retries` are
    /// the download's: its give-up time counts from the last byte that
    /// arrived.
    pub(crate) async fn get_resume(
        &self,
        retries: &mut Retries<'_>,
        path: &RemotePath,
        start: u64,
        etag: &str,
    ) -> Result<Response> {
        let url = self.url("files", path);
        self.send_retrying(retries, |_| {
            self.request(Method::GET, &url)
                .header(header::RANGE, format!("bytes={start}-"))
                .header(header::IF_RANGE, format!("\"{etag}\""))
        })
        .await
    }

    /// The retries of a longer exchange with the server (a download): see
    /// [`Retries`].
    pub(crate) fn retries(&self) -> Retries<'_> {
        Retries::new(self)
    }

    pub async fn create_upload(&self, request: &CreateUpload) -> Result<UploadCreated> {
        let url = format!("{}/v1/uploads", self.base);
        self.json(once(|| self.request(Method::POST, &url).json(request)))
            .await
    }

    pub async fn upload_status(&self, id: &str) -> Result<UploadStatus> {
        let url = format!("{}/v1/uploads/{id}", self.base);
        self.json(|| self.request(Method::GET, &url)).await
    }

    /// Fixes the size of an open-ended session.
    pub async fn declare_upload_size(
        &self,
        id: &str,
        declared: &crate::protocol::upload::DeclareSize,
    ) -> Result<UploadStatus> {
        let url = format!("{}/v1/uploads/{id}", self.base);
        self.json(|| self.request(Method::PATCH, &url).json(declared))
            .await
    }

    pub async fn put_chunk(&self, id: &str, index: u64, data: Bytes) -> Result<()> {
        let url = format!("{}/v1/uploads/{id}/chunks/{index}", self.base);
        let crc = crc32c_header_value(crc32c::crc32c(&data));
        let len = data.len() as u64;
        self.send_tracked(|progress| {
            self.chunk_bytes_sent.fetch_add(len, Ordering::Relaxed);
            self.request(Method::PUT, &url)
                .header(CRC32C_HEADER, &crc)
                .header(header::CONTENT_LENGTH, len)
                .body(tracked_body(data.clone(), progress))
        })
        .await?;
        Ok(())
    }

    /// Commits a session; `sha256` when it was created with `sha256_at_complete`.
    pub async fn complete_upload(&self, id: &str, sha256: Option<String>) -> Result<FileMeta> {
        let url = format!("{}/v1/uploads/{id}/complete", self.base);
        let body = crate::protocol::upload::CompleteUpload { sha256 };
        self.json(once(|| self.request(Method::POST, &url).json(&body)))
            .await
    }

    pub async fn abort_upload(&self, id: &str) -> Result<()> {
        let url = format!("{}/v1/uploads/{id}", self.base);
        self.send(|| self.request(Method::DELETE, &url)).await?;
        Ok(())
    }
}

/// However little of the give-up time is left, an attempt waits this long
/// for the server: a retry made at the last moment is still a real one.
const SHORTEST_ATTEMPT: Duration = Duration::from_secs(1);
/// The most [`Client::read_range`] allocates before bytes arrive.
const MAX_RANGE_PREALLOCATION: usize = 16 << 20;

/// An instant shared by clones of a client, kept as time since its
/// creation.
#[derive(Debug)]
struct Heard {
    epoch: Instant,
    nanos: AtomicU64,
}

impl Default for Heard {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            nanos: AtomicU64::new(0),
        }
    }
}

impl Heard {
    fn note(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_max(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// The retries of one exchange with the server (a request, or several
/// asking for the rest of an answer cut short): since when the server has
/// made no progress, and how many attempts were made.
pub(crate) struct Retries<'a> {
    client: &'a Client,
    quiet_since: Instant,
    attempt: u32,
}

impl<'a> Retries<'a> {
    fn new(client: &'a Client) -> Self {
        Self {
            client,
            quiet_since: Instant::now(),
            attempt: 0,
        }
    }

    /// The server moved the exchange on at `at` (bytes kept of an answer):
    /// the give-up time counts from there, and backoff starts over.
    pub(crate) fn progressed(&mut self, at: Instant) {
        self.quiet_since = self.quiet_since.max(at);
        self.attempt = 0;
    }

    /// Whether the server has made no progress for the give-up time: the
    /// next failure is final.
    pub(crate) fn exhausted(&self) -> bool {
        self.quiet_since.elapsed() >= self.client.retry.give_up_after
    }

    /// Resolves once a wait for the next piece of an answer's body, begun
    /// now, has lasted past the give-up time after the last progress; it
    /// lasts at least [`SHORTEST_ATTEMPT`].
    pub(crate) async fn stalled(&self) {
        let floor = Instant::now() + SHORTEST_ATTEMPT;
        match self
            .quiet_since
            .checked_add(self.client.retry.give_up_after)
        {
            Some(at) => tokio::time::sleep_until(at.max(floor).into()).await,
            None => std::future::pending().await,
        }
    }

    /// How long the server has made no progress.
    pub(crate) fn quiet_for(&self) -> Duration {
        self.quiet_since.elapsed()
    }

    /// After a failed attempt: `error` once the server has made no
    /// progress for the give-up time, else waits for the next attempt.
    pub(crate) async fn again(
        &mut self,
        error: Error,
        retry_after: Option<Duration>,
    ) -> Result<()> {
        if self.exhausted() {
            return Err(error);
        }
        self.attempt += 1;
        let delay = self.client.retry.delay(self.attempt, retry_after);
        tracing::debug!(attempt = self.attempt, ?delay, %error, "retrying");
        self.client.sleep(delay).await
    }
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Network(format!("reading the response: {e}")))
}

/// The version a response names in its `ETag`, without quotes or `W/`.
pub(crate) fn header_etag(resp: &Response) -> Option<String> {
    let value = resp.headers().get(header::ETAG)?.to_str().ok()?;
    Some(value.trim_start_matches("W/").trim_matches('"').to_owned())
}

/// When the connection last took a piece of a request's body.
#[derive(Clone, Default)]
struct BodyProgress(Arc<std::sync::Mutex<Option<Instant>>>);

impl BodyProgress {
    fn note(&self) {
        *self.0.lock().unwrap() = Some(Instant::now());
    }

    fn last(&self) -> Option<Instant> {
        *self.0.lock().unwrap()
    }
}

/// `data` as a request body handed over in pieces, each noted in
/// `progress` as the connection takes it. The caller sets its
/// `Content-Length`.
fn tracked_body(data: Bytes, progress: &BodyProgress) -> reqwest::Body {
    const PIECE: usize = 64 << 10;
    let progress = progress.clone();
    let pieces = (0..data.len()).step_by(PIECE).map(move |start| {
        progress.note();
        Ok::<_, std::convert::Infallible>(data.slice(start..(start + PIECE).min(data.len())))
    });
    reqwest::Body::wrap_stream(futures::stream::iter(pieces))
}

/// A request that must not be carried out twice (creating, moving or
/// committing something): every attempt carries the same
/// `Idempotency-Key`, so that one sent again after a lost answer gets the
/// first answer instead of doing it again (a `mkdir` answered
/// `already_exists`).
fn once(build: impl Fn() -> RequestBuilder) -> impl Fn() -> RequestBuilder {
    let key = hex::encode(rand::random::<[u8; 16]>());
    move || build().header(IDEMPOTENCY_KEY_HEADER, &key)
}

fn retryable_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

fn retryable_transport(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
}

fn retry_after(resp: &Response) -> Option<Duration> {
    let value = resp.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// The server's JSON error, or a description of whatever came instead.
async fn error_from_response(resp: Response) -> Error {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) if body.error.code == ErrorCode::MissingChunks => {
            Error::MissingChunks(body.error.missing.unwrap_or_default())
        }
        Ok(body) => Error::Remote {
            code: body.error.code,
            status,
            message: body.error.message,
        },
        Err(_) => Error::Remote {
            code: status_code(status),
            status,
            message: format!(
                "HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            ),
        },
    }
}

/// A code for a status that came without ferry's error body (a proxy, say).
fn status_code(status: u16) -> ErrorCode {
    match status {
        400 => ErrorCode::BadRequest,
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::Forbidden,
        404 => ErrorCode::NotFound,
        409 => ErrorCode::Conflict,
        412 => ErrorCode::PreconditionFailed,
        413 => ErrorCode::PayloadTooLarge,
        416 => ErrorCode::RangeNotSatisfiable,
        429 => ErrorCode::RateLimited,
        500..=599 => ErrorCode::StorageError,
        _ => ErrorCode::Unknown,
    }
}

/// reqwest's message plus its causes, which say what actually failed.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The HTTP client builds TLS settings even for `http://`; whatever TLS
    /// providers the build compiled in, that must not panic. (scripts/test.sh
    /// also runs the unit tests without `--all-features` for this.)
    #[test]
    fn clients_build_for_http_and_https() {
        assert!(Client::new("http://127.0.0.1:1").is_ok());
        assert!(Client::new("https://127.0.0.1:1").is_ok());
        assert!(Client::new("ftp://127.0.0.1:1").is_err());
    }

    /// A stand-in server of one file, `data`, on loopback: each of its
    /// first `cut_answers` answers stops `cut` bytes into its body, the
    /// connection closing; later ones are whole. Returns its URL and the heads of the
    /// requests it got.
    async fn cutting_server(
        data: &'static [u8],
        etag: Option<&'static str>,
        cut_answers: usize,
        cut: usize,
    ) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8(head).unwrap().to_lowercase();
                seen.lock().unwrap().push(head.clone());
                let (status, body) = if head.starts_with("get /v1/stat/") {
                    let meta = format!(
                        r#"{{"path":"f","kind":"file","size":{},"mtime":null,"etag":"v1","padding":"{}"}}"#,
                        data.len(),
                        "x".repeat(2000)
                    );
                    ("200 OK".to_owned(), meta.into_bytes())
                } else {
                    let range = head
                        .lines()
                        .find_map(|l| l.strip_prefix("range: bytes="))
                        .unwrap();
                    let (a, b) = range.trim().split_once('-').unwrap();
                    let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                    let b = b.min(data.len() - 1);
                    (
                        format!(
                            "206 Partial Content\r\ncontent-range: bytes {a}-{b}/{}",
                            data.len()
                        ),
                        data[a..=b].to_vec(),
                    )
                };
                let etag = etag.map_or(String::new(), |t| format!("etag: \"{t}\"\r\n"));
                let response = format!(
                    "HTTP/1.1 {status}\r\n{etag}content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let sent = if answered < cut_answers {
                    cut.min(body.len())
                } else {
                    body.len()
                };
                answered += 1;
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.write_all(&body[..sent]).await;
            }
        });
        (url, heads)
    }

    fn data() -> &'static [u8] {
        static DATA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        DATA.get_or_init(|| (0..5000u32).map(|i| (i * 7 % 251) as u8).collect())
    }

    /// A range whose every answer is cut short comes whole from requests
    /// for the rest, each pinned to the version first read.
    #[tokio::test]
    async fn a_range_cut_short_is_asked_for_the_rest_of_the_same_version() {
        let (url, heads) = cutting_server(data(), Some("v1"), usize::MAX, 1000).await;
        let client = Client::new(&url).unwrap();
        let path: RemotePath = "f".parse().unwrap();
        let got = client.read_range(&path, 100, 4500, None).await.unwrap();
        assert_eq!(got[..], data()[100..4600]);
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 5, "{heads:?}");
        assert!(heads[0].contains("range: bytes=100-4599"), "{}", heads[0]);
        assert!(!heads[0].contains("if-match"), "{}", heads[0]);
        for (i, head) in heads.iter().enumerate().skip(1) {
            let from = 100 + i * 1000;
            assert!(
                head.contains(&format!("range: bytes={from}-4599")),
                "{head}"
            );
            assert!(head.contains("if-match: \"v1\""), "{head}");
        }
    }

    /// Without a version named, a range cut short is asked for whole again
    /// rather than pieced together from what could be two versions.
    #[tokio::test]
    async fn a_range_cut_short_without_an_etag_is_read_again_whole() {
        let (url, heads) = cutting_server(data(), None, usize::MAX, 1000).await;
        let mut config = ClientConfig::default();
        config.retry.give_up_after = Duration::from_secs(1);
        let client = Client::with_config(&url, config).unwrap();
        let path: RemotePath = "f".parse().unwrap();
        let got = client.read_range(&path, 0, 800, None).await.unwrap();
        assert_eq!(got[..], data()[..800]);
        let err = client.read_range(&path, 0, 3000, None).await.unwrap_err();
        assert!(matches!(err, Error::Network(_)), "{err:?}");
        let heads = heads.lock().unwrap();
        assert!(heads.len() > 2, "{heads:?}");
        assert!(
            heads.iter().all(|h| h.contains("range: bytes=0-")),
            "{heads:?}"
        );
    }

    /// A metadata answer cut short is asked for again, until the give-up
    /// time when every answer is.
    #[tokio::test]
    async fn a_stat_cut_short_is_sent_again() {
        let path: RemotePath = "f".parse().unwrap();
        let mut config = ClientConfig::default();
        config.retry.give_up_after = Duration::from_secs(1);
        let (url, heads) = cutting_server(data(), Some("v1"), 2, 100).await;
        let client = Client::with_config(&url, config.clone()).unwrap();
        assert_eq!(client.stat(&path).await.unwrap().size, 5000);
        assert_eq!(heads.lock().unwrap().len(), 3);

        let (url, heads) = cutting_server(data(), Some("v1"), usize::MAX, 100).await;
        let client = Client::with_config(&url, config).unwrap();
        let started = Instant::now();
        let err = client.stat(&path).await.unwrap_err();
        assert!(matches!(err, Error::Network(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            heads.lock().unwrap().len() > 2,
            "retried until the give-up time"
        );
    }
}
