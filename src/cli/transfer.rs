//! `ferry put` and `ferry get`: resumable transfers with progress bars.
//!
//! Run again with the same arguments, an interrupted transfer continues: `put`
//! keeps a small resume record (session id and hash) keyed by server, source,
//! destination, size and mtime; `get` continues its `.NAME.ferry-part` file
//! (see `client::download`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::remote::{ServerArgs, parse_bytes, parse_remote};
use crate::client::download::{DownloadOptions, download_file};
use crate::client::throttle::Throttle;
use crate::client::upload::{Transport, UploadOptions, upload_file};
use crate::client::{Client, Progress, ProgressFn};
use crate::error::Error;
use crate::protocol::upload::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::protocol::{EntryKind, ErrorCode, RemotePath};

#[derive(Debug, Args)]
pub struct PutArgs {
    /// Local file to upload.
    local: PathBuf,
    /// Remote destination; an existing directory or a trailing `/` keeps the file's name.
    remote: String,
    /// Chunks in flight at once [default: 32 MiB of chunks, 2 to 8 of them].
    #[arg(long)]
    parallel: Option<usize>,
    /// How chunks travel: `auto` (WebSocket, falling back to HTTP), `http` or `ws`.
    #[arg(long, default_value = "auto", value_parser = parse_transport)]
    transport: Transport,
    /// Bandwidth limit in bytes per second (K, M, G suffixes).
    #[arg(long, value_parser = parse_bytes)]
    bwlimit: Option<u64>,
    /// Chunk size of a new upload session, 1M to 64M (K, M, G suffixes)
    /// [default: the server's choice for the file's size]. A resumed
    /// upload keeps its session's.
    #[arg(long, value_parser = parse_chunk_size)]
    chunk_size: Option<u64>,
    #[command(flatten)]
    server: ServerArgs,
}

/// A chunk size within what every server takes.
fn parse_chunk_size(text: &str) -> std::result::Result<u64, String> {
    let size = parse_bytes(text)?;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        return Err(format!(
            "a chunk size must be between {} and {} MiB",
            MIN_CHUNK_SIZE >> 20,
            MAX_CHUNK_SIZE >> 20
        ));
    }
    Ok(size)
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Remote file to download.
    remote: String,
    /// Local destination; an existing directory keeps the file's name.
    local: PathBuf,
    /// Bandwidth limit in bytes per second (K, M, G suffixes).
    #[arg(long, value_parser = parse_bytes)]
    bwlimit: Option<u64>,
    #[command(flatten)]
    server: ServerArgs,
}

/// What lets a later `ferry put` continue this one.
#[derive(Debug, Serialize, Deserialize)]
struct ResumeRecord {
    session_id: Option<String>,
    sha256: Option<String>,
}

pub async fn put(args: PutArgs) -> anyhow::Result<()> {
    let client = cancel_on_interrupt(args.server.client()?);
    let meta = std::fs::metadata(&args.local)
        .with_context(|| format!("reading {}", args.local.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{} is not a regular file", args.local.display());
    }
    let remote = put_destination(&client, &args.local, &args.remote).await?;
    let record_path = resume_record_path(&client, &args.local, &remote, &meta)?;
    let record: Option<ResumeRecord> = std::fs::read(&record_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    // The digest is computed while the chunks travel (a record from an
    // older run may already carry it).
    let sha256 = record.as_ref().and_then(|r| r.sha256.clone());
    let bar = progress_bar(meta.len());
    let on_session = {
        let (record_path, sha256) = (record_path.clone(), sha256.clone());
        Arc::new(move |id: &str| {
            let record = ResumeRecord {
                session_id: Some(id.to_owned()),
                sha256: sha256.clone(),
            };
            if let Err(e) = save_record(&record_path, &record) {
                tracing::warn!(error = %e, "saving the resume record failed");
            }
        })
    };
    let options = UploadOptions {
        parallel: args.parallel,
        resume_id: record.and_then(|r| r.session_id),
        sha256,
        progress: bar.as_ref().map(progress_fn),
        on_session: Some(on_session),
        throttle: args.bwlimit.map(|rate| Arc::new(Throttle::new(rate))),
        transport: args.transport,
        ws: None,
        // `put` replaces what is there, as `cp` does.
        if_match: None,
        create_only: false,
        chunk_size: args.chunk_size,
        stop: None,
        sha256_prefix: None,
        length: None,
    };
    let report = upload_file(&client, &args.local, &remote, options)
        .await
        .map_err(|e| interrupted(e, "put"))?;
    let _ = std::fs::remove_file(&record_path);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let sent = client.chunk_bytes_sent();
    println!(
        "uploaded {} ({} bytes; sent {sent} bytes, {} already on the server)",
        report.meta.path, report.meta.size, report.resumed_bytes
    );
    Ok(())
}

pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    let client = cancel_on_interrupt(args.server.client()?);
    let remote = parse_remote(&args.remote)?;
    let local = if args.local.is_dir() {
        args.local.join(
            remote
                .name()
                .context("the root is a directory, not a file")?,
        )
    } else {
        args.local.clone()
    };
    let local = regular_destination(local)?;
    let meta = client.stat(&remote).await?;
    if meta.kind != EntryKind::File {
        anyhow::bail!("{remote} is a directory");
    }
    let bar = progress_bar(meta.size);
    let options = DownloadOptions {
        progress: bar.as_ref().map(progress_fn),
        throttle: args.bwlimit.map(|rate| Arc::new(Throttle::new(rate))),
    };
    let report = download_file(&client, &remote, &local, options)
        .await
        .map_err(|e| interrupted(e, "get"))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    println!(
        "downloaded {} to {} ({} bytes, {} already on disk)",
        remote,
        local.display(),
        report.meta.size,
        report.resumed_bytes
    );
    Ok(())
}

fn parse_transport(text: &str) -> Result<Transport, String> {
    match text {
        "auto" => Ok(Transport::Auto),
        "http" => Ok(Transport::Http),
        "ws" | "websocket" => Ok(Transport::WebSocket),
        other => Err(format!("{other:?} is not one of auto, http, ws")),
    }
}

/// Where `get` writes: the file a symbolic link points to (as `cp` writes
/// through one), never over a device or FIFO, which the download's final
/// rename would replace with a regular file.
fn regular_destination(local: PathBuf) -> anyhow::Result<PathBuf> {
    let mut local = local;
    // As many links as the kernel follows (SYMLOOP_MAX): a loop ends.
    for _ in 0..40 {
        match follow_once(local)? {
            Ok(regular) => return Ok(regular),
            Err(target) => local = target,
        }
    }
    anyhow::bail!("too many levels of symbolic links")
}

/// `Ok(local)` when `get` may write there, `Err(target)` when `local` is a
/// symbolic link to `target`.
fn follow_once(local: PathBuf) -> anyhow::Result<Result<PathBuf, PathBuf>> {
    let Ok(found) = std::fs::symlink_metadata(&local) else {
        return Ok(Ok(local));
    };
    if found.file_type().is_symlink() {
        let target = std::fs::read_link(&local)?;
        let target = match local.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
        return Ok(Err(target));
    }
    if !found.is_file() {
        anyhow::bail!(
            "{} exists and is not a regular file; ferry get writes regular files only",
            local.display()
        );
    }
    Ok(Ok(local))
}

/// `REMOTE`, or `REMOTE/<name of LOCAL>` when `REMOTE` names a directory.
async fn put_destination(
    client: &Client,
    local: &Path,
    remote: &str,
) -> anyhow::Result<RemotePath> {
    let name = local
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name", local.display()))?;
    let path = parse_remote(remote.trim_end_matches('/'))?;
    if remote.ends_with('/') || path.is_root() {
        return Ok(path.join(name)?);
    }
    match client.stat(&path).await {
        Ok(meta) if meta.kind == EntryKind::Dir => Ok(path.join(name)?),
        Ok(_) => Ok(path),
        Err(e) if e.code() == ErrorCode::NotFound => Ok(path),
        // A token that may write but not read (a drop box) cannot look:
        // the name is taken as the file's, as written.
        Err(e) if e.code() == ErrorCode::Forbidden => Ok(path),
        Err(e) => Err(e.into()),
    }
}

/// Where the resume record of this exact transfer lives.
fn resume_record_path(
    client: &Client,
    local: &Path,
    remote: &RemotePath,
    meta: &std::fs::Metadata,
) -> anyhow::Result<PathBuf> {
    let source = std::fs::canonicalize(local)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let key = format!(
        "{}\n{}\n{}\n{}\n{}",
        client.base_url(),
        source.display(),
        remote,
        meta.len(),
        mtime
    );
    let name = hex::encode(Sha256::digest(key.as_bytes()));
    Ok(state_dir()?.join("transfers").join(format!("{name}.json")))
}

/// `$FERRY_STATE_DIR`, else `$XDG_STATE_HOME/ferry`, else `~/.local/state/ferry`.
pub fn state_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FERRY_STATE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return Ok(PathBuf::from(dir).join("ferry"));
    }
    let home = std::env::var_os("HOME").context("neither FERRY_STATE_DIR nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/state/ferry"))
}

fn save_record(path: &Path, record: &ResumeRecord) -> anyhow::Result<()> {
    let dir = path.parent().expect("records live in a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(record)?)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// A clone of `client` that stops on Ctrl-C.
fn cancel_on_interrupt(client: Client) -> Client {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            trigger.cancel();
        }
    });
    client.with_cancel(token)
}

fn interrupted(e: Error, command: &str) -> anyhow::Error {
    match e {
        Error::Cancelled => {
            anyhow::anyhow!("interrupted; run the same `ferry {command}` again to continue")
        }
        other => other.into(),
    }
}

/// A byte progress bar when stdout is a terminal.
fn progress_bar(total: u64) -> Option<ProgressBar> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("a valid template"),
    );
    Some(bar)
}

fn progress_fn(bar: &ProgressBar) -> ProgressFn {
    let bar = bar.clone();
    Arc::new(move |p: Progress| bar.set_position(p.done))
}
