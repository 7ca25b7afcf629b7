//! The server's view of storage: an `object_store::ObjectStore` plus the
//! directory conventions of ferry (implicit directories, `.ferry-dir` markers,
//! the hidden `.ferry/` state prefix).
//!
//! Guarantees: a file write is atomic (a reader sees the old object or the new
//! one, never a part); a read streams bytes of the one version whose metadata
//! it reported ([`Store::open_read`]); nothing is ever read or written outside
//! the store's root, because every key is built from a validated [`RemotePath`];
//! a path with a name the backend cannot hold is refused (`invalid_path`)
//! before anything is read or written, the same way by every operation.

mod backend;
mod keys;
mod local_read;
pub mod namespace;
mod stray_temps;
pub mod uploads;
mod writer;

pub use local_read::byte_is_cached;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::MultipartStore;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt};

use super::file_region::FileRegion;
use crate::error::{Error, Result};
use crate::protocol::path::stored_name_len;
use crate::protocol::{ByteRange, EntryKind, FileMeta, PathError, RemotePath};

/// Longest name, in bytes, a local store's filesystem holds (`NAME_MAX`).
const LOCAL_NAME_MAX: usize = 255;
/// Longest name, in bytes as stored, written to a local store: a write goes
/// through a temporary file beside its target, named `{name}#1` (or another
/// number) for a `PUT` and `{name}#0` for a copy.
const LOCAL_WRITTEN_NAME_MAX: usize = LOCAL_NAME_MAX - 2;

pub use writer::StoreWriter;

/// A ferry store over one object-store backend. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    objects: Arc<dyn ObjectStore>,
    /// Set when the backend is a local directory: some operations (directory
    /// rename, empty-directory cleanup) are done directly on the filesystem.
    local_root: Option<PathBuf>,
    /// Set for backends with multipart uploads (memory, S3, GCS, Azure):
    /// upload sessions stage their chunks as parts.
    multipart: Option<Arc<dyn MultipartStore>>,
    description: String,
    /// Where every committed change is announced.
    pub(crate) feed: super::feed::ChangeFeed,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.description)
            .finish()
    }
}

impl Store {
    /// Opens a store from a directory path, `file://`, `memory://`, or (with the
    /// `cloud` feature) `s3://`, `gs://` and `az://` URLs. A missing local
    /// directory is created.
    pub fn open(spec: &str) -> Result<Store> {
        backend::open(spec)
    }

    /// On a local store, removes the temporaries of writes a killed server
    /// left behind (see [`stray_temps`]), and the directories only they
    /// kept. Returns how many were removed; other backends have none.
    pub async fn collect_stray_temporaries(&self) -> Result<usize> {
        let Some(root) = self.local_root.clone() else {
            return Ok(0);
        };
        let cutoff = std::time::SystemTime::now() - stray_temps::STRAY_AFTER;
        tokio::task::spawn_blocking(move || stray_temps::collect(&root, cutoff))
            .await
            .map_err(|e| Error::Storage(format!("sweeping temporaries: {e}")))?
            .map_err(|e| Error::Storage(format!("sweeping temporaries: {}", e.kind())))
    }

    /// Human-readable description of the backend, for logs.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Metadata of the file at `path`. A directory there is `is_a_directory`.
    pub async fn head_file(&self, path: &RemotePath) -> Result<FileMeta> {
        if path.is_root() {
            return Err(Error::IsADirectory("/".into()));
        }
        match self.try_head_file(path).await? {
            Some(meta) => Ok(meta),
            None => Err(self.not_a_file(path).await),
        }
    }

    /// The file's metadata if it exists, `None` if no file is there.
    pub async fn try_head_file(&self, path: &RemotePath) -> Result<Option<FileMeta>> {
        if path.is_root() {
            return Ok(None);
        }
        self.check_names(path, LOCAL_NAME_MAX)?;
        let meta = missing_as_none(self.objects.head(&keys::object_path(path)).await)?;
        Ok(meta.map(|meta| file_meta(path.clone(), &meta)))
    }

    /// Opens the file at `path` for reading: its metadata now, its bytes later
    /// through [`OpenedFile::stream`]. A directory there is `is_a_directory`,
    /// nothing there `not_found`.
    ///
    /// On a local store the file is opened once, with its metadata, and its
    /// bytes are later read from that same descriptor.
    pub async fn open_read(&self, path: &RemotePath) -> Result<OpenedFile> {
        if path.is_root() {
            return Err(Error::IsADirectory("/".into()));
        }
        self.check_names(path, LOCAL_NAME_MAX)?;
        let key = keys::object_path(path);
        let found = if let Some(local) = self.local_path(path) {
            match local_read::open(local).await? {
                Some((file, metadata)) => {
                    Some((local_read::object_meta(&metadata, key.clone())?, Some(file)))
                }
                None => None,
            }
        } else {
            missing_as_none(self.objects.head(&key).await)?.map(|meta| (meta, None))
        };
        let Some((meta, file)) = found else {
            return Err(self.not_a_file(path).await);
        };
        let source = match file {
            Some(file) => Source::Local(Arc::new(file)),
            None => Source::Remote {
                objects: self.objects.clone(),
                key,
                etag: meta.e_tag.clone(),
            },
        };
        Ok(OpenedFile {
            meta: file_meta(path.clone(), &meta),
            source,
        })
    }

    /// Starts an atomic streamed write of the file at `path`. Nothing is
    /// visible until [`StoreWriter::commit`]; dropping the writer discards it.
    pub async fn writer(&self, path: &RemotePath) -> Result<StoreWriter> {
        self.check_file_writable(path).await?;
        let existed = self.try_head_file(path).await?.is_some();
        StoreWriter::start(self, path, existed).await
    }

    /// Subscribes to every change committed through this store from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::protocol::events::Change> {
        self.feed.subscribe()
    }

    /// Deletes the file at `path`.
    pub async fn delete_file(&self, path: &RemotePath) -> Result<()> {
        self.head_file(path).await?;
        self.objects.delete(&keys::object_path(path)).await?;
        self.feed.deleted(path, EntryKind::File);
        Ok(())
    }

    /// The error for "no file at `path`": a directory there, or nothing.
    async fn not_a_file(&self, path: &RemotePath) -> Error {
        match self.is_dir(path).await {
            Ok(true) => Error::IsADirectory(path.to_string()),
            Ok(false) => Error::NotFound(path.to_string()),
            Err(e) => e,
        }
    }

    /// Refuses a path to be written (a file, a directory, the destination of
    /// a rename or copy) with a name the backend cannot write.
    pub(crate) fn check_writable_names(&self, path: &RemotePath) -> Result<()> {
        self.check_names(path, LOCAL_WRITTEN_NAME_MAX)
    }

    /// The longest name written, in bytes as stored, on a backend with a
    /// limit (a local directory); `None`: any valid name.
    pub fn max_written_name_bytes(&self) -> Option<usize> {
        self.local_root.is_some().then_some(LOCAL_WRITTEN_NAME_MAX)
    }

    /// Refuses `path` if the backend cannot hold one of its names: on a local
    /// directory, one that takes more than `max` bytes as stored
    /// ([`stored_name_len`]: non-ASCII and some characters percent-encoded).
    /// Other backends take any valid path.
    fn check_names(&self, path: &RemotePath, max: usize) -> Result<()> {
        if self.local_root.is_none() {
            return Ok(());
        }
        for segment in path.segments() {
            // A byte takes at most three: most names need no count.
            if segment.len() * 3 <= max {
                continue;
            }
            let stored = stored_name_len(segment);
            if stored > max {
                return Err(PathError::NameTooLongForStore { stored, max }.into());
            }
        }
        Ok(())
    }

    /// Where the file or directory `path` lies on disk, for a local backend:
    /// the root, then each part of its key as it is. This is the local
    /// backend's own mapping (its `path_to_filesystem`), whose URL round trip
    /// decodes exactly what it encodes; `#` is escaped in keys, so its rule
    /// against names ending in `#<digits>` never applies.
    fn local_path(&self, path: &RemotePath) -> Option<PathBuf> {
        let mut local = self.local_root.clone()?;
        for part in keys::object_path(path).parts() {
            local.push(part.as_ref());
        }
        Some(local)
    }
}

/// A file opened by [`Store::open_read`]: its metadata, and its bytes on demand.
/// Dropping it reads nothing (and closes a local file).
pub struct OpenedFile {
    /// The version of the file that [`OpenedFile::stream`] yields bytes of.
    pub meta: FileMeta,
    source: Source,
}

enum Source {
    /// Local store: the open file, read with positioned reads.
    Local(Arc<std::fs::File>),
    /// Other backends: a ranged get, conditional on the backend's own etag.
    Remote {
        objects: Arc<dyn ObjectStore>,
        key: object_store::path::Path,
        etag: Option<String>,
    },
}

impl OpenedFile {
    /// `range` (or the whole file) of a local store's file, offered for
    /// zero-copy sending beside [`OpenedFile::stream`]'s body; `None` for
    /// other backends.
    pub fn region(&self, range: Option<ByteRange>) -> Option<FileRegion> {
        match &self.source {
            Source::Local(file) => Some(FileRegion::new(file.clone(), self.span(range))),
            Source::Remote { .. } => None,
        }
    }

    fn span(&self, range: Option<ByteRange>) -> std::ops::Range<u64> {
        range.map_or(0..self.meta.size, |r| r.start..r.end + 1)
    }

    /// Streams `range` (or the whole file) of the version described by
    /// [`OpenedFile::meta`]; `range` must lie within `meta.size`.
    ///
    /// Never yields bytes of another version. On a local store the bytes come
    /// from the descriptor opened with the metadata, so this cannot fail
    /// before the first byte. On other backends the read is conditional on
    /// the etag: if the file was replaced or deleted since it was opened, this
    /// fails (before any byte) with `precondition_failed` or `not_found`.
    pub async fn stream(
        self,
        range: Option<ByteRange>,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        match self.source {
            Source::Local(ref file) => Ok(local_read::stream(file.clone(), self.span(range))),
            Source::Remote { objects, key, etag } => {
                let options = GetOptions {
                    range: range.map(|r| GetRange::Bounded(r.start..r.end + 1)),
                    if_match: etag,
                    ..Default::default()
                };
                let got = objects.get_opts(&key, options).await?;
                Ok(got.into_stream().map_err(Error::from).boxed())
            }
        }
    }
}

/// `Ok(None)` for "no object there", other errors mapped as usual.
fn missing_as_none<T>(result: object_store::Result<T>) -> Result<Option<T>> {
    match result.map_err(Error::from) {
        Ok(found) => Ok(Some(found)),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn file_meta(path: RemotePath, meta: &ObjectMeta) -> FileMeta {
    FileMeta {
        path,
        kind: EntryKind::File,
        size: meta.size,
        mtime: Some(meta.last_modified),
        etag: plain_etag(meta),
    }
}

/// The backend's etag without HTTP quoting.
fn plain_etag(meta: &ObjectMeta) -> Option<String> {
    meta.e_tag
        .as_deref()
        .map(|e| e.trim_start_matches("W/").trim_matches('"').to_owned())
}

fn dir_meta(path: RemotePath) -> FileMeta {
    FileMeta {
        path,
        kind: EntryKind::Dir,
        size: 0,
        mtime: None,
        etag: None,
    }
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;

    async fn put(store: &Store, path: &RemotePath, data: &'static [u8]) -> FileMeta {
        let mut writer = store.writer(path).await.unwrap();
        writer.write(Bytes::from_static(data)).await.unwrap();
        writer.commit().await.unwrap()
    }

    async fn read_all(opened: OpenedFile, range: Option<ByteRange>) -> Result<Vec<u8>> {
        let chunks: Vec<Bytes> = opened.stream(range).await?.try_collect().await?;
        Ok(chunks.concat())
    }

    #[tokio::test]
    async fn a_local_read_streams_the_version_it_opened() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        // An odd name: the local open must find what the backend wrote.
        let path = RemotePath::parse("a/odd 50% #1 [ü].txt").unwrap();
        let written = put(&store, &path, b"first version").await;
        let opened = store.open_read(&path).await.unwrap();
        assert_eq!(opened.meta, store.head_file(&path).await.unwrap());
        assert_eq!(opened.meta.etag, written.etag);
        put(&store, &path, b"second").await;
        let range = ByteRange { start: 6, end: 12 };
        assert_eq!(read_all(opened, Some(range)).await.unwrap(), b"version");
    }

    #[tokio::test]
    async fn a_remote_read_of_a_replaced_file_fails_before_any_byte() {
        let store = Store::open("memory://").unwrap();
        let path = RemotePath::parse("f.txt").unwrap();
        put(&store, &path, b"first version").await;
        let opened = store.open_read(&path).await.unwrap();
        let unchanged = store.open_read(&path).await.unwrap();
        assert_eq!(read_all(unchanged, None).await.unwrap(), b"first version");
        put(&store, &path, b"second").await;
        let err = read_all(opened, None).await.unwrap_err();
        assert!(matches!(err, Error::PreconditionFailed(_)), "{err:?}");
    }

    #[tokio::test]
    async fn opening_a_directory_or_nothing_fails_like_head_file() {
        for spec in ["memory://", ""] {
            let dir = tempfile::tempdir().unwrap();
            let spec = if spec.is_empty() {
                dir.path().to_str().unwrap()
            } else {
                spec
            };
            let store = Store::open(spec).unwrap();
            put(&store, &RemotePath::parse("d/f").unwrap(), b"x").await;
            for (path, want_dir) in [
                ("d", true),
                ("", true),
                ("nothing", false),
                ("d/f/g", false),
            ] {
                let path = RemotePath::parse(path).unwrap();
                let err = store.open_read(&path).await.err().unwrap();
                match err {
                    Error::IsADirectory(_) => assert!(want_dir, "{spec} {path}"),
                    Error::NotFound(_) => assert!(!want_dir, "{spec} {path}"),
                    other => panic!("{spec} {path}: {other:?}"),
                }
            }
        }
    }
}
