//! The agent against a server with tokens: it sends the token it is given,
//! stays within the token's reach, and exports its counters.

mod harness;

use std::time::Duration;

use harness::{Agent, Server, age, eventually, ferry_bin, remote_listing, write};

/// A token for `prefix` from `ferry token new`, and a server that admits it.
fn server_with_token(dir: &std::path::Path, prefix: &str) -> (Server, String) {
    let (token, entry) = harness::token_new::token_new(&ferry_bin(), "agent", prefix);
    let config = dir.join("ferry.toml");
    std::fs::write(&config, entry).unwrap();
    let server = Server::start_with(
        &dir.join("store"),
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
    );
    (server, token)
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// One sample, -1 when absent (so that a missing gauge never reads as 0).
fn sample(text: &str, name: &str) -> f64 {
    harness::metrics_text::sample(text, name).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_uses_its_token_within_its_prefix_and_exports_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, token) = server_with_token(tmp.path(), "laptop");
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let token_arg = ["--token-file", token_file.to_str().unwrap()];
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "laptop");
    for i in 0..3 {
        write(
            &agent.dir,
            &format!("f{i}.txt"),
            format!("file {i}").as_bytes(),
        );
        age(&agent.path(&format!("f{i}.txt")));
    }
    // Without the token: refused, and it says why.
    let refused = agent.once(&[]);
    assert!(!refused.status.success());
    let log = String::from_utf8_lossy(&refused.stderr);
    assert!(log.contains("token"), "{log}");
    // Outside the token's prefix: refused too.
    let outside = Agent::new(&tmp.path().join("other"), &server, "desktop");
    write(&outside.dir, "x.txt", b"x");
    age(&outside.path("x.txt"));
    let out = outside.once(&token_arg);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    agent.once_ok(&token_arg);
    let client = ferry::client::Client::with_config(
        &server.url,
        ferry::client::ClientConfig {
            token: Some(token.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(remote_listing(&client, "laptop").await.len(), 3);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = token_arg.to_vec();
    args.extend(["--metrics-addr", &addr]);
    agent.start(&args);
    assert!(
        eventually(Duration::from_secs(10), || async {
            std::net::TcpStream::connect(&addr).is_ok()
                && sample(&scrape(&addr), "ferry_agent_tracked_files") == 3.0
        })
        .await,
        "{}",
        agent.log_text()
    );
    write(&agent.dir, "new.bin", &vec![5u8; 100_000]);
    assert!(
        eventually(Duration::from_secs(20), || async {
            let text = scrape(&addr);
            sample(&text, "ferry_agent_tracked_files") == 4.0
                && sample(&text, "ferry_agent_sent_bytes_total") >= 100_000.0
                && sample(&text, "ferry_agent_pending_uploads") == 0.0
        })
        .await,
        "{}\n{}",
        scrape(&addr),
        agent.log_text()
    );
}
