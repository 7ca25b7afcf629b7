//! The client library and the `ferry` transfer commands against real server
//! processes: interrupted uploads and downloads resume, and a killed server or
//! client loses nothing.

mod harness;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry::client::download::{DownloadOptions, download_file};
use ferry::client::ranged::RangedReader;
use ferry::client::upload::{UploadOptions, upload_file};
use ferry::client::{Client, ClientConfig, Progress};
use ferry::protocol::{ErrorCode, RemotePath};
use harness::{Server, eventually, random_bytes};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

const MIB: usize = 1 << 20;

fn remote(p: &str) -> RemotePath {
    p.parse().unwrap()
}

fn write_random(dir: &std::path::Path, name: &str, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let data = random_bytes(len);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_survives_a_server_killed_mid_transfer() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let addr = server.addr.to_string();
    let (local, data) = write_random(tmp.path(), "big.bin", 200 * MIB);
    let client = Client::new(&server.url).unwrap();

    // Kill the server once 40% is acknowledged; restart it on the same port.
    let server = Arc::new(std::sync::Mutex::new(Some(server)));
    let killed = Arc::new(AtomicBool::new(false));
    let restarter = {
        let (server, killed, store, addr) =
            (server.clone(), killed.clone(), store.clone(), addr.clone());
        std::thread::spawn(move || {
            assert!(eventually(Duration::from_secs(120), || killed.load(Ordering::SeqCst)));
            drop(server.lock().unwrap().take()); // SIGKILL
            std::thread::sleep(Duration::from_millis(500));
            *server.lock().unwrap() = Some(Server::spawn(store.to_str().unwrap(), &addr, &[]));
        })
    };
    let progress = {
        let killed = killed.clone();
        Arc::new(move |p: Progress| {
            if p.done * 10 >= p.total * 4 {
                killed.store(true, Ordering::SeqCst);
            }
        })
    };
    let options = UploadOptions {
        progress: Some(progress),
        throttle: Some(Arc::new(ferry::client::throttle::Throttle::new(
            100 * MIB as u64,
        ))),
        ..Default::default()
    };
    let report = upload_file(&client, &local, &remote("big.bin"), options)
        .await
        .unwrap();
    restarter.join().unwrap();
    assert!(killed.load(Ordering::SeqCst));
    assert_eq!(report.meta.size, data.len() as u64);
    let sent = client.chunk_bytes_sent();
    assert!(
        sent < data.len() as u64 * 12 / 10,
        "re-sent too much: {sent} bytes for {}",
        data.len()
    );
    let on_disk = std::fs::read(store.join("big.bin")).unwrap();
    assert!(on_disk == data, "committed file differs");
}

fn ferry(args: &[&str], state: &std::path::Path, server: &Server) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(args)
        .env("FERRY_SERVER", &server.url)
        .env("FERRY_STATE_DIR", state)
        .env("FERRY_LOG", "warn");
    cmd
}

/// Starts `ferry ARGS` and waits until its resume record names a session.
fn spawn_until_session(
    args: &[&str],
    state: &std::path::Path,
    server: &Server,
) -> (std::process::Child, String) {
    let child = ferry(args, state, server)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(60), || recorded_session(state)
            .is_some()),
        "no session was recorded"
    );
    (child, recorded_session(state).unwrap())
}

/// The session named by the one resume record under `state`, once written.
fn recorded_session(state: &std::path::Path) -> Option<String> {
    let entry = std::fs::read_dir(state.join("transfers"))
        .ok()?
        .flatten()
        .next()?;
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()?;
    record["session_id"].as_str().map(str::to_owned)
}

fn sent_bytes(stdout: &str) -> u64 {
    let after = stdout
        .split("sent ")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary in {stdout:?}"));
    after.split(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn ferry_put_killed_halfway_resumes_when_run_again() {
    let server = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (local, data) = write_random(tmp.path(), "movie.bin", 100 * MIB);
    let local_arg = local.to_str().unwrap();
    let (mut first, id) = spawn_until_session(
        &["put", "--bwlimit", "40M", local_arg, "clips/movie.bin"],
        &state,
        &server,
    );
    // Wait until the upload is half done.
    let client = Client::new(&server.url).unwrap();
    let mut half = false;
    for _ in 0..600 {
        let status = client.upload_status(&id).await.unwrap();
        if status.bytes_received * 2 >= status.size.unwrap() {
            half = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(half, "the upload never got half way");
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    assert_eq!(
        server.get_bytes("clips/movie.bin").await.0,
        404,
        "nothing committed yet"
    );

    let out = ferry(&["put", local_arg, "clips/movie.bin"], &state, &server)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let sent = sent_bytes(&stdout);
    assert!(
        sent <= data.len() as u64 / 2 + 8 * MIB as u64,
        "resumed run re-sent {sent} bytes: {stdout}"
    );
    assert!(server.get_bytes("clips/movie.bin").await.1 == data);
    assert!(
        std::fs::read_dir(state.join("transfers"))
            .unwrap()
            .next()
            .is_none(),
        "resume record removed"
    );
}

#[tokio::test]
async fn ferry_put_uses_the_chunk_size_asked_for() {
    let server = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (local, data) = write_random(tmp.path(), "clip.bin", 12 * MIB + 5);
    let local_arg = local.to_str().unwrap();
    // Outside what a server takes, or not a size: refused up front.
    for bad in ["512K", "65M", "lots"] {
        let out = ferry(
            &["put", "--chunk-size", bad, local_arg, "clip.bin"],
            &state,
            &server,
        )
        .output()
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--chunk-size {bad} was taken");
        assert!(stderr.contains("--chunk-size"), "{stderr}");
    }
    assert_eq!(server.get_bytes("clip.bin").await.0, 404);

    // Slowed down, so that the session can be looked at on the way.
    let (mut put, id) = spawn_until_session(
        &[
            "put",
            "--chunk-size",
            "2M",
            "--bwlimit",
            "3M",
            local_arg,
            "clip.bin",
        ],
        &state,
        &server,
    );
    let status = Client::new(&server.url)
        .unwrap()
        .upload_status(&id)
        .await
        .unwrap();
    assert_eq!(status.chunk_size, 2 * MIB as u64);
    assert!(put.wait().unwrap().success());
    assert!(server.get_bytes("clip.bin").await.1 == data);
}

#[tokio::test]
async fn ferry_get_killed_halfway_resumes_when_run_again() {
    let server = Server::start();
    let data = random_bytes(60 * MIB);
    server.put("video.bin", data.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("video.bin");
    let part = tmp.path().join(".video.bin.ferry-part");
    let mut first = ferry(
        &[
            "get",
            "--bwlimit",
            "20M",
            "video.bin",
            dest.to_str().unwrap(),
        ],
        tmp.path(),
        &server,
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    // A part is trusted up to its last checkpoint, at most 8 MiB behind.
    assert!(eventually(Duration::from_secs(60), || std::fs::metadata(
        &part
    )
    .is_ok_and(|m| m.len() > 30 * MIB as u64)));
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!dest.exists(), "no partial destination");
    let out = ferry(
        &["get", "video.bin", dest.to_str().unwrap()],
        tmp.path(),
        &server,
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let resumed: u64 = stdout
        .split(", ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(resumed >= 20 * MIB as u64, "{stdout}");
    assert!(std::fs::read(&dest).unwrap() == data);
    assert!(!part.exists());
}

#[tokio::test]
async fn a_download_resumed_after_the_file_changed_gets_the_new_version() {
    let server = Server::start();
    let old = random_bytes(4 * MIB);
    let new = random_bytes(3 * MIB);
    server.put("doc.bin", old.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("doc.bin");
    // A part of the old version, as left by an interrupted run.
    let client = Client::new(&server.url).unwrap();
    let etag = client.stat(&remote("doc.bin")).await.unwrap().etag.unwrap();
    std::fs::write(tmp.path().join(".doc.bin.ferry-part"), &old[..MIB]).unwrap();
    std::fs::write(
        tmp.path().join(".doc.bin.ferry-part.json"),
        serde_json::json!({"etag": etag, "size": old.len(), "verified": MIB}).to_string(),
    )
    .unwrap();
    // Same version: continues from the part.
    let report = download_file(
        &client,
        &remote("doc.bin"),
        &dest,
        DownloadOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.resumed_bytes, MIB as u64);
    assert!(std::fs::read(&dest).unwrap() == old);

    std::fs::write(tmp.path().join(".doc.bin.ferry-part"), &old[..MIB]).unwrap();
    std::fs::write(
        tmp.path().join(".doc.bin.ferry-part.json"),
        serde_json::json!({"etag": etag, "size": old.len(), "verified": MIB}).to_string(),
    )
    .unwrap();
    server.put("doc.bin", new.clone()).await;
    download_file(
        &client,
        &remote("doc.bin"),
        &dest,
        DownloadOptions::default(),
    )
    .await
    .unwrap();
    assert!(
        std::fs::read(&dest).unwrap() == new,
        "a stale part must not be mixed with the new version"
    );
}

fn sha256_of(path: &std::path::Path) -> Option<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).ok()?;
    Some(hex::encode(sha2::Sha256::digest(&bytes)))
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The files of `dir` whose names end with `suffix`.
fn files_ending(dir: &std::path::Path, suffix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect()
}

#[tokio::test]
async fn concurrent_ferry_gets_to_one_destination_never_corrupt_it() {
    let server = Server::start();
    let data = random_bytes(24 * MIB);
    let want = sha256_hex(&data);
    server.put("movie.bin", data).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dl");
    std::fs::create_dir(&dir).unwrap();
    let dest = dir.join("movie.bin");
    let part = dir.join(".movie.bin.ferry-part");
    let get = || {
        ferry(
            &["get", "--bwlimit", "8M", "movie.bin", dir.to_str().unwrap()],
            tmp.path(),
            &server,
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    // Every run that says it succeeded left the right file; one that did not
    // says why.
    let check = |child: std::process::Child| {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            assert_eq!(
                sha256_of(&dest).as_deref(),
                Some(want.as_str()),
                "a get that exited 0 left a wrong file; stdout: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        } else {
            assert!(stderr.contains("another ferry get"), "{stderr}");
        }
        out.status.success()
    };

    // Both started at once.
    let (a, b) = (get(), get());
    let (a, b) = (check(a), check(b));
    assert!(a || b, "neither get succeeded");
    assert_eq!(sha256_of(&dest).as_deref(), Some(want.as_str()));
    assert!(files_ending(&dir, ".ferry-part").is_empty());

    // The second starts while the first is surely writing: it is refused.
    std::fs::remove_file(&dest).unwrap();
    let first = get();
    assert!(eventually(Duration::from_secs(60), || std::fs::metadata(
        &part
    )
    .is_ok_and(|m| m.len() > 0)));
    let second = get();
    assert!(!check(second), "a second get ran beside the first");
    assert!(check(first));
    assert_eq!(sha256_of(&dest).as_deref(), Some(want.as_str()));
    assert!(files_ending(&dir, ".ferry-part").is_empty());
}

/// Starts `ferry get` slowly, kills it (SIGKILL) once `part` holds more than
/// `at_least` bytes, and returns the part's length then.
fn killed_get(
    server: &Server,
    tmp: &std::path::Path,
    remote: &str,
    dest: &std::path::Path,
    part: &std::path::Path,
    at_least: u64,
) -> u64 {
    let mut child = ferry(
        &["get", "--bwlimit", "20M", remote, dest.to_str().unwrap()],
        tmp,
        server,
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    assert!(eventually(Duration::from_secs(60), || std::fs::metadata(
        part
    )
    .is_ok_and(|m| m.len() > at_least)));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!dest.exists(), "no partial destination");
    std::fs::metadata(part).unwrap().len()
}

/// `(exit status, stdout, stderr)` of a `ferry get REMOTE DEST` run to the end.
fn run_get(
    server: &Server,
    tmp: &std::path::Path,
    remote: &str,
    dest: &std::path::Path,
) -> (bool, String, String) {
    let out = ferry(&["get", remote, dest.to_str().unwrap()], tmp, server)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Ctrl-C stops `ferry put` at once over its default transport (the
/// WebSocket), as over HTTP; it used to run the upload to its end. The
/// next run continues the session.
#[tokio::test]
async fn ferry_put_interrupted_over_the_websocket_stops_and_resumes() {
    let server = Server::start();
    let data = random_bytes(40 * MIB);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("video.bin");
    std::fs::write(&src, &data).unwrap();
    let child = ferry(
        &["put", "--bwlimit", "8M", src.to_str().unwrap(), "video.bin"],
        tmp.path(),
        &server,
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Well into the upload: 8 MB/s of 40 MiB.
    std::thread::sleep(Duration::from_millis(1500));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    // Long before the 5 s the rest of the upload takes.
    let interrupted = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        interrupted.elapsed() < Duration::from_secs(3),
        "Ctrl-C took {:?}",
        interrupted.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(server.get_bytes("video.bin").await.0, 404, "not committed");

    let again = ferry(
        &["put", src.to_str().unwrap(), "video.bin"],
        tmp.path(),
        &server,
    )
    .output()
    .unwrap();
    assert!(again.status.success(), "{again:?}");
    assert!(server.get_bytes("video.bin").await.1 == data);
}

#[tokio::test]
async fn ferry_get_interrupted_mid_body_stops_and_keeps_what_arrived() {
    let server = Server::start();
    let data = random_bytes(40 * MIB);
    server.put("video.bin", data.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("video.bin");
    let part = tmp.path().join(".video.bin.ferry-part");
    let child = ferry(
        &[
            "get",
            "--bwlimit",
            "8M",
            "video.bin",
            dest.to_str().unwrap(),
        ],
        tmp.path(),
        &server,
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    assert!(eventually(Duration::from_secs(60), || std::fs::metadata(
        &part
    )
    .is_ok_and(|m| m.len() > 2 * MIB as u64)));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    // Long before the 5 s the rest of the body takes.
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "Ctrl-C took {:?}",
        started.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("interrupted"), "{stderr}");
    let kept = std::fs::metadata(&part).unwrap().len();

    let (ok, stdout, stderr) = run_get(&server, tmp.path(), "video.bin", &dest);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!(", {kept} already on disk")),
        "{stdout}"
    );
    assert_eq!(
        sha256_of(&dest).as_deref(),
        Some(sha256_hex(&data).as_str())
    );
}

#[tokio::test]
async fn a_part_with_garbage_appended_is_not_trusted_past_what_was_synced() {
    let server = Server::start();
    let data = random_bytes(40 * MIB);
    server.put("video.bin", data.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("video.bin");
    let part = tmp.path().join(".video.bin.ferry-part");
    let kept = killed_get(
        &server,
        tmp.path(),
        "video.bin",
        &dest,
        &part,
        12 * MIB as u64,
    );
    // A tail that is not the file's: as a torn write would leave.
    let mut out = std::fs::OpenOptions::new()
        .append(true)
        .open(&part)
        .unwrap();
    std::io::Write::write_all(&mut out, &random_bytes(12345)).unwrap();
    drop(out);

    let (ok, stdout, stderr) = run_get(&server, tmp.path(), "video.bin", &dest);
    assert!(ok, "{stderr}");
    assert_eq!(
        sha256_of(&dest).as_deref(),
        Some(sha256_hex(&data).as_str()),
        "{stdout}"
    );
    let resumed: u64 = stdout
        .split(", ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        resumed <= kept,
        "{stdout}: resumed past the part's own bytes"
    );
    assert!(!part.exists());
}

#[tokio::test]
async fn a_part_is_trusted_only_as_far_as_its_record_vouches() {
    let server = Server::start();
    let data = random_bytes(4 * MIB);
    server.put("doc.bin", data.clone()).await;
    let client = Client::new(&server.url).unwrap();
    let etag = client.stat(&remote("doc.bin")).await.unwrap().etag.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("doc.bin");
    let part = tmp.path().join(".doc.bin.ferry-part");
    let record = tmp.path().join(".doc.bin.ferry-part.json");
    let garbage = random_bytes(12345);
    // (bytes in the part, what the record says is synced, what may be kept)
    for (good, verified, resumed) in [
        // Garbage after the synced bytes.
        (MIB, Some(MIB), MIB),
        // Garbage after bytes never vouched for.
        (2 * MIB, Some(MIB), MIB),
        // A whole file and more: longer than the remote.
        (4 * MIB, Some(4 * MIB), 4 * MIB),
        // A record that vouches for nothing.
        (2 * MIB, None, 0),
    ] {
        let mut bytes = data[..good].to_vec();
        bytes.extend_from_slice(&garbage);
        std::fs::write(&part, &bytes).unwrap();
        let mut fields = serde_json::json!({"etag": etag, "size": data.len()});
        if let Some(verified) = verified {
            fields["verified"] = verified.into();
        }
        std::fs::write(&record, fields.to_string()).unwrap();
        let report = download_file(
            &client,
            &remote("doc.bin"),
            &dest,
            DownloadOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(report.resumed_bytes, resumed as u64, "part of {good} bytes");
        assert_eq!(
            sha256_of(&dest).as_deref(),
            Some(sha256_hex(&data).as_str()),
            "part of {good} bytes, verified {verified:?}"
        );
        assert!(!part.exists() && !record.exists());
    }
}

#[tokio::test]
async fn a_part_of_an_older_version_is_started_over_not_mixed() {
    let server = Server::start();
    let old = random_bytes(40 * MIB);
    let new = random_bytes(40 * MIB);
    server.put("video.bin", old).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("video.bin");
    let part = tmp.path().join(".video.bin.ferry-part");
    killed_get(
        &server,
        tmp.path(),
        "video.bin",
        &dest,
        &part,
        12 * MIB as u64,
    );
    // Same length, other bytes: only the version tells them apart.
    server.put("video.bin", new.clone()).await;

    let (ok, stdout, stderr) = run_get(&server, tmp.path(), "video.bin", &dest);
    assert!(ok, "{stderr}");
    assert_eq!(
        sha256_of(&dest).as_deref(),
        Some(sha256_hex(&new).as_str()),
        "{stdout}"
    );
    assert!(stdout.contains(", 0 already on disk"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_survives_a_server_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let addr = server.addr.to_string();
    let data = random_bytes(80 * MIB);
    server.put("big.bin", data.clone()).await;
    let client = Client::new(&server.url).unwrap();
    let dest = tmp.path().join("out.bin");
    let half = Arc::new(AtomicBool::new(false));
    let restarter = {
        let (half, store) = (half.clone(), store.clone());
        std::thread::spawn(move || {
            assert!(eventually(Duration::from_secs(60), || half.load(Ordering::SeqCst)));
            drop(server);
            std::thread::sleep(Duration::from_millis(300));
            Server::spawn(store.to_str().unwrap(), &addr, &[])
        })
    };
    let options = DownloadOptions {
        progress: Some({
            let half = half.clone();
            Arc::new(move |p: Progress| {
                if p.done * 2 >= p.total {
                    half.store(true, Ordering::SeqCst);
                }
            })
        }),
        throttle: Some(Arc::new(ferry::client::throttle::Throttle::new(
            40 * MIB as u64,
        ))),
    };
    download_file(&client, &remote("big.bin"), &dest, options)
        .await
        .unwrap();
    let _restarted = restarter.join().unwrap();
    assert!(std::fs::read(&dest).unwrap() == data);
}

#[tokio::test]
async fn ranged_reader_seeks_and_reads_the_right_bytes() {
    let server = Server::start();
    let data = random_bytes(5 * MIB + 123);
    server.put("media.mp4", data.clone()).await;
    let client = Client::new(&server.url).unwrap();
    let mut reader = RangedReader::open(&client, &remote("media.mp4"))
        .await
        .unwrap();
    assert_eq!(reader.meta().size, data.len() as u64);
    let mut buf = vec![0u8; MIB];
    reader
        .seek(std::io::SeekFrom::End(-(MIB as i64)))
        .await
        .unwrap();
    reader.read_exact(&mut buf).await.unwrap();
    assert!(buf[..] == data[data.len() - MIB..]);
    reader.seek(std::io::SeekFrom::Start(0)).await.unwrap();
    reader.read_exact(&mut buf).await.unwrap();
    assert!(buf[..] == data[..MIB]);
    for offset in [4096u64, 3 * MIB as u64 + 17, 77, 5 * MIB as u64] {
        let mut small = [0u8; 100];
        reader.seek(std::io::SeekFrom::Start(offset)).await.unwrap();
        reader.read_exact(&mut small).await.unwrap();
        assert_eq!(small[..], data[offset as usize..offset as usize + 100]);
    }
    let mut rest = Vec::new();
    reader.seek(std::io::SeekFrom::Current(-50)).await.unwrap();
    reader.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest.len(), data.len() - (5 * MIB + 50));
    // A replaced file fails the next request instead of mixing versions.
    server.put("media.mp4", "replaced").await;
    reader.seek(std::io::SeekFrom::Start(0)).await.unwrap();
    let err = reader.read_exact(&mut buf).await.unwrap_err();
    assert!(err.to_string().contains("precondition"), "{err}");
}

#[tokio::test]
async fn errors_are_clear() {
    let server = Server::start();
    let client = Client::new(&server.url).unwrap();
    let err = client.stat(&remote("missing.txt")).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert_eq!(err.status(), 404);
    assert!(err.to_string().contains("missing.txt"), "{err}");

    let mut config = ClientConfig::default();
    config.retry.give_up_after = Duration::from_millis(500);
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dead = Client::with_config(&format!("http://{addr}"), config).unwrap();
    let err = dead.stat(&remote("x")).await.unwrap_err();
    assert!(matches!(err, ferry::Error::Network(_)), "{err:?}");
    assert!(err.to_string().contains("connect"), "{err}");
    assert!(Client::new("ftp://x").is_err());
}

/// A stand-in server that fails the first requests with 503 and 429 (with
/// `Retry-After`), then answers: the client's retry logic, without a network.
#[tokio::test]
async fn retries_5xx_and_429_honouring_retry_after() {
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::atomic::AtomicUsize;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = {
        let calls = calls.clone();
        axum::Router::new().fallback(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut headers = HeaderMap::new();
                match n {
                    0 => (StatusCode::SERVICE_UNAVAILABLE, headers, "{}".to_owned()),
                    1 => {
                        headers.insert("retry-after", "1".parse().unwrap());
                        (StatusCode::TOO_MANY_REQUESTS, headers, "{}".to_owned())
                    }
                    _ => (
                        StatusCode::OK,
                        headers,
                        r#"{"path":"x","kind":"file","size":1,"mtime":null,"etag":"e"}"#.to_owned(),
                    ),
                }
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = Client::new(&format!("http://{addr}")).unwrap();
    let started = std::time::Instant::now();
    let meta = client.stat(&remote("x")).await.unwrap();
    assert_eq!(meta.size, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
}

type Connection = std::io::BufReader<std::net::TcpStream>;

/// A stand-in server on loopback that accepts every connection and hands
/// each, with its first request's head read, to `serve` on a thread.
fn fake_server(serve: fn(Connection, String)) -> String {
    use std::io::BufRead;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut connection = Connection::new(stream.unwrap());
            std::thread::spawn(move || {
                let mut head = String::new();
                while connection.read_line(&mut head).unwrap_or(0) > 2 {}
                serve(connection, head);
            });
        }
    });
    url
}

/// A server that accepts connections and never answers: each call fails
/// about `give_up_after` after it began (the request in flight included),
/// not after the 60 s read timeout of each attempt. So does one that sends
/// a response's head and then nothing.
#[tokio::test]
async fn a_server_that_never_answers_fails_calls_after_the_give_up_time() {
    let mut config = ClientConfig::default();
    config.retry.give_up_after = Duration::from_secs(2);
    let silent = fake_server(|stream, _| {
        std::thread::sleep(Duration::from_secs(600));
        drop(stream);
    });
    let client = Client::with_config(&silent, config.clone()).unwrap();
    let started = std::time::Instant::now();
    let err = client.stat(&remote("x")).await.unwrap_err();
    assert!(matches!(err, ferry::Error::Network(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let err = client
        .read_range(&remote("x"), 0, 10, None)
        .await
        .unwrap_err();
    assert!(matches!(err, ferry::Error::Network(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    let mute_body = fake_server(|mut stream, _| {
        use std::io::Write;
        let _ = stream
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n");
        std::thread::sleep(Duration::from_secs(600));
    });
    let client = Client::with_config(&mute_body, config).unwrap();
    let started = std::time::Instant::now();
    let err = client
        .read_range(&remote("x"), 0, 10, None)
        .await
        .unwrap_err();
    assert!(matches!(err, ferry::Error::Network(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// `ferry get` through a link that drops every connection after 1 MiB of
/// answers, with `--retry-for 2`: every resume moves bytes, so neither the
/// give-up time nor the backoff may add up over the download's 24 cuts; it
/// finishes, byte for byte. (It used to back off ever longer and give up
/// once 2 s had passed in all.)
#[test]
fn ferry_get_through_a_link_that_keeps_dropping_finishes() {
    let server = Server::start();
    let data = random_bytes(24 * MIB + 321);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(server.put("flaky.bin", data.clone()));
    let proxy = harness::proxy::CuttingProxy::start(server.addr, MIB);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("out.bin");
    let started = std::time::Instant::now();
    let out = ferry(
        &[
            "get",
            "--server",
            &proxy.url,
            "--retry-for",
            "2",
            "flaky.bin",
            dest.to_str().unwrap(),
        ],
        tmp.path(),
        &server,
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "gave up after {:?} and {} cuts: {stderr}",
        started.elapsed(),
        proxy.cuts()
    );
    assert!(std::fs::read(&dest).unwrap() == data);
    assert!(proxy.cuts() >= 20, "{}", proxy.cuts());
    assert!(files_ending(tmp.path(), ".ferry-part").is_empty());
}

/// A stand-in server whose `stat` answers that `x` is a 10 MiB file, and
/// whose answer to the download sends its head and 64 KiB, then nothing.
fn server_going_quiet_mid_body() -> String {
    fake_server(|mut stream, head| {
        use std::io::Write;
        let stream = stream.get_mut();
        if head.starts_with("GET /v1/stat/") {
            let body = format!(
                r#"{{"path":"x","kind":"file","size":{},"mtime":null,"etag":"e"}}"#,
                10 * MIB
            );
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            return;
        }
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\netag: \"e\"\r\ncontent-length: {}\r\n\r\n",
            10 * MIB
        );
        let _ = stream.write_all(&[7u8; 64 << 10]);
        std::thread::sleep(Duration::from_secs(600));
    })
}

/// `ferry get --retry-for 2` from a server that stops sending in the middle
/// of the body gives up about 2 s after the last byte arrived (not after
/// the HTTP client's 60 s per read), keeping what arrived; from one that
/// never answers at all, about 2 s after it began.
#[test]
fn ferry_get_from_a_server_that_sends_nothing_gives_up_after_retry_for() {
    let tmp = tempfile::tempdir().unwrap();
    let dummy = Server::start();
    let quiet = server_going_quiet_mid_body();
    let silent = fake_server(|stream, _| {
        std::thread::sleep(Duration::from_secs(600));
        drop(stream);
    });
    for (url, kept) in [(&quiet, Some(64 << 10)), (&silent, None)] {
        let dest = tmp.path().join("out.bin");
        let started = std::time::Instant::now();
        let out = ferry(
            &[
                "get",
                "--server",
                url,
                "--retry-for",
                "2",
                "x",
                dest.to_str().unwrap(),
            ],
            tmp.path(),
            &dummy,
        )
        .output()
        .unwrap();
        let took = started.elapsed();
        assert!(!out.status.success(), "{url}");
        assert!(!dest.exists());
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(15),
            "{url}: gave up after {took:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(kept) = kept {
            let part = std::fs::metadata(tmp.path().join(".out.bin.ferry-part")).unwrap();
            assert_eq!(part.len(), kept, "what arrived is kept for the next run");
        }
    }
}

/// A chunk the server takes slowly, for longer than `give_up_after` in
/// all, is not cut: only waiting without progress counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_the_server_takes_slowly_is_sent_whole() {
    static RECEIVED: std::sync::Mutex<Option<(String, Vec<u8>)>> = std::sync::Mutex::new(None);
    let slow = fake_server(|mut stream, head| {
        use std::io::{Read, Write};
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        // 8 MiB/s: 4 s for the chunk, half a second for what the sockets'
        // buffers hold at the end.
        let mut body = Vec::with_capacity(len);
        let mut piece = vec![0u8; 64 << 10];
        while body.len() < len {
            let n = stream.read(&mut piece).unwrap();
            assert!(n > 0, "the client stopped sending");
            body.extend_from_slice(&piece[..n]);
            std::thread::sleep(Duration::from_millis(8));
        }
        *RECEIVED.lock().unwrap() = Some((head, body));
        let _ = stream
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
    });
    let mut config = ClientConfig::default();
    config.retry.give_up_after = Duration::from_secs(2);
    let client = Client::with_config(&slow, config).unwrap();
    let data = random_bytes(32 * MIB);
    let started = std::time::Instant::now();
    client
        .put_chunk("session", 0, data.clone().into())
        .await
        .unwrap();
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (head, body) = RECEIVED.lock().unwrap().take().unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {}", data.len())),
        "{head}"
    );
    assert!(body == data, "the chunk arrived changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_upload_finishes_its_chunks_in_flight_and_resumes_later() {
    use ferry::client::upload::Transport;
    use ferry::protocol::upload::UploadState;
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    let (local, data) = write_random(tmp.path(), "video.bin", 32 * MIB);
    let client = Client::new(&server.url).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let session = Arc::new(std::sync::Mutex::new(None::<String>));
    let options = UploadOptions {
        chunk_size: Some(MIB as u64),
        throttle: Some(Arc::new(ferry::client::throttle::Throttle::new(
            8 * MIB as u64,
        ))),
        on_session: Some({
            let session = session.clone();
            Arc::new(move |id: &str| *session.lock().unwrap() = Some(id.to_owned()))
        }),
        stop: Some(stop.clone()),
        transport: Transport::Http,
        ..Default::default()
    };
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.cancel();
        })
    };
    let err = upload_file(&client, &local, &remote("video.bin"), options)
        .await
        .unwrap_err();
    stopper.await.unwrap();
    assert!(matches!(err, ferry::Error::Cancelled), "{err}");
    let id = session
        .lock()
        .unwrap()
        .clone()
        .expect("a session was created");
    let status = client.upload_status(&id).await.unwrap();
    assert_eq!(status.state, UploadState::Open);
    // Chunks that had started were completed, none was cut short.
    assert!(status.bytes_received > 0 && status.bytes_received < data.len() as u64);
    assert_eq!(status.bytes_received % MIB as u64, 0);

    let resumed = UploadOptions {
        resume_id: Some(id.clone()),
        transport: Transport::Http,
        ..Default::default()
    };
    let asked = status_requests(&server);
    let report = upload_file(&client, &local, &remote("video.bin"), resumed)
        .await
        .unwrap();
    assert_eq!(report.session_id, id);
    assert_eq!(report.resumed_bytes, status.bytes_received);
    assert_eq!(server.get_bytes("video.bin").await.1, data);
    assert_eq!(
        status_requests(&server),
        asked + 1.0,
        "a resumed session is asked what it holds"
    );
}

/// `GET /v1/uploads/{id}` requests the server has answered.
fn status_requests(server: &Server) -> f64 {
    server
        .metric(r#"ferry_http_requests_total{route="/v1/uploads/{id}",method="GET",status="200"}"#)
}

#[tokio::test]
async fn a_new_upload_does_not_ask_for_the_status_of_its_new_session() {
    use ferry::client::upload::Transport;
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    let client = Client::new(&server.url).unwrap();
    for (i, transport) in [Transport::Http, Transport::WebSocket, Transport::Auto]
        .into_iter()
        .enumerate()
    {
        let (local, data) = write_random(tmp.path(), &format!("new{i}.bin"), 3 * MIB + 7);
        let options = UploadOptions {
            chunk_size: Some(MIB as u64),
            transport,
            ..Default::default()
        };
        let target = format!("new{i}.bin");
        let report = upload_file(&client, &local, &remote(&target), options)
            .await
            .unwrap();
        assert_eq!(report.resumed_bytes, 0);
        assert_eq!(server.get_bytes(&target).await.1, data);
    }
    assert_eq!(status_requests(&server), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_during_its_upload_is_not_committed() {
    use ferry::client::upload::Transport;
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    let (local, _) = write_random(tmp.path(), "notes.bin", 8 * MIB);
    let client = Client::new(&server.url).unwrap();
    for transport in [Transport::Http, Transport::WebSocket] {
        let options = UploadOptions {
            chunk_size: Some(MIB as u64),
            throttle: Some(Arc::new(ferry::client::throttle::Throttle::new(
                4 * MIB as u64,
            ))),
            transport,
            ..Default::default()
        };
        // Rewrites the start of the file once the upload has sent it.
        let writer = {
            let local = local.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                use std::os::unix::fs::FileExt;
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&local)
                    .unwrap();
                file.write_all_at(b"edited", 0).unwrap();
            })
        };
        let err = upload_file(&client, &local, &remote("notes.bin"), options)
            .await
            .unwrap_err();
        writer.await.unwrap();
        assert_eq!(
            err.code(),
            ErrorCode::ChecksumMismatch,
            "{transport:?}: {err}"
        );
        assert!(
            err.to_string().contains("changed while it was uploaded"),
            "{err}"
        );
        assert_eq!(server.get_bytes("notes.bin").await.0, 404, "{transport:?}");
    }
    // Left alone, the edited file uploads whole.
    let report = upload_file(
        &client,
        &local,
        &remote("notes.bin"),
        UploadOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.meta.size, 8 * MIB as u64);
    assert_eq!(
        server.get_bytes("notes.bin").await.1,
        std::fs::read(&local).unwrap()
    );
}

/// A session a writer opened without a size while the file grew (as the
/// mount does) is finished by `upload_file`: the size is declared, only the
/// chunks the server lacks are sent, and the file commits whole. A session
/// that cannot take the file's size is replaced by a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_ended_session_is_sized_and_finished_by_the_upload() {
    use ferry::protocol::upload::CreateUpload;
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_on(tmp.path().join("store").to_str().unwrap(), &[]);
    let client = Client::new(&server.url).unwrap();
    let (local, data) = write_random(tmp.path(), "grown.bin", 3 * MIB + 1234);
    let open = |path: &str| CreateUpload {
        path: remote(path),
        size: None,
        chunk_size: Some(MIB as u64),
        sha256: None,
        sha256_at_complete: true,
        if_match: None,
        if_none_match: None,
        mtime: None,
    };
    let chunk = |i: usize| bytes::Bytes::copy_from_slice(&data[i * MIB..(i + 1) * MIB]);

    let created = client.create_upload(&open("grown.bin")).await.unwrap();
    assert_eq!(created.chunk_count, None);
    for i in [0, 1] {
        client
            .put_chunk(&created.id, i as u64, chunk(i))
            .await
            .unwrap();
    }
    let options = UploadOptions {
        resume_id: Some(created.id.clone()),
        ..UploadOptions::default()
    };
    let report = upload_file(&client, &local, &remote("grown.bin"), options)
        .await
        .unwrap();
    assert_eq!(report.session_id, created.id);
    assert_eq!(report.resumed_bytes, 2 * MIB as u64);
    assert_eq!(report.meta.size, data.len() as u64);
    assert!(server.get_bytes("grown.bin").await.1 == data);
    let mtime = std::fs::metadata(&local).unwrap().modified().unwrap();
    assert_eq!(
        report.meta.mtime.map(|m| m.timestamp()),
        Some(chrono::DateTime::<chrono::Utc>::from(mtime).timestamp()),
        "the local file's mtime, declared with the size"
    );

    // Chunk 3 reaches past a file of 3 MiB + 1234 bytes only if whole; a
    // shorter file makes the session unusable.
    let (short, short_data) = write_random(tmp.path(), "short.bin", 2 * MIB + 10);
    let created = client.create_upload(&open("short.bin")).await.unwrap();
    for i in [0, 1, 2] {
        client
            .put_chunk(&created.id, i as u64, chunk(i))
            .await
            .unwrap();
    }
    let options = UploadOptions {
        resume_id: Some(created.id.clone()),
        ..UploadOptions::default()
    };
    let report = upload_file(&client, &short, &remote("short.bin"), options)
        .await
        .unwrap();
    assert_ne!(report.session_id, created.id, "a new session");
    assert!(server.get_bytes("short.bin").await.1 == short_data);
}

/// `ferry get` onto a symbolic link writes the file it points to, as `cp`
/// does; onto a FIFO (or a device) it refuses. It used to replace either
/// with a regular file.
#[tokio::test]
async fn get_writes_through_symlinks_and_refuses_special_files() {
    let server = Server::start();
    server.put("f.txt", "fresh").await;
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("real.txt");
    std::fs::write(&target, b"old").unwrap();
    let link = tmp.path().join("link.txt");
    std::os::unix::fs::symlink("real.txt", &link).unwrap();
    let get = |dest: &std::path::Path| {
        ferry(
            &["get", "f.txt", dest.to_str().unwrap()],
            tmp.path(),
            &server,
        )
        .output()
        .unwrap()
    };
    let out = get(&link);
    assert!(out.status.success(), "{out:?}");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"fresh");

    let fifo = tmp.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let out = get(&fifo);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a regular file"),
        "{out:?}"
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );

    let looped = tmp.path().join("loop");
    std::os::unix::fs::symlink("loop", &looped).unwrap();
    let out = get(&looped);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("symbolic links"),
        "{out:?}"
    );
}
