//! `GET /v1/ws` (subprotocol `ferry.v1`): many uploads, downloads and watches
//! multiplexed on one connection. docs/PROTOCOL.md describes the frames.
//!
//! Backpressure: outgoing messages go through a bounded queue, so a slow
//! reader stalls the downloads feeding it instead of growing memory; incoming
//! chunks are written by at most a few tasks at once, and while those are busy
//! the connection stops reading. A connection has at most
//! `ws_max_channels` channels in use, so what a stalled reader holds (a file
//! and a read buffer per download) is bounded too.
//!
//! A channel's binding ends at `cancel`, `done`, `eof` or a download's error,
//! and nothing of the op it bound is sent after that: every message of an op
//! is queued only while its binding is the channel's current one (see
//! [`BindingOut`]), so a client may reuse the channel at once.

use super::auth::{Caller, Grant, Scope};
use super::extract::from_json;
use super::limits::TransferSlot;
use super::uploads::authorize;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::AppState;
use crate::error::{Error, Result};
use crate::protocol::upload::{ChunkLayout, CreateUpload, expand_runs};
use crate::protocol::ws::{
    Channel, ClientMessage, FRAME_HEADER_LEN, FrameHeader, ProtocolErrorCode, SUBPROTOCOL,
    ServerMessage, WsErrorCode,
};
use crate::protocol::{ErrorCode, RemotePath};

/// Outgoing messages queued per connection before senders wait.
const OUTGOING_QUEUE: usize = 32;
/// Chunks written at once per connection.
const CHUNK_WRITERS: usize = 8;
/// Least time between two `progress` messages of a channel.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// How long a closing connection waits for the peer's Close.
const CLOSE_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn upgrade(
    State(app): State<AppState>,
    Caller(grant): Caller,
    headers: HeaderMap,
    upgrade: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    let upgrade = upgrade
        .map_err(|e| Error::BadRequest(format!("not a WebSocket upgrade: {}", e.body_text())))?;
    let offered = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if !offered {
        return Err(Error::BadRequest(format!(
            "the WebSocket subprotocol {SUBPROTOCOL} is required"
        )));
    }
    let max = app.config().ws_max_message;
    Ok(upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| serve(app, socket, grant)))
}

/// What a channel is bound to, from the message that claimed it to its end.
struct Binding {
    /// Tells this binding from earlier and later ones on the same channel:
    /// an op that has ended can neither speak for nor end its successor.
    id: u64,
    op: Op,
    /// Held by a download or an upload: one of its token's transfers.
    _slot: Option<TransferSlot>,
}

enum Op {
    Upload(Arc<UploadChannel>),
    /// A download or a watch, running as a task.
    Task(JoinHandle<()>),
}

impl Binding {
    /// Stops the op; returns once its task has let go of what it held (a
    /// file, a subscription). Then the transfer slot is freed.
    async fn stop(self) {
        let Binding { op, _slot, .. } = self;
        if let Op::Task(task) = op {
            task.abort();
            let _ = task.await;
        }
    }
}

/// A channel's reservation for a new op, made before the op starts (an
/// upload's session is created only once its channel is reserved).
struct Claim {
    ch: Channel,
    id: u64,
    slot: Option<TransferSlot>,
}

struct UploadChannel {
    id: String,
    layout: ChunkLayout,
    received: Mutex<Received>,
}

/// The chunks of an upload acknowledged so far, and their bytes (kept as a
/// running sum: a progress message per chunk must not cost a pass over all
/// of them).
#[derive(Default)]
struct Received {
    chunks: HashSet<u64>,
    bytes: u64,
    /// When the channel was last sent a `progress`.
    last_progress: Option<Instant>,
}

impl Received {
    fn add(&mut self, index: u64, layout: &ChunkLayout) {
        if self.chunks.insert(index) {
            self.bytes += layout.chunk_len(index).unwrap_or(0);
        }
    }

    /// Whether a `progress` is due: the first, the one when the last chunk
    /// lands, and otherwise one per [`PROGRESS_EVERY`]; every chunk is
    /// acknowledged by its `ack` anyway.
    fn progress_due(&mut self, layout: &ChunkLayout) -> bool {
        let now = Instant::now();
        let due = self.chunks.len() as u64 == layout.chunk_count()
            || self
                .last_progress
                .is_none_or(|last| now.duration_since(last) >= PROGRESS_EVERY);
        if due {
            self.last_progress = Some(now);
        }
        due
    }
}

type Channels = Arc<Mutex<HashMap<Channel, Binding>>>;

/// Sends for one binding: a message is queued only while the binding is its
/// channel's current one, checked under the channels' lock. So once
/// `cancelled` (or `done`, `eof`) is queued, nothing of the op can follow it;
/// what the op queued before stays ahead of it.
#[derive(Clone)]
struct BindingOut {
    out: mpsc::Sender<Message>,
    channels: Channels,
    ch: Channel,
    id: u64,
}

impl BindingOut {
    /// Queues `message`; false once the binding has ended or the connection
    /// is closing (the op should stop).
    async fn send(&self, message: &ServerMessage) -> bool {
        self.queue(text(message), false).await
    }

    async fn send_frame(&self, frame: Vec<u8>) -> bool {
        self.queue(Message::Binary(frame.into()), false).await
    }

    /// Queues the op's last message and ends its binding, in one step: the
    /// channel is free from the moment the peer can learn that it is.
    async fn finish(&self, message: &ServerMessage) {
        self.queue(text(message), true).await;
    }

    async fn queue(&self, message: Message, last: bool) -> bool {
        let Ok(permit) = self.out.reserve().await else {
            return false;
        };
        let mut channels = self.channels.lock().unwrap();
        if channels.get(&self.ch).is_none_or(|b| b.id != self.id) {
            return false;
        }
        permit.send(message);
        if last {
            channels.remove(&self.ch);
        }
        true
    }
}

async fn serve(app: AppState, socket: WebSocket, grant: Grant) {
    let _open = app.metrics().stream();
    let (mut sink, mut incoming) = socket.split();
    let (out, mut queue) = mpsc::channel::<Message>(OUTGOING_QUEUE);
    let ping_every = app.config().ws_ping_interval;
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        'write: loop {
            let mut next = Some(tokio::select! {
                m = queue.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = ping.tick() => Message::Ping(Bytes::from_static(b"ferry")),
            });
            // What is queued already goes out with it, in one flush.
            let (mut closing, mut fed) = (false, 0);
            while let Some(message) = next.take() {
                closing = matches!(message, Message::Close(_));
                if sink.feed(message).await.is_err() {
                    break 'write;
                }
                fed += 1;
                if !closing && fed < OUTGOING_QUEUE {
                    next = queue.try_recv().ok();
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
            if closing {
                // Nothing may follow a Close; hold the socket open until the
                // reader has seen the peer's Close, then let it drop.
                while queue.recv().await.is_some() {}
                break;
            }
        }
    });

    let connection = Connection {
        app: app.clone(),
        grant,
        out: out.clone(),
        channels: Arc::default(),
        bindings_made: AtomicU64::new(0),
        max_channels: app.config().ws_max_channels,
        writers: Arc::new(Semaphore::new(CHUNK_WRITERS)),
    };
    // A peer that sends nothing, not even pongs, for this long is gone.
    let idle = ping_every.saturating_mul(5) / 2;
    let shutdown = app.shutdown_token();
    let mut last_seen = Instant::now();
    loop {
        let deadline = tokio::time::Instant::from_std(last_seen + idle);
        let frame = tokio::select! {
            f = incoming.next() => f,
            _ = tokio::time::sleep_until(deadline) => {
                close(&out, close_code::AWAY, "idle").await;
                await_peer_close(&mut incoming).await;
                break;
            }
            _ = shutdown.cancelled() => {
                close(&out, close_code::AWAY, "server shutting down").await;
                await_peer_close(&mut incoming).await;
                break;
            }
        };
        last_seen = Instant::now();
        match frame {
            Some(Ok(Message::Text(text))) => connection.on_text(text.as_str()).await,
            Some(Ok(Message::Binary(data))) => {
                app.metrics().received(data.len());
                connection.on_binary(data).await
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {} // ping (answered by the library) and pong
            Some(Err(e)) => {
                // Oversized messages and protocol violations end up here.
                tracing::debug!(error = %e, "WebSocket read failed");
                close(&out, close_code::POLICY, &e.to_string()).await;
                await_peer_close(&mut incoming).await;
                break;
            }
        }
    }
    connection.stop_all();
    drop(connection);
    drop(out);
    let _ = writer.await;
}

/// After sending Close: reads until the peer's Close (or a short deadline),
/// which completes the closing handshake cleanly.
async fn await_peer_close(incoming: &mut futures::stream::SplitStream<WebSocket>) {
    let drain = async {
        while let Some(Ok(message)) = incoming.next().await {
            if matches!(message, Message::Close(_)) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE, drain).await;
}

async fn close(out: &mpsc::Sender<Message>, code: u16, reason: &str) {
    let reason: String = reason.chars().take(100).collect();
    let _ = out
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

struct Connection {
    app: AppState,
    /// What the token presented at the upgrade allows.
    grant: Grant,
    out: mpsc::Sender<Message>,
    channels: Channels,
    /// Numbers the bindings (see [`Binding::id`]).
    bindings_made: AtomicU64,
    /// Channels in use at once, at most.
    max_channels: usize,
    writers: Arc<Semaphore>,
}

impl Connection {
    async fn on_text(&self, text: &str) {
        let message = match from_json::<ClientMessage>(text.as_bytes()) {
            Ok(m) => m,
            Err(refused) => {
                let ch = serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .and_then(|v| v["ch"].as_u64())
                    .and_then(|c| u32::try_from(c).ok());
                // A path is refused with the code HTTP gives it in a body.
                if refused.is_path() {
                    let e = refused.into_error("message");
                    return send(&self.out, api_error(ch, &e, None)).await;
                }
                let message = format!("not a valid message: {refused}");
                return self
                    .refuse(ch, ProtocolErrorCode::BadMessage, message)
                    .await;
            }
        };
        match message {
            ClientMessage::UploadCreate { ch, request } => {
                if let Some(claim) = self.claim(ch, true).await {
                    let created = self.create_upload(request).await;
                    self.bind_upload(claim, created).await;
                }
            }
            ClientMessage::UploadOpen { ch, id } => {
                if let Some(claim) = self.claim(ch, true).await {
                    let allowed = authorize(&self.app, &self.grant, &id).await;
                    self.bind_upload(claim, allowed.map(|()| id)).await;
                }
            }
            ClientMessage::UploadComplete { ch, sha256 } => self.complete(ch, sha256).await,
            ClientMessage::Download {
                ch,
                path,
                offset,
                length,
            } => {
                if let Err(e) = self.grant.allow(&path, Scope::Read) {
                    return send(&self.out, api_error(Some(ch), &e, None)).await;
                }
                if let Some(claim) = self.claim(ch, true).await {
                    let app = self.app.clone();
                    self.start(claim, |out| download(app, out, path, offset, length));
                }
            }
            ClientMessage::Status { ch, id } => {
                let status = match authorize(&self.app, &self.grant, &id).await {
                    Ok(()) => self.app.uploads().status(&id).await,
                    Err(e) => Err(e),
                };
                let reply = match status {
                    Ok(status) => ServerMessage::Status { ch, status },
                    Err(e) => api_error(Some(ch), &e, None),
                };
                send(&self.out, reply).await;
            }
            ClientMessage::Cancel { ch } => {
                // Unbound first: from here on nothing of the op is queued.
                let ended = self.channels.lock().unwrap().remove(&ch);
                if let Some(binding) = ended {
                    binding.stop().await;
                }
                send(&self.out, ServerMessage::Cancelled { ch }).await;
            }
            ClientMessage::Watch { ch, prefix } => {
                let prefix = match self.grant.watch_prefix(&prefix) {
                    Ok(p) => p,
                    Err(e) => return send(&self.out, api_error(Some(ch), &e, None)).await,
                };
                if let Some(claim) = self.claim(ch, false).await {
                    let app = self.app.clone();
                    self.start(claim, |out| watch(app, out, prefix));
                }
            }
        }
    }

    /// Tells the peer that what it sent on `ch` (`None`: on the connection)
    /// was refused, and why.
    async fn refuse(&self, ch: Option<Channel>, code: ProtocolErrorCode, message: String) {
        send(&self.out, protocol_error(ch, code, message)).await;
    }

    /// Reserves `ch` for a new op (a `transfer`: a download or an upload),
    /// or tells the peer why not: the channel is in use, the connection has
    /// all the channels it may have, or the token all its transfers (counted
    /// as HTTP transfers are). Messages are handled one at a time, so the
    /// reservation holds until the op is bound.
    async fn claim(&self, ch: Channel, transfer: bool) -> Option<Claim> {
        let (busy, in_use) = {
            let channels = self.channels.lock().unwrap();
            (channels.contains_key(&ch), channels.len())
        };
        if busy {
            let message = format!("channel {ch} is in use; cancel it or pick another");
            self.refuse(Some(ch), ProtocolErrorCode::ChannelBusy, message)
                .await;
            return None;
        }
        if in_use >= self.max_channels {
            let e = Error::LimitReached(format!(
                "this connection has {} channels in use, its limit; \
                 wait for one to end or cancel one",
                self.max_channels
            ));
            send(&self.out, api_error(Some(ch), &e, None)).await;
            return None;
        }
        let slot = if transfer {
            TransferSlot::take(&self.app, &self.grant)
        } else {
            Ok(None)
        };
        match slot {
            Ok(slot) => Some(Claim {
                ch,
                id: self.bindings_made.fetch_add(1, Ordering::Relaxed),
                slot,
            }),
            Err(e) => {
                send(&self.out, api_error(Some(ch), &e, None)).await;
                None
            }
        }
    }

    /// Binds `claim`'s channel to a task running `op`.
    fn start<F>(&self, claim: Claim, op: impl FnOnce(BindingOut) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let out = self.binding_out(claim.ch, claim.id);
        let mut channels = self.channels.lock().unwrap();
        // Spawned under the lock, so the op cannot end before it is bound.
        let task = tokio::spawn(op(out));
        let binding = Binding {
            id: claim.id,
            op: Op::Task(task),
            _slot: claim.slot,
        };
        channels.insert(claim.ch, binding);
    }

    fn binding_out(&self, ch: Channel, id: u64) -> BindingOut {
        BindingOut {
            out: self.out.clone(),
            channels: self.channels.clone(),
            ch,
            id,
        }
    }

    /// Creates the session `request` asks for, if this connection can
    /// carry its chunks; returns its id.
    async fn create_upload(&self, request: CreateUpload) -> Result<String> {
        self.grant.allow(&request.path, Scope::Write)?;
        if request.size.is_none() {
            return Err(needs_size());
        }
        self.check_chunks_fit(self.app.uploads().chunk_size_for(&request)?)?;
        let created = self
            .app
            .uploads()
            .create(request, self.grant.owner())
            .await?;
        Ok(created.id)
    }

    /// Refuses chunks of `chunk_size` if one of them and its header is
    /// more than one message may hold: the connection would be closed at
    /// the first (docs/PROTOCOL.md).
    fn check_chunks_fit(&self, chunk_size: u64) -> Result<()> {
        let max = self.app.config().ws_max_message as u64;
        if chunk_size.saturating_add(FRAME_HEADER_LEN as u64) <= max {
            return Ok(());
        }
        Err(Error::BadRequest(format!(
            "chunks of {chunk_size} bytes and their {FRAME_HEADER_LEN}-byte header do not fit \
             in one message of this server's WebSocket, at most {max} bytes: send them over \
             HTTP, or create the session with a smaller chunk_size"
        )))
    }

    async fn bind_upload(&self, claim: Claim, id: Result<String>) {
        let ch = claim.ch;
        let status = match id {
            Ok(id) => self.app.uploads().status(&id).await,
            Err(e) => Err(e),
        };
        let status = match status {
            Ok(s) => s,
            Err(e) => return send(&self.out, api_error(Some(ch), &e, None)).await,
        };
        let (Some(size), Some(chunk_count)) = (status.size, status.chunk_count) else {
            return send(&self.out, api_error(Some(ch), &needs_size(), None)).await;
        };
        if let Err(e) = self.check_chunks_fit(status.chunk_size) {
            return send(&self.out, api_error(Some(ch), &e, None)).await;
        }
        let layout = ChunkLayout {
            size,
            chunk_size: status.chunk_size,
        };
        let mut received = Received::default();
        for index in expand_runs(&status.received) {
            received.add(index, &layout);
        }
        let channel = Arc::new(UploadChannel {
            id: status.id.clone(),
            layout,
            received: Mutex::new(received),
        });
        let binding = Binding {
            id: claim.id,
            op: Op::Upload(channel),
            _slot: claim.slot,
        };
        self.channels.lock().unwrap().insert(ch, binding);
        let ready = ServerMessage::Ready {
            ch,
            id: status.id,
            size,
            chunk_size: status.chunk_size,
            chunk_count,
            received: status.received,
            expires_at: status.expires_at,
        };
        send(&self.out, ready).await;
    }

    /// The upload bound to `ch`, and its binding's number.
    fn upload(&self, ch: Channel) -> Option<(Arc<UploadChannel>, u64)> {
        match self.channels.lock().unwrap().get(&ch) {
            Some(Binding {
                id,
                op: Op::Upload(u),
                ..
            }) => Some((u.clone(), *id)),
            _ => None,
        }
    }

    /// The upload open on `ch` for a binary frame; without one, the peer is
    /// told so (`bad_frame`).
    async fn open_upload(&self, ch: Channel) -> Option<(Arc<UploadChannel>, u64)> {
        let upload = self.upload(ch);
        if upload.is_none() {
            self.refuse(Some(ch), ProtocolErrorCode::BadFrame, no_upload(ch))
                .await;
        }
        upload
    }

    async fn on_binary(&self, data: Bytes) {
        let Some((header, payload)) = FrameHeader::decode(&data) else {
            let message = format!(
                "a binary frame needs a 16-byte header; got {} bytes",
                data.len()
            );
            return self
                .refuse(None, ProtocolErrorCode::BadFrame, message)
                .await;
        };
        let ch = header.ch;
        let Some((upload, id)) = self.open_upload(ch).await else {
            return;
        };
        let layout = upload.layout;
        if header.offset % layout.chunk_size != 0
            || layout
                .chunk_range(header.offset / layout.chunk_size)
                .is_none()
        {
            let message = format!(
                "offset {} is not the start of a chunk of this upload",
                header.offset
            );
            return self
                .refuse(Some(ch), ProtocolErrorCode::BadFrame, message)
                .await;
        }
        let index = header.offset / layout.chunk_size;
        let payload = data.slice(data.len() - payload.len()..);
        // Waiting here stops reading from the socket: backpressure on the sender.
        let permit = self
            .writers
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        // Replies go to this binding only: after a `cancel` the chunk is
        // still written (the session stays), but not acknowledged.
        let (app, out) = (self.app.clone(), self.binding_out(ch, id));
        tokio::spawn(async move {
            let _permit = permit;
            let len = payload.len() as u64;
            let body = futures::stream::iter([Ok(payload)]).boxed();
            let mut body = body;
            let reply = match app
                .uploads()
                .put_chunk(&upload.id, index, header.crc32c, Some(len), &mut body)
                .await
            {
                Ok(()) => {
                    if !out.send(&ServerMessage::Ack { ch, index }).await {
                        return;
                    }
                    let mut received = upload.received.lock().unwrap();
                    received.add(index, &layout);
                    if !received.progress_due(&layout) {
                        return;
                    }
                    ServerMessage::Progress {
                        ch,
                        bytes_received: received.bytes,
                        chunk_count: layout.chunk_count(),
                        chunks_received: received.chunks.len() as u64,
                    }
                }
                Err(e) => api_error(Some(ch), &e, Some(index)),
            };
            out.send(&reply).await;
        });
    }

    async fn complete(&self, ch: Channel, sha256: Option<String>) {
        // A message, not a frame: refused as HTTP refuses a bad request.
        let Some((upload, _)) = self.upload(ch) else {
            let e = Error::BadRequest(no_upload(ch));
            return send(&self.out, api_error(Some(ch), &e, None)).await;
        };
        // Chunks still being written on this connection land first.
        let all = self
            .writers
            .acquire_many(CHUNK_WRITERS as u32)
            .await
            .expect("never closed");
        drop(all);
        let reply = match self.app.complete_upload(&upload.id, sha256).await {
            Ok(meta) => {
                self.channels.lock().unwrap().remove(&ch);
                ServerMessage::Done { ch, meta }
            }
            Err(e) => api_error(Some(ch), &e, None),
        };
        send(&self.out, reply).await;
    }

    fn stop_all(&self) {
        for (_, binding) in self.channels.lock().unwrap().drain() {
            if let Op::Task(task) = binding.op {
                task.abort();
            }
        }
    }
}

async fn download(
    app: AppState,
    out: BindingOut,
    path: RemotePath,
    offset: u64,
    length: Option<u64>,
) {
    let ch = out.ch;
    let last = match stream_file(&app, &out, &path, offset, length).await {
        Ok(meta) => ServerMessage::Eof { ch, meta },
        Err(e) => api_error(Some(ch), &e, None),
    };
    out.finish(&last).await;
}

async fn stream_file(
    app: &AppState,
    out: &BindingOut,
    path: &RemotePath,
    offset: u64,
    length: Option<u64>,
) -> Result<crate::protocol::FileMeta> {
    let opened = app.store().open_read(path).await?;
    let meta = opened.meta.clone();
    if offset > meta.size {
        return Err(Error::RangeNotSatisfiable { size: meta.size });
    }
    let end = length.map_or(meta.size, |l| offset.saturating_add(l).min(meta.size));
    if end == offset {
        return Ok(meta);
    }
    let range = crate::protocol::ByteRange {
        start: offset,
        end: end - 1,
    };
    let mut stream = opened.stream(Some(range)).await?;
    let mut position = offset;
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        for part in piece.chunks(crate::protocol::ws::MAX_DOWNLOAD_FRAME) {
            let frame = FrameHeader::frame(out.ch, position, part);
            position += part.len() as u64;
            if !out.send_frame(frame).await {
                return Err(Error::Network("cancelled or connection closed".into()));
            }
            app.metrics().sent(part.len());
        }
    }
    Ok(meta)
}

async fn watch(app: AppState, out: BindingOut, prefix: RemotePath) {
    let ch = out.ch;
    let mut changes = app.store().subscribe();
    loop {
        let message = match changes.recv().await {
            Ok(change) => match change.seen_from(&prefix) {
                Some(change) => ServerMessage::Change { ch, change },
                None => continue,
            },
            Err(RecvError::Lagged(missed)) => {
                let message = format!("{missed} changes were missed; re-read what you cache");
                protocol_error(Some(ch), ProtocolErrorCode::Lagged, message)
            }
            Err(RecvError::Closed) => return,
        };
        if !out.send(&message).await {
            return;
        }
    }
}

fn text(message: &ServerMessage) -> Message {
    Message::Text(
        serde_json::to_string(message)
            .expect("messages serialize")
            .into(),
    )
}

async fn send(out: &mpsc::Sender<Message>, message: ServerMessage) {
    // A closed queue means the connection is going away; nothing to tell.
    let _ = out.send(text(&message)).await;
}

fn protocol_error(ch: Option<Channel>, code: ProtocolErrorCode, message: String) -> ServerMessage {
    ServerMessage::Error {
        ch,
        code: WsErrorCode::Protocol(code),
        message,
        index: None,
        missing: None,
    }
}

fn api_error(ch: Option<Channel>, e: &Error, index: Option<u64>) -> ServerMessage {
    super::response::log_failure(e, "WebSocket request failed");
    let missing = match e {
        Error::MissingChunks(runs) => Some(runs.clone()),
        _ => None,
    };
    let code = match e.code() {
        ErrorCode::Internal => ErrorCode::StorageError,
        other => other,
    };
    ServerMessage::Error {
        ch,
        code: WsErrorCode::Api(code),
        message: e.to_string(),
        index,
        missing,
    }
}

fn no_upload(ch: Channel) -> String {
    format!("channel {ch} has no upload open")
}

/// An open-ended session (its size not yet known) is created and sized over
/// HTTP; the WebSocket carries sessions of a known size.
fn needs_size() -> Error {
    Error::BadRequest(
        "over the WebSocket an upload needs its size: create an open-ended session and declare its size over HTTP".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_bytes_count_each_chunk_once() {
        let layout = ChunkLayout {
            size: 2 * 1024 + 100,
            chunk_size: 1024,
        };
        let mut received = Received::default();
        for index in [2, 0, 2, 0] {
            received.add(index, &layout);
        }
        assert_eq!((received.chunks.len(), received.bytes), (2, 1124));
        received.add(1, &layout);
        assert_eq!(received.bytes, layout.size);
    }

    #[test]
    fn progress_is_sent_first_last_and_then_at_most_every_100_ms() {
        let layout = ChunkLayout {
            size: 4 * 1024,
            chunk_size: 1024,
        };
        let mut received = Received::default();
        let mut due = |index| {
            received.add(index, &layout);
            received.progress_due(&layout)
        };
        assert!(due(0), "the first");
        assert!(!due(1), "too soon after the first");
        std::thread::sleep(PROGRESS_EVERY);
        assert!(due(2), "a while later");
        assert!(due(3), "the last missing chunk");
    }
}
