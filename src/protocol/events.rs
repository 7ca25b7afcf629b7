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
    /// The change as a subscriber to `prefix` sees it, if at all. A rename
    /// with one end outside `prefix` arrives as a creation (moved in) or a
    /// deletion (moved out), never naming the path outside.
    pub fn seen_from(&self, prefix: &RemotePath) -> Option<Change> {
        let inside = self.path.starts_with(prefix);
        let from_inside = self.from.as_ref().map(|f| f.starts_with(prefix));
        match (inside, from_inside) {
            (true, None | Some(true)) => Some(self.clone()),
            (true, Some(false)) => Some(Change {
                kind: ChangeKind::Created,
                from: None,
                ..self.clone()
            }),
            (false, Some(true)) => Some(Change {
                path: self.from.clone().expect("a rename has a source"),
                kind: ChangeKind::Deleted,
                etag: None,
                size: None,
                from: None,
                ..self.clone()
            }),
            (false, None | Some(false)) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renamed(from: &str, to: &str) -> Change {
        Change {
            path: to.parse().unwrap(),
            kind: ChangeKind::Renamed,
            entry: EntryKind::File,
            etag: Some("e".into()),
            size: Some(1),
            from: Some(from.parse().unwrap()),
        }
    }

    #[test]
    fn renames_across_the_prefix_never_name_the_other_side() {
        let prefix: RemotePath = "a".parse().unwrap();
        assert_eq!(
            renamed("a/x", "a/y").seen_from(&prefix),
            Some(renamed("a/x", "a/y"))
        );
        let moved_in = renamed("b/x", "a/x").seen_from(&prefix).unwrap();
        assert_eq!((moved_in.kind, moved_in.from), (ChangeKind::Created, None));
        let moved_out = renamed("a/x", "b/x").seen_from(&prefix).unwrap();
        assert_eq!(moved_out.kind, ChangeKind::Deleted);
        assert_eq!(moved_out.path.as_str(), "a/x");
        assert_eq!(renamed("b/x", "c/x").seen_from(&prefix), None);
        assert!(
            renamed("b/x", "c/x")
                .seen_from(&RemotePath::root())
                .is_some()
        );
    }
}
