//! File-system events for a folder, debounced, as paths to look at again.
//!
//! Events can be lost: the kernel's inotify queue overflows, or the number
//! of watches hits its limit. Both are reported with the setting to raise,
//! and the folder is then rescanned instead; the agent never goes silent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::Receiver;
use notify::RecursiveMode;
use notify::event::{
    AccessKind, AccessMode, EventKind, MetadataKind, ModifyKind, RemoveKind, RenameMode,
};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

/// How long events for a path are gathered before they are delivered.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// What the events mean for the folder.
#[derive(Debug, PartialEq, Eq)]
pub enum Notice {
    /// These paths (absolute) may have changed.
    Changed(Vec<PathBuf>),
    /// These files were closed after writing, with no change since.
    Closed(Vec<PathBuf>),
    /// A directory was moved or removed: look over these directories (its
    /// parents) a little later. Debouncing can drop one side of a rename
    /// (a directory renamed, then removed at once, shows only the removal
    /// of its new name), and this catches what was dropped.
    Recheck(Vec<PathBuf>),
    /// Events were lost: rescan everything. The text says why.
    Rescan(String),
    /// New directories can no longer be watched: rescan periodically.
    WatchLimit(String),
    /// The folder itself was moved away or removed. Its watches follow the
    /// old directory, if anything: a new one at its path goes unseen until
    /// watched anew.
    RootGone,
}

pub struct FolderWatch {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    pub events: Receiver<DebounceEventResult>,
}

/// Starts watching `root` recursively.
pub fn start(root: &Path) -> Result<FolderWatch, notify::Error> {
    let (tx, events) = crossbeam_channel::unbounded();
    let mut debouncer = new_debouncer(DEBOUNCE, None, tx)?;
    debouncer.watch(root, RecursiveMode::Recursive)?;
    Ok(FolderWatch {
        _debouncer: debouncer,
        events,
    })
}

/// Turns one delivery of the debouncer for the folder `root` into notices.
pub fn interpret(root: &Path, result: DebounceEventResult) -> Vec<Notice> {
    match result {
        Ok(events) => {
            let mut notices = Vec::new();
            if events
                .iter()
                .any(|e| leaves(&e.kind) && e.paths.iter().any(|p| p == root))
            {
                notices.push(Notice::RootGone);
            }
            let mut paths = Vec::new();
            let mut parents = Vec::new();
            // Whether each path's last change was its writer closing it.
            let mut closed = HashMap::new();
            for event in events {
                if event.need_rescan() {
                    notices.push(Notice::Rescan(overflow_message()));
                }
                tracing::trace!(kind = ?event.kind, paths = ?event.paths, "event");
                if changes_content(&event.kind) {
                    paths.extend(event.event.paths.iter().cloned());
                    let close = matches!(
                        event.kind,
                        EventKind::Access(AccessKind::Close(AccessMode::Write))
                    );
                    for path in &event.paths {
                        closed.insert(path.clone(), close);
                    }
                }
                if moves_a_directory(&event.kind, &event.paths) {
                    parents.extend(
                        event
                            .paths
                            .iter()
                            .filter_map(|p| p.parent())
                            .map(Path::to_owned),
                    );
                }
            }
            if !paths.is_empty() {
                notices.push(Notice::Changed(paths));
            }
            let mut closed: Vec<PathBuf> = closed
                .into_iter()
                .filter_map(|(path, close)| close.then_some(path))
                .collect();
            if !closed.is_empty() {
                closed.sort();
                notices.push(Notice::Closed(closed));
            }
            if !parents.is_empty() {
                parents.sort();
                parents.dedup();
                notices.push(Notice::Recheck(parents));
            }
            notices
        }
        Err(errors) => errors.iter().map(notice_for_error).collect(),
    }
}

/// Whether an event can mean new content or a new name. Opens and reads
/// cannot (and the agent's own scans cause them), and neither can access
/// times.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        _ => true,
    }
}

/// The path was removed or renamed away (inotify's `IN_DELETE_SELF` and
/// `IN_MOVE_SELF` for a watched directory).
fn leaves(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))
    )
}

/// A directory removed, or a rename that may concern one (its new name is a
/// directory, or only one side of it was seen).
fn moves_a_directory(kind: &EventKind, paths: &[PathBuf]) -> bool {
    match kind {
        EventKind::Remove(RemoveKind::Folder) => true,
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => paths.iter().any(|p| p.is_dir()),
        EventKind::Modify(ModifyKind::Name(_)) => true,
        _ => false,
    }
}

pub fn notice_for_error(error: &notify::Error) -> Notice {
    match error.kind {
        notify::ErrorKind::MaxFilesWatch => Notice::WatchLimit(watch_limit_message()),
        _ => Notice::Rescan(format!("file watching reported an error ({error})")),
    }
}

pub fn is_watch_limit(error: &notify::Error) -> bool {
    matches!(error.kind, notify::ErrorKind::MaxFilesWatch)
        || matches!(&error.kind, notify::ErrorKind::Io(e) if e.raw_os_error() == Some(28))
}

pub fn watch_limit_message() -> String {
    "the inotify watch limit is reached, so changes in some directories go unseen; \
     raise fs.inotify.max_user_watches (e.g. `sysctl fs.inotify.max_user_watches=524288`, \
     and in /etc/sysctl.d/ to keep it)"
        .to_owned()
}

fn overflow_message() -> String {
    "the kernel's inotify event queue overflowed and events were lost; rescanning the folder. \
     If this happens often, raise fs.inotify.max_queued_events \
     (e.g. `sysctl fs.inotify.max_queued_events=65536`)"
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{Event, Flag};
    use notify_debouncer_full::DebouncedEvent;

    #[test]
    fn watch_limit_and_overflow_name_the_setting_to_raise() {
        let limit = notify::Error::new(notify::ErrorKind::MaxFilesWatch);
        assert!(is_watch_limit(&limit));
        match notice_for_error(&limit) {
            Notice::WatchLimit(text) => assert!(text.contains("fs.inotify.max_user_watches")),
            other => panic!("{other:?}"),
        }
        let enospc = notify::Error::io(std::io::Error::from_raw_os_error(28));
        assert!(is_watch_limit(&enospc));

        let overflow = Event::new(EventKind::Other).set_flag(Flag::Rescan);
        let notices = interpret(
            Path::new("/root"),
            Ok(vec![DebouncedEvent::new(
                overflow,
                std::time::Instant::now(),
            )]),
        );
        match &notices[..] {
            [Notice::Rescan(text)] => assert!(text.contains("fs.inotify.max_queued_events")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn opens_reads_and_access_times_are_not_changes() {
        let at = std::time::Instant::now();
        let quiet = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)),
        ];
        for kind in quiet {
            let event = Event::new(kind).add_path("/a".into());
            assert_eq!(
                interpret(Path::new("/root"), Ok(vec![DebouncedEvent::new(event, at)])),
                [],
                "{kind:?}"
            );
        }
        let written = Event::new(EventKind::Access(AccessKind::Close(AccessMode::Write)))
            .add_path("/a".into());
        assert_eq!(
            interpret(
                Path::new("/root"),
                Ok(vec![DebouncedEvent::new(written, at)])
            ),
            [
                Notice::Changed(vec!["/a".into()]),
                Notice::Closed(vec!["/a".into()])
            ]
        );
    }

    #[test]
    fn a_close_followed_by_a_write_is_not_a_finished_file() {
        let at = std::time::Instant::now();
        let close = || {
            Event::new(EventKind::Access(AccessKind::Close(AccessMode::Write)))
                .add_path("/a".into())
        };
        let write = || Event::new(EventKind::Modify(ModifyKind::Any)).add_path("/a".into());
        let reopened = interpret(
            Path::new("/root"),
            Ok(vec![
                DebouncedEvent::new(close(), at),
                DebouncedEvent::new(write(), at),
            ]),
        );
        assert_eq!(reopened, [Notice::Changed(vec!["/a".into(), "/a".into()])]);
        let finished = interpret(
            Path::new("/root"),
            Ok(vec![
                DebouncedEvent::new(write(), at),
                DebouncedEvent::new(close(), at),
            ]),
        );
        assert_eq!(finished[1], Notice::Closed(vec!["/a".into()]));
    }

    #[test]
    fn a_removed_directory_gets_its_parent_looked_over() {
        let at = std::time::Instant::now();
        let event = Event::new(EventKind::Remove(RemoveKind::Folder)).add_path("/a/b/gone".into());
        assert_eq!(
            interpret(Path::new("/root"), Ok(vec![DebouncedEvent::new(event, at)])),
            [
                Notice::Changed(vec!["/a/b/gone".into()]),
                Notice::Recheck(vec!["/a/b".into()])
            ]
        );
        let file = Event::new(EventKind::Remove(RemoveKind::File)).add_path("/a/b/f".into());
        assert_eq!(
            interpret(Path::new("/root"), Ok(vec![DebouncedEvent::new(file, at)])),
            [Notice::Changed(vec!["/a/b/f".into()])]
        );
    }

    #[test]
    fn the_folder_moved_or_removed_is_noticed() {
        let at = std::time::Instant::now();
        let root = Path::new("/home/me/folder");
        for kind in [
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Remove(RemoveKind::Folder),
        ] {
            let event = Event::new(kind).add_path(root.into());
            let notices = interpret(root, Ok(vec![DebouncedEvent::new(event, at)]));
            assert_eq!(notices.first(), Some(&Notice::RootGone), "{kind:?}");
        }
        // Something in it renamed away is not the folder.
        let inner = Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::From)))
            .add_path(root.join("sub"));
        let notices = interpret(root, Ok(vec![DebouncedEvent::new(inner, at)]));
        assert!(!notices.contains(&Notice::RootGone), "{notices:?}");
    }

    #[test]
    fn changed_paths_are_passed_on() {
        let event = Event::new(EventKind::Any)
            .add_path("/a/x".into())
            .add_path("/a/y".into());
        let notices = interpret(
            Path::new("/root"),
            Ok(vec![DebouncedEvent::new(event, std::time::Instant::now())]),
        );
        assert_eq!(
            notices,
            [Notice::Changed(vec!["/a/x".into(), "/a/y".into()])]
        );
    }
}
