//! The WebSocket transport and the change feed against a real server process.

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferry::client::upload::{Transport, UploadOptions, upload_file};
use ferry::client::watch::{WatchEvent, Watcher};
use ferry::client::ws::WsConnection;
use ferry::client::{Client, Progress};
use ferry::protocol::RemotePath;
use ferry::protocol::events::ChangeKind;
use ferry::protocol::upload::crc32c_header_value;
use ferry::protocol::ws::FrameHeader;
use futures::{SinkExt, StreamExt};
use harness::{Server, random_bytes};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const MIB: usize = 1 << 20;

fn remote(p: &str) -> RemotePath {
    p.parse().unwrap()
}

fn write_file(dir: &std::path::Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

#[tokio::test]
async fn an_independent_python_client_following_the_protocol_doc_round_trips_a_file() {
    let server = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let data = random_bytes(5 * MIB + 4321);
    let file = write_file(tmp.path(), "py.bin", &data);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/ws_client.py");
    let out = std::process::Command::new("python3")
        .args([
            script,
            &server.url,
            file.to_str().unwrap(),
            "from python/file.bin",
        ])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the Python client failed (scripts/test.sh installs `websockets`):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.get_bytes("from python/file.bin").await.1 == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_websocket_falls_back_to_http_and_completes() {
    let server = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let data = random_bytes(40 * MIB);
    let file = write_file(tmp.path(), "f.bin", &data);
    let client = Client::new(&server.url).unwrap();
    let conn = WsConnection::connect(&client).await.unwrap();
    let closed_at = Arc::new(AtomicU64::new(0));
    let progress = {
        let (conn, closed_at) = (conn.clone(), closed_at.clone());
        Arc::new(move |p: Progress| {
            if p.done * 10 >= p.total * 4 && !conn.is_closed() {
                closed_at.store(p.done, Ordering::SeqCst);
                conn.close();
            }
        })
    };
    let options = UploadOptions {
        ws: Some(conn.clone()),
        transport: Transport::Auto,
        chunk_size: Some(MIB as u64),
        progress: Some(progress),
        throttle: Some(Arc::new(ferry::client::throttle::Throttle::new(
            80 * MIB as u64,
        ))),
        ..Default::default()
    };
    let report = upload_file(&client, &file, &remote("fallback.bin"), options)
        .await
        .unwrap();
    let closed_at = closed_at.load(Ordering::SeqCst);
    assert!(
        closed_at > 0 && closed_at < data.len() as u64,
        "the socket was closed mid-way ({closed_at})"
    );
    assert_eq!(report.meta.size, data.len() as u64);
    assert!(server.get_bytes("fallback.bin").await.1 == data);
    let sent = client.chunk_bytes_sent();
    assert!(
        sent < data.len() as u64 * 13 / 10,
        "acknowledged chunks were re-sent: {sent}"
    );
}

#[tokio::test]
async fn a_session_started_over_http_finishes_over_the_websocket() {
    let server = Server::start();
    let client = Client::new(&server.url).unwrap();
    let data = random_bytes(3 * MIB);
    let created = client
        .create_upload(&ferry::protocol::upload::CreateUpload {
            path: remote("mixed.bin"),
            size: Some(data.len() as u64),
            chunk_size: Some(MIB as u64),
            sha256: None,
            sha256_at_complete: false,
            if_match: None,
            if_none_match: None,
            mtime: None,
        })
        .await
        .unwrap();
    client
        .put_chunk(&created.id, 1, Bytes::copy_from_slice(&data[MIB..2 * MIB]))
        .await
        .unwrap();
    let conn = WsConnection::connect(&client).await.unwrap();
    let data2 = data.clone();
    let read = move |ch: u32,
                     start: u64,
                     len: u64|
          -> futures::future::BoxFuture<'static, ferry::Result<Bytes>> {
        let frame = FrameHeader::frame(ch, start, &data2[start as usize..(start + len) as usize]);
        Box::pin(async move { Ok(Bytes::from(frame)) })
    };
    let before = client.chunk_bytes_sent();
    let meta = conn
        .upload(&created.id, &read, 4, None, Box::pin(async { Ok(None) }))
        .await
        .unwrap();
    assert_eq!(meta.size, data.len() as u64);
    assert_eq!(
        client.chunk_bytes_sent() - before,
        2 * MIB as u64,
        "only the missing chunks went over the socket"
    );
    assert!(server.get_bytes("mixed.bin").await.1 == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_uploads_and_ten_downloads_share_one_connection() {
    let server = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::new(&server.url).unwrap();
    let conn = WsConnection::connect(&client).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let existing = random_bytes(2 * MIB + i * 1000);
        server.put(&format!("down/{i}.bin"), existing.clone()).await;
        let upload = random_bytes(3 * MIB + i * 777);
        let file = write_file(tmp.path(), &format!("{i}.bin"), &upload);
        let (client, conn) = (client.clone(), conn.clone());
        tasks.push(tokio::spawn(async move {
            let options = UploadOptions {
                ws: Some(conn.clone()),
                transport: Transport::WebSocket,
                chunk_size: Some(MIB as u64),
                ..Default::default()
            };
            let target = remote(&format!("up/{i}.bin"));
            let up = upload_file(&client, &file, &target, options);
            let mut got = Vec::new();
            let path = remote(&format!("down/{i}.bin"));
            let mut sink = |_, b: Bytes| {
                got.extend_from_slice(&b);
                Ok(())
            };
            let down = conn.download(&path, 0, None, &mut sink);
            let (up, down) = tokio::join!(up, down);
            up.unwrap();
            down.unwrap();
            assert!(got == existing, "download {i} differs");
            (i, upload)
        }));
    }
    for task in tasks {
        let (i, upload) = task.await.unwrap();
        assert!(
            server.get_bytes(&format!("up/{i}.bin")).await.1 == upload,
            "upload {i} differs"
        );
    }
    // A ranged download on the same connection.
    let mut got = Vec::new();
    let meta = conn
        .download(&remote("down/3.bin"), 1000, Some(5000), &mut |_, b| {
            got.extend_from_slice(&b);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(got.len(), 5000);
    assert!(got[..] == server.get_bytes("down/3.bin").await.1[1000..6000]);
    assert_eq!(meta.path.as_str(), "down/3.bin");
}

/// Reads SSE `change` events from `GET /v1/events`.
async fn sse_changes(url: String, count: usize) -> Vec<Value> {
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut buffer = String::new();
    let mut changes = Vec::new();
    while changes.len() < count {
        let piece = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if event.contains("event: change") {
                let data = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap();
                changes.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    changes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_changes_reach_websocket_and_sse_subscribers_once() {
    let server = Server::start();
    let client = Client::new(&server.url).unwrap();
    server.put("outside/x.txt", "x").await;
    let mut watcher = Watcher::start(&client, &remote("docs"));
    let sse = tokio::spawn(sse_changes(
        format!("{}/v1/events?prefix=docs", server.url),
        3,
    ));
    // Let both subscriptions be in place before changing anything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.put("docs/a.txt", "hello").await;
    server.put("outside/y.txt", "not watched").await;
    assert_eq!(
        server
            .client()
            .delete(server.file_url("docs/a.txt"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    server.put("docs/b.txt", "b").await;
    assert_eq!(
        server
            .op("rename", json!({"from": "docs/b.txt", "to": "docs/c.txt"}))
            .await
            .0,
        200
    );

    let mut seen = Vec::new();
    while seen.len() < 4 {
        match tokio::time::timeout(Duration::from_secs(10), watcher.next())
            .await
            .unwrap()
            .unwrap()
        {
            WatchEvent::Change(change) => seen.push((
                change.kind,
                change.path.to_string(),
                change.from.map(|f| f.to_string()),
            )),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            (ChangeKind::Created, "docs/a.txt".into(), None),
            (ChangeKind::Deleted, "docs/a.txt".into(), None),
            (ChangeKind::Created, "docs/b.txt".into(), None),
            (
                ChangeKind::Renamed,
                "docs/c.txt".into(),
                Some("docs/b.txt".into())
            ),
        ]
    );
    // Nothing more: each change arrived once, and the unwatched path never did.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watcher.next())
            .await
            .is_err()
    );

    let sse = sse.await.unwrap();
    let kinds: Vec<(&str, &str)> = sse
        .iter()
        .map(|c| (c["kind"].as_str().unwrap(), c["path"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("created", "docs/a.txt"),
            ("deleted", "docs/a.txt"),
            ("created", "docs/b.txt")
        ]
    );
}

/// A copy announces what it did to its destination: `created` for a new
/// file, `modified` for a file it replaced (as a PUT over it would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_over_a_file_is_announced_as_modified() {
    let server = Server::start();
    server.put("docs/a.txt", "a").await;
    server.put("docs/b.txt", "b").await;
    let sse = tokio::spawn(sse_changes(
        format!("{}/v1/events?prefix=docs", server.url),
        2,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let copy = |to: &str| json!({"from": "docs/a.txt", "to": to, "overwrite": true});
    assert_eq!(server.op("copy", copy("docs/new.txt")).await.0, 200);
    assert_eq!(server.op("copy", copy("docs/b.txt")).await.0, 200);
    let sse = sse.await.unwrap();
    let kinds: Vec<(&str, &str)> = sse
        .iter()
        .map(|c| (c["kind"].as_str().unwrap(), c["path"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("created", "docs/new.txt"), ("modified", "docs/b.txt")]
    );
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw_socket(server: &Server) -> Socket {
    let mut request = format!("ws://{}/v1/ws", server.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "ferry.v1".parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

#[tokio::test]
async fn malformed_input_gets_an_error_message_and_the_connection_lives_on() {
    let server = Server::start();
    let mut ws = raw_socket(&server).await;
    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("{not json".into()), "bad_message"),
        (
            Message::Text(r#"{"op":"teleport","ch":4}"#.into()),
            "bad_message",
        ),
        (
            Message::Text(r#"{"op":"download","ch":4}"#.into()),
            "bad_message",
        ),
        (Message::Binary(Bytes::from_static(b"short")), "bad_frame"),
        (
            Message::Binary(FrameHeader::frame(77, 0, b"data").into()),
            "bad_frame",
        ),
        (
            Message::Text(
                r#"{"op":"upload.open","ch":2,"id":"0123456789abcdef0123456789abcdef"}"#.into(),
            ),
            "not_found",
        ),
        (
            Message::Text(r#"{"op":"upload.create","ch":3,"path":"../x","size":1}"#.into()),
            "bad_request",
        ),
        (
            Message::Text(r#"{"op":"download","ch":5,"path":"missing.bin"}"#.into()),
            "not_found",
        ),
        (
            Message::Text(r#"{"op":"upload.create","ch":6,"path":"open-ended.bin"}"#.into()),
            "bad_request",
        ),
    ];
    for (message, code) in cases {
        let shown = format!("{message:?}");
        ws.send(message).await.unwrap();
        let reply = next_json(&mut ws).await;
        assert_eq!(
            (reply["op"].as_str(), reply["code"].as_str()),
            (Some("error"), Some(code)),
            "{shown}: {reply}"
        );
    }
    // An open-ended session is sized over HTTP before the WebSocket takes it.
    let resp = server
        .client()
        .post(format!("{}/v1/uploads", server.url))
        .json(&json!({"path": "open-ended.bin"}))
        .send()
        .await
        .unwrap();
    let created: Value = resp.json().await.unwrap();
    let open = json!({"op": "upload.open", "ch": 7, "id": created["id"]});
    ws.send(Message::Text(open.to_string().into()))
        .await
        .unwrap();
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    // CRC mismatch and wrong length on a real upload; then the right chunk is taken.
    ws.send(Message::Text(
        r#"{"op":"upload.create","ch":9,"path":"ok.bin","size":1048576}"#.into(),
    ))
    .await
    .unwrap();
    let ready = next_json(&mut ws).await;
    assert_eq!(ready["op"], "ready", "{ready}");
    let chunk = random_bytes(MIB);
    let mut bad = FrameHeader::frame(9, 0, &chunk);
    bad[100] ^= 1;
    ws.send(Message::Binary(bad.into())).await.unwrap();
    let reply = next_json(&mut ws).await;
    assert_eq!(
        (reply["code"].as_str(), reply["index"].as_u64()),
        (Some("checksum_mismatch"), Some(0)),
        "{reply}"
    );
    ws.send(Message::Binary(
        FrameHeader::frame(9, 0, &chunk[..1000]).into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "bad_request");
    ws.send(Message::Binary(FrameHeader::frame(9, 5, &chunk).into()))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut ws).await["code"],
        "bad_frame",
        "unaligned offset"
    );
    ws.send(Message::Text(r#"{"op":"watch","ch":9}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "channel_busy");
    ws.send(Message::Binary(FrameHeader::frame(9, 0, &chunk).into()))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut ws).await,
        json!({"op": "ack", "ch": 9, "index": 0})
    );
    assert_eq!(next_json(&mut ws).await["op"], "progress");
    ws.send(Message::Text(r#"{"op":"status","ch":1,"id":""}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "not_found");
    ws.send(Message::Text(r#"{"op":"upload.complete","ch":9}"#.into()))
        .await
        .unwrap();
    let done = next_json(&mut ws).await;
    assert_eq!(
        (done["op"].as_str(), done["meta"]["size"].as_u64()),
        (Some("done"), Some(MIB as u64)),
        "{done}"
    );
    assert!(server.get_bytes("ok.bin").await.1 == chunk);
    // HTTP status of the same session says committed (chunks are shared).
    ws.close(None).await.unwrap();
    assert_eq!(server.json("/healthz").await.0, 200);
}

#[tokio::test]
async fn oversized_messages_close_the_connection_not_the_server() {
    let server = Server::start();
    let mut ws = raw_socket(&server).await;
    let huge = vec![0u8; 66 * MIB];
    let _ = ws.send(Message::Binary(huge.into())).await;
    let mut code = None;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        match message {
            Ok(Message::Close(Some(frame))) => {
                code = Some(u16::from(frame.code));
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    assert!(matches!(code, None | Some(1008) | Some(1009)), "{code:?}");
    assert_eq!(server.json("/healthz").await.0, 200);
    let mut again = raw_socket(&server).await;
    again
        .send(Message::Text(r#"{"op":"status","ch":1,"id":"x"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut again).await["code"], "not_found");
}

#[tokio::test]
async fn a_silent_peer_is_pinged_then_closed_as_idle() {
    let server = Server::start_with(harness::Backend::Local, &["--ws-ping-interval", "1"]);
    let mut ws = raw_socket(&server).await;
    // Read nothing (so no pongs go back) for longer than 2.5 intervals.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut pings = 0;
    let mut close = None;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await
    {
        match message {
            Message::Ping(_) => pings += 1,
            Message::Close(frame) => {
                close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                break;
            }
            _ => {}
        }
    }
    assert!(pings >= 1, "no pings");
    assert_eq!(close, Some((1001, "idle".to_owned())));
}

#[tokio::test]
async fn the_upgrade_requires_the_subprotocol() {
    let server = Server::start();
    let request = format!("ws://{}/v1/ws", server.addr)
        .into_client_request()
        .unwrap();
    let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    let resp = server
        .client()
        .get(format!("{}/v1/ws", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let _ = crc32c_header_value(0);
}

async fn send_json(socket: &mut Socket, message: Value) {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

/// One message from the server: a JSON message or a binary frame.
enum Received {
    Json(Value),
    Frame {
        ch: u32,
        offset: u64,
        payload: Vec<u8>,
    },
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Received::Json(m) => write!(f, "{m}"),
            Received::Frame {
                ch,
                offset,
                payload,
            } => write!(
                f,
                "a frame on channel {ch} at offset {offset}, {} bytes",
                payload.len()
            ),
        }
    }
}

async fn next_received(socket: &mut Socket) -> Received {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s")
            .unwrap()
            .unwrap();
        match message {
            Message::Text(text) => return Received::Json(serde_json::from_str(&text).unwrap()),
            Message::Binary(data) => {
                let (header, payload) = FrameHeader::decode(&data).expect("a frame header");
                return Received::Frame {
                    ch: header.ch,
                    offset: header.offset,
                    payload: payload.to_vec(),
                };
            }
            _ => {}
        }
    }
}

/// Reads a whole download of `data` on `ch` (already asked for): every frame
/// in order, then `eof`. Anything else on `ch` fails the test, with `after`
/// saying what came before; other channels' messages are skipped.
async fn read_download(socket: &mut Socket, ch: u32, data: &[u8], after: &str) {
    let mut expected = 0u64;
    loop {
        match next_received(socket).await {
            Received::Frame {
                ch: c,
                offset,
                payload,
            } if c == ch => {
                assert_eq!(
                    offset, expected,
                    "{after}: a frame at offset {offset} on channel {ch}, where the new \
                     download was at {expected}"
                );
                let end = offset as usize + payload.len();
                assert!(
                    payload[..] == data[offset as usize..end],
                    "{after}: bytes differ"
                );
                expected = end as u64;
            }
            Received::Json(m) if m["op"] == "eof" && m["ch"] == ch => break,
            Received::Frame { ch: c, .. } if c != ch => {}
            Received::Json(m) if m["ch"].is_u64() && m["ch"] != ch => {}
            other => panic!("{after}: unexpected {other:?}"),
        }
    }
    assert_eq!(expected, data.len() as u64, "{after}: the whole file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_frame_of_a_cancelled_download_arrives_after_its_cancelled() {
    let server = Server::start();
    let big = random_bytes(64 * MIB);
    server.put("big.bin", big.clone()).await;
    let small = random_bytes(10_000);
    server.put("small.bin", small.clone()).await;
    let mut ws = raw_socket(&server).await;
    for round in 0..40u64 {
        send_json(
            &mut ws,
            json!({"op": "download", "ch": 3, "path": "big.bin"}),
        )
        .await;
        let mut expected = 0u64;
        let mut frames = 0;
        let mut cancelled = false;
        loop {
            match next_received(&mut ws).await {
                Received::Frame {
                    ch: 3,
                    offset,
                    payload,
                } => {
                    assert_eq!(
                        offset, expected,
                        "round {round}: a frame at offset {offset} where the download was at \
                         {expected}: one of an earlier download, cancelled?"
                    );
                    let end = offset as usize + payload.len();
                    assert!(payload[..] == big[offset as usize..end], "round {round}");
                    expected = end as u64;
                    frames += 1;
                }
                Received::Json(m) if m == json!({"op": "cancelled", "ch": 3}) => break,
                other => panic!("round {round}: unexpected {other:?}"),
            }
            if frames == 3 && !cancelled {
                // Vary the moment of the cancel against the server's sends.
                tokio::time::sleep(Duration::from_micros(round % 8 * 250)).await;
                send_json(&mut ws, json!({"op": "cancel", "ch": 3})).await;
                cancelled = true;
            }
        }
        // The channel is free again: what arrives on it now is the new download's.
        send_json(
            &mut ws,
            json!({"op": "download", "ch": 3, "path": "small.bin"}),
        )
        .await;
        let after = format!("round {round}, after cancelled");
        read_download(&mut ws, 3, &small, &after).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_of_a_cancelled_upload_arrives_after_its_cancelled() {
    let server = Server::start();
    let chunk = random_bytes(MIB);
    let mut ws = raw_socket(&server).await;
    for round in 0..8 {
        let create = json!({"op": "upload.create", "ch": 5, "path": format!("big{round}.bin"),
                            "size": 12 * MIB, "chunk_size": MIB});
        send_json(&mut ws, create).await;
        match next_received(&mut ws).await {
            Received::Json(m) if m["op"] == "ready" => {}
            other => panic!("round {round}: {other:?}"),
        }
        for index in 0..12 {
            ws.send(Message::Binary(
                FrameHeader::frame(5, (index * MIB) as u64, &chunk).into(),
            ))
            .await
            .unwrap();
        }
        // Chunks are still being written: their acks must come before `cancelled` or not at all.
        send_json(&mut ws, json!({"op": "cancel", "ch": 5})).await;
        loop {
            match next_received(&mut ws).await {
                Received::Json(m) if m == json!({"op": "cancelled", "ch": 5}) => break,
                Received::Json(m) if m["op"] == "ack" || m["op"] == "progress" => {}
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        let after = format!("round {round}, after cancelled");
        let create = json!({"op": "upload.create", "ch": 5, "path": format!("small{round}.bin"),
                            "size": 1000});
        send_json(&mut ws, create).await;
        match next_received(&mut ws).await {
            Received::Json(m) if m["op"] == "ready" => {}
            other => panic!("{after}: {other:?}"),
        }
        ws.send(Message::Binary(
            FrameHeader::frame(5, 0, &chunk[..1000]).into(),
        ))
        .await
        .unwrap();
        let mut acks = 0;
        send_json(&mut ws, json!({"op": "upload.complete", "ch": 5})).await;
        loop {
            match next_received(&mut ws).await {
                Received::Json(m) if m == json!({"op": "ack", "ch": 5, "index": 0}) => acks += 1,
                Received::Json(m) if m["op"] == "progress" && m["chunk_count"] == 1 => {}
                Received::Json(m) if m["op"] == "done" => break,
                other => panic!("{after}: unexpected {other:?}"),
            }
        }
        assert_eq!(acks, 1, "{after}: one ack for the new upload's one chunk");
        assert!(server.get_bytes(&format!("small{round}.bin")).await.1 == chunk[..1000]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_change_of_a_cancelled_watch_arrives_after_its_cancelled() {
    let server = Server::start();
    server.put("big.bin", random_bytes(64 * MIB)).await;
    let small = random_bytes(10_000);
    server.put("small.bin", small.clone()).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (url, stop) = (server.file_url(&format!("w/{w}.txt")), stop.clone());
        writers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                if client.put(&url).body("x").send().await.is_err() {
                    break;
                }
            }
        }));
    }
    let mut ws = raw_socket(&server).await;
    for round in 0..40 {
        // An unread download fills the server's queue, and changes back up
        // behind it. Both are cancelled at once: as the queue drains, the
        // watch is busy sending its backlog when its cancel is handled. (The
        // download's frames are checked by the test above.)
        send_json(
            &mut ws,
            json!({"op": "download", "ch": 50, "path": "big.bin"}),
        )
        .await;
        send_json(&mut ws, json!({"op": "watch", "ch": 7, "prefix": "w"})).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        send_json(&mut ws, json!({"op": "cancel", "ch": 50})).await;
        send_json(&mut ws, json!({"op": "cancel", "ch": 7})).await;
        let (mut download_cancelled, mut watch_cancelled) = (false, false);
        while !(download_cancelled && watch_cancelled) {
            match next_received(&mut ws).await {
                Received::Frame { ch: 50, .. } => {}
                Received::Json(m) if m == json!({"op": "cancelled", "ch": 50}) => {
                    download_cancelled = true
                }
                Received::Json(m) if m == json!({"op": "cancelled", "ch": 7}) => {
                    watch_cancelled = true
                }
                Received::Json(m) if !watch_cancelled && m["op"] == "change" => {}
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        // Channel 7 now carries a download, and nothing of the watch.
        send_json(
            &mut ws,
            json!({"op": "download", "ch": 7, "path": "small.bin"}),
        )
        .await;
        let after = format!("round {round}, after cancelled");
        read_download(&mut ws, 7, &small, &after).await;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_beyond_the_connections_limit_are_refused_until_one_is_freed() {
    let server = Server::start_with(harness::Backend::Local, &["--ws-max-channels", "3"]);
    let small = random_bytes(10_000);
    server.put("small.bin", small.clone()).await;
    let mut ws = raw_socket(&server).await;
    // Three channels in use: two watches and an upload (messages are handled
    // in order, so `ready` means the watches are in place too).
    send_json(&mut ws, json!({"op": "watch", "ch": 1, "prefix": "a"})).await;
    send_json(&mut ws, json!({"op": "watch", "ch": 3, "prefix": "b"})).await;
    send_json(
        &mut ws,
        json!({"op": "upload.create", "ch": 2, "path": "up.bin", "size": 1000}),
    )
    .await;
    let ready = next_json(&mut ws).await;
    assert_eq!(ready["op"], "ready", "{ready}");
    let refused = [
        json!({"op": "download", "ch": 4, "path": "small.bin"}),
        json!({"op": "upload.create", "ch": 5, "path": "other.bin", "size": 10}),
        json!({"op": "watch", "ch": 6}),
    ];
    for message in refused {
        send_json(&mut ws, message.clone()).await;
        let reply = next_json(&mut ws).await;
        assert_eq!(
            (&reply["op"], &reply["ch"], &reply["code"]),
            (&json!("error"), &message["ch"], &json!("rate_limited")),
            "{message} → {reply}"
        );
        assert!(
            reply["message"].as_str().unwrap().contains("3 channels"),
            "{reply}"
        );
    }
    // The refused upload made no session; what needs no channel still works.
    assert_eq!(server.json("/v1/stat/other.bin").await.0, 404);
    send_json(&mut ws, json!({"op": "status", "ch": 9, "id": ready["id"]})).await;
    let status = next_json(&mut ws).await;
    assert_eq!(
        (&status["op"], &status["ch"]),
        (&json!("status"), &json!(9)),
        "{status}"
    );
    // A cancelled channel frees its place, and so does a finished download.
    send_json(&mut ws, json!({"op": "cancel", "ch": 1})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"op": "cancelled", "ch": 1})
    );
    send_json(
        &mut ws,
        json!({"op": "download", "ch": 4, "path": "small.bin"}),
    )
    .await;
    read_download(&mut ws, 4, &small, "after a cancel").await;
    send_json(
        &mut ws,
        json!({"op": "download", "ch": 6, "path": "small.bin"}),
    )
    .await;
    read_download(&mut ws, 6, &small, "after an eof").await;
    // And so does a completed upload: then two more fit, not three.
    let data = random_bytes(1000);
    ws.send(Message::Binary(FrameHeader::frame(2, 0, &data).into()))
        .await
        .unwrap();
    send_json(&mut ws, json!({"op": "upload.complete", "ch": 2})).await;
    loop {
        let reply = next_json(&mut ws).await;
        match reply["op"].as_str() {
            Some("ack" | "progress") => {}
            Some("done") => break,
            _ => panic!("{reply}"),
        }
    }
    send_json(&mut ws, json!({"op": "watch", "ch": 10})).await;
    send_json(
        &mut ws,
        json!({"op": "upload.create", "ch": 11, "path": "up2.bin", "size": 10}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["op"], "ready");
    send_json(
        &mut ws,
        json!({"op": "download", "ch": 12, "path": "small.bin"}),
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        (&reply["ch"], &reply["code"]),
        (&json!(12), &json!("rate_limited")),
        "{reply}"
    );
}

/// Regression: a well-formed `upload.create`, `download` or `watch` whose
/// path broke the path rules was answered `bad_message` (meant for frames
/// that are no known message), whatever the path; the same path in an HTTP
/// JSON body is `bad_request`, or `name_too_long` when only too long. And
/// `upload.complete` on a channel without an upload was `bad_frame` (meant
/// for binary frames).
#[tokio::test]
async fn a_refused_path_in_a_message_gets_the_code_http_gives_it() {
    let server = Server::start();
    let mut ws = raw_socket(&server).await;
    let long_path = vec!["y".repeat(200); 6].join("/");
    let cases = [
        ("../x", "bad_request"),
        ("/etc/passwd", "bad_request"),
        ("a\\b", "bad_request"),
        (".ferry/uploads/x", "bad_request"),
        ("d/.ferry-dir", "bad_request"),
        (&"n".repeat(256), "name_too_long"),
        (&long_path, "name_too_long"),
    ];
    let mut ch = 0;
    for (path, code) in cases {
        let resp = server
            .client()
            .post(format!("{}/v1/uploads", server.url))
            .json(&json!({"path": path, "size": 1}))
            .send()
            .await
            .unwrap();
        let over_http: Value = resp.json().await.unwrap();
        assert_eq!(over_http["error"]["code"], code, "{over_http}");
        let messages = [
            json!({"op": "upload.create", "path": path, "size": 1}),
            json!({"op": "download", "path": path}),
            json!({"op": "watch", "prefix": path}),
        ];
        for mut message in messages {
            ch += 1;
            message["ch"] = json!(ch);
            send_json(&mut ws, message.clone()).await;
            let reply = next_json(&mut ws).await;
            assert_eq!(
                (&reply["op"], &reply["ch"], &reply["code"]),
                (&json!("error"), &json!(ch), &json!(code)),
                "{:.80} → {reply}",
                message.to_string()
            );
        }
    }
    send_json(&mut ws, json!({"op": "upload.complete", "ch": 500})).await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        (&reply["op"], &reply["ch"], &reply["code"]),
        (&json!("error"), &json!(500), &json!("bad_request")),
        "{reply}"
    );
    // Nothing was started, and the connection goes on.
    send_json(
        &mut ws,
        json!({"op": "upload.create", "ch": 1, "path": "fine.bin", "size": 1}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["op"], "ready");
}

/// Regression: on a server whose `--ws-max-message` is smaller than a
/// session's chunks (and their 16-byte header), `upload.create` was
/// answered `ready`, and the first chunk then closed the whole connection
/// with 1008. Such an `upload.create` (asked-for or server-picked chunk
/// size) or `upload.open` is refused on its channel, naming both sizes, and
/// creates nothing; the connection goes on.
#[tokio::test]
async fn chunks_too_large_for_one_message_are_refused_on_their_channel() {
    let max = 2 * MIB as u64;
    let server = Server::start_with(
        harness::Backend::Local,
        &["--ws-max-message", &max.to_string()],
    );
    let mut ws = raw_socket(&server).await;
    let refused = [
        (
            json!({"op": "upload.create", "ch": 1, "path": "a.bin", "size": 8 * MIB, "chunk_size": 4 * MIB}),
            4 * MIB,
        ),
        // The chunk alone fits; with its header it does not.
        (
            json!({"op": "upload.create", "ch": 2, "path": "a.bin", "size": 8 * MIB, "chunk_size": 2 * MIB}),
            2 * MIB,
        ),
        // The server's own choice for 1 GiB: 4 MiB.
        (
            json!({"op": "upload.create", "ch": 3, "path": "a.bin", "size": 1u64 << 30}),
            4 * MIB,
        ),
    ];
    for (message, chunk_size) in refused {
        send_json(&mut ws, message.clone()).await;
        let reply = next_json(&mut ws).await;
        assert_eq!(
            (&reply["op"], &reply["ch"], &reply["code"]),
            (&json!("error"), &message["ch"], &json!("bad_request")),
            "{message} → {reply}"
        );
        let text = reply["message"].as_str().unwrap();
        assert!(
            text.contains(&chunk_size.to_string()) && text.contains(&max.to_string()),
            "{text}"
        );
    }
    assert_eq!(server.metric("ferry_active_upload_sessions"), 0.0);
    // A session created over HTTP with such chunks cannot be opened here.
    let resp = server
        .client()
        .post(format!("{}/v1/uploads", server.url))
        .json(&json!({"path": "b.bin", "size": 8 * MIB, "chunk_size": 4 * MIB}))
        .send()
        .await
        .unwrap();
    let created: Value = resp.json().await.unwrap();
    send_json(
        &mut ws,
        json!({"op": "upload.open", "ch": 4, "id": created["id"]}),
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        (&reply["ch"], &reply["code"]),
        (&json!(4), &json!("bad_request")),
        "{reply}"
    );
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains(&max.to_string()),
        "{reply}"
    );
    // The channels are free and the connection up: chunks that fit go through.
    let data = random_bytes(MIB + 5);
    send_json(
        &mut ws,
        json!({"op": "upload.create", "ch": 1, "path": "c.bin", "size": data.len(), "chunk_size": MIB}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["op"], "ready");
    for (i, piece) in data.chunks(MIB).enumerate() {
        let frame = FrameHeader::frame(1, (i * MIB) as u64, piece);
        ws.send(Message::Binary(frame.into())).await.unwrap();
    }
    send_json(&mut ws, json!({"op": "upload.complete", "ch": 1})).await;
    loop {
        let reply = next_json(&mut ws).await;
        match reply["op"].as_str() {
            Some("ack" | "progress") => {}
            Some("done") => break,
            _ => panic!("{reply}"),
        }
    }
    assert!(server.get_bytes("c.bin").await.1 == data);
}

/// A file whose chunks the server's WebSocket cannot take in one message
/// goes over HTTP chunk PUTs instead, on a connection that stays up; with
/// the WebSocket only, the upload fails with the server's `bad_request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_too_large_for_the_websocket_go_over_http() {
    let server = Server::start_with(harness::Backend::Local, &["--ws-max-message", "2097152"]);
    let tmp = tempfile::tempdir().unwrap();
    let data = random_bytes(9 * MIB + 7);
    let file = write_file(tmp.path(), "f.bin", &data);
    let client = Client::new(&server.url).unwrap();
    let conn = WsConnection::connect(&client).await.unwrap();
    let options = |transport| UploadOptions {
        ws: Some(conn.clone()),
        transport,
        chunk_size: Some(4 * MIB as u64),
        ..Default::default()
    };
    let report = upload_file(
        &client,
        &file,
        &remote("auto.bin"),
        options(Transport::Auto),
    )
    .await
    .unwrap();
    assert_eq!(report.meta.size, data.len() as u64);
    assert!(server.get_bytes("auto.bin").await.1 == data);
    assert!(
        !conn.is_closed(),
        "the fallback came from a dropped connection"
    );
    let err = upload_file(
        &client,
        &file,
        &remote("ws.bin"),
        options(Transport::WebSocket),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), ferry::protocol::ErrorCode::BadRequest, "{err}");
    assert!(!conn.is_closed());
    assert_eq!(server.json("/v1/stat/ws.bin").await.0, 404);
}
