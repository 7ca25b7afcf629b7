//! `ferry-agent`: background folder sync through ferry's chunk protocol.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "Keep a folder synced to a ferry server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch a folder and push its changes (not implemented yet).
    Run,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run => anyhow::bail!("ferry-agent run is not implemented yet"),
    }
}
