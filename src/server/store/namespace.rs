//! Directories over a flat object namespace.
//!
//! A directory exists while any object lies under it or its `.ferry-dir`
//! marker exists (on a local backend: while the directory exists on disk,
//! which the same operations keep in step). Files and directories never share
//! a path, and no file lies under a file.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};

use super::{Store, dir_meta, keys, plain_etag};
use crate::error::{Error, Result};
use crate::protocol::{EntryKind, FileMeta, ListEntry, ListPage, RemotePath};

/// Largest page a listing returns, whatever `limit` asks for.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// What a listing asks for.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub recursive: bool,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

impl Store {
    /// Metadata of the file or directory at `path`.
    pub async fn stat(&self, path: &RemotePath) -> Result<FileMeta> {
        if let Some(meta) = self.try_head_file(path).await? {
            return Ok(meta);
        }
        if self.is_dir(path).await? {
            return Ok(self.dir_meta_with_mtime(path).await);
        }
        Err(Error::NotFound(path.to_string()))
    }

    /// True when a directory exists at `path` (the root always does).
    pub async fn is_dir(&self, path: &RemotePath) -> Result<bool> {
        if path.is_root() {
            return Ok(true);
        }
        self.check_names(path, super::LOCAL_NAME_MAX)?;
        if let Some(dir) = self.local_path(path) {
            return Ok(tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()));
        }
        match self.objects.head(&keys::marker_path(path)).await {
            Ok(_) => return Ok(true),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let listing = self
            .objects
            .list_with_delimiter(keys::dir_prefix(path).as_ref())
            .await?;
        Ok(!listing.objects.is_empty() || !listing.common_prefixes.is_empty())
    }

    async fn dir_meta_with_mtime(&self, path: &RemotePath) -> FileMeta {
        let mut meta = dir_meta(path.clone());
        if !path.is_root() {
            meta.mtime = self
                .objects
                .head(&keys::marker_path(path))
                .await
                .ok()
                .map(|m| m.last_modified);
        }
        meta
    }

    /// One page of the directory `dir`, sorted by name.
    pub async fn list(&self, dir: &RemotePath, query: &ListQuery) -> Result<ListPage> {
        self.require_dir(dir).await?;
        let mut entries = if query.recursive {
            self.list_recursive(dir).await?
        } else {
            self.list_children(dir).await?
        };
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(cursor) = &query.cursor {
            let after = decode_cursor(cursor)?;
            entries.retain(|e| e.name > after);
        }
        let limit = query.limit.unwrap_or(1000).clamp(1, MAX_LIST_LIMIT);
        let cursor = (entries.len() > limit).then(|| encode_cursor(&entries[limit - 1].name));
        entries.truncate(limit);
        self.add_marker_times(dir, &mut entries).await;
        Ok(ListPage { entries, cursor })
    }

    /// Gives the page's directories the time of their marker, as `stat`
    /// does, so that a listing and a `stat` agree (a mount shows one time,
    /// not two by turns). A listing with a delimiter does not carry the
    /// markers: one `head` each, a few at once.
    async fn add_marker_times(&self, dir: &RemotePath, entries: &mut [ListEntry]) {
        const AT_ONCE: usize = 16;
        let wanted: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].kind == EntryKind::Dir && entries[i].mtime.is_none())
            .collect();
        let times: Vec<_> = futures::stream::iter(wanted)
            .map(|i| {
                let path = dir.join_relative(&entries[i].name);
                async move {
                    let marker = keys::marker_path(&path.ok()?);
                    let head = self.objects.head(&marker).await.ok()?;
                    Some((i, head.last_modified))
                }
            })
            .buffer_unordered(AT_ONCE)
            .collect()
            .await;
        for (i, mtime) in times.into_iter().flatten() {
            entries[i].mtime = Some(mtime);
        }
    }

    async fn list_children(&self, dir: &RemotePath) -> Result<Vec<ListEntry>> {
        let listing = self
            .objects
            .list_with_delimiter(keys::dir_prefix(dir).as_ref())
            .await?;
        let mut entries = Vec::new();
        for prefix in &listing.common_prefixes {
            if let Some(name) = single_child(prefix, dir) {
                entries.push(dir_entry(name));
            }
        }
        for object in &listing.objects {
            if let Some(name) = single_child(&object.location, dir)
                && !keys::is_marker(&name)
            {
                entries.push(file_entry(name, object));
            }
        }
        Ok(entries)
    }

    async fn list_recursive(&self, dir: &RemotePath) -> Result<Vec<ListEntry>> {
        let objects: Vec<ObjectMeta> = self
            .objects
            .list(keys::dir_prefix(dir).as_ref())
            .try_collect()
            .await?;
        let mut found: BTreeMap<String, ListEntry> = BTreeMap::new();
        for object in &objects {
            let Some(segments) = keys::relative_segments(&object.location, dir) else {
                continue;
            };
            let Some((leaf, parents)) = segments.split_last() else {
                continue;
            };
            for depth in 1..=parents.len() {
                let name = parents[..depth].join("/");
                found.entry(name.clone()).or_insert_with(|| dir_entry(name));
            }
            if !keys::is_marker(leaf) {
                let name = segments.join("/");
                found.insert(name.clone(), file_entry(name, object));
            } else if !parents.is_empty() {
                let name = parents.join("/");
                found
                    .entry(name.clone())
                    .or_insert_with(|| dir_entry(name))
                    .mtime = Some(object.last_modified);
            }
        }
        Ok(found.into_values().collect())
    }

    /// Creates the directory `path`; with `parents`, missing ancestors too.
    pub async fn mkdir(&self, path: &RemotePath, parents: bool) -> Result<FileMeta> {
        self.check_writable_names(path)?;
        if path.is_root() || self.try_head_file(path).await?.is_some() || self.is_dir(path).await? {
            return Err(Error::AlreadyExists(path.to_string()));
        }
        let parent = path.parent().unwrap_or_default();
        if parents {
            self.check_no_file_ancestor(path).await?;
        } else {
            self.require_dir(&parent).await?;
        }
        self.objects
            .put(&keys::marker_path(path), PutPayload::new())
            .await?;
        let meta = self.dir_meta_with_mtime(path).await;
        self.feed.written(&meta, false);
        Ok(meta)
    }

    /// Removes the directory `path`; without `recursive` it must be empty.
    pub async fn rmdir(&self, path: &RemotePath, recursive: bool) -> Result<()> {
        if path.is_root() {
            return Err(Error::BadRequest(
                "the root directory cannot be removed".into(),
            ));
        }
        self.require_dir(path).await?;
        if !recursive {
            let listing = self
                .objects
                .list_with_delimiter(keys::dir_prefix(path).as_ref())
                .await?;
            let only_marker = listing.common_prefixes.is_empty()
                && listing
                    .objects
                    .iter()
                    .all(|o| o.location == keys::marker_path(path));
            if !only_marker {
                return Err(Error::DirectoryNotEmpty(path.to_string()));
            }
        }
        self.delete_tree(path).await?;
        if let Some(dir) = self.local_path(path) {
            // Left over: empty subdirectories the object store does not see.
            match tokio::fs::remove_dir_all(&dir).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::local_store(
                        &format!("cannot remove {path}"),
                        &dir,
                        e,
                    ));
                }
                _ => {}
            }
            self.prune_empty_local_parents(path).await;
        }
        self.feed.deleted(path, EntryKind::Dir);
        Ok(())
    }

    /// Moves a file, or with `recursive` a directory, to `to`.
    pub async fn rename(
        &self,
        from: &RemotePath,
        to: &RemotePath,
        overwrite: bool,
        recursive: bool,
    ) -> Result<FileMeta> {
        self.transfer(from, to, overwrite, recursive, Transfer::Move)
            .await
    }

    /// Copies a file, or with `recursive` a directory, to `to`.
    pub async fn copy(
        &self,
        from: &RemotePath,
        to: &RemotePath,
        overwrite: bool,
        recursive: bool,
    ) -> Result<FileMeta> {
        self.transfer(from, to, overwrite, recursive, Transfer::Copy)
            .await
    }

    async fn transfer(
        &self,
        from: &RemotePath,
        to: &RemotePath,
        overwrite: bool,
        recursive: bool,
        how: Transfer,
    ) -> Result<FileMeta> {
        self.check_writable_names(to)?;
        if from.is_root() || to.is_root() {
            return Err(Error::BadRequest(
                "the root directory cannot be moved or copied".into(),
            ));
        }
        if from == to {
            return self.stat(from).await;
        }
        if to.starts_with(from) {
            return Err(Error::BadRequest(format!(
                "cannot put {from} inside itself"
            )));
        }
        self.check_no_file_ancestor(to).await?;
        // A file copied over another is announced as a change of that one.
        let mut replaces_file = false;
        if self.try_head_file(from).await?.is_some() {
            if self.is_dir(to).await? {
                return Err(Error::IsADirectory(to.to_string()));
            }
            replaces_file = self.try_head_file(to).await?.is_some();
            if !overwrite && replaces_file {
                return Err(Error::AlreadyExists(to.to_string()));
            }
            let (src, dst) = (keys::object_path(from), keys::object_path(to));
            match (how, overwrite) {
                (Transfer::Move, true) => self.objects.rename(&src, &dst).await?,
                (Transfer::Move, false) => self.objects.rename_if_not_exists(&src, &dst).await?,
                (Transfer::Copy, true) => self.objects.copy(&src, &dst).await?,
                (Transfer::Copy, false) => self.objects.copy_if_not_exists(&src, &dst).await?,
            }
        } else if self.is_dir(from).await? {
            if !recursive {
                return Err(Error::IsADirectory(format!(
                    "{from} (moving or copying a directory needs \"recursive\": true)"
                )));
            }
            if self.try_head_file(to).await?.is_some() {
                return Err(Error::NotADirectory(to.to_string()));
            }
            if self.is_dir(to).await? {
                if !overwrite {
                    return Err(Error::AlreadyExists(to.to_string()));
                }
                // Like rename(2): an empty directory may be replaced.
                self.rmdir(to, false).await?;
            }
            self.transfer_tree(from, to, how).await?;
        } else {
            return Err(Error::NotFound(from.to_string()));
        }
        if how == Transfer::Move {
            self.prune_empty_local_parents(from).await;
        }
        let meta = self.stat(to).await?;
        match how {
            Transfer::Move => self.feed.renamed(from, &meta),
            Transfer::Copy => self.feed.written(&meta, replaces_file),
        }
        Ok(meta)
    }

    async fn transfer_tree(&self, from: &RemotePath, to: &RemotePath, how: Transfer) -> Result<()> {
        if let (Transfer::Move, Some(src), Some(dst)) =
            (how, self.local_path(from), self.local_path(to))
        {
            // One rename(2): atomic, and no file contents move.
            if let Some(parent) = dst.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(|e| {
                    Error::local_store(&format!("cannot create the parents of {to}"), parent, e)
                })?;
            }
            return tokio::fs::rename(&src, &dst).await.map_err(|e| {
                Error::local_store(&format!("cannot rename {from} to {to}"), &dst, e)
            });
        }
        let objects: Vec<ObjectMeta> = self
            .objects
            .list(keys::dir_prefix(from).as_ref())
            .try_collect()
            .await?;
        for object in objects {
            let Some(segments) = keys::relative_segments(&object.location, from) else {
                continue;
            };
            let dst = segments.iter().fold(keys::object_path(to), |key, segment| {
                key.join(segment.as_str())
            });
            match how {
                Transfer::Move => self.objects.rename(&object.location, &dst).await?,
                Transfer::Copy => self.objects.copy(&object.location, &dst).await?,
            }
        }
        Ok(())
    }

    /// Refuses a file write at `path` when a directory is there or a file
    /// stands where one of its parent directories should be.
    pub(crate) async fn check_file_writable(&self, path: &RemotePath) -> Result<()> {
        self.check_writable_names(path)?;
        if path.is_root() || self.is_dir(path).await? {
            return Err(Error::IsADirectory(path.to_string()));
        }
        self.check_no_file_ancestor(path).await
    }

    async fn check_no_file_ancestor(&self, path: &RemotePath) -> Result<()> {
        for ancestor in path.ancestors() {
            if self.try_head_file(&ancestor).await?.is_some() {
                return Err(Error::NotADirectory(ancestor.to_string()));
            }
        }
        Ok(())
    }

    async fn require_dir(&self, path: &RemotePath) -> Result<()> {
        if self.is_dir(path).await? {
            Ok(())
        } else if self.try_head_file(path).await?.is_some() {
            Err(Error::NotADirectory(path.to_string()))
        } else {
            Err(Error::NotFound(path.to_string()))
        }
    }

    async fn delete_tree(&self, dir: &RemotePath) -> Result<()> {
        let locations = self
            .objects
            .list(keys::dir_prefix(dir).as_ref())
            .map_ok(|meta| meta.location)
            .boxed();
        self.objects
            .delete_stream(locations)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// On a local backend, removes directories left empty above `path`, so
    /// that a directory vanishes with its last entry as it does on a cloud store.
    pub(super) async fn prune_empty_local_parents(&self, path: &RemotePath) {
        for ancestor in path.ancestors() {
            let Some(dir) = self.local_path(&ancestor) else {
                return;
            };
            if tokio::fs::remove_dir(&dir).await.is_err() {
                return;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Move,
    Copy,
}

/// The name of `key` when it lies directly in `dir`.
fn single_child(key: &Path, dir: &RemotePath) -> Option<String> {
    let segments = keys::relative_segments(key, dir)?;
    <[String; 1]>::try_from(segments).ok().map(|[name]| name)
}

fn dir_entry(name: String) -> ListEntry {
    ListEntry {
        name,
        kind: EntryKind::Dir,
        size: 0,
        mtime: None,
        etag: None,
    }
}

fn file_entry(name: String, object: &ObjectMeta) -> ListEntry {
    ListEntry {
        name,
        kind: EntryKind::File,
        size: object.size,
        mtime: Some(object.last_modified),
        etag: plain_etag(object),
    }
}

fn encode_cursor(name: &str) -> String {
    URL_SAFE_NO_PAD.encode(name)
}

fn decode_cursor(cursor: &str) -> Result<String> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| Error::BadRequest("malformed list cursor".into()))
}
