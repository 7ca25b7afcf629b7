//! The change feed: one event per committed change, as sent on the WebSocket
//! (`change`) and on `GET /v1/events` (Server-Sent Events).

use serde::{Deserialize, Serialize};

use super::{EntryKind, RemotePath};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Created,
    Modified,
    Deleted,
    Renamed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub path: RemotePath,
    pub kind: ChangeKind,
    /// Whether `path` is a file or a directory.
    pub entry: EntryKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// For `renamed`: where it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<RemotePath>,
}

impl Change {
    /// True when a subscriber to `prefix` should see this change: the path (or,
    /// for a rename, either end) lies at or below `prefix`.
    pub fn matches(&self, prefix: &RemotePath) -> bool {
        self.path.starts_with(prefix) || self.from.as_ref().is_some_and(|f| f.starts_with(prefix))
    }
}
