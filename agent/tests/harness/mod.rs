//! Test harness: a real `ferry serve` process, the real `ferry-agent`
//! binary on a real folder, and ways to compare the two sides.
#![allow(dead_code)]

#[path = "../../../tests/harness/metrics_text.rs"]
pub mod metrics_text;
#[path = "../../../tests/harness/serve_child.rs"]
pub mod serve_child;
#[path = "../../../tests/harness/token_new.rs"]
pub mod token_new;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry::client::Client;
use ferry::protocol::{EntryKind, RemotePath};
use sha2::{Digest, Sha256};

/// The `ferry` binary, built beside this test's executable by a workspace
/// build (`cargo build --workspace`, or tests run with `--workspace`).
pub fn ferry_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("ferry");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub listen: String,
    pub store: PathBuf,
}

impl Server {
    pub fn start(store: &Path) -> Server {
        Self::start_at(store, "127.0.0.1:0")
    }

    /// A server on `listen` (e.g. the address of one that was stopped).
    pub fn start_at(store: &Path, listen: &str) -> Server {
        Self::start_with(store, listen, &[])
    }

    /// A server on `listen` with more `ferry serve` arguments.
    pub fn start_with(store: &Path, listen: &str, extra: &[&str]) -> Server {
        let (child, url) =
            serve_child::spawn_serve(&ferry_bin(), store.to_str().unwrap(), listen, extra);
        let listen = url.trim_start_matches("http://").to_owned();
        Server {
            child,
            url,
            listen,
            store: store.to_owned(),
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url).unwrap()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Upload sessions the server has ever opened (committed ones are kept
    /// until they expire).
    pub fn session_count(&self) -> usize {
        std::fs::read_dir(self.store.join(".ferry/uploads"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The inode of a stored object (local store layout: one file per object,
    /// segments percent-encoded).
    pub fn stored_inode(&self, path: &str) -> u64 {
        let remote = RemotePath::parse(path).unwrap();
        let on_disk = self.store.join(remote.to_url_path());
        std::fs::metadata(&on_disk)
            .unwrap_or_else(|e| panic!("{}: {e}", on_disk.display()))
            .ino()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A synced folder and the agent that syncs it.
pub struct Agent {
    pub dir: PathBuf,
    pub server: String,
    pub prefix: String,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Agent {
    pub fn new(dir: &Path, server: &Server, prefix: &str) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        Agent {
            dir: dir.to_owned(),
            server: server.url.clone(),
            prefix: prefix.to_owned(),
            log: dir.with_extension("agent.log"),
            child: None,
        }
    }

    fn command(&self, sub: &str, extra: &[&str]) -> Command {
        self.wrapped_command(&[], sub, extra)
    }

    /// The agent run through `wrapper` (a program and its arguments, the
    /// agent's command line appended).
    fn wrapped_command(&self, wrapper: &[&str], sub: &str, extra: &[&str]) -> Command {
        let agent = env!("CARGO_BIN_EXE_ferry-agent");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(agent);
                cmd
            }
            None => Command::new(agent),
        };
        cmd.arg(sub)
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(["--server", &self.server, "--prefix", &self.prefix])
            .args(extra)
            // AGENT_TEST_LOG=ferry_agent=trace,… shows every file-system event.
            .env(
                "FERRY_LOG",
                std::env::var("AGENT_TEST_LOG").unwrap_or_else(|_| "ferry_agent=debug,info".into()),
            );
        cmd
    }

    /// `ferry-agent once`, to completion.
    pub fn once(&self, extra: &[&str]) -> Output {
        self.once_wrapped(&[], extra)
    }

    /// `ferry-agent once` through `wrapper` (see [`Agent::start_wrapped`]),
    /// to completion.
    pub fn once_wrapped(&self, wrapper: &[&str], extra: &[&str]) -> Output {
        let out = self
            .wrapped_command(wrapper, "once", extra)
            .output()
            .unwrap();
        std::fs::write(&self.log, &out.stderr).unwrap();
        out
    }

    /// `ferry-agent once` that must succeed; returns its log.
    pub fn once_ok(&self, extra: &[&str]) -> String {
        let out = self.once(extra);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "ferry-agent once failed:\n{log}");
        log
    }

    /// `ferry-agent run` in the background, logging to `self.log`.
    pub fn start(&mut self, extra: &[&str]) {
        self.start_wrapped(&[], extra);
    }

    /// `ferry-agent run` in the background, through `wrapper`.
    pub fn start_wrapped(&mut self, wrapper: &[&str], extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .wrapped_command(wrapper, "run", extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running agent").id();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the running agent to exit.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("a running agent");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit in {timeout:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
            .args(["status", "--dir", self.dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn state_db(&self) -> PathBuf {
        self.dir.join(".ferry-agent/state.db")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The upload session the agent journaled for `path`, if any.
pub fn pending_session(agent: &Agent, path: &str) -> Option<String> {
    let db = rusqlite::Connection::open_with_flags(
        agent.state_db(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .ok()?;
    db.query_row(
        "SELECT session_id FROM pending WHERE path = ?1",
        [path],
        |row| row.get(0),
    )
    .ok()
}

/// Size and SHA-256 of each file as the agent's journal records them.
pub fn journal_tree(agent: &Agent) -> Tree {
    let db = rusqlite::Connection::open_with_flags(
        agent.state_db(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut rows = db.prepare("SELECT path, size, sha256 FROM files").unwrap();
    rows.query_map([], |row| {
        let size: i64 = row.get(1)?;
        Ok((row.get(0)?, (size as u64, row.get(2)?)))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Size and SHA-256 of each file.
pub type Tree = BTreeMap<String, (u64, String)>;

/// Every regular file under `dir`, except the agent's state directory.
pub fn local_tree(dir: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            if rel == ".ferry-agent" {
                continue;
            }
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                walk(root, &path, out);
            } else if kind.is_file() {
                let data = std::fs::read(&path).unwrap();
                out.insert(rel, (data.len() as u64, sha256(&data)));
            }
        }
    }
    let mut out = Tree::new();
    walk(dir, dir, &mut out);
    out
}

/// Names and sizes of the files under `prefix`, from a listing.
pub async fn remote_listing(client: &Client, prefix: &str) -> BTreeMap<String, (u64, String)> {
    let dir = RemotePath::parse(prefix).unwrap();
    match client.list(&dir, true).await {
        Ok(entries) => entries
            .into_iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| (e.name, (e.size, e.etag.unwrap_or_default())))
            .collect(),
        Err(e) if e.code() == ferry::protocol::ErrorCode::NotFound => BTreeMap::new(),
        Err(e) => panic!("listing {prefix}: {e}"),
    }
}

/// Every file under `prefix` with its size and SHA-256 (downloaded).
pub async fn remote_tree(client: &Client, prefix: &str) -> Tree {
    let mut out = Tree::new();
    for name in remote_listing(client, prefix).await.into_keys() {
        // Gone since the listing: the agent is still at work.
        if let Some(data) = remote_bytes(client, &join(prefix, &name)).await {
            out.insert(name, (data.len() as u64, sha256(&data)));
        }
    }
    out
}

pub async fn remote_bytes(client: &Client, path: &str) -> Option<Vec<u8>> {
    let path = RemotePath::parse(path).unwrap();
    let meta = match client.stat(&path).await {
        Ok(meta) => meta,
        Err(e) if e.code() == ferry::protocol::ErrorCode::NotFound => return None,
        Err(e) => panic!("stat {path}: {e}"),
    };
    let data = client.read_range(&path, 0, meta.size, None).await.ok()?;
    Some(data.to_vec())
}

pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Polls `check` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Random bytes from the kernel (fast even in unoptimised builds).
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    data
}

pub fn write(dir: &Path, rel: &str, data: &[u8]) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// Sets a file's mtime into the past, so the agent need not wait for it to
/// settle.
pub fn age(path: &Path) {
    set_mtime(path, std::time::SystemTime::now() - Duration::from_secs(60));
}

pub fn set_mtime(path: &Path, mtime: std::time::SystemTime) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(mtime).unwrap();
}

/// Shows which entries differ (a readable failure instead of two dumps).
pub fn diff(expected: &Tree, actual: &Tree) -> String {
    let mut out = String::new();
    for (name, want) in expected {
        match actual.get(name) {
            None => out.push_str(&format!("missing remotely: {name}\n")),
            Some(got) if got != want => out.push_str(&format!("differs: {name}\n")),
            _ => {}
        }
    }
    for name in actual.keys().filter(|n| !expected.contains_key(*n)) {
        out.push_str(&format!("extra remotely: {name}\n"));
    }
    out
}
