//! Walking the local folder: regular files only (symbolic links, sockets and
//! devices are not synced), ignored paths left out, names that cannot be
//! remote paths reported and skipped.

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::filter::Filter;
use crate::journal::FileStamp;

#[derive(Debug, Default)]
pub struct LocalTree {
    pub files: BTreeMap<String, FileStamp>,
    /// Directories that could not be read: their journal records must not be
    /// mistaken for deletions.
    pub unreadable: Vec<String>,
}

pub fn stamp(meta: &Metadata) -> FileStamp {
    FileStamp {
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        inode: meta.ino(),
    }
}

/// The stamp of one regular file, `None` if it is gone or not a regular file.
pub fn stat_file(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    meta.file_type().is_file().then(|| stamp(&meta))
}

/// Regular files at or below `scope` (relative, `""` for everything).
/// `accept` says whether a relative path can be synced at all.
pub fn scan(root: &Path, scope: &str, filter: &Filter, accept: &dyn Fn(&str) -> bool) -> LocalTree {
    let mut tree = LocalTree::default();
    if !scope.is_empty() {
        let meta = match std::fs::symlink_metadata(root.join(scope)) {
            Ok(meta) => meta,
            Err(e) if is_gone(&e) => return tree,
            Err(e) => {
                tracing::warn!(path = %root.join(scope).display(), error = %e, "cannot read; left as it is");
                tree.unreadable.push(scope.to_owned());
                return tree;
            }
        };
        let is_dir = meta.file_type().is_dir();
        if filter.is_ignored(Path::new(scope), is_dir) {
            return tree;
        }
        if meta.file_type().is_file() {
            if accept(scope) {
                tree.files.insert(scope.to_owned(), stamp(&meta));
            }
            return tree;
        }
        if !is_dir {
            return tree;
        }
    }
    walk(root, scope, filter, accept, &mut tree);
    tree
}

fn walk(
    root: &Path,
    dir: &str,
    filter: &Filter,
    accept: &dyn Fn(&str) -> bool,
    tree: &mut LocalTree,
) {
    let entries = match std::fs::read_dir(root.join(dir)) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(dir = %root.join(dir).display(), error = %e, "cannot read a directory; its files are left as they are");
            tree.unreadable.push(dir.to_owned());
            return;
        }
    };
    let mut warned = false;
    for entry in entries {
        let Ok(entry) = entry else {
            tree.unreadable.push(dir.to_owned());
            continue;
        };
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            tracing::warn!(path = %entry.path().display(), "name is not UTF-8; not synced");
            continue;
        };
        let rel = if dir.is_empty() {
            name.to_owned()
        } else {
            format!("{dir}/{name}")
        };
        let meta = match std::fs::symlink_metadata(entry.path()) {
            Ok(meta) => meta,
            // Removed since the listing: a deletion like any other.
            Err(e) if is_gone(&e) => continue,
            // Not "gone" (a directory listable but not searchable, say):
            // what is there stays as it is, here and on the server.
            Err(e) => {
                if !warned {
                    tracing::warn!(path = %entry.path().display(), error = %e,
                        "cannot read; left as it is (and any other entry of its directory that cannot be read)");
                    warned = true;
                }
                tree.unreadable.push(rel);
                continue;
            }
        };
        let kind = meta.file_type();
        if filter.excludes(Path::new(&rel), kind.is_dir()) {
            continue;
        }
        if kind.is_dir() {
            walk(root, &rel, filter, accept, tree);
        } else if kind.is_file() && accept(&rel) {
            tree.files.insert(rel, stamp(&meta));
        }
    }
}

/// Whether `e` says the path no longer exists (rather than that it cannot
/// be read).
fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}
