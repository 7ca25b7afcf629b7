//! The `ferry` command line.

mod mount;
mod namespace;
mod remote;
mod serve;
mod token;
mod transfer;
mod watch;

pub use remote::{parse_bytes, read_token};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ferry", version, about = "Remote storage that feels local")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as `human` text or `json` objects (on stderr).
    #[arg(long, env = "FERRY_LOG_FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl Cli {
    /// The flag, else (for `serve`) the config file's `log_format`.
    pub fn log_format(&self) -> LogFormat {
        if let Some(format) = self.log_format {
            return format;
        }
        match &self.command {
            Command::Serve(args) => args
                .config
                .as_deref()
                .and_then(|path| serve::ServeFile::load(path).ok())
                .and_then(|file| file.log_format)
                .unwrap_or(LogFormat::Human),
            _ => LogFormat::Human,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a store over HTTP.
    Serve(serve::ServeArgs),
    /// Upload a file (resumable: run again to continue).
    Put(transfer::PutArgs),
    /// Download a file (resumable: run again to continue).
    Get(transfer::GetArgs),
    /// List a directory.
    Ls(namespace::LsArgs),
    /// Show a file's or directory's metadata.
    Stat(namespace::StatArgs),
    /// Remove a file, or with -r a directory.
    Rm(namespace::RmArgs),
    /// Move or rename a file or directory.
    Mv(namespace::MvArgs),
    /// Create a directory.
    Mkdir(namespace::MkdirArgs),
    /// Print changes as they happen (one JSON object per line).
    Watch(watch::WatchArgs),
    /// Mount a ferry server as a directory (FUSE).
    Mount(mount::MountArgs),
    /// Make access tokens for the server's config.
    Token(token::TokenArgs),
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Put(args) => transfer::put(args).await,
        Command::Get(args) => transfer::get(args).await,
        Command::Ls(args) => namespace::ls(args).await,
        Command::Stat(args) => namespace::stat(args).await,
        Command::Rm(args) => namespace::rm(args).await,
        Command::Mv(args) => namespace::mv(args).await,
        Command::Mkdir(args) => namespace::mkdir(args).await,
        Command::Watch(args) => watch::watch(args).await,
        Command::Mount(args) => mount::mount(args).await,
        Command::Token(args) => token::run(args),
    }
}
