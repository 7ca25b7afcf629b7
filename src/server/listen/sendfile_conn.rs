//! Plain HTTP/1.1 connections whose file downloads skip user space.
//!
//! hyper can only send a body as bytes in memory, so a download costs a copy
//! from the page cache into a buffer and another from it into the socket.
//! nginx sends the same bytes with one `sendfile`, and on 64 KiB ranges those
//! copies were most of the CPU ferry spent beyond it (bench/RESULTS.md, serve
//! notes).
//!
//! This driver reads each request head itself. A `GET` or `HEAD` of
//! `/v1/files/...` without a body goes through the same router, layers and
//! handler as any request, or through [`DirectReads`], the same steps in
//! line, when the server has no layer that path skips. When the response
//! offers a [`FileRegion`], the head is written here and the bytes go with
//! `sendfile`; otherwise the response is written here as hyper would.
//! Anything else (another route, a body, an upgrade, HTTP/1.0 or HTTP/2, a
//! head hyper should refuse) hands the connection, with the bytes already
//! read, to hyper for the rest of its life.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Method, Request, StatusCode, Version, header};
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::server::direct_read::DirectReads;
use crate::server::file_region::{FileRegion, Region};
use crate::server::store::byte_is_cached;

/// Largest request head read here; a longer one goes to hyper, which
/// answers 431 past its own limit.
const MAX_HEAD: usize = 16 * 1024;

/// Headers a request read here may carry; more go to hyper.
const MAX_HEADERS: usize = 64;

/// Bytes per `sendfile` call. Before each call the step's last byte is
/// checked to be in the page cache; if not, the call (which then waits for
/// the disk) runs on the blocking pool, so reading a cold file does not
/// stall an async worker.
const SENDFILE_STEP: u64 = 512 * 1024;

/// What a connection needs besides its socket.
pub(super) struct Connection {
    pub app: Router,
    /// Answers the file reads in place of `app` when the server allows it.
    pub direct: Option<DirectReads>,
    pub peer: SocketAddr,
    pub header_timeout: Duration,
    /// Becomes true when the server starts shutting down: an idle connection
    /// closes, a busy one after its response.
    pub stopping: watch::Receiver<bool>,
}

/// How a connection left this driver.
pub(super) enum Outcome {
    /// Closed (by either side, or after an error).
    Closed,
    /// For hyper to serve from here: the socket and the bytes read from it
    /// that no response has consumed.
    HandOver(Rewind),
}

impl Connection {
    pub async fn drive(mut self, mut tcp: TcpStream) -> Outcome {
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            let head = tokio::select! {
                head = tokio::time::timeout(self.header_timeout, read_head(&mut tcp, &mut buf)) => head,
                _ = self.stopping.wait_for(|stopping| *stopping), if buf.is_empty() => {
                    return Outcome::Closed;
                }
            };
            let request = match head {
                Ok(Ok(Head::Request(request, len))) => {
                    buf.advance(len);
                    *request
                }
                Ok(Ok(Head::ForHyper)) => return Outcome::HandOver(Rewind::new(buf.freeze(), tcp)),
                // The client left, or took longer than the header deadline.
                Ok(Ok(Head::Closed)) | Ok(Err(_)) | Err(_) => return Outcome::Closed,
            };
            let keep_alive = self.respond(&mut tcp, request).await.unwrap_or_else(|e| {
                tracing::debug!(peer = %self.peer, error = %e, "response not completed");
                false
            });
            if !keep_alive || *self.stopping.borrow() {
                let _ = tcp.shutdown().await;
                return Outcome::Closed;
            }
        }
    }

    /// Serves one request; `Ok(true)` if the connection may take another.
    async fn respond(&self, tcp: &mut TcpStream, mut request: Request<Body>) -> io::Result<bool> {
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let head_only = request.method() == Method::HEAD;
        let mut keep_alive = !has_token(request.headers(), "close");
        let response = match &self.direct {
            Some(direct) => direct.respond(request).await,
            None => match self.app.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            },
        };
        let (mut parts, body) = response.into_parts();
        keep_alive &= !has_token(&parts.headers, "close");
        let region = parts
            .extensions
            .remove::<FileRegion>()
            .and_then(|offer| offer.take());
        let bodyless = head_only || !status_has_body(parts.status);
        let length = declared_length(&mut parts, &body, bodyless);
        let chunked = !bodyless && length.is_none();
        let head = encode_head(&parts, chunked, keep_alive);
        match region {
            Some(region) if !bodyless && length == Some(region.span.end - region.span.start) => {
                // A packet of its own, as nginx sends it: holding it back for
                // the data (MSG_MORE) cost more CPU than the packet saved.
                tcp.write_all(&head).await?;
                send_region(tcp, region).await?;
                // The unpolled body, and what layers tied to it (transfer
                // slots, gauges), lived until the bytes were sent.
                drop(body);
            }
            _ if bodyless => tcp.write_all(&head).await?,
            _ => keep_alive &= write_body(tcp, head, body, length, chunked).await?,
        }
        Ok(keep_alive)
    }
}

enum Head {
    /// A request this driver serves, from a head of this many bytes at the
    /// start of the buffer.
    Request(Box<Request<Body>>, usize),
    /// Not for this driver: another request, or a head too long, with too
    /// many headers or malformed (hyper answers those).
    ForHyper,
    /// The connection ended before a complete head.
    Closed,
}

async fn read_head(tcp: &mut TcpStream, buf: &mut BytesMut) -> io::Result<Head> {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Request::new(&mut headers);
            match parsed.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    return Ok(servable(&parsed)
                        .map_or(Head::ForHyper, |r| Head::Request(Box::new(r), len)));
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) | Err(_) => return Ok(Head::ForHyper),
            }
        }
        if tcp.read_buf(buf).await? == 0 {
            return Ok(Head::Closed);
        }
    }
}

/// The request `parsed` if this driver serves it: a bodiless HTTP/1.1
/// `GET` or `HEAD` of a file, with a head `http` accepts as it is.
fn servable(parsed: &httparse::Request<'_, '_>) -> Option<Request<Body>> {
    let method = match parsed.method? {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return None,
    };
    let path = parsed.path?;
    if parsed.version? != 1 || !path.starts_with("/v1/files/") {
        return None;
    }
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .version(Version::HTTP_11)
        .body(Body::empty())
        .ok()?;
    let map = request.headers_mut();
    for h in parsed.headers.iter() {
        let name = header::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        map.append(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    let has_body = map.contains_key(header::TRANSFER_ENCODING)
        || map
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0");
    let special = map.contains_key(header::UPGRADE) || map.contains_key(header::EXPECT);
    (!has_body && !special).then_some(request)
}

/// Whether a `Connection` header of `headers` lists `token`.
fn has_token(headers: &header::HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn status_has_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// The body's length, from its `Content-Length` or, when it has none, its
/// exact size (then added as the header). `None`: sent chunked.
fn declared_length(
    parts: &mut axum::http::response::Parts,
    body: &Body,
    bodyless: bool,
) -> Option<u64> {
    if let Some(v) = parts.headers.get(header::CONTENT_LENGTH) {
        return v.to_str().ok()?.parse().ok();
    }
    let exact = http_body::Body::size_hint(body).exact()?;
    if status_has_body(parts.status) && (!bodyless || exact > 0) {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(exact));
    }
    Some(exact)
}

fn encode_head(parts: &axum::http::response::Parts, chunked: bool, keep_alive: bool) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive && !parts.headers.contains_key(header::CONNECTION) {
        head.extend_from_slice(b"connection: close\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Sends the region's bytes from the page cache to the socket.
async fn send_region(tcp: &TcpStream, mut region: Region) -> io::Result<()> {
    let mut offset = region.span.start;
    while offset < region.span.end {
        let step = SENDFILE_STEP.min(region.span.end - offset);
        let count = usize::try_from(step).unwrap_or(usize::MAX);
        // The last byte: the page cache fills a file's ranges front to back
        // (readahead), so a cached end means a cached step.
        let cached = byte_is_cached(&region.file, offset + step - 1);
        let sent = if cached {
            tcp.async_io(Interest::WRITABLE, || {
                let mut at = offset;
                rustix::fs::sendfile(tcp.as_fd(), &*region.file, Some(&mut at), count)
                    .map_err(io::Error::from)
            })
            .await?
        } else {
            sendfile_from_disk(tcp, &region.file, offset, count).await?
        };
        if sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file truncated while sent: it ends before byte {offset}"),
            ));
        }
        offset += sent as u64;
        region.sent(sent);
    }
    Ok(())
}

/// One `sendfile` on the blocking pool, for bytes that may have to be read
/// from the disk first; waits for the socket as usual when it is full.
async fn sendfile_from_disk(
    tcp: &TcpStream,
    file: &Arc<File>,
    offset: u64,
    count: usize,
) -> io::Result<usize> {
    loop {
        tcp.writable().await?;
        let socket = rustix::io::dup(tcp.as_fd())?;
        let file = file.clone();
        let sent = tokio::task::spawn_blocking(move || {
            let mut at = offset;
            rustix::fs::sendfile(&socket, &*file, Some(&mut at), count)
        })
        .await
        .map_err(io::Error::other)?;
        match sent {
            Ok(n) => return Ok(n),
            // The socket filled up meanwhile; the bytes read stay cached.
            Err(rustix::io::Errno::AGAIN) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes a response whose body is in memory or streamed (errors, other
/// backends' files). `Ok(false)` if the body ended short of its length or
/// failed: the connection cannot carry another response then.
async fn write_body(
    tcp: &mut TcpStream,
    mut out: Vec<u8>,
    body: Body,
    length: Option<u64>,
    chunked: bool,
) -> io::Result<bool> {
    let mut written = 0u64;
    let mut frames = body.into_data_stream();
    while let Some(data) = frames.next().await {
        let Ok(data) = data else {
            tcp.write_all(&out).await?;
            return Ok(false);
        };
        if data.is_empty() {
            continue;
        }
        written += data.len() as u64;
        if length.is_some_and(|len| written > len) {
            tcp.write_all(&out).await?;
            return Ok(false);
        }
        if chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        // Small bodies (errors, JSON) leave in one write with the head.
        if out.len() + data.len() <= 16 * 1024 {
            out.extend_from_slice(&data);
        } else {
            tcp.write_all(&out).await?;
            out.clear();
            tcp.write_all(&data).await?;
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    tcp.write_all(&out).await?;
    Ok(length.is_none_or(|len| written == len))
}

/// A socket with bytes already read from it, which are read again first.
pub(super) struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl Rewind {
    fn new(prefix: Bytes, inner: TcpStream) -> Self {
        Self { prefix, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::Response;

    use super::*;

    #[test]
    fn only_bodiless_http11_file_reads_are_served_here() {
        let served = |head: &str| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Request::new(&mut headers);
            parsed.parse(head.as_bytes()).is_ok() && servable(&parsed).is_some()
        };
        assert!(served(
            "GET /v1/files/a.mp4 HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n"
        ));
        assert!(served(
            "HEAD /v1/files/a HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!served("GET /v1/list/ HTTP/1.1\r\n\r\n"));
        assert!(!served(
            "PUT /v1/files/a HTTP/1.1\r\nContent-Length: 3\r\n\r\n"
        ));
        assert!(!served("GET /v1/files/a HTTP/1.0\r\n\r\n"));
        assert!(!served(
            "GET /v1/files/a HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
        ));
        assert!(!served(
            "GET /v1/files/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!served(
            "GET /v1/files/a HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(!served(
            "GET /v1/files/a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"
        ));
        assert!(!served("GET http://h/v1/files/a HTTP/1.1\r\n\r\n"));
        assert!(!served("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    }

    #[test]
    fn the_head_carries_status_headers_length_and_date() {
        let response = Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_LENGTH, "10")
            .body(())
            .unwrap();
        let (parts, ()) = response.into_parts();
        let head = String::from_utf8(encode_head(&parts, false, false)).unwrap();
        assert!(head.starts_with("HTTP/1.1 206 Partial Content\r\ncontent-length: 10\r\n"));
        assert!(head.contains("\r\nconnection: close\r\n"));
        assert!(head.contains("\r\ndate: "));
        assert!(head.ends_with("\r\n\r\n"));
        let head = String::from_utf8(encode_head(&parts, true, true)).unwrap();
        assert!(head.contains("transfer-encoding: chunked\r\n"));
        assert!(!head.contains("connection:"));
    }

    #[test]
    fn connection_tokens_are_matched_in_lists_and_any_case() {
        let mut headers = header::HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("TE, Close"));
        assert!(has_token(&headers, "close"));
        assert!(!has_token(&headers, "keep-alive"));
    }
}
