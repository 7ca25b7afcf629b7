//! Kept-alive HTTP/1.1 connections: file downloads answered with `sendfile`
//! and every other request answered by hyper, in order, on one connection;
//! cold and truncated files; byte counts; shutdown with idle connections.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use harness::{Server, random_bytes};

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn connect(server: &Server) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

/// Reads one response: its head, then a body framed by `Content-Length` or
/// chunked (none for `HEAD` and 304).
fn read_reply(reader: &mut BufReader<TcpStream>, head_request: bool) -> Reply {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split(' ')
        .nth(1)
        .expect("status line")
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    if head_request || status == 304 {
        return reply;
    }
    if let Some(len) = reply.header("content-length") {
        reply.body = vec![0; len.parse().unwrap()];
        reader.read_exact(&mut reply.body).unwrap();
    } else {
        assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            if size == 0 {
                break;
            }
            reply.body.extend_from_slice(&chunk[..size]);
        }
    }
    reply
}

#[tokio::test]
async fn requests_on_one_connection_are_answered_in_order_by_either_path() {
    let server = Server::start();
    let data = random_bytes(300_000);
    server.put("v.mp4", data.clone()).await;
    let (mut out, mut replies) = connect(&server);

    // Downloads, one after the other, then two sent at once (pipelined).
    out.write_all(b"GET /v1/files/v.mp4 HTTP/1.1\r\nHost: t\r\nRange: bytes=100-199\r\n\r\n")
        .unwrap();
    let r = read_reply(&mut replies, false);
    assert_eq!((r.status, &r.body[..]), (206, &data[100..200]));
    assert_eq!(r.header("content-range"), Some("bytes 100-199/300000"));
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    assert!(r.header("date").is_some());
    out.write_all(
        b"GET /v1/files/v.mp4 HTTP/1.1\r\nHost: t\r\n\r\n\
          HEAD /v1/files/v.mp4 HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /v1/files/missing HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .unwrap();
    let full = read_reply(&mut replies, false);
    assert_eq!(full.status, 200);
    assert!(full.body == data, "full body differs");
    let head = read_reply(&mut replies, true);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("300000"));
    let etag = head.header("etag").unwrap().to_owned();
    let missing = read_reply(&mut replies, false);
    assert_eq!(missing.status, 404);
    assert!(String::from_utf8_lossy(&missing.body).contains("not_found"));

    // Conditional: 304 has no body, and the next request still parses.
    write!(
        out,
        "GET /v1/files/v.mp4 HTTP/1.1\r\nHost: t\r\nIf-None-Match: {etag}\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_reply(&mut replies, false).status, 304);

    // A request with a body goes to hyper, which keeps the connection; later
    // downloads on it are hyper's too, and see the new version.
    out.write_all(b"PUT /v1/files/v.mp4 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    assert_eq!(read_reply(&mut replies, false).status, 200, "replaced");
    out.write_all(b"GET /v1/files/v.mp4 HTTP/1.1\r\nHost: t\r\nRange: bytes=1-3\r\n\r\n")
        .unwrap();
    let r = read_reply(&mut replies, false);
    assert_eq!((r.status, &r.body[..]), (206, &b"ell"[..]));
    out.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut replies, false).status, 200);
    let mut rest = Vec::new();
    replies.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "closed after Connection: close");
}

#[tokio::test]
async fn connection_close_and_other_protocol_versions_are_honoured() {
    let server = Server::start();
    server.put("a.txt", "abc").await;
    let r = harness::raw_request(
        server.addr,
        b"GET /v1/files/a.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((r.status, &r.body[..]), (200, &b"abc"[..]));
    let r = harness::raw_request(server.addr, b"GET /v1/files/a.txt HTTP/1.0\r\n\r\n");
    assert_eq!((r.status, &r.body[..]), (200, &b"abc"[..]));
    // A GET announcing a body, and one with a header hyper refuses.
    let r = harness::raw_request(
        server.addr,
        b"GET /v1/files/a.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nxy",
    );
    assert_eq!((r.status, &r.body[..]), (200, &b"abc"[..]));
    let r = harness::raw_request(
        server.addr,
        b"GET /v1/files/a.txt HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
    );
    assert_eq!(r.status, 400);
}

/// Regression: a stored page or SVG opened in a browser ran its scripts on
/// the server's origin. Downloads carry `Content-Security-Policy: sandbox`
/// whether the `sendfile` driver (HTTP/1.1) or hyper (HTTP/1.0) answers,
/// ranges and `HEAD` included; PDFs go without, as browsers' viewers do not
/// render under it.
#[tokio::test]
async fn downloads_are_sandboxed_whichever_path_answers_them() {
    let server = Server::start();
    let video = random_bytes(1000);
    let files: [(&str, &[u8], Option<&str>); 4] = [
        (
            "page.html",
            b"<html><script>alert(document.domain)</script></html>",
            Some("sandbox"),
        ),
        (
            "logo.svg",
            b"<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>",
            Some("sandbox"),
        ),
        ("v.mp4", &video, Some("sandbox")),
        ("doc.pdf", b"%PDF-1.4\n%%EOF\n", None),
    ];
    for (name, data, _) in files {
        server.put(name, data.to_vec()).await;
    }
    for (name, data, policy) in files {
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            let ask = |method: &str, range: &str| {
                let request = format!(
                    "{method} /v1/files/{name} {version}\r\nHost: t\r\n{range}Connection: close\r\n\r\n"
                );
                harness::raw_request(server.addr, request.as_bytes())
            };
            let full = ask("GET", "");
            assert_eq!(
                (full.status, &full.body[..]),
                (200, data),
                "{name} {version}"
            );
            let part = ask("GET", "Range: bytes=1-4\r\n");
            assert_eq!(
                (part.status, &part.body[..]),
                (206, &data[1..5]),
                "{name} {version}"
            );
            let head = ask("HEAD", "");
            assert_eq!(head.status, 200, "{name} {version}");
            for reply in [&full, &part, &head] {
                assert_eq!(
                    reply.header("content-security-policy"),
                    policy,
                    "{name} {version} {}",
                    reply.status
                );
                assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
            }
        }
    }
}

#[tokio::test]
async fn a_file_not_in_the_page_cache_is_read_from_the_disk() {
    let server = Server::start();
    let data = random_bytes(3 << 20);
    server.put("cold.bin", data.clone()).await;
    let path = server.store_dir.as_ref().unwrap().join("cold.bin");
    let file = std::fs::File::open(&path).unwrap();
    file.sync_all().unwrap();
    // Evicts the clean pages where the filesystem allows it (not tmpfs).
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let (status, body) = server.get_bytes("cold.bin").await;
    assert_eq!(status, 200);
    assert!(body == data, "cold read differs");
}

/// A file truncated in place while it is sent cannot deliver its
/// `Content-Length`: the response ends short, the connection closes, and
/// the server goes on serving.
#[tokio::test]
async fn a_file_truncated_in_place_mid_download_ends_the_connection() {
    let server = Server::start();
    let size = 64 << 20;
    server.put("shrinks.bin", vec![7u8; size]).await;
    let (mut out, mut replies) = connect(&server);
    out.write_all(b"GET /v1/files/shrinks.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        let mut line = String::new();
        replies.read_line(&mut line).unwrap();
        head.push_str(&line);
    }
    assert!(head.contains(&format!("content-length: {size}")), "{head}");
    let mut first = vec![0; 1 << 20];
    replies.read_exact(&mut first).unwrap();
    let path = server.store_dir.as_ref().unwrap().join("shrinks.bin");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let mut rest = Vec::new();
    let started = Instant::now();
    let _ = replies.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "connection hung"
    );
    assert!(
        first.len() + rest.len() < size,
        "all {size} bytes arrived from a truncated file"
    );
    assert_eq!(server.get_bytes("shrinks.bin").await.1.len(), 2 << 20);
}

#[tokio::test]
async fn bytes_sent_from_the_file_are_counted_in_metrics() {
    let server = Server::start();
    server.put("m.bin", random_bytes(1 << 20)).await;
    let before = server.metric("ferry_sent_bytes_total");
    let (status, body) = server.get_bytes("m.bin").await;
    assert_eq!((status, body.len()), (200, 1 << 20));
    let after = server.metric("ferry_sent_bytes_total");
    // The first /metrics response is counted too: a few KiB.
    let grew = after - before;
    assert!(
        (f64::from(1 << 20)..f64::from(1 << 20) + 64.0 * 1024.0).contains(&grew),
        "sent bytes grew by {grew}"
    );
}

#[test]
fn an_idle_kept_alive_connection_does_not_hold_up_shutdown() {
    let mut server = Server::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(server.put("a.txt", "abc"));
    let (mut out, mut replies) = connect(&server);
    out.write_all(b"GET /v1/files/a.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut replies, false).body, b"abc");
    server.signal("TERM");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the server waited for an idle connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit {status:?}");
    let mut rest = Vec::new();
    replies.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// h2c with prior knowledge starts like no HTTP/1.1 head: the connection is
/// hyper's from its first byte.
#[tokio::test]
async fn http2_without_tls_is_served_by_hyper() {
    let server = Server::start();
    let data = random_bytes(100_000);
    server.put("h2.bin", data.clone()).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .get(server.file_url("h2.bin"))
        .header("Range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 206);
    assert_eq!(response.bytes().await.unwrap(), &data[10..20]);
}
