//! A change stream that survives disconnections.
//!
//! Consumers that cache (the mount, the agent) must treat [`WatchEvent::Resync`]
//! as "changes may have been missed": re-read what they hold.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Client;
use super::ws::WsConnection;
use crate::protocol::events::Change;
use crate::protocol::ws::{ProtocolErrorCode, ServerMessage, WsErrorCode};
use crate::protocol::{ErrorCode, RemotePath};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Change(Change),
    /// The stream was interrupted (reconnect, or the server said we lagged):
    /// changes may have been missed.
    Resync,
    /// The server refuses this watch (no token, a token that does not reach
    /// the prefix, a bad prefix): retrying cannot help, and the watcher
    /// stops after saying why.
    Refused(String),
}

/// Changes at or below a prefix, reconnecting with backoff. Dropping it stops
/// watching.
pub struct Watcher {
    events: mpsc::Receiver<WatchEvent>,
    task: JoinHandle<()>,
}

impl Watcher {
    pub fn start(client: &Client, prefix: &RemotePath) -> Watcher {
        let (tx, events) = mpsc::channel(256);
        let task = tokio::spawn(run(client.clone(), prefix.clone(), tx));
        Watcher { events, task }
    }

    /// The next event; `None` only if the watcher stopped.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.events.recv().await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(client: Client, prefix: RemotePath, tx: mpsc::Sender<WatchEvent>) {
    let mut attempt = 0u32;
    let mut connected_before = false;
    loop {
        let session = async {
            let conn: Arc<WsConnection> = WsConnection::connect(&client).await?;
            conn.watch(&prefix).await
        };
        match session.await {
            Ok(mut messages) => {
                attempt = 0;
                if connected_before && tx.send(WatchEvent::Resync).await.is_err() {
                    return;
                }
                connected_before = true;
                while let Some(message) = messages.recv().await {
                    let event = match message {
                        ServerMessage::Change { change, .. } => WatchEvent::Change(change),
                        ServerMessage::Error {
                            code: WsErrorCode::Protocol(ProtocolErrorCode::Lagged),
                            ..
                        } => WatchEvent::Resync,
                        ServerMessage::Error {
                            code: WsErrorCode::Api(code),
                            message,
                            ..
                        } if refusal(code) => {
                            let _ = tx.send(WatchEvent::Refused(message)).await;
                            return;
                        }
                        _ => continue,
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                tracing::info!("change feed disconnected; reconnecting");
            }
            Err(e) if refusal(e.code()) => {
                let _ = tx.send(WatchEvent::Refused(e.to_string())).await;
                return;
            }
            Err(e) => tracing::debug!(error = %e, "change feed unavailable"),
        }
        attempt += 1;
        let delay = client.retry_policy().delay(attempt.min(16), None);
        tokio::time::sleep(delay).await;
    }
}

/// Whether an error answering a watch is the server's final word on it.
fn refusal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Unauthorized
            | ErrorCode::Forbidden
            | ErrorCode::Expired
            | ErrorCode::InvalidPath
            | ErrorCode::NameTooLong
            | ErrorCode::BadRequest
    )
}
