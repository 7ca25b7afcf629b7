//! The `ferry serve` process: defaults, start-up errors, graceful shutdown.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::{Server, eventually};

#[test]
fn default_store_is_created_in_the_working_directory() {
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(cwd.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("ferry-data") && line.contains("http://127.0.0.1:"),
        "{line}"
    );
    assert!(cwd.path().join("ferry-data").is_dir());
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--listen", &addr, "--store"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&addr) && stderr.contains("in use"),
        "{stderr}"
    );
}

#[test]
fn a_cloud_url_without_the_feature_or_credentials_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "ftp://example/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported store scheme ftp://"));
}

#[test]
fn sigterm_lets_an_in_flight_upload_finish_then_exits_cleanly() {
    for signal in ["TERM", "INT"] {
        let mut server = Server::start();
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(stream, "PUT /v1/files/late.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello").unwrap();
        stream.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        server.signal(signal);
        std::thread::sleep(Duration::from_millis(200));
        stream.write_all(b"world").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 201"), "{signal}: {response}");
        assert!(eventually(Duration::from_secs(10), || matches!(
            server.child.try_wait(),
            Ok(Some(_))
        )));
        let status = server.child.wait().unwrap();
        assert!(status.success(), "{signal}: exit {status:?}");
        let on_disk = server.store_dir.as_ref().unwrap().join("late.txt");
        assert_eq!(std::fs::read(on_disk).unwrap(), b"helloworld");
    }
}

/// A shutdown waits for requests in flight only for `--shutdown-grace`:
/// neither a change-feed subscriber (which never ends by itself) nor a
/// download its client reads slowly keeps the server running. Both used to
/// hold it for as long as they lasted.
#[test]
fn a_shutdown_waits_for_long_requests_only_for_its_grace() {
    let mut server = Server::start_with(harness::Backend::Local, &["--shutdown-grace", "2"]);
    let mut feed = TcpStream::connect(server.addr).unwrap();
    write!(feed, "GET /v1/events HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(
        rt.block_on(server.put("big.bin", vec![7u8; 64 << 20]))
            .status(),
        201
    );
    let mut download = TcpStream::connect(server.addr).unwrap();
    write!(
        download,
        "GET /v1/files/big.bin HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    .unwrap();
    // Read a little of each, then nothing more: both stay in flight.
    let mut some = [0u8; 4096];
    feed.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(feed.read(&mut some).unwrap() > 0);
    download.read_exact(&mut some).unwrap();
    server.signal("TERM");
    let stopped = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(8), || matches!(
            server.child.try_wait(),
            Ok(Some(_))
        )),
        "the server is still running 8 s after SIGTERM"
    );
    assert!(server.child.wait().unwrap().success());
    // The feed ended at once; the download had its 2 s of grace.
    assert!(
        stopped.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        stopped.elapsed()
    );
}

/// The change feed ends at a shutdown, so a server with subscribers and no
/// other requests stops at once.
#[test]
fn a_change_feed_subscriber_does_not_hold_a_shutdown() {
    let mut server = Server::start();
    let mut feed = TcpStream::connect(server.addr).unwrap();
    write!(feed, "GET /v1/events HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    feed.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut some = [0u8; 4096];
    assert!(feed.read(&mut some).unwrap() > 0);
    let stopped = std::time::Instant::now();
    server.signal("TERM");
    assert!(eventually(Duration::from_secs(5), || matches!(
        server.child.try_wait(),
        Ok(Some(_))
    )));
    assert!(stopped.elapsed() < Duration::from_secs(5));
    // The subscriber saw its stream end, not a cut connection.
    let mut rest = Vec::new();
    let _ = feed.read_to_end(&mut rest);
    assert!(
        String::from_utf8_lossy(&rest).ends_with("0\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// A server killed in the middle of a `PUT` leaves the write's temporary
/// (`{name}#1`) beside its target. The next server on that store removes it
/// once it has gone unwritten for an hour, with the directory only it kept;
/// a fresh one, which may be another node's write in progress, is kept.
#[test]
fn temporaries_of_writes_a_killed_server_left_are_removed() {
    let mut server = Server::start();
    let store = server.store_dir.clone().unwrap();
    let mut stream = TcpStream::connect(server.addr).unwrap();
    write!(
        stream,
        "PUT /v1/files/deep/dir/big.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 20000000\r\n\r\n"
    )
    .unwrap();
    // More than a part (5 MiB), which the server writes out as it fills.
    stream.write_all(&vec![7u8; 8 << 20]).unwrap();
    stream.flush().unwrap();
    let temporary = store.join("deep/dir/big.bin#1");
    assert!(eventually(Duration::from_secs(10), || {
        std::fs::metadata(&temporary).is_ok_and(|m| m.len() > 0)
    }));
    server.signal("KILL");
    server.child.wait().unwrap();
    drop(stream);
    // Another temporary, just written (as by a write under way elsewhere).
    std::fs::write(store.join("deep/fresh.bin#1"), "in progress").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    let leftover = std::fs::File::options()
        .write(true)
        .open(&temporary)
        .unwrap();
    leftover.set_modified(old).unwrap();
    drop(leftover);

    let _next = Server::start_on(store.to_str().unwrap(), &[]);
    assert!(eventually(Duration::from_secs(10), || !temporary.exists()));
    assert!(
        !store.join("deep/dir").exists(),
        "the directory it alone kept"
    );
    assert!(store.join("deep/fresh.bin#1").exists());
}
