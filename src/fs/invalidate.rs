//! Remote changes made elsewhere reach the mount through the change feed:
//! the driver's caches and the kernel's (entries, attributes, pages) are
//! dropped for every changed path as the event arrives.

use std::sync::Arc;

use fuser::{INodeNo, Notifier};

use super::core::MountCore;
use crate::client::watch::{WatchEvent, Watcher};
use crate::protocol::RemotePath;
use crate::protocol::events::ChangeKind;

pub async fn run(core: Arc<MountCore>, notifier: Notifier, mut watcher: Watcher) {
    let notifier = Arc::new(notifier);
    while let Some(event) = watcher.next().await {
        match event {
            WatchEvent::Change(change) => {
                // A directory that existed only through its entries goes
                // with the last of them, and no event names it: whatever was
                // above a removed path may have gone too.
                let gone = match change.kind {
                    ChangeKind::Deleted => Some(&change.path),
                    ChangeKind::Renamed => change.from.as_ref(),
                    ChangeKind::Created | ChangeKind::Modified => None,
                };
                let ancestors: Vec<RemotePath> =
                    gone.map(|p| p.ancestors().collect()).unwrap_or_default();
                let mut paths = vec![change.path];
                paths.extend(change.from);
                for path in paths {
                    forget(&core, &notifier, &path, Entry::Drop).await;
                }
                // Their attributes only: the kernel asks again, and learns a
                // gone one is gone. Their entries stay, so that the `rmdir`
                // ending an `rm -r` through this mount still reaches it.
                for path in ancestors {
                    forget(&core, &notifier, &path, Entry::Keep).await;
                }
            }
            // Events may have been missed: trust nothing cached.
            WatchEvent::Resync => core.inodes.invalidate_all(),
            WatchEvent::Refused(why) => {
                tracing::warn!(%why, "the server refuses the change feed: changes made elsewhere show after --attr-ttl only");
                return;
            }
        }
    }
}

/// Whether the kernel's entry for a changed path (its name in its parent)
/// is dropped along with its attributes and pages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    Drop,
    Keep,
}

async fn forget(core: &Arc<MountCore>, notifier: &Arc<Notifier>, path: &RemotePath, entry: Entry) {
    core.forget_path(path);
    if core.writes_in_flight(path) {
        // Our own upload landing: the kernel already sees this content, and
        // invalidating the entry under a waiting open would fail that open.
        return;
    }
    let entry = path
        .parent()
        .and_then(|parent| core.inodes.known(&parent))
        .zip(path.name().map(str::to_owned))
        .filter(|_| entry == Entry::Drop);
    let inode = core.inodes.known(path);
    let notifier = notifier.clone();
    // Notifications write to /dev/fuse and may wait on the kernel: keep them
    // off the threads that answer requests. Unknown entries are not errors.
    let _ = tokio::task::spawn_blocking(move || {
        if let Some((parent, name)) = entry {
            let _ = notifier.inval_entry(INodeNo(parent), name.as_ref());
        }
        if let Some(ino) = inode {
            let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
        }
    })
    .await;
}
