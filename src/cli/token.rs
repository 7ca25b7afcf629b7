//! `ferry token new`: a fresh access token and the config lines that admit it.

use clap::{Args, Subcommand};

use crate::server::auth::{Scope, new_token};

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new token, and the `[[token]]` entry to paste into the
    /// server's config file (which stores only the token's SHA-256).
    New(NewArgs),
}

#[derive(Debug, Args)]
struct NewArgs {
    /// A name for logs and for the upload sessions it owns.
    #[arg(long)]
    name: String,
    /// What it may do: read, write, or both.
    #[arg(long, value_delimiter = ',', default_value = "read,write")]
    scope: Vec<ScopeArg>,
    /// The only directory it reaches (default: everything).
    #[arg(long, default_value = "")]
    prefix: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ScopeArg {
    Read,
    Write,
}

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let TokenCommand::New(args) = args.command;
    crate::protocol::RemotePath::parse(args.prefix.trim_matches('/'))
        .map_err(|e| anyhow::anyhow!("--prefix: {e}"))?;
    let mut scopes: Vec<Scope> = args
        .scope
        .iter()
        .map(|s| match s {
            ScopeArg::Read => Scope::Read,
            ScopeArg::Write => Scope::Write,
        })
        .collect();
    scopes.dedup();
    let (token, entry) = new_token(&args.name, scopes, &args.prefix);
    let entry = toml::to_string(&TokenEntry { token: vec![entry] })?;
    println!("token: {token}");
    println!();
    println!("Give the token to its user (FERRY_TOKEN or --token-file); it is not");
    println!("shown again. Add this to the server's config file:");
    println!();
    print!("{entry}");
    Ok(())
}

#[derive(serde::Serialize)]
struct TokenEntry {
    token: Vec<crate::server::auth::TokenConfig>,
}
