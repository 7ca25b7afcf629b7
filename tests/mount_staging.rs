//! `ferry mount` staging space on real FUSE mounts: `--max-staging` makes
//! writers wait for uploads to drain, ENOSPC when nothing can drain, and a
//! full local disk gives ENOSPC, never a silently short file.

mod harness;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harness::mount::{MountProc, Tmpfs, fuse_available, is_root, staged_bytes, store_file};
use harness::{Server, eventually, random_bytes};

const MIB: usize = 1 << 20;
const ENOSPC: i32 = 28;

/// Writes `data` to an open file in 1 MiB writes; returns the bytes that
/// landed and the error that stopped it, if any.
fn write_in_mib(file: &mut std::fs::File, data: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut done = 0;
    while done < data.len() {
        // A write may land in part (the kernel splits a large one into
        // requests) before the next reports the error: count what landed.
        let end = (done + MIB).min(data.len());
        match file.write(&data[done..end]) {
            Ok(0) => return (done, None),
            Ok(n) => done += n,
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_wait_at_max_staging_until_uploads_drain() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &["--max-staging", "8M", "--retry-for", "60"]);
    let contents: Vec<Vec<u8>> = (0..8).map(|_| random_bytes(3 * MIB)).collect();
    // Opened while the server answers lookups; written while it cannot.
    let files: Vec<std::fs::File> = (0..8)
        .map(|i| std::fs::File::create(mount.at(&format!("f{i}.bin"))).unwrap())
        .collect();
    // A stopped server neither takes uploads nor fails them: they just wait.
    server.pause();
    let written = Arc::new(AtomicU64::new(0));
    let writer = std::thread::spawn({
        let (written, contents) = (written.clone(), contents.clone());
        move || {
            for (mut file, data) in files.into_iter().zip(&contents) {
                for chunk in data.chunks(MIB) {
                    file.write_all(chunk)?;
                    written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
            }
            Ok::<(), std::io::Error>(())
        }
    });
    // Two closed files wait for their upload, the third has 2 MiB: 8 MiB staged.
    let bound = 8 * MIB as u64;
    assert!(
        eventually(Duration::from_secs(20), || written.load(Ordering::SeqCst)
            == bound),
        "the writer got to the bound ({} bytes written)",
        written.load(Ordering::SeqCst)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        written.load(Ordering::SeqCst),
        bound,
        "the writer waits at the bound while nothing drains"
    );
    assert!(!writer.is_finished());
    assert!(staged_bytes(&mount.state) <= bound);
    server.resume();
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !writer.is_finished() && Instant::now() < deadline {
        peak = peak.max(staged_bytes(&mount.state));
        std::thread::sleep(Duration::from_millis(2));
    }
    writer
        .join()
        .unwrap()
        .expect("every write lands once uploads drain");
    assert!(
        peak <= bound,
        "staging took {peak} bytes, more than the bound"
    );
    for (i, data) in contents.iter().enumerate() {
        assert!(
            server.eventually_has(&format!("f{i}.bin"), data).await,
            "f{i}.bin"
        );
    }
}

#[test]
fn a_max_staging_below_one_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["mount", "http://127.0.0.1:9", "--max-staging", "512K"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--max-staging must be at least 1M"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_larger_than_max_staging_gets_enospc_at_once() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &["--max-staging", "4M"]);
    let data = random_bytes(6 * MIB);
    let mut file = std::fs::File::create(mount.at("big.bin")).unwrap();
    let started = Instant::now();
    // Only the file being written holds the space: nothing can drain.
    let (landed, error) = write_in_mib(&mut file, &data);
    let error = error.expect("a write past the bound fails");
    assert_eq!(error.raw_os_error(), Some(ENOSPC), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no waiting when nothing can drain ({:?})",
        started.elapsed()
    );
    assert_eq!(landed, 4 * MIB, "every write within the bound lands");
    assert_eq!(file.metadata().unwrap().len(), landed as u64);
    drop(file);
    // What landed is committed; the failed write left no trace.
    assert!(server.eventually_has("big.bin", &data[..landed]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_server_down_writes_past_max_staging_get_enospc_and_closed_files_survive() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let (addr, url) = (server.addr.to_string(), server.url.clone());
    let mount = MountProc::start_with_state(
        &url,
        &tmp.path().join("state"),
        &["--max-staging", "8M", "--retry-for", "2"],
    );
    let names = ["early0.bin", "early1.bin", "late.bin"];
    let mut files: Vec<std::fs::File> = names
        .iter()
        .map(|n| std::fs::File::create(mount.at(n)).unwrap())
        .collect();
    drop(server);
    let early: Vec<Vec<u8>> = (0..2).map(|_| random_bytes(3 * MIB)).collect();
    let mut late_file = files.pop().unwrap();
    for (mut file, data) in files.into_iter().zip(&early) {
        file.write_all(data).unwrap();
        // close journals the upload; it cannot run yet.
        drop(file);
    }
    let late = random_bytes(4 * MIB);
    let started = Instant::now();
    let (landed, error) = write_in_mib(&mut late_file, &late);
    let error = error.expect("writes past the bound fail while uploads cannot drain");
    assert_eq!(error.raw_os_error(), Some(ENOSPC), "{error}");
    assert_eq!(landed, 2 * MIB, "the writes within the bound landed");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the wait is bounded ({:?})",
        started.elapsed()
    );
    // While uploads still fail, the next write does not wait again.
    let again = Instant::now();
    let error = late_file
        .write_all(&late[landed..landed + MIB])
        .unwrap_err();
    assert_eq!(error.raw_os_error(), Some(ENOSPC));
    assert!(again.elapsed() < Duration::from_secs(2));
    assert_eq!(late_file.metadata().unwrap().len(), landed as u64);
    drop(late_file);
    // The server returns at the same address: everything closed is committed.
    let server = Server::spawn(store.to_str().unwrap(), &addr, &[]);
    for (name, data) in names.iter().zip(&early) {
        assert!(server.eventually_has(name, data).await, "{name}");
    }
    assert!(server.eventually_has("late.bin", &late[..landed]).await);
}

/// A mount whose cache directory (staging and journal) is `cache`, on a
/// disk that fills up. The disk block cache is off, so staging alone fills it.
fn mount_with_cache_dir(server: &Server, cache: &Path) -> MountProc {
    MountProc::start(
        server,
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--disk-cache-size",
            "0",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_write_with_enospc_and_keeps_what_landed() {
    if !fuse_available() || !is_root() {
        return;
    }
    let disk = Tmpfs::mount("4m");
    let server = Server::start();
    let mount = mount_with_cache_dir(&server, &disk.path);
    let data = random_bytes(8 * MIB);
    let mut file = std::fs::File::create(mount.at("big.bin")).unwrap();
    let (landed, error) = write_in_mib(&mut file, &data);
    let error = error.expect("8 MiB cannot fit on a 4 MiB disk");
    assert_eq!(error.raw_os_error(), Some(ENOSPC), "{error}");
    assert!(landed > 0 && landed < 4 * MIB, "{landed} bytes landed");
    assert_eq!(
        file.metadata().unwrap().len(),
        landed as u64,
        "the size is what landed, not what was attempted"
    );
    file.sync_all()
        .expect("fsync commits what landed, the disk full or not");
    drop(file);
    let (status, body) = server.get_bytes("big.bin").await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), landed, "the server has exactly what landed");
    assert!(body == data[..landed]);
    assert_eq!(std::fs::read(mount.at("big.bin")).unwrap().len(), landed);
}

/// Opens `path` for reading and writing (no truncation), overwrites its
/// first byte, reads the whole file back and closes it. Returns the errno of
/// the write and of the close (0 when they worked), and whether the read saw
/// `original` with that byte changed.
fn overwrite_first_byte(path: &Path, original: &Path) -> (i32, bool, i32) {
    let script = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    os.pwrite(fd, b"X", 0)
    w = 0
except OSError as e:
    w = e.errno
want = b"X" + open(sys.argv[2], "rb").read()[1:]
got = b""
while True:
    chunk = os.pread(fd, 1 << 20, len(got))
    if not chunk:
        break
    got += chunk
try:
    os.close(fd)
    c = 0
except OSError as e:
    c = e.errno
print(w, int(got == want), c)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .arg(original)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let codes: Vec<i32> = text
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    (codes[0], codes[1] == 1, codes[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_that_cannot_fetch_the_rest_onto_a_full_disk_fails_and_keeps_the_server_version() {
    if !fuse_available() || !is_root() {
        return;
    }
    let disk = Tmpfs::mount("4m");
    let server = Server::start();
    let original = random_bytes(6 * MIB);
    store_file(&server, "video.bin", &original);
    let mount = mount_with_cache_dir(&server, &disk.path);
    let target: PathBuf = mount.at("video.bin");
    // The write needs one block; the close needs all six staged on a 4 MiB
    // disk. Reading the file meanwhile takes no staging space.
    let stored = server.store_dir.as_ref().unwrap().join("video.bin");
    let (write, read_back, close) = overwrite_first_byte(&target, &stored);
    assert_eq!(write, 0, "one block fits");
    assert!(
        read_back,
        "the open file reads as the original with the write"
    );
    assert_eq!(
        close, ENOSPC,
        "close reports that the file could not be completed"
    );
    assert_eq!(
        server.get_bytes("video.bin").await.1,
        original,
        "the server keeps the whole original"
    );
    // The dropped change leaves the mount showing the server's version, and
    // the disk free again.
    assert!(eventually(Duration::from_secs(10), || std::fs::read(
        &target
    )
    .is_ok_and(|b| b == original)));
    assert!(eventually(Duration::from_secs(5), || staged_bytes(
        &disk.path
    ) == 0));
}
