//! Resumable download to a local file.
//!
//! Bytes go to `.NAME.ferry-part` beside the destination, with the version
//! being fetched recorded in `.NAME.ferry-part.json`. A later run continues
//! with `Range` + `If-Range`; if the remote file changed meanwhile the server
//! sends the new version whole and the download starts over. The destination
//! appears (by rename) only once length and version check out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::http::{describe, header_etag};
use super::throttle::Throttle;
use super::{Client, Progress, ProgressFn};
use crate::error::{Error, Result};
use crate::protocol::{EntryKind, FileMeta, RemotePath};

#[derive(Clone, Default)]
pub struct DownloadOptions {
    pub progress: Option<ProgressFn>,
    pub throttle: Option<std::sync::Arc<Throttle>>,
}

#[derive(Debug, Clone)]
pub struct DownloadReport {
    pub meta: FileMeta,
    /// Bytes already on disk from an earlier run.
    pub resumed_bytes: u64,
}

/// What a partial download holds.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct PartRecord {
    etag: String,
    size: u64,
}

/// Downloads `remote` to `local`, continuing an interrupted earlier run.
pub async fn download_file(
    client: &Client,
    remote: &RemotePath,
    local: &Path,
    options: DownloadOptions,
) -> Result<DownloadReport> {
    let (part, record_path) = part_paths(local)?;
    let started = Instant::now();
    let mut attempt = 0;
    let mut resumed_bytes = None;
    loop {
        let meta = client.stat(remote).await?;
        if meta.kind != EntryKind::File {
            return Err(Error::IsADirectory(remote.to_string()));
        }
        let etag = meta
            .etag
            .clone()
            .ok_or_else(|| Error::Storage(format!("{remote} has no etag")))?;
        let record = PartRecord {
            etag: etag.clone(),
            size: meta.size,
        };
        let mut offset = existing_part(&part, &record_path, &record).await?;
        resumed_bytes.get_or_insert(offset);
        match fetch_rest(
            client,
            remote,
            &part,
            &record_path,
            &mut offset,
            record,
            &options,
        )
        .await
        {
            Ok(()) => {
                finish(&part, &record_path, local).await?;
                return Ok(DownloadReport {
                    meta,
                    resumed_bytes: resumed_bytes.unwrap_or(0),
                });
            }
            Err(e @ Error::Network(_))
                if started.elapsed() < client.retry_policy().give_up_after =>
            {
                attempt += 1;
                tracing::info!(%e, "download interrupted; resuming");
                client
                    .sleep(client.retry_policy().delay(attempt, None))
                    .await?;
            }
            Err(e) => return Err(e),
        }
    }
}

fn part_paths(local: &Path) -> Result<(PathBuf, PathBuf)> {
    let name = local
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::BadRequest(format!("{} is not a file name", local.display())))?;
    let dir = local.parent().unwrap_or(Path::new("."));
    Ok((
        dir.join(format!(".{name}.ferry-part")),
        dir.join(format!(".{name}.ferry-part.json")),
    ))
}

/// Bytes of a usable earlier part for `record`'s version; starts a fresh part
/// otherwise.
async fn existing_part(part: &Path, record_path: &Path, record: &PartRecord) -> Result<u64> {
    let previous: Option<PartRecord> = tokio::fs::read(record_path)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if previous.as_ref() == Some(record)
        && let Ok(meta) = tokio::fs::metadata(part).await
        && meta.len() <= record.size
    {
        return Ok(meta.len());
    }
    start_part(part, record_path, record).await?;
    Ok(0)
}

async fn start_part(part: &Path, record_path: &Path, record: &PartRecord) -> Result<()> {
    tokio::fs::File::create(part)
        .await
        .map_err(Error::io(format!("creating {}", part.display())))?;
    let body = serde_json::to_vec(record).expect("records serialize");
    tokio::fs::write(record_path, body)
        .await
        .map_err(Error::io(format!("writing {}", record_path.display())))
}

async fn fetch_rest(
    client: &Client,
    remote: &RemotePath,
    part: &Path,
    record_path: &Path,
    offset: &mut u64,
    mut record: PartRecord,
    options: &DownloadOptions,
) -> Result<()> {
    let report = |done: u64, total: u64| {
        if let Some(progress) = &options.progress {
            progress(Progress { done, total });
        }
    };
    if *offset == record.size {
        report(*offset, record.size);
        return Ok(());
    }
    let resp = client.get_resume(remote, *offset, &record.etag).await?;
    if resp.status() == StatusCode::OK {
        // The file changed since the part began: the server sent it whole.
        record = PartRecord {
            etag: header_etag(&resp)
                .ok_or_else(|| Error::Storage("response without ETag".into()))?,
            size: resp
                .content_length()
                .ok_or_else(|| Error::Storage("response without length".into()))?,
        };
        start_part(part, record_path, &record).await?;
        *offset = 0;
    } else if header_etag(&resp).as_deref() != Some(record.etag.as_str()) {
        return Err(Error::Network(format!(
            "{remote}: the server sent another version"
        )));
    }
    let mut out = tokio::fs::OpenOptions::new()
        .append(true)
        .open(part)
        .await
        .map_err(Error::io(format!("opening {}", part.display())))?;
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece =
            piece.map_err(|e| Error::Network(format!("downloading {remote}: {}", describe(&e))))?;
        if let Some(throttle) = &options.throttle {
            throttle.acquire(piece.len() as u64).await;
        }
        out.write_all(&piece)
            .await
            .map_err(Error::io(format!("writing {}", part.display())))?;
        *offset += piece.len() as u64;
        report(*offset, record.size);
    }
    out.flush()
        .await
        .map_err(Error::io(format!("writing {}", part.display())))?;
    if *offset != record.size {
        return Err(Error::Network(format!(
            "{remote}: got {offset} of {} bytes",
            record.size
        )));
    }
    out.sync_all()
        .await
        .map_err(Error::io(format!("syncing {}", part.display())))?;
    Ok(())
}

async fn finish(part: &Path, record_path: &Path, local: &Path) -> Result<()> {
    tokio::fs::rename(part, local)
        .await
        .map_err(Error::io(format!(
            "moving the download to {}",
            local.display()
        )))?;
    let _ = tokio::fs::remove_file(record_path).await;
    Ok(())
}
