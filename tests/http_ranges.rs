//! Range and cache semantics of `GET/HEAD /v1/files/{path}` on a 10,000-byte file.

mod harness;

use harness::{Server, random_bytes};
use reqwest::header::HeaderMap;

const SIZE: usize = 10_000;

async fn server_with_file(name: &str) -> (Server, Vec<u8>) {
    let server = Server::start();
    let data = random_bytes(SIZE);
    server.put(name, data.clone()).await;
    (server, data)
}

async fn get_with(
    server: &Server,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, HeaderMap, Vec<u8>) {
    let mut req = server.client().get(server.file_url(path));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

fn h<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

fn assert_entity_headers(headers: &HeaderMap, len: usize) {
    assert_eq!(h(headers, "accept-ranges"), Some("bytes"));
    assert!(h(headers, "etag").unwrap().starts_with('"'));
    assert!(h(headers, "last-modified").unwrap().ends_with("GMT"));
    assert_eq!(h(headers, "content-length").unwrap(), len.to_string());
    assert_eq!(h(headers, "content-type"), Some("video/mp4"));
}

#[tokio::test]
async fn single_ranges_return_206_with_the_right_bytes() {
    let (server, data) = server_with_file("clip.mp4").await;
    let cases = [
        ("bytes=0-499", 0, 499),
        ("bytes=500-999", 500, 999),
        ("bytes=-500", 9500, 9999),
        ("bytes=9500-", 9500, 9999),
        ("bytes=0-0", 0, 0),
        ("bytes=9990-20000", 9990, 9999),
    ];
    for (range, start, end) in cases {
        let (status, headers, body) = get_with(&server, "clip.mp4", &[("Range", range)]).await;
        assert_eq!(status, 206, "{range}");
        assert_eq!(
            h(&headers, "content-range").unwrap(),
            format!("bytes {start}-{end}/10000"),
            "{range}"
        );
        assert_entity_headers(&headers, end - start + 1);
        assert_eq!(body, &data[start..=end], "{range}");
    }
}

#[tokio::test]
async fn unsatisfiable_range_is_416_with_the_size() {
    let (server, _) = server_with_file("clip.mp4").await;
    let (status, headers, _) = get_with(&server, "clip.mp4", &[("Range", "bytes=10000-")]).await;
    assert_eq!(status, 416);
    assert_eq!(h(&headers, "content-range"), Some("bytes */10000"));
}

/// Regression: positions too big for a u64 were taken for a malformed
/// header, so both requests got 200 and the whole body.
#[tokio::test]
async fn range_positions_beyond_u64_are_clamped_or_unsatisfiable() {
    let (server, data) = server_with_file("clip.mp4").await;
    let huge = "99999999999999999999999";
    for range in [format!("bytes=0-{huge}"), format!("bytes=-{huge}")] {
        let (status, headers, body) = get_with(&server, "clip.mp4", &[("Range", &range)]).await;
        assert_eq!(status, 206, "{range}");
        assert_eq!(h(&headers, "content-range"), Some("bytes 0-9999/10000"));
        assert_entity_headers(&headers, SIZE);
        assert_eq!(body, data, "{range}");
    }
    let range = format!("bytes={huge}-");
    let (status, headers, _) = get_with(&server, "clip.mp4", &[("Range", &range)]).await;
    assert_eq!(status, 416);
    assert_eq!(h(&headers, "content-range"), Some("bytes */10000"));
}

#[tokio::test]
async fn several_or_malformed_ranges_return_the_full_body() {
    let (server, data) = server_with_file("clip.mp4").await;
    for range in ["bytes=0-1,5-6", "bytes=abc", "lines=1-2", "bytes=7-3"] {
        let (status, headers, body) = get_with(&server, "clip.mp4", &[("Range", range)]).await;
        assert_eq!(status, 200, "{range}");
        assert!(h(&headers, "content-range").is_none());
        assert_entity_headers(&headers, SIZE);
        assert_eq!(body, data, "{range}");
    }
}

#[tokio::test]
async fn if_range_honours_only_the_current_etag() {
    let (server, data) = server_with_file("clip.mp4").await;
    let (_, headers, _) = get_with(&server, "clip.mp4", &[]).await;
    let etag = h(&headers, "etag").unwrap().to_owned();

    let (status, _, body) = get_with(
        &server,
        "clip.mp4",
        &[("Range", "bytes=0-9"), ("If-Range", &etag)],
    )
    .await;
    assert_eq!((status, body.as_slice()), (206, &data[..10]));

    let (status, _, body) = get_with(
        &server,
        "clip.mp4",
        &[("Range", "bytes=0-9"), ("If-Range", "\"stale\"")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, data);
}

#[tokio::test]
async fn conditional_gets() {
    let (server, _) = server_with_file("clip.mp4").await;
    let (_, headers, _) = get_with(&server, "clip.mp4", &[]).await;
    let etag = h(&headers, "etag").unwrap().to_owned();
    let modified = h(&headers, "last-modified").unwrap().to_owned();

    let (status, headers, body) = get_with(&server, "clip.mp4", &[("If-None-Match", &etag)]).await;
    assert_eq!(status, 304);
    assert_eq!(h(&headers, "etag"), Some(etag.as_str()));
    assert!(body.is_empty());

    let (status, _, _) = get_with(&server, "clip.mp4", &[("If-None-Match", "\"other\"")]).await;
    assert_eq!(status, 200);

    let (status, _, _) = get_with(&server, "clip.mp4", &[("If-Modified-Since", &modified)]).await;
    assert_eq!(status, 304);

    let (status, _, _) = get_with(&server, "clip.mp4", &[("If-Match", "\"stale\"")]).await;
    assert_eq!(status, 412);

    let (status, _, _) = get_with(&server, "clip.mp4", &[("If-Match", &etag)]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn conditional_puts() {
    let (server, data) = server_with_file("clip.mp4").await;
    let client = server.client();

    let resp = client
        .put(server.file_url("clip.mp4"))
        .header("If-Match", "\"stale\"")
        .body("new")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 412);

    let resp = client
        .put(server.file_url("clip.mp4"))
        .header("If-None-Match", "*")
        .body("new")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 412);
    assert_eq!(
        server.get_bytes("clip.mp4").await.1,
        data,
        "a refused PUT changed nothing"
    );

    let resp = client
        .put(server.file_url("fresh.txt"))
        .header("If-None-Match", "*")
        .body("new")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    let etag = client
        .head(server.file_url("clip.mp4"))
        .send()
        .await
        .unwrap()
        .headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    let resp = client
        .put(server.file_url("clip.mp4"))
        .header("If-Match", &etag)
        .body("replaced")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(server.get_bytes("clip.mp4").await.1, b"replaced");
}

#[tokio::test]
async fn head_carries_the_get_headers_and_no_body() {
    let (server, _) = server_with_file("clip.mp4").await;
    for range in [None, Some("bytes=100-199")] {
        let mut get = server.client().get(server.file_url("clip.mp4"));
        let mut head = server.client().head(server.file_url("clip.mp4"));
        if let Some(r) = range {
            get = get.header("Range", r);
            head = head.header("Range", r);
        }
        let get = get.send().await.unwrap();
        let head = head.send().await.unwrap();
        assert_eq!(get.status(), head.status());
        for name in [
            "accept-ranges",
            "etag",
            "last-modified",
            "content-length",
            "content-type",
            "content-range",
        ] {
            assert_eq!(get.headers().get(name), head.headers().get(name), "{name}");
        }
        assert!(head.bytes().await.unwrap().is_empty());
    }
}

/// A file dated before 1970 (an unpacked archive's, a scan's) is served
/// like any other, without a `Last-Modified` (an HTTP date cannot express
/// its time). Every request for one used to get an empty reply (the
/// request's task panicked), and `ferry get` retried for ever.
#[tokio::test]
async fn files_dated_outside_what_http_dates_express_are_served() {
    use std::time::{Duration, SystemTime};
    let server = Server::start();
    let data = random_bytes(5000);
    let year = Duration::from_secs(365 * 86_400);
    for (name, mtime) in [
        ("1965.bin", SystemTime::UNIX_EPOCH - 5 * year),
        (
            "1969.bin",
            SystemTime::UNIX_EPOCH - Duration::from_millis(500),
        ),
    ] {
        let path = server.store_dir.as_ref().unwrap().join(name);
        std::fs::write(&path, &data).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(mtime))
            .unwrap();
        let get = server.client().get(server.file_url(name)).send().await;
        let get = get.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(get.status(), 200, "{name}");
        assert!(get.headers().get("last-modified").is_none(), "{name}");
        assert!(get.headers().get("etag").is_some(), "{name}");
        assert!(get.bytes().await.unwrap() == data, "{name}");
        let ranged = server
            .client()
            .head(server.file_url(name))
            .header("Range", "bytes=10-19")
            .header("If-Modified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")
            .send()
            .await
            .unwrap();
        assert_eq!(ranged.status(), 304, "{name}: older than any HTTP date");

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(name);
        // Bounded: it used to retry for ever.
        let got = std::process::Command::new("timeout")
            .arg("60")
            .arg(env!("CARGO_BIN_EXE_ferry"))
            .args(["get", name])
            .arg(&out)
            .env("FERRY_SERVER", &server.url)
            .env("FERRY_STATE_DIR", dir.path())
            .env("FERRY_LOG", "warn")
            .output()
            .unwrap();
        assert!(got.status.success(), "{name}: {got:?}");
        assert!(std::fs::read(&out).unwrap() == data, "{name}");
    }
}

#[tokio::test]
async fn download_query_asks_for_an_attachment() {
    let (server, _) = server_with_file("clip.mp4").await;
    let resp = server
        .client()
        .get(server.file_url("clip.mp4?download=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-disposition"],
        "attachment; filename*=UTF-8''clip%2Emp4"
    );
}

#[tokio::test]
async fn content_type_follows_the_extension() {
    let server = Server::start();
    for (name, mime) in [
        ("a.mp4", "video/mp4"),
        ("b.txt", "text/plain"),
        ("c.unknownext", "application/octet-stream"),
        // What streaming players check for.
        ("seg/00001.ts", "video/mp2t"),
        ("live/index.m3u8", "application/vnd.apple.mpegurl"),
        ("song.M4A", "audio/mp4"),
        ("dash/manifest.mpd", "application/dash+xml"),
    ] {
        server.put(name, "x").await;
        let resp = server
            .client()
            .get(server.file_url(name))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], mime, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_range_requests_get_the_right_bytes() {
    let server = Server::start();
    let data = random_bytes(8 << 20);
    server.put("big.bin", data.clone()).await;
    let client = server.client();
    let url = server.file_url("big.bin");
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let (client, url) = (client.clone(), url.clone());
        let start = (i * 40_503) % (8 << 20);
        let end = (start + 65_535 + i * 977).min((8 << 20) - 1);
        tasks.push(tokio::spawn(async move {
            let resp = client
                .get(url)
                .header("Range", format!("bytes={start}-{end}"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 206);
            (start as usize, end as usize, resp.bytes().await.unwrap())
        }));
    }
    for task in tasks {
        let (start, end, body) = task.await.unwrap();
        assert!(body[..] == data[start..=end], "range {start}-{end} differs");
    }
}
