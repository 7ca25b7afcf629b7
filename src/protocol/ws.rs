//! The WebSocket protocol (`GET /v1/ws`, subprotocol `ferry.v1`): JSON control
//! messages in text frames, data in binary frames behind a 16-byte header.
//! docs/PROTOCOL.md is the normative description.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::events::Change;
use super::upload::CreateUpload;
use super::{ErrorCode, FileMeta, RemotePath};

pub const SUBPROTOCOL: &str = "ferry.v1";
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest payload of a download frame.
pub const MAX_DOWNLOAD_FRAME: usize = 1 << 20;

/// A channel number, chosen by the client, naming one transfer on a connection.
pub type Channel = u32;

/// Messages a client sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum ClientMessage {
    /// Create a session and bind it to `ch`.
    #[serde(rename = "upload.create")]
    UploadCreate {
        ch: Channel,
        #[serde(flatten)]
        request: CreateUpload,
    },
    /// Bind an existing session to `ch`.
    #[serde(rename = "upload.open")]
    UploadOpen { ch: Channel, id: String },
    #[serde(rename = "upload.complete")]
    UploadComplete {
        ch: Channel,
        /// As in the body of `POST /v1/uploads/{id}/complete`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    /// Stream `length` bytes (to the end when absent) of `path` from `offset`.
    #[serde(rename = "download")]
    Download {
        ch: Channel,
        path: RemotePath,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        length: Option<u64>,
    },
    #[serde(rename = "status")]
    Status { ch: Channel, id: String },
    /// Stop what `ch` is doing (a download, a watch) and free the channel.
    #[serde(rename = "cancel")]
    Cancel { ch: Channel },
    /// Subscribe `ch` to changes at or below `prefix`.
    #[serde(rename = "watch")]
    Watch {
        #[serde(default)]
        ch: Channel,
        #[serde(default)]
        prefix: RemotePath,
    },
}

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum ServerMessage {
    /// The channel is bound to session `id`; `received` lists chunk runs it has.
    #[serde(rename = "ready")]
    Ready {
        ch: Channel,
        id: String,
        size: u64,
        chunk_size: u64,
        chunk_count: u64,
        received: Vec<[u64; 2]>,
        expires_at: DateTime<Utc>,
    },
    /// Chunk `index` is durable.
    #[serde(rename = "ack")]
    Ack { ch: Channel, index: u64 },
    #[serde(rename = "progress")]
    Progress {
        ch: Channel,
        bytes_received: u64,
        chunk_count: u64,
        chunks_received: u64,
    },
    /// The upload is committed.
    #[serde(rename = "done")]
    Done { ch: Channel, meta: FileMeta },
    /// A download sent its last frame.
    #[serde(rename = "eof")]
    Eof { ch: Channel, meta: FileMeta },
    #[serde(rename = "status")]
    Status {
        ch: Channel,
        #[serde(flatten)]
        status: super::upload::UploadStatus,
    },
    #[serde(rename = "cancelled")]
    Cancelled { ch: Channel },
    #[serde(rename = "error")]
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ch: Option<Channel>,
        code: WsErrorCode,
        message: String,
        /// The chunk a data-frame error is about.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        missing: Option<Vec<[u64; 2]>>,
    },
    #[serde(rename = "change")]
    Change {
        ch: Channel,
        #[serde(flatten)]
        change: Change,
    },
}

/// Error codes on the WebSocket: the HTTP API's, plus the protocol's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WsErrorCode {
    // First: `ErrorCode` would take any unknown string as `unknown`.
    Protocol(ProtocolErrorCode),
    Api(ErrorCode),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolErrorCode {
    /// A text frame that is not a known message.
    BadMessage,
    /// A binary frame shorter than its header or for a channel with no upload.
    BadFrame,
    /// The channel is already in use.
    ChannelBusy,
    /// A watch subscriber fell behind and missed events.
    Lagged,
}

/// The header of every binary frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub ch: Channel,
    /// Byte offset of the payload in the file.
    pub offset: u64,
    /// CRC32C of the payload.
    pub crc32c: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[..4].copy_from_slice(&self.ch.to_be_bytes());
        out[4..12].copy_from_slice(&self.offset.to_be_bytes());
        out[12..].copy_from_slice(&self.crc32c.to_be_bytes());
        out
    }

    /// Splits a binary frame into its header and payload.
    pub fn decode(frame: &[u8]) -> Option<(FrameHeader, &[u8])> {
        if frame.len() < FRAME_HEADER_LEN {
            return None;
        }
        let header = FrameHeader {
            ch: u32::from_be_bytes(frame[..4].try_into().ok()?),
            offset: u64::from_be_bytes(frame[4..12].try_into().ok()?),
            crc32c: u32::from_be_bytes(frame[12..16].try_into().ok()?),
        };
        Some((header, &frame[FRAME_HEADER_LEN..]))
    }

    /// A whole binary frame: header then payload.
    pub fn frame(ch: Channel, offset: u64, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; FRAME_HEADER_LEN + payload.len()];
        frame[FRAME_HEADER_LEN..].copy_from_slice(payload);
        Self::fill_in(ch, offset, &mut frame);
        frame
    }

    /// Writes the header into the first [`FRAME_HEADER_LEN`] bytes of
    /// `frame`, for the payload that follows them: a payload read straight
    /// into place needs no copy.
    pub fn fill_in(ch: Channel, offset: u64, frame: &mut [u8]) {
        let (head, payload) = frame.split_at_mut(FRAME_HEADER_LEN);
        let header = FrameHeader {
            ch,
            offset,
            crc32c: crc32c::crc32c(payload),
        };
        head.copy_from_slice(&header.encode());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let frame = FrameHeader::frame(7, 1 << 40, b"hello");
        let (header, payload) = FrameHeader::decode(&frame).unwrap();
        assert_eq!(
            (header.ch, header.offset, payload),
            (7, 1 << 40, &b"hello"[..])
        );
        assert_eq!(header.crc32c, crc32c::crc32c(b"hello"));
        assert!(FrameHeader::decode(&frame[..15]).is_none());
    }

    #[test]
    fn messages_parse_as_documented() {
        let m: ClientMessage =
            serde_json::from_str(r#"{"op":"upload.create","ch":1,"path":"a/b","size":10}"#)
                .unwrap();
        assert!(matches!(m, ClientMessage::UploadCreate { ch: 1, .. }));
        let m: ClientMessage = serde_json::from_str(r#"{"op":"watch","prefix":"docs"}"#).unwrap();
        assert!(matches!(m, ClientMessage::Watch { ch: 0, .. }));
        assert!(serde_json::from_str::<ClientMessage>(r#"{"op":"nope","ch":1}"#).is_err());
        let e = ServerMessage::Error {
            ch: Some(3),
            code: WsErrorCode::Protocol(ProtocolErrorCode::Lagged),
            message: "x".into(),
            index: None,
            missing: None,
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"op":"error","ch":3,"code":"lagged","message":"x"}"#
        );
        assert_eq!(serde_json::from_str::<ServerMessage>(&text).unwrap(), e);
    }
}
