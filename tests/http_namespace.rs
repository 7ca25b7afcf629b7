//! Directories, listings and operations: one conformance suite run against
//! every backend (local directory and memory).

mod harness;

use harness::{Backend, Server, listed_names as names};
use serde_json::{Value, json};

async fn put_then_list_and_stat(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    s.put("docs/a.txt", "aaa").await;
    s.put("docs/sub/b.txt", "bb").await;
    s.put("top.txt", "t").await;
    s.put("docs/ünïcode name [1].txt", "u").await;

    let (status, root) = s.json("/v1/list/").await;
    assert_eq!(status, 200);
    assert_eq!(names(&root), ["docs", "top.txt"]);
    assert_eq!(root["entries"][0]["kind"], "dir");
    assert_eq!(root["entries"][1]["kind"], "file");
    assert_eq!(root["entries"][1]["size"], 1);
    assert!(root["entries"][1]["etag"].is_string());

    let (_, docs) = s.json("/v1/list/docs").await;
    assert_eq!(names(&docs), ["a.txt", "sub", "ünïcode name [1].txt"]);

    let (_, all) = s.json("/v1/list/docs?recursive=true").await;
    assert_eq!(
        names(&all),
        ["a.txt", "sub", "sub/b.txt", "ünïcode name [1].txt"]
    );

    let (status, stat) = s.json("/v1/stat/docs/a.txt").await;
    assert_eq!(status, 200);
    assert_eq!(
        (stat["kind"].as_str(), stat["size"].as_u64()),
        (Some("file"), Some(3))
    );
    let (_, stat) = s.json("/v1/stat/docs/sub").await;
    assert_eq!(stat["kind"], "dir");
    let (_, stat) = s.json("/v1/stat/").await;
    assert_eq!(stat["kind"], "dir");
    assert_eq!(s.json("/v1/stat/nope").await.0, 404);
    assert_eq!(s.json("/v1/list/nope").await.0, 404);
    assert_eq!(s.json("/v1/list/top.txt").await.0, 409);
}

async fn listing_pages_with_a_cursor(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let mut expected = Vec::new();
    for i in 0..25 {
        let name = format!("f{i:03}");
        s.put(&format!("many/{name}"), "x").await;
        expected.push(name);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("/v1/list/many?limit=10&cursor={c}"),
            None => "/v1/list/many?limit=10".to_owned(),
        };
        let (status, page) = s.json(&query).await;
        assert_eq!(status, 200);
        let page_names = names(&page);
        assert!(page_names.len() <= 10);
        seen.extend(page_names);
        match page["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, expected);
}

async fn mkdir_and_rmdir(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let (status, meta) = s.op("mkdir", json!({"path": "empty"})).await;
    assert_eq!((status, meta["kind"].as_str()), (201, Some("dir")));
    assert_eq!(names(&s.json("/v1/list/").await.1), ["empty"]);
    assert_eq!(s.json("/v1/list/empty").await.1["entries"], json!([]));
    assert_eq!(s.op("mkdir", json!({"path": "empty"})).await.0, 409);
    assert_eq!(
        s.op("mkdir", json!({"path": "x/y/z"})).await.0,
        404,
        "parent missing"
    );
    assert_eq!(
        s.op("mkdir", json!({"path": "x/y/z", "parents": true}))
            .await
            .0,
        201
    );
    assert_eq!(s.json("/v1/stat/x/y").await.1["kind"], "dir");

    s.put("full/f.txt", "f").await;
    assert_eq!(
        s.op("mkdir", json!({"path": "full/f.txt/sub", "parents": true}))
            .await
            .0,
        409
    );
    let (status, err) = s.op("rmdir", json!({"path": "full"})).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("directory_not_empty"))
    );
    assert_eq!(
        s.op("rmdir", json!({"path": "x"})).await.0,
        409,
        "x holds y"
    );
    assert_eq!(
        s.op("rmdir", json!({"path": "full", "recursive": true}))
            .await
            .0,
        204
    );
    assert_eq!(s.get_bytes("full/f.txt").await.0, 404);
    assert_eq!(s.op("rmdir", json!({"path": "empty"})).await.0, 204);
    assert_eq!(s.op("rmdir", json!({"path": "empty"})).await.0, 404);
    assert_eq!(s.op("rmdir", json!({"path": ""})).await.0, 400);
    assert_eq!(names(&s.json("/v1/list/").await.1), ["x"]);
}

/// A listing gives a directory the time `stat` gives it (its marker's), so
/// that a mount shows one time for it, not two by turns; a directory that
/// exists only through its files has none, in either.
async fn listings_and_stat_agree_on_directory_times(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    assert_eq!(s.op("mkdir", json!({"path": "top"})).await.0, 201);
    assert_eq!(s.op("mkdir", json!({"path": "top/made"})).await.0, 201);
    s.put("top/implied/f.txt", "f").await;
    let s = &s;
    let stat = async |p: &str| s.json(&format!("/v1/stat/{p}")).await.1["mtime"].clone();
    let made = stat("top/made").await;
    assert!(made.is_string(), "{made}");
    assert_eq!(stat("top/implied").await, Value::Null);
    let mtimes = |listing: Value| -> Vec<(String, Value)> {
        listing["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "dir")
            .map(|e| (e["name"].as_str().unwrap().to_owned(), e["mtime"].clone()))
            .collect()
    };
    assert_eq!(
        mtimes(s.json("/v1/list/top").await.1),
        [
            ("implied".to_owned(), Value::Null),
            ("made".to_owned(), made.clone())
        ]
    );
    assert_eq!(
        mtimes(s.json("/v1/list/?recursive=true").await.1),
        [
            ("top".to_owned(), stat("top").await),
            ("top/implied".to_owned(), Value::Null),
            ("top/made".to_owned(), made),
        ]
    );
}

async fn a_directory_lives_while_it_has_entries(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    s.put("d/only.txt", "x").await;
    assert_eq!(
        s.client()
            .delete(s.file_url("d/only.txt"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        s.json("/v1/stat/d").await.0,
        404,
        "implicit directory vanishes with its last file"
    );
    assert_eq!(
        s.client()
            .delete(s.file_url("d/only.txt"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    s.op("mkdir", json!({"path": "kept"})).await;
    s.put("kept/f", "x").await;
    s.client()
        .delete(s.file_url("kept/f"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        s.json("/v1/stat/kept").await.1["kind"],
        "dir",
        "mkdir'd directory stays"
    );
}

async fn rename_files_and_directories(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    s.put("a.txt", "A").await;
    s.put("b.txt", "B").await;
    let (status, meta) = s
        .op("rename", json!({"from": "a.txt", "to": "moved/a.txt"}))
        .await;
    assert_eq!((status, meta["path"].as_str()), (200, Some("moved/a.txt")));
    assert_eq!(s.get_bytes("moved/a.txt").await.1, b"A");
    assert_eq!(s.get_bytes("a.txt").await.0, 404);

    let (status, err) = s
        .op("rename", json!({"from": "b.txt", "to": "moved/a.txt"}))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("already_exists"))
    );
    assert_eq!(
        s.op(
            "rename",
            json!({"from": "b.txt", "to": "moved/a.txt", "overwrite": true})
        )
        .await
        .0,
        200
    );
    assert_eq!(s.get_bytes("moved/a.txt").await.1, b"B");
    assert_eq!(
        s.op("rename", json!({"from": "nope", "to": "x"})).await.0,
        404
    );

    s.put("tree/one.txt", "1").await;
    s.put("tree/deep/two.txt", "22").await;
    s.op("mkdir", json!({"path": "tree/empty"})).await;
    let (status, err) = s
        .op("rename", json!({"from": "tree", "to": "forest"}))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("is_a_directory"))
    );
    assert_eq!(
        s.op(
            "rename",
            json!({"from": "tree", "to": "tree/inner", "recursive": true})
        )
        .await
        .0,
        400
    );
    assert_eq!(
        s.op(
            "rename",
            json!({"from": "tree", "to": "forest", "recursive": true})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        names(&s.json("/v1/list/forest?recursive=true").await.1),
        ["deep", "deep/two.txt", "empty", "one.txt"]
    );
    assert_eq!(s.json("/v1/stat/tree").await.0, 404);
    assert_eq!(names(&s.json("/v1/list/").await.1), ["forest", "moved"]);

    s.put("dir2/x", "x").await;
    assert_eq!(
        s.op(
            "rename",
            json!({"from": "forest", "to": "dir2", "recursive": true})
        )
        .await
        .0,
        409
    );
    assert_eq!(
        s.op("rename", json!({"from": "moved/a.txt", "to": "dir2"}))
            .await
            .0,
        409
    );
}

async fn copy_files_and_directories(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    s.put("src/a.txt", "A").await;
    s.put("src/deep/b.txt", "B").await;
    assert_eq!(
        s.op("copy", json!({"from": "src/a.txt", "to": "dst/a.txt"}))
            .await
            .0,
        200
    );
    assert_eq!(s.get_bytes("dst/a.txt").await.1, b"A");
    assert_eq!(s.get_bytes("src/a.txt").await.1, b"A");
    assert_eq!(
        s.op("copy", json!({"from": "src/a.txt", "to": "dst/a.txt"}))
            .await
            .0,
        409
    );
    assert_eq!(
        s.op(
            "copy",
            json!({"from": "src", "to": "copy", "recursive": true})
        )
        .await
        .0,
        200
    );
    assert_eq!(s.get_bytes("copy/deep/b.txt").await.1, b"B");
    assert_eq!(s.get_bytes("src/deep/b.txt").await.1, b"B");
    // Replacing the copy leaves the original alone.
    s.put("copy/a.txt", "changed").await;
    assert_eq!(s.get_bytes("src/a.txt").await.1, b"A");
}

async fn multipart_form_upload(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let boundary = "XyZ";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"one.txt\"\r\n\r\nfirst file\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"g\"; filename=\"two.bin\"\r\n\r\nsecond\r\n\
         --{boundary}--\r\n"
    );
    let resp = s
        .client()
        .post(format!("{}/v1/files/uploads", s.url))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["files"].as_array().unwrap().len(), 2);
    assert_eq!(s.get_bytes("uploads/one.txt").await.1, b"first file");
    assert_eq!(s.get_bytes("uploads/two.bin").await.1, b"second");

    let evil = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"..\"\r\n\r\nx\r\n--{boundary}--\r\n"
    );
    let resp = s
        .client()
        .post(format!("{}/v1/files/uploads", s.url))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(evil)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

async fn put_replaces_atomically_and_reports_metadata(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let resp = s
        .client()
        .put(s.file_url("f.bin"))
        .body(vec![1u8; 12_000_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let meta: Value = resp.json().await.unwrap();
    assert_eq!(
        (meta["size"].as_u64(), meta["kind"].as_str()),
        (Some(12_000_000), Some("file"))
    );
    let resp = s
        .client()
        .put(s.file_url("f.bin"))
        .body("small")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let meta2: Value = resp.json().await.unwrap();
    assert_ne!(meta["etag"], meta2["etag"]);
    assert_eq!(s.get_bytes("f.bin").await.1, b"small");
    s.put("empty", Vec::<u8>::new()).await;
    assert_eq!(s.get_bytes("empty").await, (200, vec![]));
}

/// An answer's status, error code, error message and body.
type Answer = (u16, String, String, String);

async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let code = v["error"]["code"].as_str().unwrap_or_default().to_owned();
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code, message, body)
}

/// Writes `name` by every route that can create it: PUT, form upload,
/// upload session, mkdir, rename and copy, each into a directory of its own
/// under `top`.
async fn write_name_every_way(s: &Server, top: &str, name: &str) -> Vec<(&'static str, Answer)> {
    let url = |p: &str| ferry::protocol::RemotePath::parse(p).unwrap().to_url_path();
    let mut answers = Vec::new();
    let put = s
        .client()
        .put(s.file_url(&url(&format!("{top}/put/{name}"))))
        .body("put");
    answers.push(("put", answer(put.send().await.unwrap()).await));

    let boundary = "XyZ";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{name}\"\r\n\r\nform\r\n--{boundary}--\r\n"
    );
    let form = s
        .client()
        .post(s.file_url(&format!("{top}/form")))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(form);
    answers.push(("form", answer(form.send().await.unwrap()).await));

    let created = s
        .client()
        .post(format!("{}/v1/uploads", s.url))
        .json(&json!({"path": format!("{top}/session/{name}"), "size": 7}))
        .send()
        .await
        .unwrap();
    let created = answer(created).await;
    if created.0 == 201 {
        let id = serde_json::from_str::<Value>(&created.3).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let chunk = s
            .client()
            .put(format!("{}/v1/uploads/{id}/chunks/0", s.url))
            .header(
                "X-Ferry-Crc32c",
                ferry::protocol::upload::crc32c_header_value(crc32c::crc32c(b"session")),
            )
            .body("session")
            .send()
            .await
            .unwrap();
        assert_eq!(chunk.status(), 204);
        let done = s
            .client()
            .post(format!("{}/v1/uploads/{id}/complete", s.url))
            .send()
            .await
            .unwrap();
        answers.push(("session", answer(done).await));
    } else {
        answers.push(("session", created));
    }

    for (op, body) in [
        (
            "mkdir",
            json!({"path": format!("{top}/mkdir/{name}"), "parents": true}),
        ),
        (
            "rename",
            json!({"from": "source.txt", "to": format!("{top}/rename/{name}")}),
        ),
        (
            "copy",
            json!({"from": "source.txt", "to": format!("{top}/copy/{name}")}),
        ),
    ] {
        s.put("source.txt", "source").await;
        let resp = s
            .client()
            .post(format!("{}/v1/ops/{op}", s.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        answers.push((op, answer(resp).await));
    }
    answers
}

/// Regression: on a local store, valid names near the 255-byte segment limit
/// failed with 503 and the store's absolute path for PUT (and, once
/// percent-encoded on disk, for mkdir, rename and copy) while an upload
/// session took them. Every route now writes a name, or refuses it with the
/// same 400, and no answer names a server path.
async fn long_names_are_written_by_every_route_or_refused_alike(backend: Backend) {
    let s = Server::start_with(backend, &[]);
    let local = matches!(backend, Backend::Local);
    // `whoami` tells clients the limit, so that a mount refuses such a name
    // when it is made.
    let access: serde_json::Value = s
        .client()
        .get(format!("{}/v1/whoami", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let limit = &access["limits"]["max_stored_name_bytes"];
    match local {
        true => assert_eq!(limit, 253, "{access}"),
        false => assert!(access["limits"].is_object() && limit.is_null(), "{access}"),
    }
    // (name, bytes it takes on a local store's disk)
    let names = [
        ("a".repeat(253), 253),
        ("a".repeat(255), 255),
        (format!("{}a", "é".repeat(42)), 253),
        ("é".repeat(127), 762),
        (format!("{}x", "#".repeat(84)), 253),
        ("%".repeat(85), 255),
    ];
    let mut bodies = Vec::new();
    for (i, (name, stored)) in names.iter().enumerate() {
        let answers = write_name_every_way(&s, &i.to_string(), name).await;
        let fits = !local || *stored <= 253;
        let refusal = &answers[0].1;
        for (route, (status, code, message, body)) in &answers {
            let short = &name[..name.char_indices().nth(8).unwrap().0];
            if fits {
                assert!(
                    (200..300).contains(status),
                    "{route} {short}… ({stored} bytes stored): {status} {body}"
                );
            } else {
                assert_eq!(
                    (*status, code.as_str()),
                    (400, "name_too_long"),
                    "{route} {short}… ({stored} bytes stored): {body}"
                );
                assert_eq!(message, &refusal.2, "{route}: the same refusal as PUT's");
                assert!(message.contains(&stored.to_string()), "{message}");
            }
            bodies.push(body.clone());
        }
        let url = ferry::protocol::RemotePath::parse(&format!("{i}/put/{name}"))
            .unwrap()
            .to_url_path();
        let (status, data) = s.get_bytes(&url).await;
        if fits {
            assert_eq!((status, &data[..]), (200, &b"put"[..]));
            for dir in ["session", "mkdir", "rename", "copy", "form"] {
                let listed = s.listed_names(&format!("{i}/{dir}")).await;
                assert_eq!(listed, [name.as_str()], "{dir}");
            }
        } else if *stored <= 255 {
            // The filesystem could hold the name: nothing is there.
            assert_eq!(status, 404);
        } else {
            // It could not: the read is refused as the writes were.
            assert_eq!(status, 400);
        }
    }
    if let Some(dir) = &s.store_dir {
        let root = std::fs::canonicalize(dir).unwrap();
        for body in &bodies {
            assert!(!body.contains(root.to_str().unwrap()), "{body}");
        }
        // Nothing was left of the refused writes, temporary files included.
        for file in s.files_on_disk() {
            assert!(!file.contains('#'), "{file}");
            assert!(!file.contains(&"a".repeat(254)), "{file}");
        }
    }
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
    put_then_list_and_stat,
    listing_pages_with_a_cursor,
    mkdir_and_rmdir,
    listings_and_stat_agree_on_directory_times,
    a_directory_lives_while_it_has_entries,
    rename_files_and_directories,
    copy_files_and_directories,
    multipart_form_upload,
    put_replaces_atomically_and_reports_metadata,
    long_names_are_written_by_every_route_or_refused_alike,
);
