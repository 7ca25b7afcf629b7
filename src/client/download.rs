//! Resumable download to a local file.
//!
//! Bytes go to `.NAME.ferry-part` beside the destination, with the version
//! being fetched recorded in `.NAME.ferry-part.json`. A later run continues
//! with `Range` + `If-Range`; if the remote file changed meanwhile the server
//! sends the new version whole and the download starts over. The destination
//! appears (by rename) only once length and version check out.
//!
//! The part file is locked (`flock`) by the download writing it: a second
//! download to the same destination is refused instead of writing the same
//! bytes twice. The record also holds how many bytes of the part are known to
//! be on disk (`verified`, written after an fsync): a later run trusts the
//! part only that far and drops the rest, so a tail that never reached the
//! disk whole, or anything appended to the part since, is fetched again
//! instead of kept.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::http::{Retries, describe, header_etag};
use super::throttle::Throttle;
use super::{Client, Progress, ProgressFn};
use crate::error::{Error, Result};
use crate::protocol::{EntryKind, FileMeta, RemotePath};

/// A checkpoint (fsync, then the record) once this much was written since the
/// last one, at most every [`CHECKPOINT_INTERVAL`]...
const CHECKPOINT_BYTES: u64 = 8 << 20;
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// ...and whatever the time once this much was.
const CHECKPOINT_MAX_BYTES: u64 = 64 << 20;

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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PartRecord {
    /// The version the part's bytes come from.
    etag: String,
    /// That version's length.
    size: u64,
    /// Bytes at the start of the part known to be on disk. A record without
    /// it (from an older ferry) vouches for nothing.
    #[serde(default)]
    verified: u64,
}

/// Downloads `remote` to `local`, continuing an interrupted earlier run.
pub async fn download_file(
    client: &Client,
    remote: &RemotePath,
    local: &Path,
    options: DownloadOptions,
) -> Result<DownloadReport> {
    let mut part = Part::lock(local)?;
    // One give-up time and backoff for the whole download, both started
    // over by every piece of the file that arrives: a link that keeps
    // dropping the connection but moves bytes in between never makes the
    // download give up, and each resume follows the cut without a long
    // pause; only `give_up_after` without a byte does.
    let mut retries = client.retries();
    let mut resumed_bytes = None;
    loop {
        let mut meta = client.stat_retrying(&mut retries, remote).await?;
        if meta.kind != EntryKind::File {
            return Err(Error::IsADirectory(remote.to_string()));
        }
        let etag = meta
            .etag
            .clone()
            .ok_or_else(|| Error::Storage(format!("{remote} has no etag")))?;
        part.pin(&etag, meta.size).await?;
        resumed_bytes.get_or_insert(part.len);
        let outcome = fetch_rest(client, &mut retries, remote, &mut part, &options).await;
        match outcome {
            Ok(()) => {
                let record = part.finish(local).await?;
                // The version fetched may be newer than the one stat saw.
                meta.size = record.size;
                meta.etag = Some(record.etag);
                return Ok(DownloadReport {
                    meta,
                    resumed_bytes: resumed_bytes.unwrap_or(0),
                });
            }
            Err(e) => {
                // What arrived before the failure counts for the next try.
                if let Err(saving) = part.checkpoint().await {
                    tracing::warn!(error = %saving, "recording the partial download failed");
                }
                match e {
                    Error::Network(_) if !retries.exhausted() => {
                        tracing::info!(%e, "download interrupted; resuming");
                        retries.again(e, None).await?;
                    }
                    e => return Err(e),
                }
            }
        }
    }
}

/// The locked part file of one download.
struct Part {
    file: tokio::fs::File,
    path: PathBuf,
    record_path: PathBuf,
    /// What the part holds; `None` until a version is pinned when the part
    /// vouched for nothing.
    record: Option<PartRecord>,
    /// Bytes of the part written (by earlier runs: trusted) so far.
    len: u64,
    /// `len` at the last checkpoint, and when it was.
    checkpointed: u64,
    checkpointed_at: Instant,
}

impl Part {
    /// Opens and locks the part file for `local`, refusing if another
    /// download holds it; reads what an earlier run recorded of it.
    fn lock(local: &Path) -> Result<Part> {
        let (path, record_path) = part_paths(local)?;
        let file = lock_part(&path, local)?;
        let record: Option<PartRecord> = std::fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|r: &PartRecord| r.verified <= r.size);
        let on_disk = file
            .metadata()
            .map_err(Error::io(format!("reading {}", path.display())))?
            .len();
        // Only what a checkpoint vouched for; a longer part holds bytes that
        // may never have reached the disk whole, or that are not ours.
        let len = record.as_ref().map_or(0, |r| r.verified.min(on_disk));
        Ok(Part {
            file: tokio::fs::File::from_std(file),
            path,
            record_path,
            record,
            len,
            checkpointed: len,
            checkpointed_at: Instant::now(),
        })
    }

    /// Makes the part one of version `etag` (`size` bytes): kept up to what
    /// is trusted if it already is, started over otherwise.
    async fn pin(&mut self, etag: &str, size: u64) -> Result<()> {
        let same = self
            .record
            .as_ref()
            .is_some_and(|r| r.etag == etag && r.size == size);
        if same {
            self.truncate(self.len).await
        } else {
            self.restart(etag.to_owned(), size).await
        }
    }

    /// Empties the part for version `etag`.
    async fn restart(&mut self, etag: String, size: u64) -> Result<()> {
        self.truncate(0).await?;
        self.file
            .sync_all()
            .await
            .map_err(Error::io(format!("syncing {}", self.path.display())))?;
        self.len = 0;
        self.checkpointed = 0;
        self.record = Some(PartRecord {
            etag,
            size,
            verified: 0,
        });
        self.save_record().await
    }

    async fn truncate(&mut self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .await
            .map_err(Error::io(format!("truncating {}", self.path.display())))?;
        self.file
            .seek(std::io::SeekFrom::Start(len))
            .await
            .map_err(Error::io(format!("seeking in {}", self.path.display())))?;
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .await
            .map_err(Error::io(format!("writing {}", self.path.display())))?;
        self.len += bytes.len() as u64;
        let since = self.len - self.checkpointed;
        if since >= CHECKPOINT_MAX_BYTES
            || (since >= CHECKPOINT_BYTES && self.checkpointed_at.elapsed() >= CHECKPOINT_INTERVAL)
        {
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Puts what was written on disk, then records it as trusted.
    async fn checkpoint(&mut self) -> Result<()> {
        if self.len == self.checkpointed {
            return Ok(());
        }
        self.file
            .flush()
            .await
            .map_err(Error::io(format!("writing {}", self.path.display())))?;
        self.file
            .sync_data()
            .await
            .map_err(Error::io(format!("syncing {}", self.path.display())))?;
        if let Some(record) = &mut self.record {
            record.verified = self.len;
        }
        self.save_record().await?;
        self.checkpointed = self.len;
        self.checkpointed_at = Instant::now();
        Ok(())
    }

    async fn save_record(&self) -> Result<()> {
        let Some(record) = &self.record else {
            return Ok(());
        };
        let body = serde_json::to_vec(record).expect("records serialize");
        let tmp = self.record_path.with_extension("json.tmp");
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(Error::io(format!("writing {}", tmp.display())))?;
        out.write_all(&body)
            .await
            .map_err(Error::io(format!("writing {}", tmp.display())))?;
        out.sync_all()
            .await
            .map_err(Error::io(format!("syncing {}", tmp.display())))?;
        tokio::fs::rename(&tmp, &self.record_path)
            .await
            .map_err(Error::io(format!("writing {}", self.record_path.display())))
    }

    /// Moves the complete part to `local`, once it holds exactly the pinned
    /// version's length and is still the file at the part's name.
    async fn finish(mut self, local: &Path) -> Result<PartRecord> {
        self.file
            .flush()
            .await
            .map_err(Error::io(format!("writing {}", self.path.display())))?;
        self.file
            .sync_all()
            .await
            .map_err(Error::io(format!("syncing {}", self.path.display())))?;
        let record = self
            .record
            .clone()
            .expect("a version is pinned before anything is fetched");
        let ours = self
            .file
            .metadata()
            .await
            .map_err(Error::io(format!("reading {}", self.path.display())))?;
        if ours.len() != record.size || self.len != record.size {
            // Never kept: the next run starts over.
            let _ = tokio::fs::remove_file(&self.record_path).await;
            let _ = self.file.set_len(0).await;
            return Err(Error::Conflict(format!(
                "{} holds {} bytes where the remote file has {}; not keeping it",
                self.path.display(),
                ours.len(),
                record.size
            )));
        }
        if !same_file(&ours, &self.path) {
            return Err(Error::Conflict(format!(
                "{} was removed or replaced during the download",
                self.path.display()
            )));
        }
        // The record first: a part without one is never trusted.
        let _ = tokio::fs::remove_file(&self.record_path).await;
        tokio::fs::rename(&self.path, local)
            .await
            .map_err(Error::io(format!(
                "moving the download to {}",
                local.display()
            )))?;
        // The lock goes with the file, after the rename.
        drop(self);
        Ok(record)
    }
}

/// Opens `part` (created if missing), locked for this process alone.
fn lock_part(part: &Path, local: &Path) -> Result<std::fs::File> {
    loop {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(part)
            .map_err(Error::io(format!("opening {}", part.display())))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(Error::Conflict(format!(
                    "another ferry get is downloading to {} ({} is locked)",
                    local.display(),
                    part.display()
                )));
            }
            // A filesystem without locks (some network ones): the download
            // goes on unguarded, with a warning.
            Err(e @ (rustix::io::Errno::NOLCK | rustix::io::Errno::OPNOTSUPP)) => {
                tracing::warn!(error = %e, part = %part.display(), "cannot lock the part file");
            }
            Err(e) => {
                return Err(Error::io(format!("locking {}", part.display()))(e.into()));
            }
        }
        // The download that held the lock may have renamed the part into
        // place (or removed it) between our open and our lock: that file is
        // no part any more; open the name again.
        let meta = file
            .metadata()
            .map_err(Error::io(format!("reading {}", part.display())))?;
        if same_file(&meta, part) {
            return Ok(file);
        }
    }
}

/// Whether `path` names the file `meta` describes.
fn same_file(meta: &std::fs::Metadata, path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
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

/// Fetches the rest of the pinned version into `part`. Every piece that
/// arrives is progress for `retries`; waiting for one fails once the server
/// has sent nothing for the give-up time.
async fn fetch_rest(
    client: &Client,
    retries: &mut Retries<'_>,
    remote: &RemotePath,
    part: &mut Part,
    options: &DownloadOptions,
) -> Result<()> {
    let report = |done: u64, total: u64| {
        if let Some(progress) = &options.progress {
            progress(Progress { done, total });
        }
    };
    let pinned = part.record.clone().expect("a version is pinned");
    if part.len == pinned.size {
        report(part.len, pinned.size);
        return Ok(());
    }
    let resp = client
        .get_resume(retries, remote, part.len, &pinned.etag)
        .await?;
    let size = if resp.status() == StatusCode::OK {
        // The file changed since the part began: the server sent it whole.
        let etag =
            header_etag(&resp).ok_or_else(|| Error::Storage("response without ETag".into()))?;
        let size = resp
            .content_length()
            .ok_or_else(|| Error::Storage("response without length".into()))?;
        part.restart(etag, size).await?;
        size
    } else {
        if header_etag(&resp).as_deref() != Some(pinned.etag.as_str()) {
            return Err(Error::Network(format!(
                "{remote}: the server sent another version"
            )));
        }
        if content_range(&resp) != Some((part.len, pinned.size)) {
            return Err(Error::Network(format!(
                "{remote}: the server sent another range than bytes {}-",
                part.len
            )));
        }
        pinned.size
    };
    let mut stream = resp.bytes_stream();
    loop {
        // Cancelled (Ctrl-C), what arrived is kept for the next run.
        let piece = tokio::select! {
            piece = stream.next() => piece,
            () = retries.stalled() => {
                return Err(Error::Network(format!(
                    "downloading {remote}: the server sent nothing for {:.1?}",
                    retries.quiet_for()
                )));
            }
            () = client.cancelled() => return Err(Error::Cancelled),
        };
        let Some(piece) = piece else { break };
        let piece =
            piece.map_err(|e| Error::Network(format!("downloading {remote}: {}", describe(&e))))?;
        if part.len + piece.len() as u64 > size {
            return Err(Error::Network(format!(
                "{remote}: the server sent more than {size} bytes"
            )));
        }
        if let Some(throttle) = &options.throttle {
            throttle.acquire(piece.len() as u64).await;
        }
        part.write(&piece).await?;
        retries.progressed(Instant::now());
        report(part.len, size);
    }
    if part.len != size {
        return Err(Error::Network(format!(
            "{remote}: got {} of {size} bytes",
            part.len
        )));
    }
    Ok(())
}

/// The start and the complete length of a `Content-Range: bytes a-b/len`.
fn content_range(resp: &reqwest::Response) -> Option<(u64, u64)> {
    let value = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let (range, total) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()?))
}
