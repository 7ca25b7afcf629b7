//! Inode numbers for remote paths: stable while mounted, and a short-lived
//! cache of each path's metadata.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::protocol::{FileMeta, RemotePath};

pub const ROOT_INO: u64 = 1;

#[derive(Default)]
struct Maps {
    /// Bumped by every rename, removal and invalidation: an answer the
    /// server gave before a change here must not be cached after it.
    changes: u64,
    by_path: HashMap<RemotePath, u64>,
    by_ino: HashMap<u64, Node>,
    next: u64,
}

struct Node {
    path: RemotePath,
    meta: Option<(FileMeta, Instant)>,
}

impl Maps {
    fn ino(&mut self, path: &RemotePath) -> u64 {
        if let Some(ino) = self.by_path.get(path) {
            return *ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_path.insert(path.clone(), ino);
        self.by_ino.insert(
            ino,
            Node {
                path: path.clone(),
                meta: None,
            },
        );
        ino
    }
}

/// The inode table of one mount.
pub struct Inodes {
    maps: Mutex<Maps>,
    ttl: Duration,
}

impl Inodes {
    pub fn new(ttl: Duration) -> Self {
        let mut maps = Maps {
            next: ROOT_INO + 1,
            ..Default::default()
        };
        maps.by_path.insert(RemotePath::root(), ROOT_INO);
        maps.by_ino.insert(
            ROOT_INO,
            Node {
                path: RemotePath::root(),
                meta: None,
            },
        );
        Self {
            maps: Mutex::new(maps),
            ttl,
        }
    }

    /// The inode of `path`, assigning one on first sight.
    pub fn ino(&self, path: &RemotePath) -> u64 {
        self.maps.lock().unwrap().ino(path)
    }

    /// The inode of `path` if one was assigned.
    pub fn known(&self, path: &RemotePath) -> Option<u64> {
        self.maps.lock().unwrap().by_path.get(path).copied()
    }

    pub fn path(&self, ino: u64) -> Option<RemotePath> {
        self.maps
            .lock()
            .unwrap()
            .by_ino
            .get(&ino)
            .map(|n| n.path.clone())
    }

    /// Where the namespace stands now; see [`Inodes::remember_unless_changed`].
    pub fn version(&self) -> u64 {
        self.maps.lock().unwrap().changes
    }

    /// Like [`Inodes::remember`] for an answer asked for at `version`, but
    /// caches nothing if the namespace changed meanwhile: a `stat` of a file
    /// renamed away while it was in flight must not bring the old name back.
    pub fn remember_unless_changed(&self, meta: &FileMeta, version: u64) -> u64 {
        let mut maps = self.maps.lock().unwrap();
        let ino = maps.ino(&meta.path);
        if maps.changes == version
            && let Some(node) = maps.by_ino.get_mut(&ino)
        {
            node.meta = Some((meta.clone(), Instant::now()));
        }
        ino
    }

    /// Remembers `meta` for its path and returns the path's inode.
    pub fn remember(&self, meta: &FileMeta) -> u64 {
        let version = self.version();
        self.remember_unless_changed(meta, version)
    }

    /// The cached metadata of `ino`, if still fresh.
    pub fn fresh_meta(&self, ino: u64) -> Option<FileMeta> {
        let maps = self.maps.lock().unwrap();
        let (meta, at) = maps.by_ino.get(&ino)?.meta.as_ref()?;
        (at.elapsed() < self.ttl).then(|| meta.clone())
    }

    /// Forgets the cached metadata of `path` (it changed or vanished).
    pub fn invalidate(&self, path: &RemotePath) {
        let mut maps = self.maps.lock().unwrap();
        maps.changes += 1;
        if let Some(ino) = maps.by_path.get(path).copied()
            && let Some(node) = maps.by_ino.get_mut(&ino)
        {
            node.meta = None;
        }
    }

    /// Forgets every cached metadata entry.
    pub fn invalidate_all(&self) {
        let mut maps = self.maps.lock().unwrap();
        maps.changes += 1;
        for node in maps.by_ino.values_mut() {
            node.meta = None;
        }
    }

    /// Moves `from` and everything below it to `to`, keeping inode numbers.
    pub fn rename(&self, from: &RemotePath, to: &RemotePath) {
        let mut maps = self.maps.lock().unwrap();
        maps.changes += 1;
        let moved: Vec<(RemotePath, u64)> = maps
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        // Whatever stood at the destination is replaced.
        if let Some(old) = maps.by_path.remove(to) {
            maps.by_ino.remove(&old);
        }
        for (old_path, ino) in moved {
            let Some(new_path) = old_path.moved(from, to) else {
                continue;
            };
            maps.by_path.remove(&old_path);
            maps.by_path.insert(new_path.clone(), ino);
            if let Some(node) = maps.by_ino.get_mut(&ino) {
                node.path = new_path;
                node.meta = None;
            }
        }
    }

    /// Forgets `path` (deleted); its inode number is not reused.
    pub fn remove(&self, path: &RemotePath) {
        let mut maps = self.maps.lock().unwrap();
        maps.changes += 1;
        if let Some(ino) = maps.by_path.remove(path) {
            maps.by_ino.remove(&ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RemotePath {
        s.parse().unwrap()
    }

    #[test]
    fn an_answer_from_before_a_rename_is_not_cached_after_it() {
        let t = Inodes::new(Duration::from_secs(60));
        let meta = FileMeta {
            path: p("d/config.lock"),
            kind: crate::protocol::EntryKind::File,
            size: 1,
            mtime: None,
            etag: Some("e".into()),
        };
        t.remember(&meta);
        // A getattr asks the server about the lock file; meanwhile it is
        // renamed over `config`, and only then does the answer arrive.
        let asked_at = t.version();
        t.rename(&p("d/config.lock"), &p("d/config"));
        let ino = t.remember_unless_changed(&meta, asked_at);
        assert_eq!(t.fresh_meta(ino), None, "the old name came back");
        // Nothing changed meanwhile: cached as usual.
        let asked_at = t.version();
        let ino = t.remember_unless_changed(&meta, asked_at);
        assert_eq!(t.fresh_meta(ino), Some(meta));
    }

    #[test]
    fn inode_numbers_are_stable_and_follow_renames() {
        let t = Inodes::new(Duration::from_secs(1));
        let a = t.ino(&p("a"));
        let ab = t.ino(&p("a/b"));
        assert_eq!(t.ino(&p("a")), a);
        assert_ne!(a, ab);
        t.rename(&p("a"), &p("z"));
        assert_eq!(t.known(&p("z")), Some(a));
        assert_eq!(t.known(&p("z/b")), Some(ab));
        assert_eq!(t.path(ab), Some(p("z/b")));
        assert_eq!(t.known(&p("a/b")), None);
        t.remove(&p("z/b"));
        assert_eq!(t.path(ab), None);
        assert_ne!(t.ino(&p("z/b")), ab, "numbers are not reused");
    }
}
