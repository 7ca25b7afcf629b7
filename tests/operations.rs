//! Running a server in the open: CORS, rate and per-token limits, request
//! deadlines, bounded memory under oversized input, metrics and TLS —
//! against real server processes.

mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures::SinkExt;
use harness::{Server, eventually, token_entry};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TOKEN: &str = "ferry_operations_test_token_0001";

fn with_token(extra: &str) -> String {
    format!(
        "{extra}\n{}",
        token_entry("ops", TOKEN, r#"["read", "write"]"#, "")
    )
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// The value of one sample line of `/metrics`, 0 when absent.
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    harness::metrics_text::sample(metrics, name_and_labels).unwrap_or(0.0)
}

async fn metrics(server: &Server) -> String {
    let response = http()
        .get(format!("{}/metrics", server.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

fn rss_kib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_preflights_and_exposes_the_player_headers() {
    let server =
        Server::start_configured(&with_token("cors_origins = [\"https://app.example\"]"), &[]);
    http()
        .put(server.file_url("v.mp4"))
        .bearer_auth(TOKEN)
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    // A preflight carries no token and is answered anyway.
    let preflight = http()
        .request(reqwest::Method::OPTIONS, server.file_url("v.mp4"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "PUT")
        .header(
            "access-control-request-headers",
            "authorization, range, x-ferry-crc32c",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
            .unwrap_or_default()
    };
    assert_eq!(
        header(&preflight, "access-control-allow-origin"),
        "https://app.example"
    );
    assert!(header(&preflight, "access-control-allow-methods").contains("put"));
    let allowed = header(&preflight, "access-control-allow-headers");
    for h in ["authorization", "range", "x-ferry-crc32c"] {
        assert!(allowed.contains(h), "{allowed}");
    }
    let get = http()
        .get(server.file_url("v.mp4"))
        .bearer_auth(TOKEN)
        .header("origin", "https://app.example")
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 206);
    let exposed = header(&get, "access-control-expose-headers");
    for h in ["content-range", "accept-ranges", "content-length", "etag"] {
        assert!(exposed.contains(h), "{exposed}");
    }
    // Errors carry CORS headers too, so the page can read them.
    let refused = http()
        .get(server.file_url("v.mp4"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        header(&refused, "access-control-allow-origin"),
        "https://app.example"
    );
    let other = http()
        .get(server.file_url("v.mp4"))
        .bearer_auth(TOKEN)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&other, "access-control-allow-origin"), "");
}

/// Regression: the preflight left out PATCH, with which a page declares the
/// size of an open-ended upload session (`PATCH /v1/uploads/{id}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_allow_every_method_the_api_uses() {
    let server =
        Server::start_configured(&with_token("cors_origins = [\"https://app.example\"]"), &[]);
    let session_route = "/v1/uploads/0123456789abcdef0123456789abcdef";
    let routes = [
        ("GET", "/v1/files/v.mp4"),
        ("HEAD", "/v1/files/v.mp4"),
        ("PUT", "/v1/files/v.mp4"),
        ("POST", "/v1/uploads"),
        ("DELETE", "/v1/files/v.mp4"),
        ("PATCH", session_route),
    ];
    for (method, route) in routes {
        let preflight = http()
            .request(reqwest::Method::OPTIONS, format!("{}{route}", server.url))
            .header("origin", "https://app.example")
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "authorization")
            .send()
            .await
            .unwrap();
        assert!(preflight.status().is_success(), "{method}: {preflight:?}");
        let allowed = preflight
            .headers()
            .get("access-control-allow-methods")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        assert!(
            allowed.split(',').any(|m| m.trim() == method),
            "{method} {route}: allowed {allowed:?}"
        );
    }
    // The PATCH itself, from the page's origin, sizes the session.
    let created = http()
        .post(format!("{}/v1/uploads", server.url))
        .bearer_auth(TOKEN)
        .header("origin", "https://app.example")
        .json(&json!({"path": "open.bin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sized = http()
        .patch(format!("{}/v1/uploads/{id}", server.url))
        .bearer_auth(TOKEN)
        .header("origin", "https://app.example")
        .json(&json!({"size": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(sized.status(), 200);
    assert_eq!(
        sized.headers()["access-control-allow-origin"],
        "https://app.example"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429_with_retry_after_then_recovers() {
    let server =
        Server::start_configured(&with_token(""), &["--rate-limit", "1", "--rate-burst", "5"]);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let response = http()
            .get(format!("{}/v1/list/", server.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limited");
        }
    }
    // The burst, plus one a second refilled meanwhile (the machine may be slow).
    let refilled = started.elapsed().as_secs() as usize + 1;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (5..=5 + refilled).contains(&ok),
        "burst of 5 then 1/s over {refilled} s: {statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    let wait = retry_after.expect("429 carries Retry-After");
    assert!((1..=2).contains(&wait), "{wait}");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let after = http()
        .get(format!("{}/v1/list/", server.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 200, "served again after Retry-After");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = metrics(&server).await;
    assert!(
        sample(&text, "ferry_rate_limited_requests_total") >= 1.0,
        "{text}"
    );
}

#[test]
fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let server = Server::start_configured("", &["--header-timeout", "2", "--body-timeout", "2"]);
    // Headers dribbled one byte a second.
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let request =
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut_after = None;
    for byte in request {
        if slow.write_all(&[*byte]).is_err() {
            cut_after = Some(started.elapsed());
            break;
        }
        // Meanwhile a normal client is served promptly.
        let normal = harness::raw_get(server.addr, b"/healthz");
        assert_eq!(normal.status, 200);
        let mut buf = [0u8; 256];
        match slow.read(&mut buf) {
            Ok(0) => {
                cut_after = Some(started.elapsed());
                break;
            }
            Ok(_) => panic!("the slow client got an answer to an incomplete request"),
            Err(_) => {} // nothing yet
        }
        std::thread::sleep(Duration::from_millis(800));
    }
    let cut = cut_after.expect("the server never closed the slow connection");
    assert!(cut < Duration::from_secs(6), "cut off after {cut:?}");

    // A body that stalls is cut off too, and nothing is stored.
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    stalled
        .write_all(b"PUT /v1/files/stalled.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        .unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = stalled.read_to_end(&mut answer);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer}"
    );
    // The discarded write is tidied up in the background.
    assert!(
        eventually(Duration::from_secs(5), || !server
            .files_on_disk()
            .iter()
            .any(|f| f.contains("stalled"))),
        "{:?}",
        server.files_on_disk()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_and_messages_are_refused_without_memory_growth() {
    let server = Server::start_configured(
        "",
        &["--max-body-bytes", "1048576", "--ws-max-message", "1048576"],
    );
    // Warm up the allocator's arenas with normal traffic first.
    for i in 0..4 {
        server.put(&format!("warm{i}"), vec![1u8; 512 * 1024]).await;
    }
    let before = rss_kib(&server);
    // 256 MiB announced and streamed at a 1 MiB limit.
    let huge = futures::stream::iter((0..256).map(|_| Ok::<_, std::io::Error>(vec![0u8; 1 << 20])));
    let response = http()
        .put(server.file_url("huge.bin"))
        .body(reqwest::Body::wrap_stream(huge))
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status(), 413);
    } // else: the server closed the connection mid-body, which is also a refusal
    // One 64 MiB WebSocket message at a 1 MiB limit.
    let url = format!("{}/v1/ws", server.url.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "ferry.v1".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let _ = socket
        .send(Message::Binary(vec![0u8; 64 << 20].into()))
        .await;
    drop(socket);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(&server);
    assert!(
        after < before + 32 * 1024,
        "server RSS grew from {before} KiB to {after} KiB"
    );
    assert!(eventually(Duration::from_secs(5), || !server
        .files_on_disk()
        .iter()
        .any(|f| f.contains("huge"))));
    let (status, _) = server.get_bytes("warm0").await;
    assert_eq!(status, 200, "still serving");
}

/// Whether a one-byte download by the token succeeds within 5 s.
async fn slot_frees_up(server: &Server) -> bool {
    for _ in 0..50 {
        let again = http()
            .get(server.file_url("big.bin"))
            .bearer_auth(TOKEN)
            .header("range", "bytes=0-0")
            .send()
            .await
            .unwrap();
        if again.status() == 206 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_token_limits_on_sessions_and_transfers() {
    let server = Server::start_configured(
        &with_token(""),
        &[
            "--max-sessions-per-token",
            "2",
            "--max-transfers-per-token",
            "1",
        ],
    );
    let create = || async {
        http()
            .post(format!("{}/v1/uploads", server.url))
            .bearer_auth(TOKEN)
            .json(&json!({"path": "s.bin", "size": 10}))
            .send()
            .await
            .unwrap()
    };
    let first: Value = create().await.json().await.unwrap();
    assert_eq!(create().await.status(), 201);
    let third = create().await;
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
    let body: Value = third.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sessions"),
        "{body}"
    );
    let aborted = http()
        .delete(format!(
            "{}/v1/uploads/{}",
            server.url,
            first["id"].as_str().unwrap()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(aborted.status(), 204);
    let usable = create().await;
    assert_eq!(usable.status(), 201, "a freed slot is usable");
    let usable: Value = usable.json().await.unwrap();

    // One transfer at a time: a download whose body is not read holds it.
    http()
        .put(server.file_url("big.bin"))
        .bearer_auth(TOKEN)
        .body(vec![3u8; 32 << 20])
        .send()
        .await
        .unwrap();
    let holding = http()
        .get(server.file_url("big.bin"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(holding.status(), 200);
    let second = http()
        .get(server.file_url("big.bin"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429);
    assert_eq!(second.headers()["retry-after"], "1");
    // Metadata is not a transfer.
    let stat = http()
        .get(format!("{}/v1/stat/big.bin", server.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(stat.status(), 200);
    assert_eq!(holding.bytes().await.unwrap().len(), 32 << 20);
    let freed = slot_frees_up(&server).await;
    assert!(freed, "the slot is released when the download ends");
    // Over a WebSocket, each download and upload channel is a transfer, as
    // its HTTP counterpart is; the connection itself is none.
    let url = format!("{}/v1/ws", server.url.replacen("http", "ws", 1));
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "ferry.v1".parse().unwrap());
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert!(
        slot_frees_up(&server).await,
        "an open WebSocket holds no slot"
    );
    // The probe that found the slot free held it itself until its response
    // ended, which the server notes a moment after the client has it all.
    let mut tries = 0;
    let ready = loop {
        let open = json!({"op": "upload.open", "ch": 1, "id": usable["id"]});
        let reply = ws_request(&mut socket, open).await;
        if reply["code"] == "rate_limited" && tries < 20 {
            tries += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        break reply;
    };
    assert_eq!(ready["op"], "ready", "{ready}");
    let during = http()
        .get(server.file_url("big.bin"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(during.status(), 429, "the upload channel holds the slot");
    for refused in [
        json!({"op": "download", "ch": 2, "path": "big.bin"}),
        json!({"op": "upload.open", "ch": 3, "id": usable["id"]}),
    ] {
        let reply = ws_request(&mut socket, refused.clone()).await;
        assert_eq!(
            (&reply["op"], &reply["ch"], &reply["code"]),
            (&json!("error"), &refused["ch"], &json!("rate_limited")),
            "{refused} → {reply}"
        );
        assert!(
            reply["message"].as_str().unwrap().contains("transfers"),
            "{reply}"
        );
    }
    // A watch is no transfer; the reply to the next message shows it was taken.
    socket
        .send(Message::Text(
            json!({"op": "watch", "ch": 4}).to_string().into(),
        ))
        .await
        .unwrap();
    let cancelled = ws_request(&mut socket, json!({"op": "cancel", "ch": 1})).await;
    assert_eq!(cancelled, json!({"op": "cancelled", "ch": 1}));
    // A download channel holds the slot while it runs (its frames unread).
    let download = json!({"op": "download", "ch": 2, "path": "big.bin"});
    socket
        .send(Message::Text(download.to_string().into()))
        .await
        .unwrap();
    match next_ws(&mut socket).await {
        WsReceived::Frame(2) => {}
        other => panic!("the download did not start: {other:?}"),
    }
    let during = http()
        .get(server.file_url("big.bin"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(during.status(), 429, "the download channel holds the slot");
    socket
        .send(Message::Text(
            json!({"op": "cancel", "ch": 2}).to_string().into(),
        ))
        .await
        .unwrap();
    loop {
        match next_ws(&mut socket).await {
            WsReceived::Frame(2) => {}
            WsReceived::Json(m) if m == json!({"op": "cancelled", "ch": 2}) => break,
            other => panic!("{other:?}"),
        }
    }
    let freed = slot_frees_up(&server).await;
    assert!(freed, "the slot is released when the download is cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upload_refused_its_transfer_slot_goes_on_over_http() {
    use ferry::client::upload::{Transport, UploadOptions, upload_file};
    let server = Server::start_configured(&with_token(""), &["--max-transfers-per-token", "1"]);
    let put = http()
        .put(server.file_url("big.bin"))
        .bearer_auth(TOKEN)
        .body(vec![3u8; 32 << 20])
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    // The token's one transfer: a download whose body is not read yet.
    let holding = http()
        .get(server.file_url("big.bin"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(holding.status(), 200);
    let config = ferry::client::ClientConfig {
        token: Some(TOKEN.into()),
        ..Default::default()
    };
    let client = ferry::client::Client::with_config(&server.url, config).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = harness::random_bytes(2 << 20);
    let file = tmp.path().join("up.bin");
    std::fs::write(&file, &data).unwrap();
    let options = UploadOptions {
        transport: Transport::Auto,
        chunk_size: Some(1 << 20),
        ..Default::default()
    };
    let mut upload = tokio::spawn(async move {
        let target = "up.bin".parse().unwrap();
        upload_file(&client, &file, &target, options).await
    });
    // Refused over the WebSocket, the client goes on over HTTP, where chunk
    // PUTs are refused too (429) until the slot is free, and retried.
    let refused_chunk = "ferry_http_requests_total{route=\"/v1/uploads/{id}/chunks/{index}\",method=\"PUT\",status=\"429\"}";
    while sample(&metrics(&server).await, refused_chunk) == 0.0 {
        if upload.is_finished() {
            panic!(
                "the upload ended without trying HTTP: {:?}",
                (&mut upload).await
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(holding.bytes().await.unwrap().len(), 32 << 20);
    let report = upload.await.unwrap().unwrap();
    assert_eq!(report.meta.size, data.len() as u64);
    // The upload's last chunk PUT frees its slot a moment after it ends.
    let mut tries = 0;
    let got = loop {
        let got = http()
            .get(server.file_url("up.bin"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        if got.status() != 429 || tries == 50 {
            break got;
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(got.status(), 200);
    assert!(got.bytes().await.unwrap() == data);
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Debug)]
enum WsReceived {
    Json(Value),
    /// A binary frame, on this channel.
    Frame(u32),
}

async fn next_ws(socket: &mut Socket) -> WsReceived {
    use futures::StreamExt;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s")
            .unwrap()
            .unwrap();
        match message {
            Message::Text(text) => return WsReceived::Json(serde_json::from_str(&text).unwrap()),
            Message::Binary(data) => {
                let ch = u32::from_be_bytes(data[..4].try_into().unwrap());
                return WsReceived::Frame(ch);
            }
            _ => {}
        }
    }
}

/// Sends `message` and returns the next JSON message.
async fn ws_request(socket: &mut Socket, message: Value) -> Value {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
    loop {
        if let WsReceived::Json(reply) = next_ws(socket).await {
            return reply;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_requests_are_made() {
    let server = Server::start_configured(&with_token(""), &[]);
    let before = metrics(&server).await;
    let put =
        "ferry_http_requests_total{route=\"/v1/files/{*path}\",method=\"PUT\",status=\"201\"}";
    let get =
        "ferry_http_requests_total{route=\"/v1/files/{*path}\",method=\"GET\",status=\"200\"}";
    let missing =
        "ferry_http_requests_total{route=\"/v1/files/{*path}\",method=\"GET\",status=\"404\"}";
    let body = vec![9u8; 300_000];
    for i in 0..3 {
        let r = http()
            .put(server.file_url(&format!("m{i}")))
            .bearer_auth(TOKEN)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let r = http()
        .get(server.file_url("m0"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), body.len());
    let r = http()
        .get(server.file_url("nope"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let session = http()
        .post(format!("{}/v1/uploads", server.url))
        .bearer_auth(TOKEN)
        .json(&json!({"path": "s.bin", "size": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(session.status(), 201);
    let after = metrics(&server).await;
    assert_eq!(sample(&after, put) - sample(&before, put), 3.0, "{after}");
    assert_eq!(sample(&after, get) - sample(&before, get), 1.0);
    assert_eq!(sample(&after, missing) - sample(&before, missing), 1.0);
    let received = sample(&after, "ferry_received_bytes_total")
        - sample(&before, "ferry_received_bytes_total");
    assert!(received >= 900_000.0, "{received}");
    let sent = sample(&after, "ferry_sent_bytes_total") - sample(&before, "ferry_sent_bytes_total");
    assert!(sent >= 300_000.0, "{sent}");
    assert_eq!(sample(&after, "ferry_active_upload_sessions"), 1.0);
    let count = "ferry_http_request_duration_seconds_count{route=\"/v1/files/{*path}\"}";
    assert!(sample(&after, count) - sample(&before, count) >= 5.0);
    // The metrics need a token like everything else.
    let anonymous = http()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

/// A private CA and a server certificate it signed for 127.0.0.1 and
/// localhost: (CA certificate, server certificate, server key).
fn private_ca(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let path = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| {
        let made = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-days",
                "2",
                "-subj",
                "/CN=ferry test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        path("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    (path("ca.pem"), path("server.pem"), path("server.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_https_to_clients_that_trust_its_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(tmp.path());
    let server = Server::start_configured(
        "",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let local = tmp.path().join("up.bin");
    std::fs::write(&local, &data).unwrap();
    let ferry = |args: &[&str], trust: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.args(args)
            .args(["--server", &server.url, "--retry-for", "2"])
            .env("FERRY_STATE_DIR", tmp.path().join("state"))
            .env_remove("FERRY_CA_FILE");
        if trust {
            cmd.arg("--ca-file").arg(&ca);
        }
        cmd.output().unwrap()
    };
    let untrusted = ferry(&["ls", "/"], false);
    assert!(!untrusted.status.success());
    let stderr = String::from_utf8_lossy(&untrusted.stderr).to_lowercase();
    assert!(
        stderr.contains("certificate") || stderr.contains("tls"),
        "{stderr}"
    );
    for transport in ["ws", "http"] {
        let name = format!("up-{transport}.bin");
        let put = ferry(
            &[
                "put",
                local.to_str().unwrap(),
                &name,
                "--transport",
                transport,
            ],
            true,
        );
        assert!(
            put.status.success(),
            "{}",
            String::from_utf8_lossy(&put.stderr)
        );
        let back = tmp.path().join(format!("back-{transport}.bin"));
        let get = ferry(&["get", &name, back.to_str().unwrap()], true);
        assert!(
            get.status.success(),
            "{}",
            String::from_utf8_lossy(&get.stderr)
        );
        assert!(std::fs::read(&back).unwrap() == data);
    }
    // Ranges over TLS through the library.
    let config = ferry::client::ClientConfig {
        ca_file: Some(ca.clone()),
        ..Default::default()
    };
    let client = ferry::client::Client::with_config(&server.url, config).unwrap();
    let range = client
        .read_range(&"up-http.bin".parse().unwrap(), 1000, 5000, None)
        .await
        .unwrap();
    assert!(range[..] == data[1000..6000]);
    // Plain HTTP to the TLS port gets nowhere.
    assert!(eventually(Duration::from_secs(1), || {
        let mut plain = TcpStream::connect(server.addr).unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let _ = plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = Vec::new();
        let _ = plain.read_to_end(&mut buf);
        !String::from_utf8_lossy(&buf).contains("\"ok\"")
    }));
}

#[test]
fn logs_can_be_json_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--store",
        ])
        .arg(tmp.path().join("store"))
        .env("FERRY_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stderr.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(event["level"], "INFO", "{event}");
    assert_eq!(event["fields"]["message"], "serving", "{event}");
}
