//! `ferry mount` read path and namespace, on real FUSE mounts of a real
//! server. Skipped (loudly) only where /dev/fuse is absent.

mod harness;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::mount::{MountProc, fuse_available, is_mounted, probe_duration, store_file};
use harness::proxy::CuttingProxy;
use harness::{Server, eventually, random_bytes};
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;

fn sha_of_reader(mut r: impl Read) -> String {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; MIB];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex::encode(hasher.finalize())
}

#[test]
fn a_1_gib_file_reads_back_identically() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let data = random_bytes(1 << 30);
    store_file(&server, "big/one-gig.bin", &data);
    let expected = hex::encode(Sha256::digest(&data));
    drop(data);
    let mount = MountProc::start(&server, &[]);
    let file = std::fs::File::open(mount.at("big/one-gig.bin")).unwrap();
    assert_eq!(file.metadata().unwrap().len(), 1 << 30);
    assert_eq!(sha_of_reader(file), expected);
}

/// The kernel offers FUSE only 128 KiB of readahead; the mount raises its
/// device's to a whole block, so sequential reads arrive in 1 MiB requests.
#[test]
fn the_mount_raises_the_kernels_readahead_to_a_block() {
    use std::os::unix::fs::MetadataExt;
    if !fuse_available() || !harness::mount::is_root() {
        return;
    }
    let server = Server::start();
    store_file(&server, "seq.bin", &random_bytes(4 * MIB));
    let mount = MountProc::start(&server, &[]);
    let dev = std::fs::metadata(mount.at("")).unwrap().dev();
    let (major, minor) = (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    );
    let setting = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    let raised = eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&setting).is_ok_and(|kb| kb.trim() == "1024")
    });
    assert!(
        raised,
        "{setting} is {:?}",
        std::fs::read_to_string(&setting)
    );
    let mut data = Vec::new();
    std::fs::File::open(mount.at("seq.bin"))
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    assert_eq!(data.len(), 4 * MIB);
}

#[test]
fn concurrent_readers_of_one_file_and_of_fifty_files() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let shared = random_bytes(48 * MIB);
    store_file(&server, "shared.bin", &shared);
    let mut small = Vec::new();
    for i in 0..50 {
        let data = random_bytes(MIB + i * 4099);
        store_file(&server, &format!("many/f{i:02}.bin"), &data);
        small.push(data);
    }
    let mount = MountProc::start(&server, &[]);
    let expected = hex::encode(Sha256::digest(&shared));
    std::thread::scope(|scope| {
        for _ in 0..8 {
            let (path, expected) = (mount.at("shared.bin"), expected.clone());
            scope.spawn(move || {
                assert_eq!(sha_of_reader(std::fs::File::open(path).unwrap()), expected)
            });
        }
        for (i, data) in small.iter().enumerate() {
            let path = mount.at(&format!("many/f{i:02}.bin"));
            scope.spawn(move || assert!(std::fs::read(path).unwrap() == *data, "file {i} differs"));
        }
    });
    let listed: Vec<_> = std::fs::read_dir(mount.at("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listed.len(), 50);
}

#[test]
fn seeks_read_the_right_bytes() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let data = random_bytes(40 * MIB + 12_345);
    store_file(&server, "seek.bin", &data);
    let mount = MountProc::start(&server, &[]);
    let mut file = std::fs::File::open(mount.at("seek.bin")).unwrap();
    let mut buf = vec![0u8; MIB];
    file.seek(SeekFrom::End(-(MIB as i64))).unwrap();
    file.read_exact(&mut buf).unwrap();
    assert!(buf[..] == data[data.len() - MIB..], "last MiB");
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_exact(&mut buf).unwrap();
    assert!(buf[..] == data[..MIB], "first MiB");
    let mut state = 0x9e3779b97f4a7c15u64;
    for _ in 0..300 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = state % (data.len() as u64 - 4096);
        let mut small = [0u8; 4096];
        file.read_exact_at(&mut small, offset).unwrap();
        assert!(
            small[..] == data[offset as usize..offset as usize + 4096],
            "4 KiB at {offset}"
        );
    }
    // Reading past the end returns nothing, not an error.
    assert_eq!(file.read_at(&mut buf, data.len() as u64 + 10).unwrap(), 0);
}

/// Response body bytes the server has sent so far (its `/metrics`).
#[test]
fn random_reads_fetch_only_what_they_need() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let data = random_bytes(64 * MIB);
    store_file(&server, "random.bin", &data);
    let mount = MountProc::start(&server, &[]);
    let file = std::fs::File::open(mount.at("random.bin")).unwrap();
    let before = server.metric("ferry_sent_bytes_total");
    // Far apart: no read lands near another's block.
    for i in 0..20u64 {
        let offset = i * 3 * MIB as u64 + 12_345;
        let mut small = [0u8; 4096];
        file.read_exact_at(&mut small, offset).unwrap();
        assert!(small[..] == data[offset as usize..offset as usize + 4096]);
    }
    let fetched = server.metric("ferry_sent_bytes_total") - before;
    assert!(
        fetched < (20 * 256 * 1024) as f64,
        "20 random 4 KiB reads fetched {fetched} bytes"
    );
}

/// One sample from a `/metrics` text, 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    harness::metrics_text::sample(text, name).unwrap_or(0.0)
}

#[test]
fn the_mount_exports_its_counters() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let data = random_bytes(8 * MIB);
    store_file(&server, "counted.bin", &data);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mount = MountProc::start(&server, &["--metrics-addr", &addr]);
    let scrape = || {
        String::from_utf8_lossy(&harness::raw_get(addr.parse().unwrap(), b"/metrics").body)
            .into_owned()
    };
    assert!(std::fs::read(mount.at("counted.bin")).unwrap() == data);
    let first = scrape();
    assert!(
        metric(&first, "ferry_mount_fetched_bytes_total") >= (8 * MIB) as f64,
        "{first}"
    );
    assert!(
        metric(&first, "ferry_mount_cache_misses_total") >= 1.0,
        "{first}"
    );
    assert_eq!(
        metric(&first, "ferry_mount_pending_uploads"),
        0.0,
        "{first}"
    );
    // The kernel forgets its pages; the blocks come from the mount's memory.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert!(std::fs::read(mount.at("counted.bin")).unwrap() == data);
    let second = scrape();
    assert!(
        metric(&second, "ferry_mount_cache_hits_total")
            > metric(&first, "ferry_mount_cache_hits_total"),
        "{second}"
    );
    assert!(
        metric(&second, "ferry_mount_cached_bytes") >= (8 * MIB) as f64,
        "{second}"
    );
}

#[test]
fn a_mount_of_a_server_with_tokens_uses_the_token_file() {
    if !fuse_available() {
        return;
    }
    let (token, writer) = (
        "ferry_mount_test_token_0001",
        "ferry_mount_test_writer_0002",
    );
    let config = harness::token_entry("mount", token, r#"["read"]"#, "")
        + &harness::token_entry("writer", writer, r#"["read", "write"]"#, "");
    let server = Server::start_configured(&config, &[]);
    let data = random_bytes(3 * MIB);
    let stored = reqwest_free_put(&server, writer, "secret.bin", &data);
    assert_eq!(stored, 201);
    // Without a token the mount is refused before anything is mounted.
    let dir = tempfile::tempdir().unwrap();
    let denied = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["mount", &server.url])
        .arg(dir.path())
        .args(["--foreground", "--retry-for", "1"])
        .env_remove("FERRY_TOKEN")
        .output()
        .unwrap();
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("token"), "{stderr}");
    assert!(!is_mounted(dir.path()));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let mount = MountProc::start(&server, &["--token-file", token_file.to_str().unwrap()]);
    assert!(std::fs::read(mount.at("secret.bin")).unwrap() == data);
    // A read-only token makes a read-only mount: writes fail at once.
    let err = std::fs::write(mount.at("new.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "EROFS: {err}");
}

/// `PUT /v1/files/{path}` with a bearer token over a raw connection.
fn reqwest_free_put(server: &Server, token: &str, path: &str, data: &[u8]) -> u16 {
    let mut request = format!(
        "PUT /v1/files/{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    )
    .into_bytes();
    request.extend_from_slice(data);
    server.raw(&request).status
}

/// Byte offsets of the top-level MP4 boxes named `name`.
fn box_offset(data: &[u8], name: &[u8; 4]) -> Option<usize> {
    let mut at = 0;
    while at + 8 <= data.len() {
        let size = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        if &data[at + 4..at + 8] == name {
            return Some(at);
        }
        if size < 8 {
            return None;
        }
        at += size;
    }
    None
}

#[test]
fn ffprobe_and_a_seek_decode_work_on_an_mp4_with_moov_at_the_end() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let video = tmp.path().join("clip.mp4");
    let made = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=duration=120:size=320x240:rate=10",
        ])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "20",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(&video)
        .status()
        .expect("ffmpeg is installed (scripts/test.sh installs it)");
    assert!(made.success());
    let bytes = std::fs::read(&video).unwrap();
    let (moov, mdat) = (
        box_offset(&bytes, b"moov").unwrap(),
        box_offset(&bytes, b"mdat").unwrap(),
    );
    assert!(
        moov > mdat,
        "the test needs the moov atom after the media data"
    );
    store_file(&server, "videos/clip.mp4", &bytes);
    let mount = MountProc::start(&server, &[]);
    let target = mount.at("videos/clip.mp4");
    let duration = probe_duration(&target);
    assert!((duration - 120.0).abs() < 1.0, "{duration}");
    let frame = tmp.path().join("frame.png");
    let decode = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-ss", "60", "-i"])
        .arg(&target)
        .args(["-frames:v", "1"])
        .arg(&frame)
        .output()
        .unwrap();
    assert!(
        decode.status.success(),
        "{}",
        String::from_utf8_lossy(&decode.stderr)
    );
    assert!(std::fs::metadata(&frame).unwrap().len() > 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_changes_are_visible_both_ways() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("docs/a.txt", "first version").await;
    let mount = MountProc::start(&server, &[]);
    // Through the mount, seen by the API.
    std::fs::create_dir(mount.at("made-here")).unwrap();
    assert_eq!(server.json("/v1/stat/made-here").await.1["kind"], "dir");
    std::fs::rename(mount.at("docs/a.txt"), mount.at("made-here/b.txt")).unwrap();
    assert_eq!(
        server.get_bytes("made-here/b.txt").await.1,
        b"first version"
    );
    std::fs::create_dir(mount.at("empty")).unwrap();
    std::fs::remove_dir(mount.at("empty")).unwrap();
    assert_eq!(server.json("/v1/stat/empty").await.0, 404);
    std::fs::remove_file(mount.at("made-here/b.txt")).unwrap();
    assert_eq!(server.get_bytes("made-here/b.txt").await.0, 404);
    // Through the API, seen by the mount (the change feed invalidates at once).
    server
        .op("mkdir", serde_json::json!({"path": "from-api"}))
        .await;
    server.put("from-api/c.txt", "api").await;
    let seen = mount.at("from-api/c.txt");
    assert!(eventually(Duration::from_secs(3), || std::fs::read(&seen)
        .is_ok_and(|b| b == b"api")));
    server
        .op(
            "rename",
            serde_json::json!({"from": "from-api", "to": "renamed", "recursive": true}),
        )
        .await;
    assert!(eventually(Duration::from_secs(3), || !mount
        .at("from-api")
        .exists()
        && mount.at("renamed/c.txt").exists()));
    // A file changed through the API reads back its new bytes.
    server
        .put("renamed/c.txt", "a longer, second version")
        .await;
    assert!(eventually(Duration::from_secs(3), || {
        std::fs::read(mount.at("renamed/c.txt")).is_ok_and(|b| b == b"a longer, second version")
    }));
    let names: Vec<String> = std::fs::read_dir(&mount.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.contains(&"renamed".to_owned()) && !names.iter().any(|n| n.starts_with(".ferry")),
        "{names:?}"
    );
}

/// With a long attribute TTL only the change feed can make a remote change
/// visible at once: the kernel's cached entry, attributes and pages are
/// dropped as the event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_invalidates_the_kernels_caches() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("feed/n.txt", "first").await;
    server.put("feed/old.txt", "x").await;
    server.put("lone/b/last.txt", "z").await;
    let mount = MountProc::start(&server, &["--attr-ttl", "600"]);
    let file = mount.at("feed/n.txt");
    assert_eq!(std::fs::read(&file).unwrap(), b"first");
    assert!(mount.at("feed/old.txt").exists());
    assert!(mount.at("lone/b/last.txt").exists());
    assert_eq!(std::fs::read_dir(mount.at("lone")).unwrap().count(), 1);
    // The directories that existed only through it go with it, though no
    // event names them.
    let deleted = server
        .client()
        .delete(server.file_url("lone/b/last.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert!(
        eventually(Duration::from_secs(2), || !mount.at("lone").exists()),
        "lone is still there"
    );
    // Same length: only dropped pages can show the new bytes.
    server.put("feed/n.txt", "later").await;
    server
        .op(
            "rename",
            serde_json::json!({"from": "feed/old.txt", "to": "feed/new.txt"}),
        )
        .await;
    assert!(
        eventually(Duration::from_secs(2), || std::fs::read(&file)
            .is_ok_and(|b| b == b"later")),
        "the mount still reads {:?}",
        std::fs::read(&file)
    );
    assert!(eventually(Duration::from_secs(2), || !mount
        .at("feed/old.txt")
        .exists()
        && mount.at("feed/new.txt").exists()));
}

#[test]
fn unsupported_and_missing_give_honest_errnos() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    store_file(&server, "f.txt", b"x");
    let mount = MountProc::start(&server, &[]);
    let missing = std::fs::read(mount.at("nope.txt")).unwrap_err();
    assert_eq!(missing.raw_os_error(), Some(2), "ENOENT");
    let link = std::fs::hard_link(mount.at("f.txt"), mount.at("g.txt")).unwrap_err();
    assert_eq!(link.raw_os_error(), Some(1), "EPERM");
    let rmdir_file = std::fs::remove_dir(mount.at("f.txt")).unwrap_err();
    assert_eq!(rmdir_file.raw_os_error(), Some(20), "ENOTDIR");
    std::fs::create_dir(mount.at("d")).unwrap();
    std::fs::write(server.store_dir.as_ref().unwrap().join("d/inner"), b"1").unwrap();
    let not_empty = std::fs::remove_dir(mount.at("d")).unwrap_err();
    assert_eq!(not_empty.raw_os_error(), Some(39), "ENOTEMPTY");
}

/// A handle open on a file that is then replaced on the server, or removed
/// through the mount, cannot read its version any more: ESTALE, never
/// ENOENT or other bytes.
#[test]
fn a_handle_on_a_replaced_or_removed_file_reads_estale() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let data = random_bytes(64 << 20);
    for name in ["replaced.bin", "removed.bin"] {
        store_file(&server, name, &data);
    }
    let mount = MountProc::start(&server, &[]);
    for name in ["replaced.bin", "removed.bin"] {
        let file = std::fs::File::open(mount.at(name)).unwrap();
        let mut head = vec![0u8; 64 << 10];
        file.read_exact_at(&mut head, 0).unwrap();
        assert!(head[..] == data[..head.len()]);
        match name {
            "replaced.bin" => store_file(&server, name, &random_bytes(64 << 20)),
            _ => std::fs::remove_file(mount.at(name)).unwrap(),
        }
        let mut tail = vec![0u8; 64 << 10];
        let err = file.read_exact_at(&mut tail, 60 << 20).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(116), "{name}: {err}");
    }
}

#[test]
fn a_stopped_server_gives_eio_and_reads_resume_when_it_returns() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let addr = server.addr.to_string();
    let data = random_bytes(16 * MIB);
    store_file(&server, "f.bin", &data);
    let mount = MountProc::start(&server, &["--retry-for", "2"]);
    let file = std::fs::File::open(mount.at("f.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == data[..4096]);
    drop(server); // SIGKILL
    let err = file.read_exact_at(&mut buf, 12 * MIB as u64).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(5),
        "EIO, not wrong bytes or ENOENT: {err}"
    );
    let _back = Server::spawn(store.to_str().unwrap(), &addr, &[]);
    file.read_exact_at(&mut buf, 12 * MIB as u64).unwrap();
    assert!(buf[..] == data[12 * MIB..12 * MIB + 4096]);
}

/// A server that accepts connections but never answers (stopped with
/// SIGSTOP) makes calls fail with EIO after about `--retry-for`, the
/// request in flight included, not after the 60 s the HTTP client waits
/// for each answer: `stat` of the mount point, `cat` of a file not yet
/// looked up, and a read of an open file.
#[test]
fn a_frozen_server_gives_eio_after_retry_for() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let data = random_bytes(4 * MIB);
    store_file(&server, "open.bin", &data);
    store_file(&server, "uncached.txt", b"never looked up");
    let mount = MountProc::start(&server, &["--retry-for", "2"]);
    let open = std::fs::File::open(mount.at("open.bin")).unwrap();
    server.pause();
    // What the kernel and the mount know of the root expires (1 s).
    std::thread::sleep(Duration::from_millis(1500));
    let bound = Duration::from_secs(30);
    let started = std::time::Instant::now();
    let err = std::fs::metadata(&mount.path).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    assert!(
        started.elapsed() < bound,
        "stat took {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let err = std::fs::read(mount.at("uncached.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    assert!(
        started.elapsed() < bound,
        "cat took {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let err = open.read_exact_at(&mut buf, 3 * MIB as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    assert!(
        started.elapsed() < bound,
        "read took {:?}",
        started.elapsed()
    );
    server.resume();
    assert_eq!(
        std::fs::read(mount.at("uncached.txt")).unwrap(),
        b"never looked up"
    );
    open.read_exact_at(&mut buf, 3 * MIB as u64).unwrap();
    assert!(buf[..] == data[3 * MIB..3 * MIB + 4096]);
}

#[test]
fn sigterm_unmounts_and_bad_mount_points_are_clear_errors() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mut mount = MountProc::start(&server, &[]);
    let busy = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["mount", &server.url])
        .arg(&mount.path)
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    let missing = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["mount", &server.url, "/no/such/dir"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/dir"));
    let exited = terminate(&mut mount.child);
    assert!(exited.success(), "{exited:?}");
    assert!(!is_mounted(&mount.path));
    let _ = std::io::stderr().flush();
}

/// `fusermount3 -u`, the usual way to unmount, ends the mount process
/// cleanly and without a warning.
#[test]
fn fusermount_unmounts_quietly() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mnt");
    std::fs::create_dir_all(&path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["mount", &server.url, path.to_str().unwrap(), "--foreground"])
        .env("FERRY_LOG", "warn")
        .env("FERRY_STATE_DIR", dir.path().join("state"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(15), || is_mounted(&path)));
    let status = Command::new("fusermount3")
        .arg("-u")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(stderr.contains("unmounted"), "{stderr}");
    assert!(
        !stderr.contains("WARN") && !stderr.contains("ERROR"),
        "{stderr}"
    );
}

/// A mount unmounted from outside while its session still runs (here a
/// lazy unmount with a file held open; also `fusermount3 -u` followed at
/// once by a SIGTERM, as scripts do) ends cleanly on SIGTERM: nothing is
/// left to unmount, which is not an error.
#[test]
fn sigterm_after_an_unmount_from_outside_ends_cleanly() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mut mount = MountProc::start(&server, &[]);
    let held = std::fs::File::create(mount.path.join("held")).unwrap();
    let status = Command::new("fusermount3")
        .arg("-uz")
        .arg(&mount.path)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!is_mounted(&mount.path));
    let exited = terminate(&mut mount.child);
    drop(held);
    assert!(exited.success(), "{exited:?}");
}

/// Sends `child` a SIGTERM and waits for it to exit.
fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap()
}

/// Total bytes of the regular files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn the_disk_cache_serves_blocks_memory_evicted_and_stays_in_budget() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let cache_dir = tmp.path().join("cache");
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let data = random_bytes(12 * MIB);
    store_file(&server, "f.bin", &data);
    store_file(&server, "g.bin", &random_bytes(12 * MIB));
    let args = [
        "--cache-size",
        "2M",
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "--disk-cache-size",
        "16M",
        "--retry-for",
        "1",
    ];
    let mount = MountProc::start(&server, &args);
    let file = std::fs::File::open(mount.at("f.bin")).unwrap();
    let mut all = vec![0u8; data.len()];
    file.read_exact_at(&mut all, 0).unwrap();
    assert!(all == data);
    let blocks = cache_dir.join("blocks");
    assert!(
        eventually(Duration::from_secs(5), || bytes_under(&blocks)
            >= 10 * MIB as u64),
        "blocks reach the disk"
    );
    // Another file pushes the total past the 16 MiB budget: the oldest go.
    std::fs::read(mount.at("g.bin")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        bytes_under(&blocks) <= 16 * MIB as u64,
        "over budget: {}",
        bytes_under(&blocks)
    );
    // With the server gone and the kernel's pages dropped, the last blocks of
    // f.bin (still on disk, long gone from the 2 MiB memory cache) read back.
    drop(server);
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let mut tail = vec![0u8; 2 * MIB];
    file.read_exact_at(&mut tail, 10 * MIB as u64).unwrap();
    assert!(tail[..] == data[10 * MIB..], "served from the disk cache");
}

/// A link that drops every connection after 100 kB of response (fewer
/// than a block): each block, and each read after a seek, is asked for
/// again from where the cut left it, and reads return the right bytes.
#[test]
fn connections_cut_mid_response_are_retried_for_the_rest() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let data = random_bytes(24 * MIB + 4321);
    store_file(&server, "cut.bin", &data);
    let proxy = CuttingProxy::start(server.addr, 100_000);
    let mount = MountProc::start_url(&proxy.url, &[]);
    let expected = hex::encode(Sha256::digest(&data));
    let file = std::fs::File::open(mount.at("cut.bin")).unwrap();
    assert_eq!(sha_of_reader(&file), expected);
    // Reads after seeks, on a handle with no readahead yet.
    let file = std::fs::File::open(mount.at("cut.bin")).unwrap();
    std::fs::write("/proc/sys/vm/drop_caches", "3").ok();
    for offset in [20 * MIB + 77, 3 * MIB + 5, 11 * MIB] {
        let mut buf = vec![0u8; 300_000];
        file.read_exact_at(&mut buf, offset as u64).unwrap();
        assert!(buf[..] == data[offset..offset + buf.len()], "at {offset}");
    }
    assert!(
        proxy.cuts() >= 24 * MIB as u64 / 100_000,
        "{}",
        proxy.cuts()
    );
}

/// The same with connections cut after 3000 bytes, in the middle of small
/// answers: listing (short enough to fit in one connection), `stat`,
/// `open` and reads of small files, and a rewrite of one, all succeed.
#[test]
fn metadata_calls_cut_mid_response_are_retried() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mut files = Vec::new();
    for i in 0..15 {
        let data = random_bytes(500 + i * 601);
        store_file(&server, &format!("d/f{i:02}"), &data);
        files.push(data);
    }
    let proxy = CuttingProxy::start(server.addr, 3000);
    let mount = MountProc::start_url(&proxy.url, &["--attr-ttl", "0"]);
    for round in 0..4 {
        let mut listed: Vec<_> = std::fs::read_dir(mount.at("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        listed.sort();
        let expected: Vec<_> = (0..files.len()).map(|i| format!("f{i:02}")).collect();
        assert_eq!(listed, expected, "round {round}");
        for (i, data) in files.iter().enumerate() {
            let path = mount.at(&format!("d/f{i:02}"));
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.len(), data.len() as u64, "f{i:02}");
            assert!(std::fs::read(&path).unwrap() == *data, "f{i:02}");
        }
    }
    std::fs::write(mount.at("d/f07"), b"rewritten").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(rt.block_on(server.eventually_has("d/f07", b"rewritten")));
    assert!(proxy.cuts() > 0);
}

/// Reads `file` on from `*pos` a MiB at a time, checking the bytes, until
/// a read fails; leaves `*pos` at the failed read and returns its error.
fn read_on_until_an_error(file: &std::fs::File, data: &[u8], pos: &mut usize) -> std::io::Error {
    let mut buf = vec![0u8; MIB];
    loop {
        assert!(*pos + MIB <= data.len(), "read to the end without an error");
        match file.read_exact_at(&mut buf, *pos as u64) {
            Ok(()) => assert!(buf[..] == data[*pos..*pos + MIB], "at {pos}"),
            Err(e) => return e,
        }
        *pos += MIB;
    }
}

/// Reads `len` bytes of `file` on from `*pos`, checking them, and waits
/// for the readahead window (now at its largest) to be fetched.
fn read_ahead_of_a_stop(file: &std::fs::File, data: &[u8], pos: &mut usize, len: usize) {
    let mut buf = vec![0u8; MIB];
    let end = *pos + len;
    while *pos < end {
        file.read_exact_at(&mut buf, *pos as u64).unwrap();
        assert!(buf[..] == data[*pos..*pos + MIB], "at {pos}");
        *pos += MIB;
    }
    std::thread::sleep(Duration::from_secs(3));
}

/// A reader streaming a file when the server stops answering (SIGSTOP) or
/// dies (SIGKILL): the read that reaches a block not yet fetched fails
/// with EIO about `--retry-for` after the server went quiet, not after
/// every block of the readahead window ahead of it (up to 64) has had its
/// own `--retry-for` of retries, eight at a time. Reads work again once
/// the server is back.
#[test]
fn a_read_fails_soon_after_the_server_stops_however_much_is_prefetched() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let addr = server.addr.to_string();
    let data = random_bytes(200 * MIB);
    store_file(&server, "stream.bin", &data);
    let mount = MountProc::start(&server, &["--retry-for", "2"]);
    let file = std::fs::File::open(mount.at("stream.bin")).unwrap();
    // Without the fix a read took 9 × --retry-for here (about 18 s).
    let bound = Duration::from_secs(10);
    let mut pos = 0;

    read_ahead_of_a_stop(&file, &data, &mut pos, 16 * MIB);
    server.pause();
    let stopped = std::time::Instant::now();
    let err = read_on_until_an_error(&file, &data, &mut pos);
    let waited = stopped.elapsed();
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    eprintln!("a stopped server: EIO after {waited:?}");
    assert!(waited < bound, "a stopped server: EIO after {waited:?}");
    assert!(
        pos > 32 * MIB,
        "the prefetched blocks were read first: {pos}"
    );
    server.resume();
    read_ahead_of_a_stop(&file, &data, &mut pos, 16 * MIB);

    drop(server); // SIGKILL
    let killed = std::time::Instant::now();
    let err = read_on_until_an_error(&file, &data, &mut pos);
    let waited = killed.elapsed();
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    eprintln!("a killed server: EIO after {waited:?}");
    assert!(waited < bound, "a killed server: EIO after {waited:?}");
    let _back = Server::spawn(store.to_str().unwrap(), &addr, &[]);
    read_ahead_of_a_stop(&file, &data, &mut pos, 8 * MIB);
}

/// The first offset at which `got` differs from `want` (in length too).
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .or((got.len() != want.len()).then(|| got.len().min(want.len())))
}

/// Reads all of `path` through a new handle.
fn read_whole(path: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    data
}

/// A handle opened before the file was replaced on the server goes on
/// reading its version; a handle opened after it reads the new version
/// only, and so does every later open: the old handle's reads never put
/// old pages where the new version's readers find them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_handle_reading_on_never_mixes_old_pages_into_the_new_version() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let (v1, v2) = (random_bytes(16 * MIB), random_bytes(16 * MIB));
    server.put("mix/s.bin", v1.clone()).await;
    let mount = MountProc::start(&server, &[]);
    let path = mount.at("mix/s.bin");
    let old = std::fs::File::open(&path).unwrap();
    let mut head = vec![0u8; 4 * MIB];
    old.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(first_difference(&head, &v1[..4 * MIB]), None);
    server.put("mix/s.bin", v2.clone()).await;
    let mut probe = vec![0u8; 4096];
    assert!(
        eventually(Duration::from_secs(20), || {
            std::fs::File::open(&path)
                .and_then(|f| f.read_exact_at(&mut probe, 0))
                .is_ok()
                && probe[..] == v2[..4096]
        }),
        "the mount never saw the new version"
    );
    let new = std::fs::File::open(&path).unwrap();
    // The old handle reads on: its own version's bytes, or ESTALE.
    let mut chunk = vec![0u8; MIB];
    for at in (MIB..8 * MIB).step_by(MIB) {
        match old.read_exact_at(&mut chunk, at as u64) {
            Ok(()) => assert_eq!(
                first_difference(&chunk, &v1[at..at + MIB]),
                None,
                "old handle at {at}"
            ),
            Err(e) => assert_eq!(e.raw_os_error(), Some(116), "old handle at {at}: {e}"),
        }
    }
    let mut whole = vec![0u8; 16 * MIB];
    new.read_exact_at(&mut whole, 0).unwrap();
    assert_eq!(
        first_difference(&whole, &v2),
        None,
        "the new handle read other bytes than the new version"
    );
    assert_eq!(
        first_difference(&read_whole(&path), &v2),
        None,
        "a later open"
    );
    drop((old, new));
    assert_eq!(
        first_difference(&read_whole(&path), &v2),
        None,
        "an open after every old handle closed"
    );
}

/// A handle on a file the server then shrinks reads its version or gets
/// ESTALE past the new end, never a silent end of file, even once the new
/// size is known to the kernel (a `stat` by path, an `ls -l`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_on_a_shrunk_file_never_reads_a_false_end() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let (a, b) = (random_bytes(20 * MIB), random_bytes(MIB));
    server.put("f/t.bin", a.clone()).await;
    let mount = MountProc::start(&server, &[]);
    let path = mount.at("f/t.bin");
    let file = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 0).unwrap();
    server.put("f/t.bin", b.clone()).await;
    assert!(eventually(Duration::from_secs(20), || {
        std::fs::metadata(&path).is_ok_and(|m| m.len() == MIB as u64)
    }));
    let _ = file.metadata();
    for at in [10 * MIB, 15 * MIB, 2 * MIB, 100] {
        let mut buf = vec![0u8; 64 << 10];
        match file.read_at(&mut buf, at as u64) {
            Ok(n) => {
                assert_eq!(n, buf.len(), "a short read at {at}");
                assert_eq!(first_difference(&buf, &a[at..at + n]), None, "at {at}");
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(116), "at {at}: {e}"),
        }
    }
    drop(file);
    assert_eq!(first_difference(&read_whole(&path), &b), None);

    // A sequential reader (`cp`) whose file is replaced by a shorter one
    // midway gets all of its version or an error, not a prefix of it.
    let (a, b) = (random_bytes(64 * MIB), random_bytes(8 * MIB));
    server.put("f/seq.bin", a.clone()).await;
    let path = mount.at("f/seq.bin");
    let mut file = std::fs::File::open(&path).unwrap();
    let (mut got, mut chunk, mut failed) = (Vec::new(), vec![0u8; MIB], None);
    loop {
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
        if got.len() == 16 * MIB {
            server.put("f/seq.bin", b.clone()).await;
            assert!(eventually(Duration::from_secs(20), || {
                std::fs::metadata(&path).is_ok_and(|m| m.len() == 8 * MIB as u64)
            }));
        }
    }
    assert_eq!(
        first_difference(&got, &a[..got.len()]),
        None,
        "not the old version's bytes"
    );
    match failed {
        Some(e) => assert_eq!(e.raw_os_error(), Some(116), "{e}"),
        None => assert_eq!(got.len(), a.len(), "a silent end of file"),
    }
}

/// `fstat` of a handle whose file was removed on the server answers from
/// the version the handle reads, as on a local filesystem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fstat_of_a_handle_on_a_file_removed_on_the_server_works() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let a = random_bytes(4 * MIB);
    server.put("f/del.bin", a.clone()).await;
    let mount = MountProc::start(&server, &[]);
    let path = mount.at("f/del.bin");
    let file = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 0).unwrap();
    let status = server
        .client()
        .delete(server.file_url("f/del.bin"))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    assert!(eventually(Duration::from_secs(20), || !path.exists()));
    let meta = file.metadata().unwrap();
    assert_eq!(meta.len(), a.len() as u64);
}

/// A directory's time is the same whether the mount last learnt it from a
/// listing of its parent or from a `stat` of it: `tar c` right after a copy
/// into the mount used to stop with "file changed as we read it".
#[test]
fn a_directory_shows_one_time_through_listings_and_stats() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(
        rt.block_on(server.op("mkdir", serde_json::json!({"path": "top"})))
            .0,
        201
    );
    assert_eq!(
        rt.block_on(server.op("mkdir", serde_json::json!({"path": "top/sub"})))
            .0,
        201
    );
    let mount = MountProc::start(&server, &[]);
    let mtime = || {
        std::fs::metadata(mount.at("top/sub"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let first = mtime();
    for _ in 0..2 {
        // Past `--attr-ttl` (1 s), so that the listing's attributes are taken.
        std::thread::sleep(Duration::from_millis(1500));
        for entry in std::fs::read_dir(mount.at("top")).unwrap() {
            entry.unwrap().metadata().unwrap();
        }
        assert_eq!(mtime(), first, "after a listing");
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(mtime(), first, "after a stat");
    }
}

/// What the server has no room for is refused with the errno a local
/// filesystem without it gives.
#[test]
fn symlinks_and_extended_attributes_are_refused_plainly() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    store_file(&server, "f.txt", b"f");
    let mount = MountProc::start(&server, &[]);
    let link = std::os::unix::fs::symlink("f.txt", mount.at("link")).unwrap_err();
    assert_eq!(link.raw_os_error(), Some(libc::EPERM), "{link}");
    assert!(!mount.at("link").exists());
    let path =
        std::ffi::CString::new(mount.at("f.txt").into_os_string().into_encoded_bytes()).unwrap();
    let name = c"user.note";
    let errno_of = |result: isize| {
        assert_eq!(result, -1);
        std::io::Error::last_os_error().raw_os_error()
    };
    // SAFETY: both strings are NUL-terminated and outlive the calls; no
    // buffer is read or written (size 0, null).
    unsafe {
        let set = libc::setxattr(path.as_ptr(), name.as_ptr(), b"x".as_ptr().cast(), 1, 0);
        assert_eq!(errno_of(set as isize), Some(libc::EOPNOTSUPP), "setxattr");
        let get = libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0);
        assert_eq!(errno_of(get), Some(libc::ENODATA), "getxattr");
        let remove = libc::removexattr(path.as_ptr(), name.as_ptr());
        assert_eq!(
            errno_of(remove as isize),
            Some(libc::ENODATA),
            "removexattr"
        );
    }
}
