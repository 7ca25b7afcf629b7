//! Bad input gets a clear JSON error, never a panic or a 500, and nothing is
//! read or written outside the store root.

mod harness;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use harness::{Backend, Server, eventually, random_bytes, raw_get};

/// A secret beside the store that no request may reach.
fn plant_secret(server: &Server) -> std::path::PathBuf {
    let outside = server
        .store_dir
        .as_ref()
        .unwrap()
        .parent()
        .unwrap()
        .join("secret.txt");
    std::fs::write(&outside, "top secret").unwrap();
    outside
}

#[tokio::test]
async fn traversal_and_malformed_paths_are_refused() {
    let server = Server::start();
    let secret = plant_secret(&server);
    let long_segment = format!("/v1/files/{}", "x".repeat(300));
    let targets: Vec<&[u8]> = vec![
        b"/v1/files/../secret.txt",
        b"/v1/files/../etc/passwd",
        b"/v1/files/%2e%2e/secret.txt",
        b"/v1/files/%2E%2E/secret.txt",
        b"/v1/files/a/%2e%2e/%2e%2e/secret.txt",
        b"/v1/files/a//b",
        b"/v1/files//abs",
        b"/v1/files//etc/passwd",
        b"/v1/files/a%5Cb",
        b"/v1/files/a%00b",
        long_segment.as_bytes(),
        b"/v1/files/.ferry/uploads/x",
        b"/v1/files/dir/.ferry-dir",
        b"/v1/files/a%FFb",
        b"/v1/list/..",
        b"/v1/stat/%2e%2e",
    ];
    for target in targets {
        let resp = raw_get(server.addr, target);
        let shown = String::from_utf8_lossy(target);
        assert_eq!(resp.status, 400, "{shown}");
        // Too long is told apart (a mount reports it as ENAMETOOLONG).
        let code = if target == long_segment.as_bytes() {
            "name_too_long"
        } else {
            "invalid_path"
        };
        assert_eq!(resp.error_code(), code, "{shown}");
        assert!(!String::from_utf8_lossy(&resp.body).contains("top secret"));
    }
    // A raw backslash or NUL in the request line is refused by the HTTP parser
    // itself, also with a 400.
    for target in [&b"/v1/files/a\\b"[..], b"/v1/files/a\0b"] {
        assert_eq!(raw_get(server.addr, target).status, 400);
    }
    assert_eq!(std::fs::read_to_string(secret).unwrap(), "top secret");
}

#[tokio::test]
async fn traversal_puts_write_nothing_outside() {
    let server = Server::start();
    let parent = server
        .store_dir
        .as_ref()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    for target in [
        "../escaped.txt",
        "%2e%2e/escaped.txt",
        "a/%2e%2e/%2e%2e/escaped.txt",
        "/escaped.txt",
    ] {
        let req = format!(
            "PUT /v1/files/{target} HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        );
        let resp = server.raw(req.as_bytes());
        assert_eq!(resp.status, 400, "{target}");
    }
    assert!(!parent.join("escaped.txt").exists());
    assert!(
        server.files_on_disk().is_empty(),
        "{:?}",
        server.files_on_disk()
    );
}

#[tokio::test]
async fn reserved_names_cannot_be_written_or_listed() {
    let server = Server::start();
    server.put("d/f.txt", "x").await;
    let (status, _) = server
        .op("mkdir", serde_json::json!({"path": ".ferry/x"}))
        .await;
    assert_eq!(status, 400);
    let (status, _) = server
        .op(
            "rename",
            serde_json::json!({"from": "d/f.txt", "to": "d/.ferry-dir"}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = server
        .op("mkdir", serde_json::json!({"path": "d/sub"}))
        .await;
    assert_eq!(status, 201);
    let names = server.listed_names("d?recursive=true").await;
    assert_eq!(names, ["f.txt", "sub"]);
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let server = Server::start();
    let resp = raw_get(server.addr, b"/v2/nothing");
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (404, "not_found")
    );
    let resp = raw_get(server.addr, b"/v1/ops/mkdir");
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (405, "method_not_allowed")
    );
    let resp = server
        .client()
        .get(server.file_url("missing.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn malformed_bodies_and_queries_are_400() {
    let server = Server::start();
    let client = server.client();
    for body in ["", "{", "{\"path\": 5}", "[]", "{\"from\": \"a\"}"] {
        let resp = client
            .post(format!("{}/v1/ops/rename", server.url))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body:?}");
    }
    let huge = format!("{{\"path\": \"{}\"}}", "a".repeat(100_000));
    let resp = client
        .post(format!("{}/v1/ops/mkdir", server.url))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    for query in ["limit=abc", "recursive=maybe", "cursor=%%%"] {
        let (status, body) = server.json(&format!("/v1/list/?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
    }
    let resp = client
        .post(format!("{}/v1/files/d", server.url))
        .header("content-type", "text/plain")
        .body("not a form")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn oversized_puts_are_413_and_leave_nothing_behind() {
    let server = Server::start_with(Backend::Local, &["--max-body-bytes", "1000"]);
    let client = server.client();
    // Declared too large: refused before reading.
    let resp = client
        .put(server.file_url("big.bin"))
        .body(vec![7u8; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // Streamed without a length: refused once the limit is crossed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|_| Ok(vec![7u8; 100])).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let resp = client
        .put(server.file_url("big.bin"))
        .body(body)
        .send()
        .await;
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), 413);
    }
    // Exactly at the limit is fine.
    let resp = client
        .put(server.file_url("ok.bin"))
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert!(
        eventually(Duration::from_secs(5), || server.files_on_disk()
            == ["ok.bin"]),
        "{:?}",
        server.files_on_disk()
    );
    assert_eq!(server.get_bytes("big.bin").await.0, 404);
    // A refused write into new directories leaves no directory behind.
    let resp = client
        .put(server.file_url("new/deep/big.bin"))
        .body(vec![7u8; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|_| Ok(vec![7u8; 100])).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let _ = client
        .put(server.file_url("new/deep/big.bin"))
        .body(body)
        .send()
        .await;
    let root = server.store_dir.clone().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !root.join("new").exists()),
        "empty directories left behind"
    );
    assert_eq!(server.json("/v1/stat/new").await.0, 404);
}

#[tokio::test]
async fn a_client_disconnecting_mid_put_leaves_the_old_version() {
    let server = Server::start();
    let old = random_bytes(50_000);
    server.put("doc.bin", old.clone()).await;
    let declared = 20 << 20;
    for sent in [0, 100_000, 6 << 20] {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        write!(
            stream,
            "PUT /v1/files/doc.bin HTTP/1.1\r\nHost: t\r\nContent-Length: {declared}\r\n\r\n"
        )
        .unwrap();
        stream.write_all(&vec![1u8; sent]).unwrap();
        stream.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(stream);
        let (status, body) = server.get_bytes("doc.bin").await;
        assert_eq!(status, 200);
        assert!(body == old, "old version replaced after {sent} bytes");
        assert!(
            eventually(Duration::from_secs(5), || server.files_on_disk()
                == ["doc.bin"]),
            "staging left behind after {sent} bytes: {:?}",
            server.files_on_disk()
        );
    }
    // And a disconnect with no previous version leaves no object at all.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    write!(
        stream,
        "PUT /v1/files/new.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n"
    )
    .unwrap();
    stream.write_all(&[2u8; 1000]).unwrap();
    drop(stream);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.get_bytes("new.bin").await.0, 404);
    assert!(eventually(Duration::from_secs(5), || server
        .files_on_disk()
        == ["doc.bin"]));
}

#[tokio::test]
async fn writes_that_would_mix_files_and_directories_are_409() {
    let server = Server::start();
    server.put("a/b.txt", "x").await;
    let client = server.client();
    // A file where a directory is.
    let resp = client
        .put(server.file_url("a"))
        .body("y")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    // A file under a file.
    let resp = client
        .put(server.file_url("a/b.txt/c"))
        .body("y")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    // GET and DELETE of a directory.
    assert_eq!(
        client
            .get(server.file_url("a"))
            .send()
            .await
            .unwrap()
            .status(),
        409
    );
    assert_eq!(
        client
            .delete(server.file_url("a"))
            .send()
            .await
            .unwrap()
            .status(),
        409
    );
    assert_eq!(server.get_bytes("a/b.txt").await.1, b"x");
}

/// The status, code and message of an answer, after checking that its body
/// does not name the store's absolute path.
async fn error_naming_no_server_path(server: &Server, resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    let root = std::fs::canonicalize(server.store_dir.as_ref().unwrap()).unwrap();
    assert!(!body.contains(root.to_str().unwrap()), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (status, v["error"]["code"].as_str().unwrap().to_owned())
}

/// Regression: the local backend's errors went to clients with the store's
/// absolute path in them.
#[tokio::test]
async fn a_failing_store_names_no_server_path() {
    let server = Server::start();
    let store = server.store_dir.as_ref().unwrap();
    std::os::unix::fs::symlink("loop.txt", store.join("loop.txt")).unwrap();
    let client = server.client();
    // Read through ferry's own local reader, written through the backend.
    let resp = client
        .get(server.file_url("loop.txt"))
        .send()
        .await
        .unwrap();
    let refused = error_naming_no_server_path(&server, resp).await;
    assert_eq!(refused, (503, "storage_error".to_owned()));
    let resp = client
        .put(server.file_url("loop.txt"))
        .body("x")
        .send()
        .await
        .unwrap();
    let refused = error_naming_no_server_path(&server, resp).await;
    assert_eq!(refused, (503, "storage_error".to_owned()));
}

/// A name the filesystem refuses partway through an operation (here one of
/// 255 bytes, left by a server that let upload sessions write such names,
/// whose copy goes through a temporary `{name}#0`) is a 400, not a 503.
#[tokio::test]
async fn a_name_the_filesystem_refuses_is_a_400() {
    let server = Server::start();
    let long = "a".repeat(255);
    let legacy = server.store_dir.as_ref().unwrap().join("legacy");
    std::fs::create_dir_all(&legacy).unwrap();
    std::fs::write(legacy.join(&long), "old").unwrap();
    // It can still be read and deleted.
    assert_eq!(
        server.get_bytes(&format!("legacy/{long}")).await,
        (200, b"old".to_vec())
    );
    let resp = server
        .client()
        .post(format!("{}/v1/ops/copy", server.url))
        .json(&serde_json::json!({"from": "legacy", "to": "copied", "recursive": true}))
        .send()
        .await
        .unwrap();
    let refused = error_naming_no_server_path(&server, resp).await;
    assert_eq!(refused, (400, "name_too_long".to_owned()));
    let resp = server
        .client()
        .delete(server.file_url(&format!("legacy/{long}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
}

/// Regression: with SIGPIPE at its default disposition, a client closing its
/// connection in the middle of a download killed the server.
#[tokio::test]
async fn a_client_dropping_a_download_midway_does_not_kill_the_server() {
    let mut server = Server::start();
    server.put("big.bin", vec![3u8; 8 << 20]).await;
    for _ in 0..5 {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        write!(stream, "GET /v1/files/big.bin HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut first = [0u8; 4096];
        std::io::Read::read(&mut stream, &mut first).unwrap();
        drop(stream);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    assert_eq!(server.get_bytes("big.bin").await.1.len(), 8 << 20);
}

/// A request head larger than the server buffers (64 KiB) is refused with
/// 431 and the server keeps serving; one just under it is answered.
#[tokio::test]
async fn an_oversized_request_head_is_431() {
    let server = Server::start();
    server.put("f.txt", "x").await;
    let request = |filler: usize| {
        format!(
            "GET /v1/files/f.txt HTTP/1.1\r\nHost: t\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(filler)
        )
    };
    assert_eq!(server.raw(request(70 * 1024).as_bytes()).status, 431);
    assert_eq!(server.raw(request(32 * 1024).as_bytes()).status, 200);
}

/// Regression: a name of 256 bytes or more (or a path over 1024 bytes) in a
/// JSON body was `400 bad_request` ("bad JSON body: …") while 254 and 255
/// bytes, and the same names in a URL, were `name_too_long`. A too-long
/// path is `name_too_long` wherever it is; any other invalid path in a JSON
/// body stays `bad_request`.
#[tokio::test]
async fn a_too_long_path_in_a_json_body_is_name_too_long() {
    let server = Server::start();
    server.put("src.txt", "x").await;
    let writes = |path: &str| {
        [
            ("ops/mkdir", serde_json::json!({"path": path})),
            (
                "ops/rename",
                serde_json::json!({"from": "src.txt", "to": path}),
            ),
            (
                "ops/copy",
                serde_json::json!({"from": "src.txt", "to": path}),
            ),
            ("uploads", serde_json::json!({"path": path, "size": 1})),
        ]
    };
    let reads = |path: &str| [("sign", serde_json::json!({"path": path}))];
    // Too long for a local-directory store to write, not to read.
    let too_long_to_write = ["n".repeat(254), "n".repeat(255)];
    // Too long by the path rules.
    let too_long = [
        "n".repeat(256),
        format!("d/{}", "n".repeat(300)),
        vec!["y".repeat(200); 6].join("/"),
    ];
    let invalid = [
        "../x",
        "/etc/passwd",
        "a\\b",
        ".ferry/x",
        "a//b",
        "d/.ferry-dir",
    ];
    let mut cases = Vec::new();
    for path in &too_long_to_write {
        cases.extend(writes(path).map(|request| (request, "name_too_long")));
    }
    for path in &too_long {
        cases.extend(writes(path).map(|request| (request, "name_too_long")));
        cases.extend(reads(path).map(|request| (request, "name_too_long")));
    }
    for path in invalid {
        cases.extend(writes(path).map(|request| (request, "bad_request")));
        cases.extend(reads(path).map(|request| (request, "bad_request")));
    }
    for ((route, body), code) in cases {
        let resp = server
            .client()
            .post(format!("{}/v1/{route}", server.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let reply: serde_json::Value = resp.json().await.unwrap();
        let shown = body.to_string();
        assert_eq!(
            (status, reply["error"]["code"].as_str()),
            (400, Some(code)),
            "{route} {:.60}… ({} bytes): {reply}",
            shown,
            shown.len()
        );
    }
    assert_eq!(server.get_bytes("src.txt").await, (200, b"x".to_vec()));
    assert_eq!(server.listed_names("?recursive=true").await, ["src.txt"]);
}
