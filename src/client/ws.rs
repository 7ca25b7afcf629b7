//! The WebSocket transport (`ferry.v1`): one connection multiplexing uploads,
//! downloads and watches on channels. See docs/PROTOCOL.md.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;

use super::{Client, Progress, ProgressFn};
use crate::error::{Error, Result};
use crate::protocol::upload::{ChunkLayout, expand_runs};
use crate::protocol::ws::{
    Channel, ClientMessage, FrameHeader, SUBPROTOCOL, ServerMessage, WsErrorCode,
};
use crate::protocol::{ErrorCode, FileMeta, RemotePath};

/// Messages buffered per channel before the connection stops reading.
const CHANNEL_QUEUE: usize = 64;
/// Times one chunk is re-sent after the server refused it (CRC, length).
const CHUNK_RESENDS: u32 = 3;

/// Reads a binary frame of an upload: `(channel, start, len)`.
pub type ReadFrame<'a> = dyn Fn(Channel, u64, u64) -> futures::future::BoxFuture<'static, Result<Bytes>>
    + Send
    + Sync
    + 'a;

/// What a channel receives.
#[derive(Debug)]
pub enum Incoming {
    Message(ServerMessage),
    Data { offset: u64, payload: Bytes },
}

/// One WebSocket connection to a ferry server. Share it with `Arc`.
pub struct WsConnection {
    client: Client,
    out: mpsc::Sender<Message>,
    channels: Arc<Mutex<HashMap<Channel, mpsc::Sender<Incoming>>>>,
    next_channel: AtomicU32,
    closed: CancellationToken,
}

impl WsConnection {
    /// Opens `/v1/ws` on `client`'s server.
    pub async fn connect(client: &Client) -> Result<Arc<WsConnection>> {
        let url = format!("{}/v1/ws", client.base_url().replacen("http", "ws", 1));
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::BadRequest(format!("{url}: {e}")))?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        if let Some(authorization) = client.authorization() {
            request
                .headers_mut()
                .insert("authorization", authorization.clone());
        }
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(
                crate::protocol::upload::MAX_CHUNK_SIZE as usize + (1 << 20),
            ));
        let connector = client
            .tls()
            .map(tokio_tungstenite::Connector::Rustls)
            .unwrap_or(tokio_tungstenite::Connector::Plain);
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(connector),
        );
        let (socket, response) =
            tokio::time::timeout(std::time::Duration::from_secs(10), connecting)
                .await
                .map_err(|_| Error::Network(format!("{url}: WebSocket handshake timed out")))?
                .map_err(|e| refused_upgrade(&url, e))?;
        if response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes())
            != Some(SUBPROTOCOL.as_bytes())
        {
            return Err(Error::Network(format!(
                "{url}: the server did not accept {SUBPROTOCOL}"
            )));
        }
        let (mut sink, mut stream) = socket.split();
        let (out, mut queue) = mpsc::channel::<Message>(CHANNEL_QUEUE);
        let channels: Arc<Mutex<HashMap<Channel, mpsc::Sender<Incoming>>>> = Arc::default();
        let closed = CancellationToken::new();

        let writer_closed = closed.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    m = queue.recv() => m,
                    _ = writer_closed.cancelled() => None,
                };
                let Some(message) = message else { break };
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
            writer_closed.cancel();
        });

        let (reader_channels, reader_closed) = (channels.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = stream.next() => f,
                    _ = reader_closed.cancelled() => None,
                };
                let Some(Ok(frame)) = frame else { break };
                let (ch, incoming) = match frame {
                    Message::Text(text) => {
                        match serde_json::from_str::<ServerMessage>(text.as_str()) {
                            Ok(message) => (channel_of(&message), Incoming::Message(message)),
                            Err(e) => {
                                tracing::warn!(error = %e, "unreadable message from the server");
                                continue;
                            }
                        }
                    }
                    Message::Binary(data) => match FrameHeader::decode(&data) {
                        Some((header, payload)) => {
                            let payload = data.slice(data.len() - payload.len()..);
                            (
                                Some(header.ch),
                                Incoming::Data {
                                    offset: header.offset,
                                    payload,
                                },
                            )
                        }
                        None => continue,
                    },
                    Message::Close(_) => break,
                    _ => continue,
                };
                let target = ch.and_then(|ch| reader_channels.lock().unwrap().get(&ch).cloned());
                match target {
                    Some(tx) => {
                        let _ = tx.send(incoming).await;
                    }
                    None => tracing::debug!(?incoming, "message for no channel"),
                }
            }
            reader_closed.cancel();
            // Dropping every sender tells each channel the connection is gone.
            reader_channels.lock().unwrap().clear();
        });

        Ok(Arc::new(WsConnection {
            client: client.clone(),
            out,
            channels,
            next_channel: AtomicU32::new(1),
            closed,
        }))
    }

    /// Closes the connection; transfers on it fail with a network error.
    pub fn close(&self) {
        self.closed.cancel();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    fn register(&self) -> (Channel, mpsc::Receiver<Incoming>) {
        let ch = self.next_channel.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
        self.channels.lock().unwrap().insert(ch, tx);
        (ch, rx)
    }

    fn open_channel(&self) -> ChannelGuard<'_> {
        let (ch, rx) = self.register();
        ChannelGuard { conn: self, ch, rx }
    }

    async fn send(&self, message: Message) -> Result<()> {
        tokio::select! {
            sent = self.out.send(message) => sent.map_err(|_| gone()),
            _ = self.closed.cancelled() => Err(gone()),
        }
    }

    async fn send_json(&self, message: &ClientMessage) -> Result<()> {
        let text = serde_json::to_string(message).expect("messages serialize");
        self.send(Message::Text(text.into())).await
    }

    /// Sends the chunks session `id` lacks, several in flight, and commits it.
    /// `read_frame(ch, start, len)` gives the binary frame carrying the
    /// file's bytes `start..start + len` on channel `ch`; `sha256`, awaited
    /// once every chunk is acknowledged, the digest to commit with.
    pub async fn upload(
        &self,
        id: &str,
        read_frame: &ReadFrame<'_>,
        parallel: usize,
        progress: Option<&ProgressFn>,
        sha256: futures::future::BoxFuture<'_, Result<Option<String>>>,
    ) -> Result<FileMeta> {
        let mut channel = self.open_channel();
        let ch = channel.ch;
        self.send_json(&ClientMessage::UploadOpen {
            ch,
            id: id.to_owned(),
        })
        .await?;
        let (layout, received) = match channel.next_message().await? {
            ServerMessage::Ready {
                size,
                chunk_size,
                received,
                ..
            } => (
                ChunkLayout { size, chunk_size },
                expand_runs(&received).collect::<HashSet<u64>>(),
            ),
            other => return Err(unexpected(other)),
        };
        let mut pending: VecDeque<u64> = (0..layout.chunk_count())
            .filter(|i| !received.contains(i))
            .collect();
        let mut in_flight: HashSet<u64> = HashSet::new();
        let mut resends: HashMap<u64, u32> = HashMap::new();
        let mut done_bytes: u64 = received.iter().filter_map(|i| layout.chunk_len(*i)).sum();
        while !pending.is_empty() || !in_flight.is_empty() {
            while in_flight.len() < parallel.max(1) {
                let Some(index) = pending.pop_front() else {
                    break;
                };
                let (start, end) = layout.chunk_range(index).expect("index within the layout");
                let frame = read_frame(ch, start, end - start).await?;
                self.client.count_chunk_bytes(end - start);
                self.send(Message::Binary(frame)).await?;
                in_flight.insert(index);
            }
            match channel.next_message().await? {
                ServerMessage::Ack { index, .. } => {
                    if in_flight.remove(&index) {
                        done_bytes += layout.chunk_len(index).unwrap_or(0);
                        if let Some(progress) = progress {
                            progress(Progress {
                                done: done_bytes,
                                total: layout.size,
                            });
                        }
                    }
                }
                ServerMessage::Progress { .. } => {}
                ServerMessage::Error {
                    index: Some(index),
                    code,
                    message,
                    ..
                } if in_flight.remove(&index) => {
                    let tries = resends.entry(index).or_default();
                    *tries += 1;
                    if *tries > CHUNK_RESENDS {
                        return Err(remote_error(code, message, None));
                    }
                    pending.push_back(index);
                }
                other => return Err(unexpected(other)),
            }
        }
        let sha256 = sha256.await?;
        self.send_json(&ClientMessage::UploadComplete { ch, sha256 })
            .await?;
        loop {
            match channel.next_message().await? {
                ServerMessage::Done { meta, .. } => return Ok(meta),
                ServerMessage::Progress { .. } | ServerMessage::Ack { .. } => {}
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Streams `length` bytes (to the end when `None`) of `path` from `offset`
    /// into `sink`, in order. Returns the version sent.
    pub async fn download(
        &self,
        path: &RemotePath,
        offset: u64,
        length: Option<u64>,
        sink: &mut (dyn FnMut(u64, Bytes) -> Result<()> + Send),
    ) -> Result<FileMeta> {
        let mut channel = self.open_channel();
        let ch = channel.ch;
        self.send_json(&ClientMessage::Download {
            ch,
            path: path.clone(),
            offset,
            length,
        })
        .await?;
        let mut expected = offset;
        loop {
            match channel.next().await? {
                Incoming::Data { offset, payload } => {
                    if offset != expected {
                        return Err(Error::Network(format!(
                            "download of {path}: expected offset {expected}, got {offset}"
                        )));
                    }
                    expected += payload.len() as u64;
                    sink(offset, payload)?;
                }
                Incoming::Message(ServerMessage::Eof { meta, .. }) => return Ok(meta),
                Incoming::Message(other) => return Err(unexpected(other)),
            }
        }
    }

    /// Subscribes to changes at or below `prefix`. Messages arrive on the
    /// returned channel until the connection drops (then it closes).
    pub async fn watch(
        self: &Arc<Self>,
        prefix: &RemotePath,
    ) -> Result<mpsc::Receiver<ServerMessage>> {
        let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
        let (ch, mut raw) = self.register();
        if let Err(e) = self
            .send_json(&ClientMessage::Watch {
                ch,
                prefix: prefix.clone(),
            })
            .await
        {
            self.channels.lock().unwrap().remove(&ch);
            return Err(e);
        }
        let conn = self.clone();
        tokio::spawn(async move {
            while let Some(incoming) = raw.recv().await {
                if let Incoming::Message(message) = incoming
                    && tx.send(message).await.is_err()
                {
                    break;
                }
            }
            conn.channels.lock().unwrap().remove(&ch);
        });
        Ok(rx)
    }
}

/// A channel in use; unregistered when dropped.
struct ChannelGuard<'a> {
    conn: &'a WsConnection,
    ch: Channel,
    rx: mpsc::Receiver<Incoming>,
}

impl ChannelGuard<'_> {
    async fn next(&mut self) -> Result<Incoming> {
        self.rx.recv().await.ok_or_else(gone)
    }

    async fn next_message(&mut self) -> Result<ServerMessage> {
        loop {
            match self.next().await? {
                Incoming::Message(m) => return Ok(m),
                Incoming::Data { .. } => continue,
            }
        }
    }
}

impl Drop for ChannelGuard<'_> {
    fn drop(&mut self) {
        self.conn.channels.lock().unwrap().remove(&self.ch);
    }
}

fn channel_of(message: &ServerMessage) -> Option<Channel> {
    match message {
        ServerMessage::Ready { ch, .. }
        | ServerMessage::Ack { ch, .. }
        | ServerMessage::Progress { ch, .. }
        | ServerMessage::Done { ch, .. }
        | ServerMessage::Eof { ch, .. }
        | ServerMessage::Status { ch, .. }
        | ServerMessage::Cancelled { ch }
        | ServerMessage::Change { ch, .. } => Some(*ch),
        ServerMessage::Error { ch, .. } => *ch,
    }
}

fn gone() -> Error {
    Error::Network("the WebSocket connection closed".into())
}

fn unexpected(message: ServerMessage) -> Error {
    match message {
        ServerMessage::Error {
            code,
            message,
            missing,
            ..
        } => remote_error(code, message, missing),
        other => Error::Network(format!("unexpected message from the server: {other:?}")),
    }
}

fn remote_error(code: WsErrorCode, message: String, missing: Option<Vec<[u64; 2]>>) -> Error {
    match code {
        WsErrorCode::Api(ErrorCode::MissingChunks) => {
            Error::MissingChunks(missing.unwrap_or_default())
        }
        WsErrorCode::Api(code) => Error::Remote {
            code,
            status: code.status(),
            message,
        },
        WsErrorCode::Protocol(_) => Error::Network(format!("protocol error: {message}")),
    }
}

/// The error of a failed WebSocket upgrade: the server's own, when it
/// refused the caller (401, 403, 410: asking again cannot help); a network
/// error otherwise, which callers retry or get past over HTTP.
fn refused_upgrade(url: &str, e: tokio_tungstenite::tungstenite::Error) -> Error {
    if let tokio_tungstenite::tungstenite::Error::Http(response) = &e
        && matches!(response.status().as_u16(), 401 | 403 | 410)
        && let Some(body) = response.body()
        && let Ok(parsed) = serde_json::from_slice::<crate::protocol::ErrorBody>(body)
    {
        return Error::Remote {
            code: parsed.error.code,
            status: response.status().as_u16(),
            message: parsed.error.message,
        };
    }
    Error::Network(format!("{url}: {e}"))
}
