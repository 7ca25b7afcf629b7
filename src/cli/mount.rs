//! `ferry mount URL MOUNTPOINT`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use super::remote::{parse_bytes, read_token};
use crate::client::Client;
use crate::fs::core::MountOptions;
use crate::fs::{MAX_WRITE, Mount};

#[derive(Debug, Args)]
pub struct MountArgs {
    /// The ferry server, e.g. http://127.0.0.1:7070.
    url: String,
    /// An existing, empty directory.
    #[arg(required_unless_present = "status")]
    mountpoint: Option<PathBuf>,
    /// Show the uploads this server's mounts have not committed yet, and exit.
    #[arg(long)]
    status: bool,
    /// Memory for cached file blocks (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    cache_size: u64,
    /// The mount's directory: staged writes, the journal of pending uploads,
    /// and (when given explicitly) a second block cache on disk, emptied at
    /// mount time. Default: a directory per server URL under the state
    /// directory ($FERRY_STATE_DIR, else ~/.local/state/ferry).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Budget of the disk block cache (K, M, G suffixes).
    #[arg(long, default_value = "4G", value_parser = parse_bytes)]
    disk_cache_size: u64,
    /// Bound on the local space taken by staged writes: files open for
    /// writing plus closed files whose upload is pending (K, M, G suffixes).
    /// Past it, writes wait for uploads to drain, or fail with ENOSPC when
    /// they cannot. Default: no bound but the free space of the cache
    /// directory's disk (less 1 MiB kept for the upload journal).
    #[arg(long, value_parser = parse_bytes)]
    max_staging: Option<u64>,
    /// Refuse every change through the mount.
    #[arg(long)]
    read_only: bool,
    /// Upload a file only once it is closed (or fsynced). By default the
    /// chunks of a new or truncated file written from its start are sent
    /// while it is still being written, so little is left at close.
    #[arg(long)]
    no_write_behind: bool,
    /// Per second: while the server takes a file's chunks at least this
    /// fast, a close waits for write-behind to send the rest instead of
    /// writing the whole file to the local disk as well. The close is as
    /// durable either way. 0: a close always writes locally.
    #[arg(long, value_parser = parse_bytes, default_value = "100M")]
    server_pace: u64,
    /// Seconds names and attributes are trusted without asking the server.
    /// Changes made elsewhere reach the mount sooner, through the server's
    /// change feed; the TTL bounds how stale they can be when the feed is
    /// down.
    #[arg(long, default_value_t = 1)]
    attr_ttl: u64,
    /// Seconds a request keeps retrying an unreachable server (or waiting
    /// on one that does not answer) before the filesystem call fails with
    /// EIO.
    #[arg(long, default_value_t = 10)]
    retry_for: u64,
    /// Stay in the foreground (otherwise the mount runs in the background
    /// once it is ready).
    #[arg(long)]
    foreground: bool,
    /// A file holding the access token (else `FERRY_TOKEN`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// PEM CA certificates to trust for an https:// server, besides the system's.
    #[arg(long, env = "FERRY_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Serve the mount's counters (cache hits and misses, bytes fetched,
    /// pending uploads) at http://ADDR/metrics.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

pub async fn mount(args: MountArgs) -> anyhow::Result<()> {
    let state = match &args.cache_dir {
        Some(dir) => dir.clone(),
        None => default_cache_dir(&args.url)?,
    };
    if args.status {
        return print_status(&state);
    }
    if let Some(bound) = args.max_staging
        && bound < u64::from(MAX_WRITE)
    {
        bail!("--max-staging must be at least 1M: a single write can carry 1 MiB");
    }
    let requested = args
        .mountpoint
        .clone()
        .expect("clap requires it without --status");
    let mountpoint = std::fs::canonicalize(&requested)
        .with_context(|| format!("mount point {}", requested.display()))?;
    match std::fs::metadata(&mountpoint) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => bail!("mount point {} is not a directory", mountpoint.display()),
        // ENOTCONN: a FUSE mount whose process died.
        Err(e) if e.raw_os_error() == Some(107) => bail!(
            "{} is a stale mount left by a process that died; unmount it with `fusermount3 -u {}`",
            mountpoint.display(),
            mountpoint.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("mount point {}", mountpoint.display())),
    }
    if is_mounted(&mountpoint) {
        bail!(
            "{} is busy: something is already mounted there",
            mountpoint.display()
        );
    }
    let mut config = crate::client::ClientConfig::default();
    config.retry.give_up_after = Duration::from_secs(args.retry_for);
    config.retry.max_delay = Duration::from_secs(2);
    config.token = read_token(args.token_file.as_deref())?;
    config.ca_file = args.ca_file.clone();
    let client = Client::with_config(&args.url, config)?;
    let access = client
        .whoami()
        .await
        .with_context(|| format!("cannot use the ferry server at {}", args.url))?;
    if !access.prefix.is_root() || !access.read {
        bail!(
            "the token reaches only {:?} (read: {}); a mount needs to read the whole store",
            access.prefix.as_str(),
            access.read
        );
    }
    // A read-only token makes a read-only mount: writes fail at once (EROFS)
    // rather than after close, when the upload is refused.
    let read_only = args.read_only || !access.write;
    if read_only && !args.read_only {
        eprintln!("ferry: the token cannot write; mounting read-only");
    }
    if !args.foreground {
        return run_in_background(&mountpoint);
    }
    let options = MountOptions {
        cache_bytes: args.cache_size as usize,
        disk_cache: args
            .cache_dir
            .clone()
            .map(|dir| (dir, args.disk_cache_size)),
        state_dir: Some(state),
        max_staging: args.max_staging,
        read_only,
        attr_ttl: Duration::from_secs(args.attr_ttl),
        write_behind: !args.no_write_behind,
        server_pace: args.server_pace,
        limits: access.limits,
    };
    let mount = Mount::start(client, &mountpoint, options)?;
    if let Some(addr) = args.metrics_addr {
        let core = mount.core.clone();
        let bound = crate::metrics_export::serve(addr, move || core.metrics())
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        eprintln!("ferry: mount metrics at http://{bound}/metrics");
    }
    eprintln!("ferry: {} mounted at {}", args.url, mountpoint.display());
    wait_for_end(&mount).await;
    if !mount.is_finished() {
        mount
            .unmount()
            .with_context(|| format!("unmounting {}", mountpoint.display()))?;
    }
    eprintln!("ferry: {} unmounted", mountpoint.display());
    Ok(())
}

/// The cache directory of mounts of `url`: stable, so a later mount finds
/// the uploads an earlier one left.
fn default_cache_dir(url: &str) -> anyhow::Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let id = hex::encode(&Sha256::digest(url.trim_end_matches('/').as_bytes())[..8]);
    Ok(super::transfer::state_dir()?.join("mounts").join(id))
}

fn print_status(state: &Path) -> anyhow::Result<()> {
    let pending = crate::fs::pending::list_pending(&state.join("journal"));
    if pending.is_empty() {
        println!("no pending uploads");
    }
    for entry in pending {
        let size = std::fs::metadata(&entry.local)
            .map(|m| m.len())
            .unwrap_or(0);
        println!(
            "{}	{} bytes	queued {}",
            entry.path,
            size,
            entry.queued_at.to_rfc3339()
        );
    }
    Ok(())
}

/// Until SIGINT, SIGTERM or an unmount from outside (`fusermount3 -u`).
async fn wait_for_end(mount: &Mount) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = ticks.tick() => if mount.is_finished() { return },
        }
    }
}

/// Starts this same command in the foreground as a detached process, and
/// returns once the mount is in place (or says why it failed).
fn run_in_background(mountpoint: &Path) -> anyhow::Result<()> {
    let log = std::env::temp_dir().join(format!("ferry-mount-{}.log", std::process::id()));
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--foreground".into());
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(std::env::current_exe()?)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .process_group(0)
            .spawn()?
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if is_mounted(mountpoint) {
            println!(
                "mounted at {} (process {}, log {})",
                mountpoint.display(),
                child.id(),
                log.display()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("the mount process exited ({status}):\n{output}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the mount did not appear within 15 s; see {}",
        log.display()
    )
}

/// True when `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| unescape(mount_point) == wanted)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}
