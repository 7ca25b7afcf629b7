//! The `ferry` command line.

mod serve;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ferry", version, about = "Remote storage that feels local")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a store over HTTP.
    Serve(serve::ServeArgs),
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
    }
}
