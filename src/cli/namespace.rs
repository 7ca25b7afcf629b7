//! `ferry ls`, `stat`, `rm`, `mv`, `mkdir`.

use std::io::Write;

use clap::Args;

use super::remote::{ServerArgs, parse_remote};
use crate::protocol::{EntryKind, ErrorCode, MoveRequest};

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Directory to list (default: the root).
    #[arg(default_value = "")]
    path: String,
    /// List everything below, not just the directory's entries.
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Print JSON, one entry per line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct StatArgs {
    path: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    path: String,
    /// Remove a directory and everything in it.
    #[arg(short, long)]
    recursive: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct MvArgs {
    from: String,
    to: String,
    /// Refuse to replace an existing destination.
    #[arg(short = 'n', long)]
    no_clobber: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct MkdirArgs {
    path: String,
    /// Create missing parents too; an existing directory is not an error.
    #[arg(short, long)]
    parents: bool,
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn ls(args: LsArgs) -> anyhow::Result<()> {
    let client = args.server.client()?;
    let entries = client
        .list(&parse_remote(&args.path)?, args.recursive)
        .await?;
    let mut out = std::io::stdout().lock();
    for entry in entries {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&entry)?)?;
            continue;
        }
        let mtime = entry
            .mtime
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|| "-".repeat(16));
        let (kind, suffix) = match entry.kind {
            EntryKind::Dir => ('d', "/"),
            EntryKind::File => ('-', ""),
        };
        writeln!(
            out,
            "{kind} {:>14} {mtime} {}{suffix}",
            entry.size, entry.name
        )?;
    }
    Ok(())
}

pub async fn stat(args: StatArgs) -> anyhow::Result<()> {
    let meta = args
        .server
        .client()?
        .stat(&parse_remote(&args.path)?)
        .await?;
    println!("{}", serde_json::to_string_pretty(&meta)?);
    Ok(())
}

pub async fn rm(args: RmArgs) -> anyhow::Result<()> {
    let client = args.server.client()?;
    let path = parse_remote(&args.path)?;
    let kind = match client.stat(&path).await {
        Ok(meta) => meta.kind,
        // A token that may write but not read cannot look first: the path
        // is removed as a file, and as a directory if it is one.
        Err(e) if e.code() == ErrorCode::Forbidden => match client.delete(&path).await {
            Err(e) if e.code() == ErrorCode::IsADirectory => EntryKind::Dir,
            deleted => return Ok(deleted?),
        },
        Err(e) => return Err(e.into()),
    };
    match kind {
        EntryKind::File => client.delete(&path).await?,
        EntryKind::Dir if args.recursive => client.rmdir(&path, true).await?,
        EntryKind::Dir => anyhow::bail!("{path} is a directory; use -r to remove it"),
    }
    Ok(())
}

pub async fn mv(args: MvArgs) -> anyhow::Result<()> {
    let request = MoveRequest {
        from: parse_remote(&args.from)?,
        to: parse_remote(&args.to)?,
        overwrite: !args.no_clobber,
        recursive: true,
    };
    args.server.client()?.rename(&request).await?;
    Ok(())
}

pub async fn mkdir(args: MkdirArgs) -> anyhow::Result<()> {
    let client = args.server.client()?;
    let path = parse_remote(&args.path)?;
    match client.mkdir(&path, args.parents).await {
        Err(e) if args.parents && e.code() == crate::protocol::ErrorCode::AlreadyExists => {
            match client.stat(&path).await?.kind {
                EntryKind::Dir => Ok(()),
                EntryKind::File => Err(e.into()),
            }
        }
        other => other.map(|_| ()).map_err(Into::into),
    }
}
