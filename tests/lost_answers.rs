//! Requests that create, move or commit something, whose answer is lost on
//! the way back (the connection cut after the server did the work): sent
//! again with their `Idempotency-Key`, they get the first answer instead of
//! doing it twice. A real server behind a proxy that cuts one answer.

mod harness;

use std::time::Duration;

use ferry::client::upload::{Transport, UploadOptions, upload_file};
use ferry::client::{Client, ClientConfig};
use ferry::protocol::{MoveRequest, RemotePath};
use harness::mount::{MountProc, fuse_available, store_file};
use harness::proxy::{AnswerCutter, Cut};
use harness::{Server, random_bytes, token_entry};
use serde_json::{Value, json};

fn remote(p: &str) -> RemotePath {
    p.parse().unwrap()
}

/// A client of `url` that gives up after 10 s.
fn client_of(url: &str) -> Client {
    let mut config = ClientConfig::default();
    config.retry.give_up_after = Duration::from_secs(10);
    Client::with_config(url, config).unwrap()
}

const CUTS: [Cut; 2] = [Cut::InHead(12), Cut::InBody(5)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mkdir_whose_answer_is_lost_succeeds_once() {
    for cut in CUTS {
        let server = Server::start();
        let proxy = AnswerCutter::start(server.addr, "POST /v1/ops/mkdir", cut);
        let meta = client_of(&proxy.url)
            .mkdir(&remote("photos"), false)
            .await
            .expect("the mkdir is answered, not already_exists");
        assert!(proxy.cut(), "the first answer was cut");
        assert_eq!(meta.path, remote("photos"));
        assert_eq!(server.json("/v1/stat/photos").await.1["kind"], "dir");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_whose_answer_is_lost_succeeds_once() {
    for cut in CUTS {
        let server = Server::start();
        assert_eq!(server.put("a.txt", "one").await.status(), 201);
        let proxy = AnswerCutter::start(server.addr, "POST /v1/ops/rename", cut);
        let request = MoveRequest {
            from: remote("a.txt"),
            to: remote("b.txt"),
            overwrite: false,
            recursive: false,
        };
        let meta = client_of(&proxy.url)
            .rename(&request)
            .await
            .expect("the rename is answered, not not_found");
        assert!(proxy.cut());
        assert_eq!(meta.path, remote("b.txt"));
        assert_eq!(server.get_bytes("b.txt").await, (200, b"one".to_vec()));
        assert_eq!(server.get_bytes("a.txt").await.0, 404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rmdir_and_a_copy_whose_answers_are_lost_succeed_once() {
    for cut in CUTS {
        let server = Server::start();
        assert_eq!(server.op("mkdir", json!({"path": "d"})).await.0, 201);
        assert_eq!(server.put("f.txt", "data").await.status(), 201);
        let proxy = AnswerCutter::start(server.addr, "POST /v1/ops/rmdir", cut);
        let client = client_of(&proxy.url);
        client
            .rmdir(&remote("d"), false)
            .await
            .expect("the rmdir is answered, not not_found");
        assert!(proxy.cut());
        assert_eq!(server.json("/v1/stat/d").await.0, 404);

        let proxy = AnswerCutter::start(server.addr, "POST /v1/ops/copy", cut);
        let request = MoveRequest {
            from: remote("f.txt"),
            to: remote("g.txt"),
            overwrite: false,
            recursive: false,
        };
        client_of(&proxy.url)
            .copy(&request)
            .await
            .expect("the copy is answered, not already_exists");
        assert!(proxy.cut());
        assert_eq!(server.get_bytes("g.txt").await, (200, b"data".to_vec()));
    }
}

/// The session's creation and its commit, each answer lost once: the upload
/// finishes, in the one session it created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_create_and_complete_answers_are_lost_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("big.bin");
    let data = random_bytes(3 << 20);
    std::fs::write(&local, &data).unwrap();
    for (pattern, cut) in [
        ("POST /v1/uploads ", Cut::InBody(5)),
        ("POST /v1/uploads ", Cut::InHead(12)),
        ("/complete ", Cut::InBody(5)),
        ("/complete ", Cut::InHead(12)),
    ] {
        let server = Server::start();
        let proxy = AnswerCutter::start(server.addr, pattern, cut);
        let options = UploadOptions {
            transport: Transport::Http,
            chunk_size: Some(1 << 20),
            ..Default::default()
        };
        let report = upload_file(&client_of(&proxy.url), &local, &remote("big.bin"), options)
            .await
            .unwrap_or_else(|e| panic!("{pattern} cut {}: {e}", cut_name(cut)));
        assert!(proxy.cut(), "{pattern}");
        assert_eq!(report.meta.size, data.len() as u64);
        let (status, stored) = server.get_bytes("big.bin").await;
        assert_eq!(status, 200);
        assert!(stored == data, "{pattern}: the stored file differs");
        let sessions = std::fs::read_dir(server.store_dir.as_ref().unwrap().join(".ferry/uploads"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(sessions, 1, "{pattern}: one session, not one per attempt");
    }
}

fn cut_name(cut: Cut) -> &'static str {
    match cut {
        Cut::InHead(_) => "in the head",
        Cut::InBody(_) => "in the body",
    }
}

async fn post(
    server: &Server,
    route: &str,
    key: Option<&str>,
    token: Option<&str>,
    body: Value,
) -> (u16, Option<String>, Value) {
    let mut request = server
        .client()
        .post(format!("{}/v1/{route}", server.url))
        .json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        replayed,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_repeated_key_gets_the_first_answer_and_nothing_is_done_twice() {
    let server = Server::start();
    let mkdir = json!({"path": "a"});
    let first = post(&server, "ops/mkdir", Some("k-1"), None, mkdir.clone()).await;
    assert_eq!((first.0, first.1.as_deref()), (201, None));
    let again = post(&server, "ops/mkdir", Some("k-1"), None, mkdir.clone()).await;
    assert_eq!((again.0, again.1.as_deref()), (201, Some("true")));
    assert_eq!(again.2, first.2, "the same answer");
    // Without the key, or with another, the request runs.
    let plain = post(&server, "ops/mkdir", None, None, mkdir.clone()).await;
    assert_eq!(
        (plain.0, plain.2["error"]["code"].as_str()),
        (409, Some("already_exists"))
    );
    let other = post(&server, "ops/mkdir", Some("k-2"), None, mkdir.clone()).await;
    assert_eq!(other.0, 409);

    // An error answer is kept too: the rename ran once and found nothing.
    let rename = json!({"from": "missing", "to": "b"});
    let first = post(&server, "ops/rename", Some("k-3"), None, rename.clone()).await;
    assert_eq!(first.0, 404);
    assert_eq!(server.put("missing", "now here").await.status(), 201);
    let again = post(&server, "ops/rename", Some("k-3"), None, rename).await;
    assert_eq!((again.0, again.1.as_deref()), (404, Some("true")));
    assert_eq!(server.get_bytes("missing").await.0, 200, "not renamed");

    // A key names one request: another body, path or route with it is refused.
    let reused = post(
        &server,
        "ops/mkdir",
        Some("k-1"),
        None,
        json!({"path": "c"}),
    )
    .await;
    assert_eq!(reused.0, 409);
    assert_eq!(reused.2["error"]["code"], "conflict");
    let message = reused.2["error"]["message"].as_str().unwrap();
    assert!(message.contains("Idempotency-Key"), "{message}");
    assert_eq!(server.json("/v1/stat/c").await.0, 404);
    let reused = post(&server, "ops/rmdir", Some("k-1"), None, mkdir).await;
    assert_eq!(reused.0, 409);
    assert_eq!(server.json("/v1/stat/a").await.1["kind"], "dir");

    for bad in ["", "has space", &"k".repeat(256)] {
        let refused = post(&server, "ops/mkdir", Some(bad), None, json!({"path": "d"})).await;
        assert_eq!(refused.0, 400, "{bad:?}");
        assert_eq!(refused.2["error"]["code"], "bad_request");
    }
    assert_eq!(server.json("/v1/stat/d").await.0, 404);
}

#[tokio::test]
async fn a_key_is_its_callers_own() {
    let config = [
        token_entry(
            "alice",
            "ferry_alice_token_00000000001",
            r#"["read", "write"]"#,
            "",
        ),
        token_entry(
            "bob",
            "ferry_bob_token_000000000000001",
            r#"["read", "write"]"#,
            "",
        ),
    ]
    .join("\n");
    let server = Server::start_configured(&config, &[]);
    let mkdir = json!({"path": "shared"});
    let alice = Some("ferry_alice_token_00000000001");
    let bob = Some("ferry_bob_token_000000000000001");
    assert_eq!(
        post(&server, "ops/mkdir", Some("same"), alice, mkdir.clone())
            .await
            .0,
        201
    );
    // Bob's "same" is not Alice's: his request runs, and finds the directory.
    let his = post(&server, "ops/mkdir", Some("same"), bob, mkdir.clone()).await;
    assert_eq!((his.0, his.1), (409, None));
    let hers = post(&server, "ops/mkdir", Some("same"), alice, mkdir).await;
    assert_eq!((hers.0, hers.1.as_deref()), (201, Some("true")));
}

/// Through a mount: `mkdir`, `mv` and `rmdir` over a link that loses their
/// answers are not told EEXIST or ENOENT for what the server did.
#[test]
fn mkdir_mv_and_rmdir_through_a_mount_survive_a_lost_answer() {
    if !fuse_available() {
        return;
    }
    type Action = fn(&MountProc) -> std::io::Result<()>;
    let actions: [(&str, Action); 3] = [
        ("POST /v1/ops/mkdir", |m| std::fs::create_dir(m.at("new"))),
        ("POST /v1/ops/rename", |m| {
            std::fs::rename(m.at("a.txt"), m.at("b.txt"))
        }),
        ("POST /v1/ops/rmdir", |m| std::fs::remove_dir(m.at("old"))),
    ];
    for (pattern, action) in actions {
        let server = Server::start();
        store_file(&server, "a.txt", b"one");
        let rt = tokio::runtime::Runtime::new().unwrap();
        assert_eq!(
            rt.block_on(server.op("mkdir", json!({"path": "old"}))).0,
            201
        );
        let proxy = AnswerCutter::start(server.addr, pattern, Cut::InBody(5));
        let mount = MountProc::start_url(&proxy.url, &[]);
        action(&mount).unwrap_or_else(|e| panic!("{pattern}: {e}"));
        assert!(proxy.cut(), "{pattern}");
        let stat = |p: &str| rt.block_on(server.json(&format!("/v1/stat/{p}"))).0;
        match pattern {
            "POST /v1/ops/mkdir" => assert!(mount.at("new").is_dir() && stat("new") == 200),
            "POST /v1/ops/rename" => {
                assert_eq!(std::fs::read(mount.at("b.txt")).unwrap(), b"one");
                assert_eq!((stat("a.txt"), stat("b.txt")), (404, 200));
            }
            _ => assert!(!mount.at("old").exists() && stat("old") == 404),
        }
    }
}
