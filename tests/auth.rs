//! Tokens, prefixes, signed URLs and the anonymous default, against a real
//! server process: every route refuses what a caller may not do, and nothing
//! changes when it does.

mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use harness::{Server, token_entry};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ADMIN: &str = "ferry_admin_token_for_tests_0001";
const ALICE: &str = "ferry_alice_token_for_tests_0002";
const READER: &str = "ferry_reader_token_for_tests_0003";
const WRONG: &str = "ferry_no_such_token_0004";
const SECRET: &str = "a signing secret only the tests know";

/// A server with an all-powerful token, a read-write token for `alice/`, and
/// a read-only token for `alice/`.
fn secured_server() -> Server {
    let config = format!(
        "signing_secret = \"{SECRET}\"\n{}{}{}",
        token_entry("admin", ADMIN, r#"["read", "write"]"#, ""),
        token_entry("alice", ALICE, r#"["read", "write"]"#, "alice"),
        token_entry("reader", READER, r#"["read"]"#, "alice/"),
    );
    Server::start_configured(&config, &[])
}

struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
}

fn call(method: Method, path: &str, body: Option<Value>) -> Call {
    Call {
        method,
        path: path.to_owned(),
        body,
    }
}

async fn send(server: &Server, token: Option<&str>, c: &Call) -> (u16, String) {
    let mut request =
        reqwest::Client::new().request(c.method.clone(), format!("{}{}", server.url, c.path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = &c.body {
        request = request.json(body);
    } else if c.method == Method::PUT {
        request = request.body("intruder");
    }
    let response = tokio::time::timeout(Duration::from_secs(10), request.send())
        .await
        .expect("answered promptly")
        .unwrap();
    let status = response.status().as_u16();
    // An event stream that was allowed would never end; its status is enough.
    let text = if status < 300 && c.path.starts_with("/v1/events") {
        String::new()
    } else {
        response.text().await.unwrap_or_default()
    };
    (status, text)
}

/// Every file under the store (session state included) with its contents.
fn snapshot(store: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![store.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.insert(format!("{}/", path.display()), Vec::new());
                stack.push(path);
            } else {
                out.insert(path.display().to_string(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

async fn as_admin(server: &Server, c: Call) -> Value {
    let (status, text) = send(server, Some(ADMIN), &c).await;
    assert!(status < 300, "{} {}: {status} {text}", c.method, c.path);
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// An upload session on `path` created by `token`.
async fn session(server: &Server, token: &str, path: &str) -> String {
    let c = call(
        Method::POST,
        "/v1/uploads",
        Some(json!({"path": path, "size": 8})),
    );
    let (status, text) = send(server, Some(token), &c).await;
    assert_eq!(status, 201, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_missing_wrong_narrow_and_foreign_tokens_and_changes_nothing() {
    let server = secured_server();
    for (path, body) in [("alice/a.txt", "alice's"), ("bob/b.txt", "bob's")] {
        let put = reqwest::Client::new()
            .put(server.file_url(path))
            .bearer_auth(ADMIN)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(put.status().is_success());
    }
    as_admin(
        &server,
        call(
            Method::POST,
            "/v1/ops/mkdir",
            Some(json!({"path": "alice/empty"})),
        ),
    )
    .await;
    as_admin(
        &server,
        call(
            Method::POST,
            "/v1/ops/mkdir",
            Some(json!({"path": "bob/empty"})),
        ),
    )
    .await;
    let admins_session = session(&server, ADMIN, "alice/admin.bin").await;
    let alices_session = session(&server, ALICE, "alice/own.bin").await;
    let store = server.store_dir.clone().unwrap();
    let before = snapshot(&store);

    let reads = |prefix: &str| {
        vec![
            call(Method::GET, &format!("/v1/files/{prefix}/x.txt"), None),
            call(Method::HEAD, &format!("/v1/files/{prefix}/x.txt"), None),
            call(Method::GET, &format!("/v1/list/{prefix}"), None),
            call(Method::GET, &format!("/v1/stat/{prefix}/x.txt"), None),
            call(Method::GET, &format!("/v1/events?prefix={prefix}"), None),
            call(
                Method::POST,
                "/v1/sign",
                Some(json!({"path": format!("{prefix}/x.txt")})),
            ),
        ]
    };
    let writes = |prefix: &str| {
        vec![
            call(Method::PUT, &format!("/v1/files/{prefix}/x.txt"), None),
            call(Method::DELETE, &format!("/v1/files/{prefix}/x.txt"), None),
            call(
                Method::POST,
                "/v1/ops/mkdir",
                Some(json!({"path": format!("{prefix}/new")})),
            ),
            call(
                Method::POST,
                "/v1/ops/rmdir",
                Some(json!({"path": format!("{prefix}/empty")})),
            ),
            call(
                Method::POST,
                "/v1/ops/rename",
                Some(json!({"from": format!("{prefix}/x.txt"), "to": format!("{prefix}/y.txt")})),
            ),
            call(
                Method::POST,
                "/v1/ops/copy",
                Some(json!({"from": format!("{prefix}/x.txt"), "to": format!("{prefix}/y.txt")})),
            ),
            call(
                Method::POST,
                "/v1/uploads",
                Some(json!({"path": format!("{prefix}/up.bin"), "size": 8})),
            ),
        ]
    };
    let real = |calls: Vec<Call>, from: &str, to: &str| -> Vec<Call> {
        calls
            .into_iter()
            .map(|c| Call {
                path: c.path.replace(&format!("{from}/x.txt"), to),
                body: c.body.map(|b| {
                    serde_json::from_str(&b.to_string().replace(&format!("{from}/x.txt"), to))
                        .unwrap()
                }),
                ..c
            })
            .collect()
    };
    let session_calls = |id: &str| {
        vec![
            call(Method::GET, &format!("/v1/uploads/{id}"), None),
            call(Method::PUT, &format!("/v1/uploads/{id}/chunks/0"), None),
            call(Method::POST, &format!("/v1/uploads/{id}/complete"), None),
            call(Method::DELETE, &format!("/v1/uploads/{id}"), None),
        ]
    };

    // No token, or one the server does not know: 401 everywhere.
    let mut everything = real(reads("alice"), "alice", "alice/a.txt");
    everything.extend(real(writes("alice"), "alice", "alice/a.txt"));
    everything.extend(session_calls(&alices_session));
    everything.push(call(Method::GET, "/v1/ws", None));
    everything.push(call(Method::POST, "/v1/files/alice", None));
    for token in [None, Some(WRONG)] {
        for c in &everything {
            let (status, text) = send(&server, token, c).await;
            assert_eq!(
                status, 401,
                "{} {} with {token:?}: {text}",
                c.method, c.path
            );
            assert!(
                c.method == Method::HEAD || text.contains("unauthorized"),
                "{text}"
            );
        }
    }
    // A read-only token writing inside its prefix: 403.
    for c in real(writes("alice"), "alice", "alice/a.txt") {
        let (status, text) = send(&server, Some(READER), &c).await;
        assert_eq!(status, 403, "reader: {} {}: {text}", c.method, c.path);
    }
    for c in session_calls(&alices_session) {
        let (status, _) = send(&server, Some(READER), &c).await;
        assert_eq!(status, 403, "reader: {} {}", c.method, c.path);
    }
    // Alice outside her prefix, by every route: 403.
    let mut outside = real(reads("bob"), "bob", "bob/b.txt");
    outside.extend(real(writes("bob"), "bob", "bob/b.txt"));
    outside.extend(
        reads("")
            .into_iter()
            .filter(|c| c.method != Method::POST && !c.path.contains("/x.txt")),
    );
    outside.push(call(Method::GET, "/v1/events", None));
    for (from, to) in [("alice/a.txt", "bob/a.txt"), ("bob/b.txt", "alice/b.txt")] {
        for op in ["rename", "copy"] {
            outside.push(call(
                Method::POST,
                &format!("/v1/ops/{op}"),
                Some(json!({"from": from, "to": to})),
            ));
        }
    }
    // Chunks and commands into another token's session, even inside the prefix.
    outside.extend(session_calls(&admins_session));
    for c in &outside {
        let (status, text) = send(&server, Some(ALICE), c).await;
        assert_eq!(status, 403, "alice: {} {}: {text}", c.method, c.path);
        assert!(
            c.method == Method::HEAD || text.contains("forbidden"),
            "{text}"
        );
    }
    // A form upload into someone else's directory.
    let body = "--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.txt\"\r\n\r\nx\r\n--XX--\r\n";
    let response = reqwest::Client::new()
        .post(server.file_url("bob"))
        .bearer_auth(ALICE)
        .header("content-type", "multipart/form-data; boundary=XX")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    assert_eq!(
        snapshot(&store),
        before,
        "a refused request changed the store"
    );

    // What each token may do, it can.
    let (status, text) = send(
        &server,
        Some(READER),
        &call(Method::GET, "/v1/files/alice/a.txt", None),
    )
    .await;
    assert_eq!((status, text.as_str()), (200, "alice's"));
    let (status, _) = send(
        &server,
        Some(ALICE),
        &call(Method::PUT, "/v1/files/alice/new.txt", None),
    )
    .await;
    assert_eq!(status, 201);
    let (status, text) = send(
        &server,
        Some(ALICE),
        &call(Method::GET, &format!("/v1/uploads/{alices_session}"), None),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let healthz = reqwest::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200, "health checks need no token");
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket opened with `token` in the `access_token` query, as a browser would.
async fn ws_connect(server: &Server, token: &str) -> Socket {
    let url = format!(
        "{}/v1/ws?access_token={token}",
        server.url.replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "ferry.v1".parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

async fn next_text(socket: &mut Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// The first reply to `message` on a new connection.
async fn ws_reply(server: &Server, token: &str, message: Value) -> Value {
    let mut socket = ws_connect(server, token).await;
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
    next_text(&mut socket).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ops_are_held_to_the_tokens_prefix_and_sessions() {
    let server = secured_server();
    let put = reqwest::Client::new()
        .put(server.file_url("bob/b.txt"))
        .bearer_auth(ADMIN)
        .body("bob's")
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let admins_session = session(&server, ADMIN, "alice/admin.bin").await;
    let refused = [
        json!({"op": "upload.create", "ch": 1, "path": "bob/x.bin", "size": 4}),
        json!({"op": "upload.open", "ch": 1, "id": admins_session}),
        json!({"op": "status", "ch": 1, "id": admins_session}),
        json!({"op": "download", "ch": 1, "path": "bob/b.txt"}),
        json!({"op": "watch", "ch": 1, "prefix": ""}),
    ];
    for message in refused {
        let reply = ws_reply(&server, ALICE, message.clone()).await;
        assert_eq!(reply["op"], "error", "{message} → {reply}");
        assert_eq!(reply["code"], "forbidden", "{message} → {reply}");
    }
    let reply = ws_reply(
        &server,
        READER,
        json!({"op": "upload.create", "ch": 1, "path": "alice/x.bin", "size": 4}),
    )
    .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
    let reply = ws_reply(
        &server,
        ALICE,
        json!({"op": "upload.create", "ch": 1, "path": "alice/x.bin", "size": 4}),
    )
    .await;
    assert_eq!(reply["op"], "ready", "{reply}");
    let mut watching = ws_connect(&server, ALICE).await;
    let watch = json!({"op": "watch", "ch": 2, "prefix": "alice"});
    watching
        .send(Message::Text(watch.to_string().into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let put = reqwest::Client::new()
        .put(server.file_url("alice/w.txt"))
        .bearer_auth(ADMIN)
        .body("w")
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let change = next_text(&mut watching).await;
    assert_eq!(
        (&change["op"], &change["path"]),
        (&json!("change"), &json!("alice/w.txt")),
        "{change}"
    );
    assert!(
        !Path::new(&server.store_dir.clone().unwrap())
            .join("bob/x.bin")
            .exists()
    );
}

fn signature(path: &str, expires: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("GET\n{path}\n{expires}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_read_one_file_until_they_expire() {
    let server = secured_server();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let put = reqwest::Client::new()
        .put(server.file_url("alice/movie.mp4"))
        .bearer_auth(ADMIN)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let signed: Value = reqwest::Client::new()
        .post(format!("{}/v1/sign", server.url))
        .bearer_auth(READER)
        .json(&json!({"path": "alice/movie.mp4", "expires_in": 600}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = signed["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&server.url), "{url}");
    let client = reqwest::Client::new();
    let full = client.get(&url).send().await.unwrap();
    assert_eq!(full.status(), 200);
    assert_eq!(full.bytes().await.unwrap().to_vec(), data);
    let part = client
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap().to_vec(), data[1000..2000]);
    assert_eq!(client.head(&url).send().await.unwrap().status(), 200);

    let (base, query) = url.split_once('?').unwrap();
    let params: BTreeMap<String, String> = serde_urlencoded::from_str(query).unwrap();
    let expires: u64 = params["expires"].parse().unwrap();
    let sig = &params["signature"];
    let status = |u: String| {
        let client = client.clone();
        async move { client.get(u).send().await.unwrap().status().as_u16() }
    };
    // Altered path, expiry and signature; a signed URL used for a write.
    let other = base.replace("movie.mp4", "other.mp4");
    assert_eq!(status(format!("{other}?{query}")).await, 403);
    assert_eq!(
        status(format!("{base}?expires={}&signature={sig}", expires + 10)).await,
        403
    );
    let mut bad = sig.clone();
    bad.replace_range(0..2, if &sig[0..2] == "00" { "11" } else { "00" });
    assert_eq!(
        status(format!("{base}?expires={expires}&signature={bad}")).await,
        403
    );
    assert_eq!(status(format!("{base}?expires={expires}")).await, 401);
    let write = client.put(&url).body("x").send().await.unwrap();
    assert_eq!(write.status(), 403);
    let list = format!(
        "{}/v1/list/alice?expires={expires}&signature={sig}",
        server.url
    );
    assert_eq!(status(list).await, 403);
    // Past its expiry (signed with the server's secret): 410.
    let past = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 5;
    let expired = format!(
        "{base}?expires={past}&signature={}",
        signature("alice/movie.mp4", past)
    );
    assert_eq!(status(expired).await, 410);
    let fresh = format!(
        "{base}?expires={}&signature={}",
        past + 600,
        signature("alice/movie.mp4", past + 600)
    );
    assert_eq!(status(fresh).await, 200);
    // Nobody signs what they cannot read.
    let refused = client
        .post(format!("{}/v1/sign", server.url))
        .bearer_auth(ALICE)
        .json(&json!({"path": "bob/x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
}

#[test]
fn without_tokens_only_loopback_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--listen", "0.0.0.0:0", "--store"])
        .arg(tmp.path().join("store"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("without tokens") && stderr.contains("--allow-anonymous"),
        "{stderr}"
    );
    assert!(
        !tmp.path().join("store").exists(),
        "refused before touching the store"
    );
    // With --allow-anonymous it starts (and says where).
    let server = Server::start_on(
        tmp.path().join("store").to_str().unwrap(),
        &["--allow-anonymous"],
    );
    drop(server);
    // A bad config file is a clear error, not a silent default.
    let config = tmp.path().join("bad.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nsurprise = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("surprise"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tokens_from_token_new_work_through_env_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (token, entry) =
        harness::token_new::token_new(Path::new(env!("CARGO_BIN_EXE_ferry")), "ci", "ci/");
    let config = tmp.path().join("ferry.toml");
    std::fs::write(&config, entry).unwrap();
    let server = Server::start_on(
        tmp.path().join("store").to_str().unwrap(),
        &["--config", config.to_str().unwrap()],
    );
    let local = tmp.path().join("up.txt");
    std::fs::write(&local, "through the CLI").unwrap();
    let ferry = |args: &[&str], env_token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.args(args)
            .args(["--server", &server.url, "--retry-for", "2"]);
        cmd.env_remove("FERRY_TOKEN")
            .env("FERRY_STATE_DIR", tmp.path().join("state"));
        if let Some(t) = env_token {
            cmd.env("FERRY_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let denied = ferry(&["put", local.to_str().unwrap(), "ci/up.txt"], None);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("token"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let put = ferry(&["put", local.to_str().unwrap(), "ci/up.txt"], Some(&token));
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let outside = ferry(
        &["put", local.to_str().unwrap(), "other/up.txt"],
        Some(&token),
    );
    assert!(!outside.status.success());
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let ls = ferry(
        &["ls", "ci", "--token-file", token_file.to_str().unwrap()],
        None,
    );
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert!(String::from_utf8_lossy(&ls.stdout).contains("up.txt"));
}

/// The scheme of `Authorization` is matched in any case (RFC 9110); what is
/// not a bearer token is still refused.
#[tokio::test]
async fn the_bearer_scheme_is_matched_in_any_case() {
    let server = secured_server();
    let whoami = |value: String| {
        reqwest::Client::new()
            .get(format!("{}/v1/whoami", server.url))
            .header("Authorization", value)
            .send()
    };
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let response = whoami(format!("{scheme} {ADMIN}")).await.unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
    }
    for value in [
        format!("Basic {ADMIN}"),
        format!("Bearer{ADMIN}"),
        format!("bearer {WRONG}"),
    ] {
        let response = whoami(value.clone()).await.unwrap();
        assert_eq!(response.status(), 401, "{value}");
    }
}

/// A watch the server refuses (no token, or a prefix the token does not
/// reach) ends with the server's reason instead of reconnecting silently
/// for ever; `ferry watch` says it and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_watch_ends_with_the_reason() {
    use ferry::client::watch::{WatchEvent, Watcher};
    let server = secured_server();
    for (token, prefix, expected) in [
        (None, "", "unauthorized"),
        (Some(ALICE), "bob", "forbidden"),
    ] {
        let config = ferry::client::ClientConfig {
            token: token.map(str::to_owned),
            ..Default::default()
        };
        let client = ferry::client::Client::with_config(&server.url, config).unwrap();
        let mut watcher = Watcher::start(&client, &prefix.parse().unwrap());
        let event = tokio::time::timeout(Duration::from_secs(10), watcher.next())
            .await
            .expect("an answer, not silence");
        match event {
            Some(WatchEvent::Refused(why)) => {
                assert!(why.contains(expected), "{why}");
            }
            other => panic!("{prefix:?}: {other:?}"),
        }
        assert_eq!(watcher.next().await, None, "the watcher stopped");
    }
    let watch = std::process::Command::new("timeout")
        .arg("20")
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .args(["watch", "bob"])
        .env("FERRY_SERVER", &server.url)
        .env("FERRY_TOKEN", ALICE)
        .output()
        .unwrap();
    assert_eq!(watch.status.code(), Some(1), "{watch:?}");
    let stderr = String::from_utf8_lossy(&watch.stderr);
    assert!(stderr.contains("refuses this watch"), "{stderr}");
}

/// A token that may write but not read (a drop box) can `ferry put` and
/// `ferry rm`: neither needs to look first. Both used to fail on the
/// `stat` they made before.
#[tokio::test]
async fn a_write_only_token_puts_and_removes_from_the_cli() {
    const DROP: &str = "ferry_drop_token_for_tests_0005";
    let server = Server::start_configured(&token_entry("drop", DROP, r#"["write"]"#, "inbox"), &[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("h.txt"), b"hello").unwrap();
    let ferry = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .current_dir(dir.path())
            .env("FERRY_SERVER", &server.url)
            .env("FERRY_TOKEN", DROP)
            .env("FERRY_STATE_DIR", dir.path())
            .output()
            .unwrap()
    };
    let put = ferry(&["put", "h.txt", "inbox/h.txt"]);
    assert!(put.status.success(), "{put:?}");
    let on_disk = server.store_dir.as_ref().unwrap().join("inbox/h.txt");
    assert_eq!(std::fs::read(&on_disk).unwrap(), b"hello");
    let rm = ferry(&["rm", "inbox/h.txt"]);
    assert!(rm.status.success(), "{rm:?}");
    assert!(!on_disk.exists());
    // Outside its prefix it is refused all the same.
    let put = ferry(&["put", "h.txt", "elsewhere/h.txt"]);
    assert!(!put.status.success());
    assert!(
        String::from_utf8_lossy(&put.stderr).contains("forbidden"),
        "{put:?}"
    );
}
