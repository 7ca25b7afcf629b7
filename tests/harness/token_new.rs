//! Tokens made the way an operator makes them: `ferry token new`. Shared
//! with the agent's tests, which include this file by path.

use std::path::Path;
use std::process::Command;

/// Runs `ferry token new`; returns the token and the `[[token]]` entry to
/// put in the server's config.
pub fn token_new(ferry: &Path, name: &str, prefix: &str) -> (String, String) {
    let made = Command::new(ferry)
        .args(["token", "new", "--name", name, "--prefix", prefix])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let text = String::from_utf8(made.stdout).unwrap();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("a token line")
        .to_owned();
    let entry = text[text.find("[[token]]").expect("a config entry")..].to_owned();
    (token, entry)
}
