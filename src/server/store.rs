//! The server's view of storage: an `object_store::ObjectStore` plus the
//! directory conventions of ferry (implicit directories, `.ferry-dir` markers,
//! the hidden `.ferry/` state prefix).
//!
//! Guarantees: a file write is atomic (a reader sees the old object or the new
//! one, never a part); nothing is ever read or written outside the store's root,
//! because every key is built from a validated [`RemotePath`].

mod backend;
mod keys;
pub mod namespace;
pub mod uploads;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::MultipartStore;
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectMeta, ObjectStore, ObjectStoreExt,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::error::{Error, Result};
use crate::protocol::{ByteRange, EntryKind, FileMeta, RemotePath};

pub use writer::StoreWriter;

/// Read size when streaming from a local file: large enough for GB/s on
/// loopback, small enough that 200 concurrent streams stay well under 100 MiB.
const LOCAL_READ_CHUNK: usize = 256 * 1024;

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
        match self
            .objects
            .head(&keys::object_path(path))
            .await
            .map_err(Error::from)
        {
            Ok(meta) => Ok(Some(file_meta(path.clone(), &meta))),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Streams `range` (or the whole file) of the version tagged `etag`.
    /// Fails with `precondition_failed` if the file changed since.
    pub async fn read(
        &self,
        path: &RemotePath,
        range: Option<ByteRange>,
        etag: Option<&str>,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let options = GetOptions {
            range: range.map(|r| GetRange::Bounded(r.start..r.end + 1)),
            if_match: etag.map(|e| self.backend_etag(e)),
            ..Default::default()
        };
        let result = self
            .objects
            .get_opts(&keys::object_path(path), options)
            .await?;
        let span = result.range.clone();
        Ok(match result.payload {
            GetResultPayload::File(file, _) => {
                let mut file = tokio::fs::File::from_std(file);
                let len = span.end - span.start;
                let stream = futures::stream::once(async move {
                    file.seek(std::io::SeekFrom::Start(span.start)).await?;
                    Ok::<_, std::io::Error>(ReaderStream::with_capacity(
                        file.take(len),
                        LOCAL_READ_CHUNK,
                    ))
                })
                .try_flatten();
                stream.map_err(|e| Error::Storage(e.to_string())).boxed()
            }
            GetResultPayload::Stream(s) => s.map_err(Error::from).boxed(),
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

    /// Every object_store backend quotes its etags.
    fn backend_etag(&self, etag: &str) -> String {
        format!("\"{etag}\"")
    }

    /// Where the directory `path` lies on disk, for a local backend.
    fn local_dir(&self, path: &RemotePath) -> Option<PathBuf> {
        let mut dir = self.local_root.clone()?;
        dir.extend(
            keys::object_path(path)
                .parts()
                .map(|p| p.as_ref().to_owned()),
        );
        Some(dir)
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
