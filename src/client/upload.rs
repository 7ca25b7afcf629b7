//! Resumable upload of a local file through a chunk session.
//!
//! Guarantees: the remote file appears whole or not at all; an interrupted
//! upload (dropped connection, restarted server, killed client) resumes from
//! the session's status and re-sends only chunks the server has not
//! acknowledged.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use super::digest::{DigestPrefix, UploadDigest};
use super::throttle::Throttle;
use super::ws::WsConnection;
use super::{Client, Progress, ProgressFn};
use crate::error::{Error, Result};
use crate::protocol::upload::{
    ChunkLayout, CreateUpload, DeclareSize, UploadState, UploadStatus, expand_runs,
};
use crate::protocol::ws::{Channel, FRAME_HEADER_LEN, FrameHeader};
use crate::protocol::{ErrorCode, FileMeta, RemotePath};

/// Chunk bytes in flight at once unless a count is asked for: enough for
/// both ends to keep hashing and writing while the next chunks travel
/// (bench/RESULTS.md, upload), without holding many large chunks.
const IN_FLIGHT_BYTES: u64 = 32 << 20;
/// Bounds on the chunks in flight that [`IN_FLIGHT_BYTES`] gives.
const FEWEST_IN_FLIGHT: u64 = 2;
const MOST_IN_FLIGHT: u64 = 8;
/// Times a session is recreated when the server lost it (expired, collected).
const SESSION_RECREATES: usize = 2;
/// Rounds of "send what is missing, then complete" before giving up.
const COMPLETE_ROUNDS: usize = 5;

/// How chunks travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// The WebSocket, falling back to HTTP chunk PUTs if it cannot be opened
    /// or drops mid-transfer.
    #[default]
    Auto,
    Http,
    /// The WebSocket only.
    WebSocket,
}

impl Transport {
    /// For a program that uploads files of every size: the WebSocket
    /// (falling back to HTTP) for files of [`WEBSOCKET_FROM`] bytes and more,
    /// where it costs less per byte; pooled HTTP connections for smaller
    /// ones, rather than opening a WebSocket each.
    pub fn for_file_of(size: u64) -> Transport {
        if size >= WEBSOCKET_FROM {
            Transport::Auto
        } else {
            Transport::Http
        }
    }
}

/// See [`Transport::for_file_of`].
pub const WEBSOCKET_FROM: u64 = 8 << 20;

/// Receives a new session's id.
pub type SessionFn = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Clone, Default)]
pub struct UploadOptions {
    /// Chunks in flight at once (default: 32 MiB of chunks, 2 to 8 of them).
    pub parallel: Option<usize>,
    /// Ask for a chunk size instead of the server's choice.
    pub chunk_size: Option<u64>,
    /// Commit only if the remote file still has this etag.
    pub if_match: Option<String>,
    /// Commit only if there is no remote file (`if_none_match: "*"`): for
    /// a new file, which must not replace one created elsewhere meanwhile.
    pub create_only: bool,
    /// A session to continue (from an earlier, interrupted run).
    pub resume_id: Option<String>,
    /// The file's SHA-256 when already known (skips hashing).
    pub sha256: Option<String>,
    /// The hash of the file's start when already known (not read again).
    pub sha256_prefix: Option<DigestPrefix>,
    /// Send only the file's first this many bytes: a snapshot of a file
    /// that keeps growing, committed even though it grew meanwhile. Give
    /// `sha256` with it (the digest of those bytes, read earlier): the
    /// server's check of it at commit is what shows that the bytes sent are
    /// the ones hashed. A file now shorter than this fails to read.
    pub length: Option<u64>,
    pub progress: Option<ProgressFn>,
    /// Called with the session id as soon as it exists, to persist it.
    pub on_session: Option<SessionFn>,
    pub throttle: Option<Arc<Throttle>>,
    pub transport: Transport,
    /// A WebSocket connection to share with other transfers.
    pub ws: Option<Arc<WsConnection>>,
    /// Once cancelled, no further chunk is started: chunks already on their
    /// way finish, the session is left open and the upload returns
    /// [`Error::Cancelled`], to be resumed later with `resume_id`.
    pub stop: Option<CancellationToken>,
}

#[derive(Debug, Clone)]
pub struct UploadReport {
    pub meta: FileMeta,
    pub session_id: String,
    /// Bytes the server already had when this run started.
    pub resumed_bytes: u64,
    /// The SHA-256 the commit was checked against: the one given, or the one
    /// computed while the chunks travelled.
    pub sha256: Option<String>,
}

/// Uploads `local` to `remote` and commits it.
pub async fn upload_file(
    client: &Client,
    local: &Path,
    remote: &RemotePath,
    options: UploadOptions,
) -> Result<UploadReport> {
    let file =
        Arc::new(File::open(local).map_err(Error::io(format!("opening {}", local.display())))?);
    let metadata = file
        .metadata()
        .map_err(Error::io(format!("reading {}", local.display())))?;
    let size = options.length.unwrap_or(metadata.len());
    let modified = metadata.modified().ok();
    // Unless the caller knows the digest, it is computed from the chunks as
    // they are read and sent with `complete`.
    let source = Source {
        digest: match &options.sha256 {
            Some(_) => None,
            None => Some(Arc::new(UploadDigest::new(
                file.clone(),
                size,
                options.sha256_prefix.clone(),
            ))),
        },
        known_sha256: options.sha256.clone(),
        file,
        local: local.to_owned(),
        size,
        modified,
    };
    let request = CreateUpload {
        path: remote.clone(),
        size: Some(size),
        chunk_size: options.chunk_size,
        sha256: options.sha256.clone(),
        sha256_at_complete: source.digest.is_some(),
        if_match: options.if_match.clone(),
        if_none_match: options.create_only.then(|| "*".to_owned()),
        mtime: modified.map(DateTime::<Utc>::from),
    };

    let mut resume = options.resume_id.clone();
    for _ in 0..=SESSION_RECREATES {
        if options.stop.as_ref().is_some_and(|s| s.is_cancelled()) {
            return Err(Error::Cancelled);
        }
        // A session just created needs no asking what it holds.
        let (id, known) = match resume.take() {
            Some(id) => (id, None),
            None => {
                let created = client.create_upload(&request).await?;
                if let Some(record) = &options.on_session {
                    record(&created.id);
                }
                let status = UploadStatus::of_new_session(&request, &created);
                (created.id, Some(status))
            }
        };
        match drive_session(client, &id, known, &source, &request, &options).await {
            Err(e) if e.code() == ErrorCode::NotFound => {
                tracing::info!(
                    session = id,
                    "the server no longer has the session; starting a new one"
                );
            }
            Ok(report) => {
                let sha256 = match &options.sha256 {
                    Some(known) => Some(known.clone()),
                    // Computed before the commit; this only reads it back.
                    None => match &source.digest {
                        Some(digest) => Some(digest.finish().await?),
                        None => None,
                    },
                };
                return Ok(UploadReport { sha256, ..report });
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::Conflict(format!(
        "upload of {remote} kept losing its session"
    )))
}

impl UploadOptions {
    /// Chunks in flight at once for chunks of `chunk_size`.
    fn chunks_in_flight(&self, chunk_size: u64) -> usize {
        let fitting = || {
            (IN_FLIGHT_BYTES / chunk_size.max(1)).clamp(FEWEST_IN_FLIGHT, MOST_IN_FLIGHT) as usize
        };
        self.parallel.unwrap_or_else(fitting).max(1)
    }
}

/// Sends what the session lacks and completes it. `known`: its status, if
/// the caller has it; else the server is asked.
async fn drive_session(
    client: &Client,
    id: &str,
    known: Option<UploadStatus>,
    source: &Source,
    request: &CreateUpload,
    options: &UploadOptions,
) -> Result<UploadReport> {
    let mut status = match known {
        Some(status) => status,
        None => client.upload_status(id).await?,
    };
    if status.path == request.path && status.size.is_none() {
        status = declare_size(client, id, request).await?;
    }
    if status.path != request.path || status.size != request.size {
        return Err(Error::NotFound(format!("session {id} is for another file")));
    }
    let resumed_bytes = status.bytes_received;
    let report = |meta| UploadReport {
        meta,
        session_id: id.to_owned(),
        resumed_bytes,
        sha256: None,
    };
    if status.state == UploadState::Open && options.transport != Transport::Http {
        let parallel = options.chunks_in_flight(status.chunk_size);
        match upload_over_ws(client, id, source, options, parallel).await {
            Ok(meta) => {
                return Ok(report(meta));
            }
            // Also when the server's limits refused the channel: HTTP goes on
            // and waits out its 429s. And when the WebSocket refused what
            // HTTP may take (chunks too large for one of its messages): a
            // request bad over HTTP too is refused there the same way.
            Err(
                e @ (Error::Network(_)
                | Error::MissingChunks(_)
                | Error::Remote {
                    code: ErrorCode::RateLimited | ErrorCode::BadRequest,
                    ..
                }),
            ) if options.transport == Transport::Auto => {
                tracing::info!(error = %e, "WebSocket upload interrupted or refused; continuing over HTTP");
                status = client.upload_status(id).await?;
            }
            Err(e) => return Err(e),
        }
    }
    if status.state == UploadState::Committed {
        let meta = status
            .meta
            .ok_or_else(|| Error::Storage("committed session without metadata".into()))?;
        return Ok(report(meta));
    }
    let layout = ChunkLayout {
        size: status.size.unwrap_or_default(),
        chunk_size: status.chunk_size,
    };
    let mut received: Vec<u64> = expand_runs(&status.received).collect();
    let done = Arc::new(AtomicU64::new(status.bytes_received));
    for _ in 0..COMPLETE_ROUNDS {
        let missing: Vec<u64> = (0..layout.chunk_count())
            .filter(|i| received.binary_search(i).is_err())
            .collect();
        send_chunks(client, id, source, layout, &missing, options, &done).await?;
        let sha256 = source.sha256().await?;
        match client.complete_upload(id, sha256).await {
            Ok(meta) => {
                return Ok(report(meta));
            }
            // Acknowledged chunks were lost (a node without fsync, say): resend.
            Err(Error::MissingChunks(runs)) => {
                let lost: Vec<u64> = expand_runs(&runs).collect();
                received.retain(|i| lost.binary_search(i).is_err());
                done.store(
                    received.iter().filter_map(|i| layout.chunk_len(*i)).sum(),
                    Ordering::Relaxed,
                );
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::Conflict(format!("session {id} kept losing chunks")))
}

/// Declares the size of the open-ended session `id` (one a writer started
/// while the file was still being written). A session that cannot take
/// the size (it holds a chunk past the end) counts as lost.
async fn declare_size(client: &Client, id: &str, request: &CreateUpload) -> Result<UploadStatus> {
    let declared = DeclareSize {
        size: request.size.expect("an upload knows its file's size"),
        mtime: request.mtime,
    };
    match client.declare_upload_size(id, &declared).await {
        Err(e) if e.code() == ErrorCode::Conflict => Err(Error::NotFound(format!(
            "session {id} cannot take this file: {e}"
        ))),
        other => other,
    }
}

async fn upload_over_ws(
    client: &Client,
    id: &str,
    source: &Source,
    options: &UploadOptions,
    parallel: usize,
) -> Result<FileMeta> {
    let conn = match &options.ws {
        Some(conn) => conn.clone(),
        None => WsConnection::connect(client).await?,
    };
    let read_frame = |ch: Channel, start: u64, len: u64| -> BoxFuture<'static, Result<Bytes>> {
        let (source, throttle) = (source.clone(), options.throttle.clone());
        let stopped = options.stop.as_ref().is_some_and(|s| s.is_cancelled());
        async move {
            if stopped {
                return Err(Error::Cancelled);
            }
            let frame = source.read(start, len, Some(ch)).await?;
            if let Some(throttle) = throttle {
                throttle.acquire(len).await;
            }
            Ok(frame)
        }
        .boxed()
    };
    let upload = conn.upload(
        id,
        &read_frame,
        parallel,
        options.progress.as_ref(),
        source.sha256().boxed(),
    );
    // A cancelled client (Ctrl-C) stops at once, as over HTTP: the session
    // stays open, and a later run resumes it from what the server has.
    let uploaded = tokio::select! {
        uploaded = upload => uploaded,
        () = client.cancelled() => Err(Error::Cancelled),
    };
    if options.ws.is_none() {
        conn.close();
    }
    uploaded
}

async fn send_chunks(
    client: &Client,
    id: &str,
    source: &Source,
    layout: ChunkLayout,
    chunks: &[u64],
    options: &UploadOptions,
    done: &Arc<AtomicU64>,
) -> Result<()> {
    let parallel = options.chunks_in_flight(layout.chunk_size);
    let stopped = || options.stop.as_ref().is_some_and(|s| s.is_cancelled());
    futures::stream::iter(chunks.iter().copied())
        .take_while(|_| std::future::ready(!stopped()))
        .map(|index| async move {
            let (start, end) = layout.chunk_range(index).expect("index within the layout");
            let data = source.read(start, end - start, None).await?;
            if let Some(throttle) = &options.throttle {
                throttle.acquire(data.len() as u64).await;
            }
            client.put_chunk(id, index, data).await?;
            let now = done.fetch_add(end - start, Ordering::Relaxed) + (end - start);
            if let Some(progress) = &options.progress {
                progress(Progress {
                    done: now,
                    total: layout.size,
                });
            }
            Ok::<_, Error>(())
        })
        .buffer_unordered(parallel)
        .try_collect::<()>()
        .await?;
    if stopped() {
        return Err(Error::Cancelled);
    }
    Ok(())
}

/// The file being uploaded, and its digest being computed from the reads.
#[derive(Clone)]
struct Source {
    file: Arc<File>,
    /// None when the caller gave the digest.
    digest: Option<Arc<UploadDigest>>,
    /// The digest the caller gave, sent with `complete` too: a resumed
    /// session may have been created to receive it there.
    known_sha256: Option<String>,
    local: PathBuf,
    /// Size and mtime when the upload started.
    size: u64,
    modified: Option<SystemTime>,
}

impl Source {
    /// Reads `len` bytes of the file at `start` and feeds them to the
    /// digest. With a channel, the bytes come as that channel's binary
    /// frame, read straight in behind the header.
    async fn read(&self, start: u64, len: u64, frame_for: Option<Channel>) -> Result<Bytes> {
        let file = self.file.clone();
        let head = if frame_for.is_some() {
            FRAME_HEADER_LEN
        } else {
            0
        };
        let buf = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(head + len as usize);
            buf.resize(head, 0);
            append_exact_at(&file, &mut buf, start, len as usize)
                .map_err(Error::io("reading the local file"))?;
            if let Some(ch) = frame_for {
                FrameHeader::fill_in(ch, start, &mut buf);
            }
            Ok::<_, Error>(Bytes::from(buf))
        })
        .await
        .map_err(|e| Error::Storage(format!("read task failed: {e}")))??;
        if let Some(digest) = &self.digest {
            digest.feed(start, buf.slice(head..)).await;
        }
        Ok(buf)
    }

    /// The digest to send with `complete`, once every chunk was read.
    ///
    /// It is the digest of the bytes read, so it cannot tell a file changed
    /// between two reads: the file's size and mtime are checked instead,
    /// and a change refuses the commit.
    async fn sha256(&self) -> Result<Option<String>> {
        let Some(digest) = &self.digest else {
            return Ok(self.known_sha256.clone());
        };
        let sha256 = digest.finish().await?;
        let now = self
            .file
            .metadata()
            .map_err(Error::io(format!("reading {}", self.local.display())))?;
        if now.len() != self.size || now.modified().ok() != self.modified {
            return Err(Error::ChecksumMismatch(format!(
                "{} changed while it was uploaded; nothing was committed",
                self.local.display()
            )));
        }
        Ok(Some(sha256))
    }
}

/// Appends `len` bytes of `file` from `offset` to `buf`. Reads straight
/// into the vector's spare capacity: a chunk buffer is not zero-filled
/// first (that cost about 5 % of an upload's client CPU).
pub(crate) fn append_exact_at(
    file: &File,
    buf: &mut Vec<u8>,
    offset: u64,
    len: usize,
) -> std::io::Result<()> {
    let (from, want) = (buf.len(), buf.len() + len);
    buf.reserve_exact(len);
    while buf.len() < want {
        let at = offset + (buf.len() - from) as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(buf), at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The spare capacity may reach past the range; what was read beyond goes.
    buf.truncate(want);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_in_flight_hold_about_32_mib_unless_a_count_is_asked() {
        let default = UploadOptions::default();
        assert_eq!(default.chunks_in_flight(1 << 20), 8);
        assert_eq!(default.chunks_in_flight(4 << 20), 8);
        assert_eq!(default.chunks_in_flight(8 << 20), 4);
        assert_eq!(default.chunks_in_flight(64 << 20), 2);
        let asked = UploadOptions {
            parallel: Some(3),
            ..UploadOptions::default()
        };
        assert_eq!(asked.chunks_in_flight(64 << 20), 3);
        let zero = UploadOptions {
            parallel: Some(0),
            ..UploadOptions::default()
        };
        assert_eq!(zero.chunks_in_flight(1 << 20), 1);
    }

    #[test]
    fn append_exact_at_reads_the_range_behind_what_is_there() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::io::Write::write_all(&mut file, &data).unwrap();
        let mut buf = Vec::with_capacity(1 << 20); // more spare room than asked for
        buf.extend_from_slice(b"head");
        append_exact_at(&file, &mut buf, 1_000, 50_000).unwrap();
        assert_eq!(&buf[..4], b"head");
        assert_eq!(&buf[4..], &data[1_000..51_000]);
        let mut short = Vec::new();
        let err = append_exact_at(&file, &mut short, 90_000, 20_000).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
