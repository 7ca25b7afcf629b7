//! `ferry serve` as a child process, and the URL it announces on its first
//! line. Shared by the ferry and ferry-agent test harnesses.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Runs `BIN serve --store STORE --listen LISTEN EXTRA…` (warnings and
/// errors go to the test's stderr) and returns the process with its URL.
pub fn spawn_serve(bin: &Path, store: &str, listen: &str, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(bin)
        .args(["serve", "--store", store, "--listen", listen])
        .args(extra)
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning ferry serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://") || w.starts_with("https://"))
        .unwrap_or_else(|| panic!("no URL in the server's first line: {line:?}"))
        .to_owned();
    (child, url)
}
