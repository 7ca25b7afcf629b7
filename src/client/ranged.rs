//! `RangedReader`: `AsyncRead + AsyncSeek` over one version of a remote file.
//!
//! Reading streams one open-ended range GET; a seek drops it and the next read
//! opens a new one at the new position. Every request is pinned to the etag
//! seen at open, so a reader never mixes two versions: a file replaced
//! underneath fails the next request instead.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};

use super::Client;
use crate::error::{Error, Result};
use crate::protocol::{FileMeta, RemotePath};

type ByteStream = BoxStream<'static, reqwest::Result<Bytes>>;

pub struct RangedReader {
    client: Client,
    meta: FileMeta,
    pos: u64,
    state: State,
}

enum State {
    Idle,
    Opening(BoxFuture<'static, Result<ByteStream>>),
    Streaming { stream: ByteStream, buffered: Bytes },
}

impl RangedReader {
    /// Opens the current version of `path`.
    pub async fn open(client: &Client, path: &RemotePath) -> Result<RangedReader> {
        let meta = client.stat(path).await?;
        if meta.kind != crate::protocol::EntryKind::File {
            return Err(Error::IsADirectory(path.to_string()));
        }
        Ok(RangedReader {
            client: client.clone(),
            meta,
            pos: 0,
            state: State::Idle,
        })
    }

    /// The version being read.
    pub fn meta(&self) -> &FileMeta {
        &self.meta
    }

    fn open_at(&self, pos: u64) -> BoxFuture<'static, Result<ByteStream>> {
        let client = self.client.clone();
        let path = self.meta.path.clone();
        let etag = self.meta.etag.clone();
        async move {
            let resp = client.get_range(&path, pos, None, etag.as_deref()).await?;
            Ok(resp.bytes_stream().boxed())
        }
        .boxed()
    }
}

fn to_io(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl AsyncRead for RangedReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos >= this.meta.size || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match &mut this.state {
                State::Idle => this.state = State::Opening(this.open_at(this.pos)),
                State::Opening(opening) => match ready!(opening.poll_unpin(cx)) {
                    Ok(stream) => {
                        this.state = State::Streaming {
                            stream,
                            buffered: Bytes::new(),
                        }
                    }
                    Err(e) => {
                        this.state = State::Idle;
                        return Poll::Ready(Err(to_io(e)));
                    }
                },
                State::Streaming { stream, buffered } => {
                    if !buffered.is_empty() {
                        let n = buffered.len().min(buf.remaining());
                        buf.put_slice(&buffered.split_to(n));
                        this.pos += n as u64;
                        return Poll::Ready(Ok(()));
                    }
                    match ready!(stream.poll_next_unpin(cx)) {
                        Some(Ok(piece)) => *buffered = piece,
                        Some(Err(e)) => {
                            this.state = State::Idle;
                            return Poll::Ready(Err(to_io(e)));
                        }
                        None => {
                            this.state = State::Idle;
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the server ended the body early",
                            )));
                        }
                    }
                }
            }
        }
    }
}

impl AsyncSeek for RangedReader {
    fn start_seek(self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let target = match position {
            io::SeekFrom::Start(p) => Some(p),
            io::SeekFrom::End(d) => this.meta.size.checked_add_signed(d),
            io::SeekFrom::Current(d) => this.pos.checked_add_signed(d),
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        if target != this.pos {
            this.pos = target;
            this.state = State::Idle;
        }
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}
