//! Hitting the inotify watch limit is reported, and rescans take over.

mod harness;

use std::time::Duration;

use harness::{Agent, Server, age, eventually, remote_bytes, remote_listing, write};

/// Runs the agent in a user namespace of its own whose inotify watch limit
/// is 8, so the limit is real without touching the machine's setting.
const LOW_WATCH_LIMIT: &[&str] = &[
    "unshare",
    "--user",
    "--map-root-user",
    "sh",
    "-c",
    "echo 8 > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\"",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_limit_is_named_and_periodic_rescans_take_over() {
    let probe = std::process::Command::new(LOW_WATCH_LIMIT[0])
        .args(&LOW_WATCH_LIMIT[1..])
        .arg("true")
        .status()
        .expect("running unshare (util-linux)");
    assert!(
        probe.success(),
        "this test needs unprivileged user namespaces (unshare --user)"
    );

    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "wl");
    for i in 0..30 {
        let rel = format!("d{i}/f.txt");
        write(&agent.dir, &rel, b"x");
        age(&agent.path(&rel));
    }
    agent.start_wrapped(LOW_WATCH_LIMIT, &["--rescan-interval", "3s"]);
    let client = server.client();
    assert!(
        eventually(Duration::from_secs(30), || async {
            remote_listing(&client, "wl").await.len() == 30
        })
        .await,
        "{}",
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(log.contains("inotify watch limit is reached"), "{log}");
    assert!(log.contains("fs.inotify.max_user_watches"), "{log}");
    assert!(log.contains("rescanned every 3 s"), "{log}");

    // A change in a directory that could not be watched still arrives.
    write(&agent.dir, "d29/late.txt", b"found by a rescan");
    assert!(
        eventually(Duration::from_secs(15), || async {
            remote_bytes(&client, "wl/d29/late.txt").await.as_deref()
                == Some(&b"found by a rescan"[..])
        })
        .await,
        "{}",
        agent.log_text()
    );
}
