//! Atomic streamed writes.

use bytes::Bytes;
use object_store::{ObjectStoreExt, WriteMultipart};

use super::{Store, keys};
use crate::error::Result;
use crate::protocol::{FileMeta, RemotePath};

/// Part size: the smallest S3 accepts, so one code path serves every backend.
const PART_SIZE: usize = 5 * 1024 * 1024;
/// Parts in flight per writer; bounds memory to about `PART_SIZE * (1 + this)`.
const PARTS_IN_FLIGHT: usize = 2;

/// A write in progress. Nothing is visible at the destination until
/// [`StoreWriter::commit`]; dropping the writer (a failed or disconnected
/// upload) discards everything written.
pub struct StoreWriter {
    upload: Option<WriteMultipart>,
    written: u64,
    /// For tidying up after a discarded write.
    store: Store,
    path: RemotePath,
    /// Whether a file was there when the write began (for the change feed).
    existed: bool,
}

impl StoreWriter {
    pub(super) async fn start(store: &Store, path: &RemotePath, existed: bool) -> Result<Self> {
        let upload = store
            .objects
            .put_multipart(&keys::object_path(path))
            .await?;
        Ok(Self {
            upload: Some(WriteMultipart::new_with_chunk_size(upload, PART_SIZE)),
            written: 0,
            store: store.clone(),
            path: path.clone(),
            existed,
        })
    }

    /// Appends `data`, waiting while too many parts are in flight.
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        let upload = self.upload.as_mut().expect("writer used after commit");
        upload.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        self.written += data.len() as u64;
        upload.put(data);
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Makes the object visible, atomically replacing any previous version,
    /// and returns its metadata.
    pub async fn commit(mut self) -> Result<FileMeta> {
        let upload = self.upload.take().expect("writer committed twice");
        upload.finish().await?;
        let meta = self.store.head_file(&self.path).await?;
        self.store.feed.written(&meta, self.existed);
        Ok(meta)
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (store, path) = (self.store.clone(), self.path.clone());
            runtime.spawn(async move {
                if let Err(e) = upload.abort().await {
                    tracing::warn!(error = %e, "discarding an unfinished upload failed");
                }
                // The backend created parent directories for the staged write.
                store.prune_empty_local_parents(&path).await;
            });
        }
    }
}
