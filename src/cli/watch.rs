//! `ferry watch [PREFIX]`: print changes as they happen, one JSON line each.

use std::io::Write;

use clap::Args;

use super::remote::{ServerArgs, parse_remote};
use crate::client::watch::{WatchEvent, Watcher};

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only changes at or below this path (default: everything).
    #[arg(default_value = "")]
    prefix: String,
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let client = args.server.client()?;
    let mut watcher = Watcher::start(&client, &parse_remote(&args.prefix)?);
    while let Some(event) = watcher.next().await {
        let mut out = std::io::stdout().lock();
        match event {
            WatchEvent::Change(change) => writeln!(out, "{}", serde_json::to_string(&change)?)?,
            WatchEvent::Resync => {
                eprintln!("ferry watch: reconnected; changes may have been missed")
            }
            WatchEvent::Refused(why) => anyhow::bail!("the server refuses this watch: {why}"),
        }
        out.flush()?;
    }
    Ok(())
}
