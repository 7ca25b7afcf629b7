//! Resumable chunk sessions over HTTP against a real server process; the
//! conformance cases run on the local-directory and the memory (multipart)
//! backends.

mod harness;

use std::time::Duration;

use ferry::protocol::upload::crc32c_header_value;
use harness::{Backend, Server, eventually, random_bytes};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1 << 20;

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

async fn create(s: &Server, body: Value) -> (u16, Value) {
    let resp = s
        .client()
        .post(format!("{}/v1/uploads", s.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn session(s: &Server, path: &str, data: &[u8], chunk_size: usize) -> String {
    let (status, created) = create(
        s,
        json!({"path": path, "size": data.len(), "chunk_size": chunk_size, "sha256": sha(data)}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

async fn put_chunk_raw(s: &Server, id: &str, n: u64, body: Vec<u8>, crc_of: &[u8]) -> (u16, Value) {
    let resp = s
        .client()
        .put(format!("{}/v1/uploads/{id}/chunks/{n}", s.url))
        .header(
            "X-Ferry-Crc32c",
            crc32c_header_value(crc32c::crc32c(crc_of)),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn put_chunk(s: &Server, id: &str, n: usize, data: &[u8], cs: usize) -> u16 {
    let chunk = &data[n * cs..((n + 1) * cs).min(data.len())];
    put_chunk_raw(s, id, n as u64, chunk.to_vec(), chunk)
        .await
        .0
}

async fn status(s: &Server, id: &str) -> (u16, Value) {
    s.json(&format!("/v1/uploads/{id}")).await
}

async fn complete(s: &Server, id: &str) -> (u16, Value) {
    complete_with(s, id, None).await
}

async fn declare(s: &Server, id: &str, body: Value) -> (u16, Value) {
    let resp = s
        .client()
        .patch(format!("{}/v1/uploads/{id}", s.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `complete`, with `body` or none.
async fn complete_with(s: &Server, id: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = s
        .client()
        .post(format!("{}/v1/uploads/{id}/complete", s.url));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let resp = request.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// 5 MiB chunks suit every backend (S3-family parts must be at least 5 MiB).
const CS: usize = 5 * MIB;

async fn out_of_order_concurrent_and_repeated_chunks(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let data = random_bytes(4 * CS + 12_345);
    let id = session(&s, "movies/out of order.bin", &data, CS).await;
    assert_eq!(put_chunk(&s, &id, 4, &data, CS).await, 204);
    assert_eq!(put_chunk(&s, &id, 1, &data, CS).await, 204);
    assert_eq!(
        put_chunk(&s, &id, 1, &data, CS).await,
        204,
        "a repeat is idempotent"
    );
    let (_, st) = status(&s, &id).await;
    assert_eq!(st["received"], json!([[1, 1], [4, 4]]));
    assert_eq!(st["bytes_received"], CS + 12_345);
    assert_eq!(st["state"], "open");
    let (a, b, c) = tokio::join!(
        put_chunk(&s, &id, 3, &data, CS),
        put_chunk(&s, &id, 0, &data, CS),
        put_chunk(&s, &id, 2, &data, CS)
    );
    assert_eq!((a, b, c), (204, 204, 204));
    let (code, meta) = complete(&s, &id).await;
    assert_eq!(code, 200, "{meta}");
    assert_eq!(meta["size"], data.len());
    assert!(s.get_bytes("movies/out of order.bin").await.1 == data);
    let (code, again) = complete(&s, &id).await;
    assert_eq!((code, &again), (200, &meta), "complete is idempotent");
    assert_eq!(status(&s, &id).await.1["state"], "committed");
    let resp = s
        .client()
        .put(format!("{}/v1/uploads/{id}/chunks/0", s.url))
        .header("X-Ferry-Crc32c", "AAAAAA==")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409, "no chunks into a committed session");
}

async fn bad_chunks_are_refused_and_not_kept(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let data = random_bytes(2 * CS + 100);
    let id = session(&s, "f.bin", &data, CS).await;
    let chunk0 = data[..CS].to_vec();
    let mut corrupt = chunk0.clone();
    corrupt[1000] ^= 0xff;
    let (code, err) = put_chunk_raw(&s, &id, 0, corrupt.clone(), &chunk0).await;
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (422, Some("checksum_mismatch"))
    );
    assert_eq!(
        status(&s, &id).await.1["received"],
        json!([]),
        "a bad chunk is not kept"
    );
    // A wrong declared length is refused (and the client still reads the answer).
    for len in [CS - 1, CS + 1] {
        let body = vec![9u8; len];
        let (code, err) = put_chunk_raw(&s, &id, 0, body.clone(), &body).await;
        assert_eq!(
            (code, err["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "declared {len}"
        );
    }
    // Streamed bodies (no length) are measured as they arrive.
    for len in [CS - 1, CS + 1] {
        let body = data[..len.min(data.len())].to_vec();
        let crc = crc32c_header_value(crc32c::crc32c(&body));
        let stream = futures::stream::iter(
            body.chunks(64 * 1024)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        );
        let resp = s
            .client()
            .put(format!("{}/v1/uploads/{id}/chunks/0", s.url))
            .header("X-Ferry-Crc32c", crc)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "streamed {len} bytes");
    }
    assert_eq!(
        put_chunk_raw(&s, &id, 3, vec![1], &[1]).await.0,
        400,
        "index past the end"
    );
    assert_eq!(
        put_chunk_raw(&s, &id, 2, vec![1; 99], &[1; 99]).await.0,
        400,
        "short last chunk"
    );
    let resp = s
        .client()
        .put(format!("{}/v1/uploads/{id}/chunks/0", s.url))
        .body(chunk0.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "missing CRC header");
    let resp = s
        .client()
        .put(format!("{}/v1/uploads/{id}/chunks/x", s.url))
        .header("X-Ferry-Crc32c", "AAAAAA==")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "non-numeric index");
    assert_eq!(status(&s, &id).await.1["received"], json!([]));

    // A received chunk is not damaged by a faulty repeat.
    assert_eq!(put_chunk(&s, &id, 0, &data, CS).await, 204);
    assert_eq!(put_chunk_raw(&s, &id, 0, corrupt, &chunk0).await.0, 422);
    assert_eq!(put_chunk(&s, &id, 1, &data, CS).await, 204);
    let (code, err) = complete(&s, &id).await;
    assert_eq!(code, 409);
    assert_eq!(err["error"]["code"], "missing_chunks");
    assert_eq!(err["error"]["missing"], json!([[2, 2]]));
    assert_eq!(put_chunk(&s, &id, 2, &data, CS).await, 204);
    assert_eq!(complete(&s, &id).await.0, 200);
    assert!(s.get_bytes("f.bin").await.1 == data);
}

async fn wrong_sha256_commits_nothing(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    s.put("keep.bin", "old version").await;
    let data = random_bytes(CS + 10);
    let (code, created) = create(&s, json!({"path": "keep.bin", "size": data.len(), "chunk_size": CS, "sha256": sha(b"something else")})).await;
    assert_eq!(code, 201);
    let id = created["id"].as_str().unwrap();
    put_chunk(&s, id, 0, &data, CS).await;
    put_chunk(&s, id, 1, &data, CS).await;
    let (code, err) = complete(&s, id).await;
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (422, Some("checksum_mismatch"))
    );
    assert_eq!(s.get_bytes("keep.bin").await.1, b"old version");
    assert_eq!(status(&s, id).await.0, 404, "the session is discarded");
    let (_, listing) = s.json("/v1/list/?recursive=true").await;
    assert_eq!(listing["entries"].as_array().unwrap().len(), 1);
}

/// Whatever a backend does with a chunk sent again with other bytes (a valid
/// CRC32C each time) — local staging keeps the first, multipart the last —
/// what gets committed hashes to the session's sha256.
async fn a_chunk_resent_with_other_bytes_never_commits_unverified_data(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let data = random_bytes(2 * CS);
    let id = session(&s, "resent.bin", &data, CS).await;
    assert_eq!(put_chunk(&s, &id, 0, &data, CS).await, 204);
    assert_eq!(put_chunk(&s, &id, 1, &data, CS).await, 204);
    // Let the server hash what it has so far.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let other = random_bytes(CS);
    assert_eq!(
        put_chunk_raw(&s, &id, 0, other.clone(), &other).await.0,
        204
    );
    let (code, body) = complete(&s, &id).await;
    match code {
        200 => assert!(
            s.get_bytes("resent.bin").await.1 == data,
            "committed bytes differ from the sha256"
        ),
        422 => {
            assert_eq!(body["error"]["code"], "checksum_mismatch");
            assert_eq!(s.get_bytes("resent.bin").await.0, 404);
        }
        other => panic!("{other}: {body}"),
    }
}

async fn stale_if_match_is_412(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let meta: Value = s.put("doc.txt", "v1").await.json().await.unwrap();
    let etag = meta["etag"].as_str().unwrap().to_owned();
    let data = b"version two".to_vec();
    let (code, created) = create(
        &s,
        json!({"path": "doc.txt", "size": data.len(), "if_match": etag}),
    )
    .await;
    assert_eq!(code, 201);
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(put_chunk(&s, &id, 0, &data, data.len()).await, 204);
    s.put("doc.txt", "changed elsewhere").await;
    assert_eq!(complete(&s, &id).await.0, 412);
    assert_eq!(s.get_bytes("doc.txt").await.1, b"changed elsewhere");
    let (code, _) = create(
        &s,
        json!({"path": "doc.txt", "size": 1, "if_match": "\"stale\""}),
    )
    .await;
    assert_eq!(code, 412);
}

/// `if_none_match: "*"`: a new file's session commits only where there is
/// still no file, checked at creation and again at `complete`.
async fn if_none_match_creates_only(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let data = b"a new file".to_vec();
    let new_file = |path: &str| json!({"path": path, "size": data.len(), "if_none_match": "*"});
    // Created elsewhere while the upload ran: nothing is replaced.
    let (code, created) = create(&s, new_file("raced.txt")).await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(put_chunk(&s, &id, 0, &data, data.len()).await, 204);
    s.put("raced.txt", "created elsewhere").await;
    let (code, body) = complete(&s, &id).await;
    assert_eq!(code, 412, "{body}");
    assert_eq!(body["error"]["code"], "precondition_failed", "{body}");
    assert_eq!(s.get_bytes("raced.txt").await.1, b"created elsewhere");
    // There already: refused at once.
    assert_eq!(create(&s, new_file("raced.txt")).await.0, 412);
    // Still free: committed.
    let id = session_with(&s, new_file("free.txt")).await;
    assert_eq!(put_chunk(&s, &id, 0, &data, data.len()).await, 204);
    assert_eq!(complete(&s, &id).await.0, 200);
    assert_eq!(s.get_bytes("free.txt").await.1, data);
    // Only `*` means anything here.
    let (code, body) = create(
        &s,
        json!({"path": "x.txt", "size": 1, "if_none_match": "\"abc\""}),
    )
    .await;
    assert_eq!(code, 400, "{body}");
}

async fn session_with(s: &Server, body: Value) -> String {
    let (code, created) = create(s, body).await;
    assert_eq!(code, 201, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

async fn create_validates_its_request(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    s.put("dir/file", "x").await;
    for (body, want) in [
        (json!({"path": "../x", "size": 1}), 400),
        (json!({"path": "a", "size": 1, "chunk_size": 1000}), 400),
        (json!({"path": "a", "size": 1, "sha256": "zz"}), 400),
        (json!({"path": "dir", "size": 1}), 409),
        (json!({"path": "dir/file/x", "size": 1}), 409),
        (json!({"size": 1}), 400),
    ] {
        assert_eq!(create(&s, body.clone()).await.0, want, "{body}");
    }
    assert_eq!(status(&s, "0123456789abcdef0123456789abcdef").await.0, 404);
    assert_eq!(status(&s, "..").await.0, 404);
    // An empty file is one empty chunk.
    let (code, created) = create(&s, json!({"path": "empty", "size": 0})).await;
    assert_eq!((code, created["chunk_count"].as_u64()), (201, Some(1)));
    let id = created["id"].as_str().unwrap();
    assert_eq!(put_chunk_raw(&s, id, 0, vec![], &[]).await.0, 204);
    assert_eq!(complete(&s, id).await.0, 200);
    assert_eq!(s.get_bytes("empty").await, (200, vec![]));
}

async fn server_picks_a_chunk_size(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let (_, created) = create(&s, json!({"path": "big", "size": 1u64 << 30})).await;
    let cs = created["chunk_size"].as_u64().unwrap();
    assert!(
        cs.is_power_of_two() && (1 << 20..=64 << 20).contains(&cs),
        "{cs}"
    );
    if matches!(backend, Backend::Memory) {
        assert!(cs >= 5 << 20, "multipart backends need 5 MiB parts");
    }
    assert_eq!(
        created["chunk_count"].as_u64().unwrap(),
        (1u64 << 30).div_ceil(cs)
    );
}

async fn abort_frees_the_session(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let data = random_bytes(2 * CS);
    let id = session(&s, "gone.bin", &data, CS).await;
    put_chunk(&s, &id, 0, &data, CS).await;
    let resp = s
        .client()
        .delete(format!("{}/v1/uploads/{id}", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(status(&s, &id).await.0, 404);
    assert_eq!(put_chunk(&s, &id, 1, &data, CS).await, 404);
    assert_eq!(s.get_bytes("gone.bin").await.0, 404);
    if s.store_dir.is_some() {
        assert!(
            s.files_on_disk().is_empty(),
            "staged bytes remain: {:?}",
            s.files_on_disk()
        );
    }
}

/// A session created without a size (a writer still writing the file) takes
/// whole chunks; its size, declared later, fixes the last chunk.
async fn an_open_ended_session_takes_whole_chunks_then_its_size(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let data = random_bytes(2 * CS + 777);
    let (code, created) = create(
        &s,
        json!({"path": "growing.bin", "chunk_size": CS, "sha256_at_complete": true}),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["chunk_size"], CS);
    assert!(created.get("chunk_count").is_none(), "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let (_, st) = status(&s, &id).await;
    assert!(
        st.get("size").is_none() && st.get("chunk_count").is_none(),
        "{st}"
    );
    assert_eq!(st["received"], json!([]));
    assert_eq!(put_chunk(&s, &id, 1, &data, CS).await, 204);
    assert_eq!(put_chunk(&s, &id, 0, &data, CS).await, 204);
    // Before the size is known every chunk is whole.
    let (code, err) = put_chunk_raw(&s, &id, 2, data[2 * CS..].to_vec(), &data[2 * CS..]).await;
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{err}"
    );
    let (code, err) = complete_with(&s, &id, Some(json!({"sha256": sha(&data)}))).await;
    assert_eq!(code, 400, "no commit before the size: {err}");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("size"),
        "{err}"
    );
    let (_, st) = status(&s, &id).await;
    assert_eq!(
        (st["received"].clone(), st["bytes_received"].clone()),
        (json!([[0, 1]]), json!(2 * CS))
    );

    let mtime = "2024-05-06T07:08:09Z";
    let (code, st) = declare(&s, &id, json!({"size": data.len(), "mtime": mtime})).await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(
        (st["size"].as_u64(), st["chunk_count"].as_u64()),
        (Some(data.len() as u64), Some(3))
    );
    assert_eq!(st["received"], json!([[0, 1]]));
    let (code, _) = declare(&s, &id, json!({"size": data.len()})).await;
    assert_eq!(code, 200, "declaring the same size again changes nothing");
    let (code, err) = declare(&s, &id, json!({"size": data.len() + 1})).await;
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{err}"
    );
    assert_eq!(
        put_chunk(&s, &id, 2, &data, CS).await,
        204,
        "the short last chunk"
    );
    let (code, err) = put_chunk_raw(&s, &id, 3, data[..CS].to_vec(), &data[..CS]).await;
    assert_eq!(code, 400, "past the declared end: {err}");
    let (code, meta) = complete_with(&s, &id, Some(json!({"sha256": sha(&data)}))).await;
    assert_eq!(code, 200, "{meta}");
    assert_eq!(meta["size"], data.len());
    assert!(s.get_bytes("growing.bin").await.1 == data);
    if matches!(backend, Backend::Local) {
        assert_eq!(meta["mtime"], mtime, "the declared mtime");
    }
    let (code, _) = declare(&s, &id, json!({"size": 5})).await;
    assert_eq!(code, 409, "a committed session takes no size");
}

/// A declared size must hold every chunk received whole; bad requests to
/// declare one change nothing.
async fn a_size_that_cuts_a_received_chunk_is_refused(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let data = random_bytes(2 * CS);
    let (code, created) = create(&s, json!({"path": "cut.bin", "chunk_size": CS})).await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(put_chunk(&s, &id, 0, &data, CS).await, 204);
    assert_eq!(put_chunk(&s, &id, 1, &data, CS).await, 204);
    for (body, code) in [
        (json!({"size": CS + 10}), 409),
        (json!({}), 400),
        (json!({"size": -1}), 400),
        (json!({"size": "big"}), 400),
        (json!({"size": 1u64 << 62}), 413),
    ] {
        let (got, err) = declare(&s, &id, body.clone()).await;
        assert_eq!(got, code, "{body}: {err}");
        assert!(err["error"]["message"].is_string(), "{err}");
    }
    let (_, st) = status(&s, &id).await;
    assert!(st.get("size").is_none(), "still open-ended: {st}");
    let (code, _) = declare(&s, "0123456789abcdef0123456789abcdef", json!({"size": 1})).await;
    assert_eq!(code, 404);
    assert_eq!(declare(&s, &id, json!({"size": 2 * CS})).await.0, 200);
    let (code, meta) = complete(&s, &id).await;
    assert_eq!(code, 200, "{meta}");
    assert!(s.get_bytes("cut.bin").await.1 == data);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod local {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Local).await } )*
        }
        mod memory {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Memory).await } )*
        }
    };
}

conformance!(
    out_of_order_concurrent_and_repeated_chunks,
    bad_chunks_are_refused_and_not_kept,
    wrong_sha256_commits_nothing,
    a_chunk_resent_with_other_bytes_never_commits_unverified_data,
    stale_if_match_is_412,
    if_none_match_creates_only,
    create_validates_its_request,
    server_picks_a_chunk_size,
    abort_frees_the_session,
    an_open_ended_session_takes_whole_chunks_then_its_size,
    a_size_that_cuts_a_received_chunk_is_refused,
);

#[tokio::test]
async fn an_open_ended_session_can_be_sized_by_another_node() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let first = Server::start_on(store.to_str().unwrap(), &[]);
    let second = Server::start_on(store.to_str().unwrap(), &[]);
    let data = random_bytes(2 * MIB + 5);
    let (code, created) = create(
        &first,
        json!({"path": "nodes.bin", "chunk_size": MIB, "sha256_at_complete": true}),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(put_chunk(&first, &id, 0, &data, MIB).await, 204);
    assert_eq!(put_chunk(&second, &id, 1, &data, MIB).await, 204);
    assert_eq!(
        declare(&second, &id, json!({"size": data.len()})).await.0,
        200
    );
    // The first node knew the session open-ended; it takes the short chunk.
    assert_eq!(put_chunk(&first, &id, 2, &data, MIB).await, 204);
    let (code, meta) = complete_with(&first, &id, Some(json!({"sha256": sha(&data)}))).await;
    assert_eq!(code, 200, "{meta}");
    assert!(second.get_bytes("nodes.bin").await.1 == data);
}

#[tokio::test]
async fn staging_is_one_sparse_file_written_in_place() {
    let s = Server::start();
    let data = random_bytes(3 * MIB);
    let id = session(&s, "sparse.bin", &data, MIB).await;
    put_chunk(&s, &id, 2, &data, MIB).await;
    let files = s.files_on_disk();
    assert_eq!(
        files,
        [
            format!(".ferry/uploads/{id}/chunks"),
            format!(".ferry/uploads/{id}/data"),
            format!(".ferry/uploads/{id}/manifest.json")
        ]
    );
    let staged = s
        .store_dir
        .as_ref()
        .unwrap()
        .join(format!(".ferry/uploads/{id}/data"));
    let meta = std::fs::metadata(&staged).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.len(), 3 * MIB as u64);
    assert!(
        meta.blocks() * 512 < 2 * MIB as u64,
        "the holes are not allocated"
    );
    let ino = meta.ino();
    put_chunk(&s, &id, 0, &data, MIB).await;
    put_chunk(&s, &id, 1, &data, MIB).await;
    assert_eq!(complete(&s, &id).await.0, 200);
    let committed = s.store_dir.as_ref().unwrap().join("sparse.bin");
    assert_eq!(
        std::fs::metadata(committed).unwrap().ino(),
        ino,
        "commit is a rename, not a copy"
    );
}

#[tokio::test]
async fn sessions_survive_a_restart_and_are_shared_by_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let first = Server::start_on(store.to_str().unwrap(), &[]);
    let data = random_bytes(3 * MIB);
    let id = session(&first, "shared.bin", &data, MIB).await;
    assert_eq!(put_chunk(&first, &id, 0, &data, MIB).await, 204);
    // A second node on the same store sees the session and takes chunks.
    let second = Server::start_on(store.to_str().unwrap(), &[]);
    assert_eq!(status(&second, &id).await.1["received"], json!([[0, 0]]));
    assert_eq!(put_chunk(&second, &id, 1, &data, MIB).await, 204);
    // The first node dies; a restarted node still has every acknowledged chunk.
    drop(first);
    let third = Server::start_on(store.to_str().unwrap(), &[]);
    assert_eq!(status(&third, &id).await.1["received"], json!([[0, 1]]));
    assert_eq!(put_chunk(&third, &id, 2, &data, MIB).await, 204);
    assert_eq!(complete(&second, &id).await.0, 200);
    assert_eq!(complete(&third, &id).await.0, 200);
    assert!(third.get_bytes("shared.bin").await.1 == data);
}

/// A server killed inside `complete`, after the staged file was moved into
/// place and before the session said so: the next server reports the
/// session committed, and a repeated `complete` answers as for a commit.
#[tokio::test]
async fn a_commit_cut_short_by_a_kill_is_recognised_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let first = Server::start_on(store.to_str().unwrap(), &[]);
    let data = random_bytes(2 * MIB);
    let id = session(&first, "cut.bin", &data, MIB).await;
    for n in 0..2 {
        assert_eq!(put_chunk(&first, &id, n, &data, MIB).await, 204);
    }
    drop(first);
    // What the killed server had done: the commit noted, the rename made.
    let dir = store.join(format!(".ferry/uploads/{id}"));
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["state"], "open");
    manifest["committing"] = json!({"replaces": false});
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::rename(dir.join("data"), store.join("cut.bin")).unwrap();

    let second = Server::start_on(store.to_str().unwrap(), &[]);
    let (code, st) = status(&second, &id).await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["state"], "committed", "{st}");
    assert_eq!(st["meta"]["size"], 2 * MIB, "{st}");
    let (code, meta) = complete(&second, &id).await;
    assert_eq!(code, 200, "{meta}");
    assert_eq!(meta["etag"], st["meta"]["etag"]);
    assert!(second.get_bytes("cut.bin").await.1 == data);
    assert!(!dir.join("chunks").exists(), "the chunk map is left behind");
}

/// A session whose staged data vanished (not by a commit) is reported gone,
/// so a client starts a new session instead of retrying a server error.
#[tokio::test]
async fn a_session_without_its_staged_data_is_gone() {
    let s = Server::start();
    let data = random_bytes(MIB);
    let id = session(&s, "lost.bin", &data, MIB).await;
    assert_eq!(put_chunk(&s, &id, 0, &data, MIB).await, 204);
    let dir = s
        .store_dir
        .as_ref()
        .unwrap()
        .join(format!(".ferry/uploads/{id}"));
    std::fs::remove_file(dir.join("data")).unwrap();
    std::fs::remove_file(dir.join("chunks")).unwrap();
    let (code, body) = complete(&s, &id).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(status(&s, &id).await.0, 404);
    assert_eq!(s.get_bytes("lost.bin").await.0, 404);
}

/// A client that gives up on `complete` (its request dropped mid-commit)
/// does not cut the commit short: it finishes and the session says so.
#[tokio::test]
async fn a_dropped_complete_request_still_commits_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let first = Server::start_on(store.to_str().unwrap(), &[]);
    let data = random_bytes(64 * MIB);
    let id = session(&first, "dropped.bin", &data, 8 * MIB).await;
    for n in 0..8 {
        assert_eq!(put_chunk(&first, &id, n, &data, 8 * MIB).await, 204);
    }
    // A restarted server hashes the staged file again on complete, which
    // keeps the commit busy long enough to drop the request during it.
    drop(first);
    let s = Server::start_on(store.to_str().unwrap(), &[]);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(30))
        .build()
        .unwrap();
    let sent = impatient
        .post(format!("{}/v1/uploads/{id}/complete", s.url))
        .send()
        .await;
    assert!(sent.is_err(), "the commit finished within 30 ms: {sent:?}");
    let mut last = Value::Null;
    for _ in 0..200 {
        last = status(&s, &id).await.1;
        if last["state"] == "committed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["state"], "committed", "{last}");
    assert!(s.get_bytes("dropped.bin").await.1 == data);
}

#[tokio::test]
async fn expired_sessions_are_collected() {
    let s = Server::start_with(Backend::Local, &["--upload-ttl", "1", "--gc-interval", "1"]);
    let data = random_bytes(2 * MIB);
    let id = session(&s, "abandoned.bin", &data, MIB).await;
    put_chunk(&s, &id, 0, &data, MIB).await;
    assert!(!s.files_on_disk().is_empty());
    assert!(
        eventually(Duration::from_secs(10), || s.files_on_disk().is_empty()),
        "{:?}",
        s.files_on_disk()
    );
    assert_eq!(status(&s, &id).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_partial_object_while_an_upload_completes() {
    let s = Server::start();
    let old = vec![b'o'; 8 * MIB];
    let new = random_bytes(8 * MIB);
    s.put("hot.bin", old.clone()).await;
    let id = session(&s, "hot.bin", &new, MIB).await;
    for n in 0..8 {
        put_chunk(&s, &id, n, &new, MIB).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (client, url, stop) = (s.client(), s.file_url("hot.bin"), stop.clone());
        let (old, new) = (old.clone(), new.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads < 5 {
                let resp = client.get(&url).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                let body = resp.bytes().await.unwrap();
                assert!(
                    body[..] == old[..] || body[..] == new[..],
                    "a reader saw a mixed or partial object"
                );
                reads += 1;
            }
            reads
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(complete(&s, &id).await.0, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.await.unwrap() >= 5);
    assert!(s.get_bytes("hot.bin").await.1 == new);
}

/// A chunk PUT sent by hand: its head, then the body as the test decides.
async fn open_chunk_put(s: &Server, id: &str, n: u64, len: usize, crc_of: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "PUT /v1/uploads/{id}/chunks/{n} HTTP/1.1\r\nHost: ferry\r\nContent-Length: {len}\r\nX-Ferry-Crc32c: {}\r\n\r\n",
        crc32c_header_value(crc32c::crc32c(crc_of))
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// The status of the answer on `stream`; 0 if the server closed it unanswered.
async fn answer_status(stream: &mut TcpStream) -> u16 {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return 0,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&answer);
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Two copies of one chunk in flight at once (a client that retried while
/// its first request was still arriving, say): the newer one is the chunk,
/// whole. The older one, here damaged in transit but sent under the right
/// CRC32C, is refused from then on and writes nothing more: not into the
/// received chunk, and not into the file once committed.
#[tokio::test]
async fn an_older_copy_of_a_chunk_still_arriving_never_writes_over_the_newer() {
    let s = Server::start();
    for commit_first in [false, true] {
        let path = format!("twice-{commit_first}.bin");
        let good = random_bytes(4 * MIB);
        let damaged = vec![b'X'; 4 * MIB];
        let id = session(&s, &path, &good, 4 * MIB).await;
        let mut older = open_chunk_put(&s, &id, 0, good.len(), &good).await;
        older.write_all(&damaged[..3 * MIB / 2]).await.unwrap();
        // The older copy's first piece is in the staged file.
        let staged = s
            .store_dir
            .as_ref()
            .unwrap()
            .join(format!(".ferry/uploads/{id}/data"));
        assert!(eventually(Duration::from_secs(10), || {
            std::fs::read(&staged).is_ok_and(|d| d[0] == b'X')
        }));
        assert_eq!(put_chunk(&s, &id, 0, &good, 4 * MIB).await, 204);
        if commit_first {
            assert_eq!(complete(&s, &id).await.0, 200);
        }
        older.write_all(&damaged[3 * MIB / 2..]).await.unwrap();
        assert_eq!(answer_status(&mut older).await, 409);
        if !commit_first {
            let (code, meta) = complete(&s, &id).await;
            assert_eq!(code, 200, "{meta}");
        }
        let (_, stored) = s.get_bytes(&path).await;
        assert!(
            stored == good,
            "the committed file holds {} bytes of the older copy",
            stored.iter().filter(|b| **b == b'X').count()
        );
    }
}

/// The names in `dir` (none when it does not exist), sorted.
fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(read) => read
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", dir.display()),
    };
    names.sort();
    names
}

/// Fills the filesystem holding `dir` with one file, `dir/fill`, until it
/// has no room left.
fn fill_disk(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("fill");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![7u8; 64 << 10];
    loop {
        if let Err(e) = file.write_all(&block) {
            assert_eq!(e.raw_os_error(), Some(28), "{e}");
            return path;
        }
    }
}

/// Regression: on a full disk every refused session creation left an empty
/// session directory behind (a mount retrying its files made thousands
/// within a minute), which no sweep removed. A creation refused for lack of
/// space now says why and leaves nothing; sessions already open are kept.
#[tokio::test]
async fn a_session_refused_for_lack_of_space_leaves_nothing_behind() {
    if !harness::mount::is_root() {
        return;
    }
    // Declared first, so dropped last: the server stops before the unmount.
    let disk = harness::mount::Tmpfs::mount("2m");
    let store = disk.path.join("store");
    let s = Server::start_on(store.to_str().unwrap(), &[]);
    let data = random_bytes(64 << 10);
    let kept = session(&s, "kept.bin", &data, MIB).await;
    let waiting = session(&s, "waiting.bin", &data, MIB).await;
    assert_eq!(put_chunk(&s, &waiting, 0, &data, MIB).await, 204);
    let fill = fill_disk(&disk.path);
    let uploads = store.join(".ferry/uploads");
    let before = entries(&uploads);
    let mut sessions = vec![kept.clone(), waiting.clone()];
    sessions.sort();
    assert_eq!(before, sessions);
    // Neither a chunk nor a commit fits: refused, and the sessions stay as
    // they were.
    let (code, body) = put_chunk_raw(&s, &kept, 0, data.clone(), &data).await;
    assert_eq!(
        (code, &body["error"]["code"]),
        (503, &json!("storage_error")),
        "{body}"
    );
    assert!(
        body.to_string().contains("No space left on device"),
        "{body}"
    );
    let (code, body) = complete(&s, &waiting).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"]["code"], "storage_error", "{body}");
    for (id, received) in [(&kept, json!([])), (&waiting, json!([[0, 0]]))] {
        let (code, st) = status(&s, id).await;
        assert_eq!(code, 200, "{st}");
        assert_eq!((&st["state"], &st["received"]), (&json!("open"), &received));
    }
    let requests = [
        json!({"path": "new.bin", "size": 1000}),
        json!({"path": "sha.bin", "size": 1000, "sha256": sha(b"x")}),
        json!({"path": "open-ended.bin"}),
    ];
    for attempt in 0..30 {
        let (code, body) = create(&s, requests[attempt % requests.len()].clone()).await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["error"]["code"], "storage_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("No space left on device"), "{body}");
    }
    assert_eq!(entries(&uploads), before, "a refused creation left debris");
    assert_eq!(s.metric("ferry_active_upload_sessions"), 2.0);

    // Room again: the sessions complete, new ones are created.
    std::fs::remove_file(fill).unwrap();
    assert_eq!(put_chunk(&s, &kept, 0, &data, MIB).await, 204);
    for id in [&kept, &waiting] {
        let (code, meta) = complete(&s, id).await;
        assert_eq!(code, 200, "{meta}");
    }
    assert!(s.get_bytes("kept.bin").await.1 == data);
    assert!(s.get_bytes("waiting.bin").await.1 == data);
    let (code, body) = create(&s, requests[0].clone()).await;
    assert_eq!(code, 201, "{body}");
}

/// Sets the modification time of `path` (a file or a directory).
fn set_mtime(path: &std::path::Path, to: std::time::SystemTime) {
    std::fs::File::open(path)
        .and_then(|f| f.set_modified(to))
        .unwrap_or_else(|e| panic!("setting the mtime of {}: {e}", path.display()));
}

/// What a server killed while creating a session leaves (its directory,
/// maybe its staged files, no manifest) is removed by the sweep once
/// untouched for an hour; a younger one may be a creation still under way
/// (on this node or another on the store) and stays, as do real sessions,
/// however old their files.
#[tokio::test]
async fn the_sweep_removes_session_debris_left_untouched_for_an_hour() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let first = Server::start_on(store.to_str().unwrap(), &[]);
    let data = random_bytes(2 * MIB);
    let real = session(&first, "real.bin", &data, MIB).await;
    assert_eq!(put_chunk(&first, &real, 0, &data, MIB).await, 204);
    drop(first);

    let uploads = store.join(".ferry/uploads");
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    let old_empty = "0123456789abcdef0123456789abcdef";
    let old_staged = "fedcba9876543210fedcba9876543210";
    let fresh = "00000000000000000000000000000001";
    for id in [old_empty, old_staged, fresh] {
        std::fs::create_dir(uploads.join(id)).unwrap();
    }
    for name in ["data", "chunks", "manifest.json#1"] {
        let path = uploads.join(old_staged).join(name);
        std::fs::write(&path, b"staged").unwrap();
        set_mtime(&path, two_hours_ago);
    }
    std::fs::write(uploads.join(fresh).join("data"), b"").unwrap();
    // A real session's age is its manifest's business, not its files'.
    for name in ["data", "chunks", "manifest.json"] {
        set_mtime(&uploads.join(&real).join(name), two_hours_ago);
    }
    for id in [old_empty, old_staged, &real] {
        set_mtime(&uploads.join(id), two_hours_ago);
    }

    let s = Server::start_on(store.to_str().unwrap(), &["--gc-interval", "1"]);
    let swept = eventually(Duration::from_secs(20), || entries(&uploads).len() == 2);
    let mut expected = vec![fresh.to_owned(), real.clone()];
    expected.sort();
    assert!(swept, "{:?}", entries(&uploads));
    assert_eq!(entries(&uploads), expected);
    assert_eq!(entries(&uploads.join(fresh)), ["data"]);
    assert_eq!(put_chunk(&s, &real, 1, &data, MIB).await, 204);
    let (code, meta) = complete(&s, &real).await;
    assert_eq!(code, 200, "{meta}");
    assert!(s.get_bytes("real.bin").await.1 == data);
}
