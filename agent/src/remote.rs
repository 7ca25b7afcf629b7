//! The remote side of one folder pair: the server, the prefix the folder
//! maps to, and the calls the agent makes, in folder-relative paths.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ferry::client::Client;
use ferry::client::throttle::Throttle;
use ferry::client::upload::{SessionFn, Transport, UploadOptions, UploadReport, upload_file};
use ferry::protocol::upload::UploadStatus;
use ferry::protocol::{EntryKind, ErrorCode, FileMeta, MoveRequest, PathError, RemotePath};
use ferry::{Error, Result};
use tokio_util::sync::CancellationToken;

use crate::plan::RemoteFile;

/// Chunks of one file in flight at once.
const CHUNKS_PER_FILE: usize = 4;

pub struct Remote {
    client: Client,
    prefix: RemotePath,
    throttle: Option<Arc<Throttle>>,
    stop: CancellationToken,
}

/// One upload: where from, where to, and how it may commit.
pub struct Push<'a> {
    pub local: &'a Path,
    pub target: &'a RemotePath,
    /// `None`: computed while the file is sent.
    pub sha256: Option<&'a str>,
    /// Commit only over this remote version; without one, only where there
    /// is no remote file (one created elsewhere meanwhile is a conflict).
    pub if_match: Option<String>,
    /// Send only the first this many bytes (a snapshot of a file that keeps
    /// changing; `sha256` is then theirs).
    pub length: Option<u64>,
    pub resume_id: Option<String>,
    pub on_session: SessionFn,
}

impl Remote {
    pub fn new(
        client: Client,
        prefix: RemotePath,
        throttle: Option<Arc<Throttle>>,
        stop: CancellationToken,
    ) -> Remote {
        Remote {
            client,
            prefix,
            throttle,
            stop,
        }
    }

    pub fn describe(&self) -> String {
        if self.prefix.is_root() {
            return self.client.base_url().to_owned();
        }
        format!("{}/{}", self.client.base_url(), self.prefix)
    }

    /// The remote path of a folder-relative path.
    pub fn path(&self, rel: &str) -> Result<RemotePath, PathError> {
        if self.prefix.is_root() {
            RemotePath::parse(rel)
        } else if rel.is_empty() {
            Ok(self.prefix.clone())
        } else {
            RemotePath::parse(&format!("{}/{rel}", self.prefix))
        }
    }

    /// Runs a read-only request, giving up as soon as the agent is stopping
    /// (it may be retrying against a server that is down).
    async fn until_stopped<T>(&self, request: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::select! {
            result = request => result,
            _ = self.stop.cancelled() => Err(Error::Cancelled),
        }
    }

    /// Remote files at or below `scope` (folder-relative, `""` for all).
    pub async fn index(&self, scope: &str) -> Result<BTreeMap<String, RemoteFile>> {
        self.until_stopped(self.list_scope(scope)).await
    }

    async fn list_scope(&self, scope: &str) -> Result<BTreeMap<String, RemoteFile>> {
        let path = self.path(scope)?;
        let mut out = BTreeMap::new();
        if !path.is_root() {
            match self.client.stat(&path).await {
                Ok(meta) if meta.kind == EntryKind::File => {
                    if let Some(file) = remote_file(&meta.etag, meta.size, meta.mtime) {
                        out.insert(scope.to_owned(), file);
                    }
                    return Ok(out);
                }
                Ok(_) => {}
                Err(e) if e.code() == ErrorCode::NotFound => return Ok(out),
                Err(e) => return Err(e),
            }
        }
        let entries = match self.client.list(&path, true).await {
            Ok(entries) => entries,
            Err(e) if e.code() == ErrorCode::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            if entry.kind != EntryKind::File {
                continue;
            }
            let rel = if scope.is_empty() {
                entry.name.clone()
            } else {
                format!("{scope}/{}", entry.name)
            };
            if let Some(file) = remote_file(&entry.etag, entry.size, entry.mtime) {
                out.insert(rel, file);
            }
        }
        Ok(out)
    }

    pub async fn stat(&self, rel: &str) -> Result<Option<FileMeta>> {
        let path = self.path(rel)?;
        match self.until_stopped(self.client.stat(&path)).await {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn upload_status(&self, session_id: &str) -> Result<UploadStatus> {
        self.until_stopped(self.client.upload_status(session_id))
            .await
    }

    /// Server-side rename of a file, or of a directory with everything in it.
    pub async fn rename(&self, from: &str, to: &str, dir: bool) -> Result<FileMeta> {
        self.client
            .rename(&MoveRequest {
                from: self.path(from)?,
                to: self.path(to)?,
                overwrite: false,
                recursive: dir,
            })
            .await
    }

    /// Deletes the file if it is still the version `etag`.
    pub async fn delete(&self, rel: &str, etag: &str) -> Result<()> {
        self.client
            .delete_if_match(&self.path(rel)?, Some(etag))
            .await
    }

    pub async fn abort(&self, session_id: &str) {
        if let Err(e) = self.client.abort_upload(session_id).await {
            tracing::debug!(session = session_id, error = %e, "aborting an upload session failed");
        }
    }

    /// A chunk-session upload; on stop, chunks on the wire finish and the
    /// session stays open for the next run.
    pub async fn upload(&self, push: Push<'_>) -> Result<UploadReport> {
        let size = push
            .length
            .unwrap_or_else(|| std::fs::metadata(push.local).map_or(0, |m| m.len()));
        let options = UploadOptions {
            parallel: Some(CHUNKS_PER_FILE),
            create_only: push.if_match.is_none(),
            if_match: push.if_match,
            resume_id: push.resume_id,
            sha256: push.sha256.map(str::to_owned),
            length: push.length,
            on_session: Some(push.on_session),
            throttle: self.throttle.clone(),
            transport: Transport::for_file_of(size),
            stop: Some(self.stop.clone()),
            ..Default::default()
        };
        upload_file(&self.client, push.local, push.target, options).await
    }
}

fn remote_file(
    etag: &Option<String>,
    size: u64,
    mtime: Option<chrono::DateTime<chrono::Utc>>,
) -> Option<RemoteFile> {
    Some(RemoteFile {
        size,
        etag: etag.clone()?,
        mtime,
    })
}
