//! Test harness: a real `ferry serve` process on 127.0.0.1:0, a reqwest
//! client, and a raw HTTP/1.1 client for requests no URL library would send.
#![allow(dead_code)]

pub mod metrics_text;
pub mod mount;
pub mod proxy;
pub mod serve_child;
pub mod token_new;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub url: String,
    /// The local store directory (absent for `memory://`).
    pub store_dir: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
}

/// The backends every conformance test runs against.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Local,
    Memory,
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(Backend::Local, &[])
    }

    pub fn start_with(backend: Backend, extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let store_dir = tmp.path().join("store");
        let store = match backend {
            Backend::Local => store_dir.to_str().unwrap().to_owned(),
            Backend::Memory => "memory://".to_owned(),
        };
        let mut server = Self::spawn(&store, "127.0.0.1:0", extra);
        server.store_dir = matches!(backend, Backend::Local).then_some(store_dir);
        server._tmp = Some(tmp);
        server
    }

    /// A server on a fresh local store, configured by the TOML `config`.
    pub fn start_configured(config: &str, extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("ferry.toml");
        std::fs::write(&file, config).unwrap();
        let store_dir = tmp.path().join("store");
        let mut args = vec!["--config", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut server = Self::spawn(store_dir.to_str().unwrap(), "127.0.0.1:0", &args);
        server.store_dir = Some(store_dir);
        server._tmp = Some(tmp);
        server
    }

    /// Another node on an existing store directory.
    pub fn start_on(store: &str, extra: &[&str]) -> Server {
        let mut server = Self::spawn(store, "127.0.0.1:0", extra);
        server.store_dir = Some(PathBuf::from(store));
        server
    }

    /// A node on `store` listening on `listen` (e.g. the address of a killed one).
    pub fn spawn(store: &str, listen: &str, extra: &[&str]) -> Server {
        // Tests build plain `reqwest` clients, which need a process-wide
        // TLS provider when a test target is built without the workspace's
        // features.
        ferry::tls::install_default_provider();
        let bin = Path::new(env!("CARGO_BIN_EXE_ferry"));
        let (child, url) = serve_child::spawn_serve(bin, store, listen, extra);
        let addr = url.split_once("://").unwrap().1.parse().unwrap();
        Server {
            child,
            addr,
            url,
            store_dir: None,
            _tmp: None,
        }
    }

    pub fn file_url(&self, path: &str) -> String {
        format!("{}/v1/files/{}", self.url, path)
    }

    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    /// Stores `data` at `path` through the API.
    pub async fn put(&self, path: &str, data: impl Into<reqwest::Body>) -> reqwest::Response {
        let resp = self
            .client()
            .put(self.file_url(path))
            .body(data)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "PUT {path}: {}", resp.status());
        resp
    }

    pub async fn get_bytes(&self, path: &str) -> (u16, Vec<u8>) {
        let resp = self.client().get(self.file_url(path)).send().await.unwrap();
        (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
    }

    /// One sample of the server's `/metrics` (asked without a token), 0
    /// when absent.
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        let response = raw_get(self.addr, b"/metrics");
        metrics_text::sample(&String::from_utf8_lossy(&response.body), name_and_labels)
            .unwrap_or(0.0)
    }

    /// Waits (up to 15 s) until the server holds exactly `expected` at `path`.
    pub async fn eventually_has(&self, path: &str, expected: &[u8]) -> bool {
        for _ in 0..300 {
            let (status, body) = self.get_bytes(path).await;
            if status == 200 && body == expected {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub async fn op(&self, op: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self
            .client()
            .post(format!("{}/v1/ops/{op}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The names `GET /v1/list/{dir_and_query}` lists, in its order.
    pub async fn listed_names(&self, dir_and_query: &str) -> Vec<String> {
        listed_names(&self.json(&format!("/v1/list/{dir_and_query}")).await.1)
    }

    pub async fn json(&self, path_and_query: &str) -> (u16, serde_json::Value) {
        let resp = self
            .client()
            .get(format!("{}{path_and_query}", self.url))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Sends bytes as they are and reads the whole response.
    pub fn raw(&self, request: &[u8]) -> RawResponse {
        raw_request(self.addr, request)
    }

    /// Every file under the store directory, relative, sorted.
    pub fn files_on_disk(&self) -> Vec<String> {
        let root = self.store_dir.as_ref().expect("a local store");
        let mut out = Vec::new();
        walk(root, root, &mut out);
        out.sort();
        out
    }

    /// Stops the server process (SIGSTOP): it neither answers nor refuses.
    /// Sent without spawning `kill`, which stalled here while a thread of
    /// the test was blocked in a FUSE write.
    pub fn pause(&self) {
        self.send(rustix::process::Signal::STOP);
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.send(rustix::process::Signal::CONT);
    }

    fn send(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a child's pid");
        rustix::process::kill_process(pid, signal).expect("signalling the server");
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, out);
        } else {
            out.push(
                path.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn error_code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not a JSON error body: {:?}",
                String::from_utf8_lossy(&self.body)
            )
        });
        v["error"]["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// One HTTP/1.1 exchange over a fresh connection (`Connection: close`).
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    RawResponse {
        status,
        headers,
        body: buf[split + 4..].to_vec(),
    }
}

/// A GET of `target` exactly as written (no normalisation).
pub fn raw_get(addr: SocketAddr, target: &[u8]) -> RawResponse {
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    raw_request(addr, &req)
}

/// Polls `check` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Random bytes from the kernel (fast even in unoptimised test builds).
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    urandom.read_exact(&mut data).unwrap();
    data
}

/// The `[[token]]` config entry admitting `token` (`scopes` as TOML, e.g.
/// `["read", "write"]`).
pub fn token_entry(name: &str, token: &str, scopes: &str, prefix: &str) -> String {
    use sha2::Digest;
    format!(
        "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = {scopes}\nprefix = \"{prefix}\"\n",
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    )
}

/// The names of a listing's entries, in its order.
pub fn listed_names(listing: &serde_json::Value) -> Vec<String> {
    listing["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("not a listing: {listing}"))
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect()
}
