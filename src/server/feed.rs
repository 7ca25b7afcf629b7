//! The change feed: every committed change this node makes, published once to
//! every subscriber (WebSocket `watch`, `GET /v1/events`).

use tokio::sync::broadcast;

use crate::protocol::events::{Change, ChangeKind};
use crate::protocol::{EntryKind, FileMeta, RemotePath};

/// Events a subscriber may fall behind by before it is told it lagged.
const BACKLOG: usize = 4096;

#[derive(Clone, Debug)]
pub struct ChangeFeed {
    sender: broadcast::Sender<Change>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(BACKLOG).0,
        }
    }
}

impl ChangeFeed {
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.sender.subscribe()
    }

    pub fn publish(&self, change: Change) {
        // No subscriber is not an error.
        let _ = self.sender.send(change);
    }

    /// A file or directory appeared or changed, as `meta` describes it now.
    pub fn written(&self, meta: &FileMeta, existed: bool) {
        self.publish(Change {
            path: meta.path.clone(),
            kind: if existed {
                ChangeKind::Modified
            } else {
                ChangeKind::Created
            },
            entry: meta.kind,
            etag: meta.etag.clone(),
            size: (meta.kind == EntryKind::File).then_some(meta.size),
            from: None,
        });
    }

    pub fn deleted(&self, path: &RemotePath, entry: EntryKind) {
        self.publish(Change {
            path: path.clone(),
            kind: ChangeKind::Deleted,
            entry,
            etag: None,
            size: None,
            from: None,
        });
    }

    pub fn renamed(&self, from: &RemotePath, meta: &FileMeta) {
        self.publish(Change {
            path: meta.path.clone(),
            kind: ChangeKind::Renamed,
            entry: meta.kind,
            etag: meta.etag.clone(),
            size: (meta.kind == EntryKind::File).then_some(meta.size),
            from: Some(from.clone()),
        });
    }
}
