//! `ferry-agent`: keeps local folders pushed to a ferry server.
//!
//! ```text
//! ferry-agent run --dir ~/Documents --server http://nas:7070 --prefix laptop/docs
//! ferry-agent once --config ~/.config/ferry/agent.toml
//! ferry-agent status --dir ~/Documents
//! ```

mod config;
mod filter;
mod folder;
mod journal;
mod memory;
mod output;
mod pipeline;
mod plan;
mod remote;
mod scan;
mod settle;
mod status;
mod watch;

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ferry::client::retry::RetryPolicy;
use ferry::client::throttle::Throttle;
use ferry::client::{Client, ClientConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{FolderSpec, Overrides, Settings};
use crate::filter::Filter;
use crate::folder::{Folder, FolderParts, LoopOptions};
use crate::journal::Journal;
use crate::pipeline::Pipeline;
use crate::remote::Remote;

/// Hashing threads (reading files is the limit, not the CPU).
const HASHERS: usize = 2;
/// How long one request is retried before the failure is reported (and the
/// pass or upload is tried again later, with its own backoff).
const REQUEST_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long a stopping agent lets transfers in flight finish.
const STOP_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "Keep local folders pushed to a ferry server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sync, then watch for changes and push them until stopped (SIGTERM, Ctrl-C).
    Run(SyncArgs),
    /// Sync once (waiting for files still being written), then exit: for cron and scripts.
    Once(SyncArgs),
    /// Show what the journal says: last sync, pending uploads, errors.
    Status(FolderArgs),
}

#[derive(Debug, Args)]
struct FolderArgs {
    /// The local folder to sync.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The ferry server.
    #[arg(long, env = "FERRY_SERVER")]
    server: Option<String>,
    /// Remote directory the folder maps to (default: the root).
    #[arg(long)]
    prefix: Option<String>,
    /// Where the state journal lives (default: DIR/.ferry-agent/).
    #[arg(long)]
    state: Option<PathBuf>,
    /// A TOML file listing several folders (see docs/AGENT.md).
    #[arg(long, conflicts_with_all = ["dir", "prefix", "state"])]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SyncArgs {
    #[command(flatten)]
    folder: FolderArgs,
    /// Files uploaded at once (each with several chunks in flight).
    #[arg(long)]
    transfers: Option<usize>,
    /// Bandwidth limit in bytes per second for all transfers (K, M, G suffixes).
    #[arg(long, value_parser = ferry::cli::parse_bytes)]
    bwlimit: Option<u64>,
    /// Delete at most this many remote files in one pass (default: half of them).
    #[arg(long)]
    max_delete: Option<u64>,
    /// How often the whole folder is rescanned to catch missed events (e.g. 30m, 1h).
    #[arg(long, value_parser = config::parse_duration)]
    rescan_interval: Option<Duration>,
    /// How long a file that keeps changing (a log being appended) waits to
    /// settle before a snapshot of it is pushed anyway (default 60s).
    #[arg(long, value_parser = config::parse_duration)]
    max_settle_delay: Option<Duration>,
    /// Print what would be done, change nothing (one pass, then exit).
    #[arg(long)]
    dry_run: bool,
    /// A file holding the access token (else `FERRY_TOKEN`), for every folder.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// PEM CA certificates to trust for an https:// server, besides the system's.
    #[arg(long, env = "FERRY_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Serve the agent's counters (tracked files, pending uploads, bytes
    /// sent) at http://ADDR/metrics.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| "info,notify=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let outcome = match Cli::parse().command {
        Command::Run(args) => sync(&args, false),
        Command::Once(args) => sync(&args, true),
        Command::Status(args) => status(&args).map(|()| true),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ferry-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// What `--metrics-addr` exports, over every folder.
fn metrics(folders: &[Arc<Folder>], clients: &[Client]) -> Vec<ferry::metrics_export::Sample> {
    use ferry::metrics_export::Sample;
    let (mut tracked, mut pending) = (0, 0);
    for folder in folders {
        tracked += folder.journal.count_records().map_or(0, |(n, _)| n);
        pending += folder.journal.all_pending().map_or(0, |p| p.len() as u64);
    }
    let sent = clients.iter().map(Client::chunk_bytes_sent).sum();
    vec![
        Sample::gauge(
            "ferry_agent_tracked_files",
            "Files the journal knows are on the server",
            tracked,
        ),
        Sample::gauge(
            "ferry_agent_pending_uploads",
            "Uploads with a session not yet committed",
            pending,
        ),
        Sample::counter(
            "ferry_agent_sent_bytes",
            "Chunk bytes sent, retries included",
            sent,
        ),
    ]
}

fn overrides(args: &FolderArgs) -> Overrides {
    Overrides {
        dir: args.dir.clone(),
        server: args.server.clone(),
        prefix: args.prefix.clone(),
        state: args.state.clone(),
        config: args.config.clone(),
        ..Overrides::default()
    }
}

fn status(args: &FolderArgs) -> Result<()> {
    let settings = Settings::resolve_for_status(&overrides(args))?;
    let mut first = true;
    for spec in &settings.folders {
        if !first {
            output::text("\n");
        }
        first = false;
        output::text(&status::describe(spec)?);
    }
    Ok(())
}

/// `run` and `once`. Returns whether everything was pushed.
fn sync(args: &SyncArgs, once: bool) -> Result<bool> {
    let settings = Settings::resolve(&Overrides {
        transfers: args.transfers,
        bwlimit: args.bwlimit,
        max_delete: args.max_delete,
        rescan_interval: args.rescan_interval,
        max_settle_delay: args.max_settle_delay,
        ..overrides(&args.folder)
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let stop = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let (shutdown_tx, shutdown_rx) = crossbeam_channel::bounded::<()>(0);
    rt.spawn(stop_on_signals(
        stop.clone(),
        hard_stop.clone(),
        shutdown_tx,
    ));

    let throttle = settings.bwlimit.map(|rate| Arc::new(Throttle::new(rate)));
    let pipeline = Pipeline::start(HASHERS, settings.transfers);
    let token = ferry::cli::read_token(args.token_file.as_deref())?;
    let mut folders = Vec::new();
    let mut clients = Vec::new();
    let mut locks = Vec::new();
    for spec in &settings.folders {
        let config = ClientConfig {
            retry: RetryPolicy {
                give_up_after: REQUEST_RETRY_FOR,
                ..RetryPolicy::default()
            },
            token: token.clone(),
            ca_file: args.ca_file.clone(),
            ..ClientConfig::default()
        };
        let client = Client::with_config(&spec.server, config)
            .with_context(|| format!("server for {}", spec.dir.display()))?
            .with_cancel(hard_stop.clone());
        clients.push(client.clone());
        let remote = Remote::new(client, spec.prefix.clone(), throttle.clone(), stop.clone());
        let journal = if args.dry_run {
            if spec.state.exists() {
                Journal::open_read_only(&spec.state)?
            } else {
                Journal::in_memory()?
            }
        } else {
            locks.push(lock(spec)?);
            let journal = Journal::open(&spec.state)?;
            journal.set_meta("remote", &remote.describe())?;
            journal.set_meta("pid", &std::process::id().to_string())?;
            journal
        };
        tracing::info!(
            folder = %spec.dir.display(),
            remote = remote.describe(),
            state = %spec.state.display(),
            "syncing"
        );
        folders.push(Folder::new(FolderParts {
            root: spec.dir.clone(),
            journal,
            remote,
            filter: Filter::new(&spec.dir, spec.own_paths_inside()),
            dry_run: args.dry_run,
            max_delete: spec.max_delete,
            rt: rt.handle().clone(),
            stop: stop.clone(),
            max_settle_delay: settings.max_settle_delay,
            once: once || args.dry_run,
        }));
    }
    if let Some(addr) = args.metrics_addr {
        let (folders, clients) = (folders.clone(), clients.clone());
        let bound = rt
            .block_on(ferry::metrics_export::serve(addr, move || {
                metrics(&folders, &clients)
            }))
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!("metrics at http://{bound}/metrics");
    }
    let options = LoopOptions {
        once: once || args.dry_run,
        rescan_interval: settings.rescan_interval,
    };
    let results: Vec<Result<bool>> = std::thread::scope(|scope| {
        let handles: Vec<_> = folders
            .iter()
            .map(|folder| {
                let (pipeline, options, shutdown) = (&pipeline, &options, &shutdown_rx);
                scope.spawn(move || folder.run(pipeline, options, shutdown))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a folder thread panicked")))
            })
            .collect()
    });
    // Stopped: transfers in flight finish their chunks (bounded by the hard stop).
    let drained_by = std::time::Instant::now() + STOP_GRACE + Duration::from_secs(5);
    while !folders.iter().all(|f| f.idle()) && std::time::Instant::now() < drained_by {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut all_pushed = true;
    for (folder, result) in folders.iter().zip(results) {
        if !args.dry_run {
            let _ = folder.journal.set_meta("pid", "");
        }
        match result {
            Ok(pushed) => all_pushed &= pushed,
            Err(e) => {
                tracing::error!(folder = %folder.root.display(), error = %format!("{e:#}"), "stopped");
                all_pushed = false;
            }
        }
    }
    if stop.is_cancelled() {
        tracing::info!("stopped");
    }
    drop(locks);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(all_pushed)
}

/// SIGTERM or SIGINT: no new work, transfers in flight finish their chunks
/// (for at most [`STOP_GRACE`]); a second signal stops at once.
async fn stop_on_signals(
    stop: CancellationToken,
    hard_stop: CancellationToken,
    shutdown: crossbeam_channel::Sender<()>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for signals");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping: letting chunks in flight finish");
    stop.cancel();
    drop(shutdown);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = tokio::time::sleep(STOP_GRACE) => {}
    }
    hard_stop.cancel();
}

/// One agent per journal: a second one would push the same files twice.
fn lock(spec: &FolderSpec) -> Result<std::fs::File> {
    let dir = spec
        .state
        .parent()
        .context("the state path has no directory")?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    let path = spec.lock_path();
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; the lock goes with the file.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        bail!(
            "another ferry-agent is already syncing {} (its state is {})",
            spec.dir.display(),
            spec.state.display()
        );
    }
    Ok(file)
}
