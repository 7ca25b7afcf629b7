//! A file opened for writing is staged in a sparse local file. Blocks of the
//! remote version are copied in only when a partial write or a read needs them
//! (and, at upload time, those still missing), never the whole file up front.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;

use super::block_cache::{BLOCK_SIZE, FetchError};
use super::core::{FsResult, errno};
use crate::protocol::{FileMeta, RemotePath};

/// Where the remote blocks come from.
pub trait RemoteBlocks: Send + Sync {
    fn fetch(
        &self,
        meta: &FileMeta,
        block: u64,
    ) -> futures::future::BoxFuture<'_, Result<Bytes, FetchError>>;
}

pub struct Staged {
    pub local: PathBuf,
    file: Arc<File>,
    /// The remote version the file started from; `None` for a new file.
    pub base: Option<FileMeta>,
    pub state: Mutex<StagedState>,
    /// Held shared by writes, exclusively by an upload of the current content.
    pub gate: tokio::sync::RwLock<()>,
}

pub struct StagedState {
    pub path: RemotePath,
    pub size: u64,
    /// Bytes below this may still be the remote's, unless their block is filled.
    remote_size: u64,
    filled: HashSet<u64>,
    pub dirty: bool,
    pub mtime: SystemTime,
    pub open_handles: u32,
    /// Unlinked while open: discarded at the last close, never uploaded.
    pub unlinked: bool,
}

fn io_errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(errno::EIO)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> FsResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| errno::EIO)?
        .map_err(io_errno)
}

impl Staged {
    /// A staging file at `local` for `path`; `base` is the remote version to
    /// start from, `truncate` starts empty instead.
    pub fn create(
        local: PathBuf,
        path: RemotePath,
        base: Option<FileMeta>,
        truncate: bool,
    ) -> FsResult<Staged> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&local)
            .map_err(io_errno)?;
        let size = if truncate {
            0
        } else {
            base.as_ref().map_or(0, |b| b.size)
        };
        file.set_len(size).map_err(io_errno)?;
        Ok(Staged {
            local,
            file: Arc::new(file),
            base,
            state: Mutex::new(StagedState {
                path,
                size,
                remote_size: size,
                filled: HashSet::new(),
                dirty: truncate,
                mtime: SystemTime::now(),
                open_handles: 0,
                unlinked: false,
            }),
            gate: tokio::sync::RwLock::new(()),
        })
    }

    pub fn size(&self) -> u64 {
        self.state.lock().unwrap().size
    }

    fn needs_fill(&self, block: u64) -> bool {
        let state = self.state.lock().unwrap();
        block * BLOCK_SIZE < state.remote_size && !state.filled.contains(&block)
    }

    /// Copies remote block `block` into the staging file if it is still missing.
    async fn fill(&self, remote: &dyn RemoteBlocks, block: u64) -> FsResult<()> {
        if !self.needs_fill(block) {
            return Ok(());
        }
        let base = self
            .base
            .as_ref()
            .expect("only a file with a base has remote blocks");
        let data = remote.fetch(base, block).await.map_err(|e| e.errno)?;
        let remote_size = self.state.lock().unwrap().remote_size;
        let start = block * BLOCK_SIZE;
        // Only the part still within the remote region (a truncate may have cut it).
        let keep = (remote_size.saturating_sub(start) as usize).min(data.len());
        let file = self.file.clone();
        let data = data.slice(..keep);
        blocking(move || file.write_all_at(&data, start)).await?;
        self.state.lock().unwrap().filled.insert(block);
        Ok(())
    }

    pub async fn write(
        &self,
        remote: &dyn RemoteBlocks,
        offset: u64,
        data: Bytes,
    ) -> FsResult<u32> {
        let _shared = self.gate.read().await;
        let end = offset + data.len() as u64;
        if !data.is_empty() {
            let (first, last) = (offset / BLOCK_SIZE, (end - 1) / BLOCK_SIZE);
            // Blocks only partly overwritten need their remote bytes first.
            for block in [first, last] {
                let (bs, be) = (block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE);
                if offset > bs || end < be {
                    self.fill(remote, block).await?;
                }
            }
            let file = self.file.clone();
            let len = data.len() as u32;
            blocking(move || file.write_all_at(&data, offset)).await?;
            let mut state = self.state.lock().unwrap();
            state.filled.extend(first..=last);
            state.size = state.size.max(end);
            state.dirty = true;
            state.mtime = SystemTime::now();
            return Ok(len);
        }
        Ok(0)
    }

    pub async fn truncate(&self, remote: &dyn RemoteBlocks, new_size: u64) -> FsResult<()> {
        let _shared = self.gate.read().await;
        if new_size % BLOCK_SIZE != 0 {
            self.fill(remote, new_size / BLOCK_SIZE).await?;
        }
        let file = self.file.clone();
        blocking(move || file.set_len(new_size)).await?;
        let mut state = self.state.lock().unwrap();
        state.remote_size = state.remote_size.min(new_size);
        state.size = new_size;
        state.dirty = true;
        state.mtime = SystemTime::now();
        Ok(())
    }

    pub async fn read(&self, remote: &dyn RemoteBlocks, offset: u64, len: u32) -> FsResult<Bytes> {
        let size = self.size();
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + len as u64).min(size);
        for block in offset / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
            self.fill(remote, block).await?;
        }
        let file = self.file.clone();
        blocking(move || {
            let mut buf = vec![0u8; (end - offset) as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    /// Fills every block still missing and makes the file durable locally:
    /// after this the staging file is the whole new content.
    pub async fn complete(&self, remote: &dyn RemoteBlocks) -> FsResult<()> {
        let remote_size = self.state.lock().unwrap().remote_size;
        for block in 0..remote_size.div_ceil(BLOCK_SIZE) {
            self.fill(remote, block).await?;
        }
        let (file, mtime) = (self.file.clone(), self.state.lock().unwrap().mtime);
        blocking(move || {
            file.set_modified(mtime)?;
            file.sync_all()
        })
        .await
    }

    pub fn path(&self) -> RemotePath {
        self.state.lock().unwrap().path.clone()
    }
}

/// Removes a staging file, ignoring one already gone.
pub fn discard(local: &Path) {
    let _ = std::fs::remove_file(local);
}
