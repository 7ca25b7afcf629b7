//! Hard links: a file with several names in the folder is a remote file
//! under each name, and each of them follows the local content. File
//! watching reports a write under the name written to only; the agent has
//! to find the file's other names itself, not leave them stale until the
//! next rescan.

mod harness;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use ferry::client::Client;
use harness::{Agent, Server, age, eventually, remote_bytes, remote_listing, write};

/// How long the remote may lag behind a change: generous for a loaded
/// machine, and far below the rescan interval the agents run with.
const FOLLOW: Duration = Duration::from_secs(60);
/// No full pass but the first one: what follows a change is the watching.
const NO_RESCAN: [&str; 2] = ["--rescan-interval", "1d"];

/// Polls until the remote file at `path` has `want` (`None`: no file).
async fn remote_has(client: &Client, path: &str, want: Option<&[u8]>) -> bool {
    eventually(FOLLOW, || async {
        remote_bytes(client, path).await.as_deref() == want
    })
    .await
}

fn same_inode(a: &std::path::Path, b: &std::path::Path) -> bool {
    std::fs::metadata(a).unwrap().ino() == std::fs::metadata(b).unwrap().ino()
}

/// Full passes the agent logged: only the start-up one is expected.
fn full_passes(agent: &Agent) -> usize {
    agent.log_text().matches("full pass:").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_hard_link_reaches_every_name() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "links");
    for i in 0..4 {
        write(
            &agent.dir,
            &format!("pad{i}"),
            format!("pad {i}").as_bytes(),
        );
    }
    write(&agent.dir, "a.txt", b"first version");
    std::fs::create_dir_all(agent.path("b")).unwrap();
    std::fs::hard_link(agent.path("a.txt"), agent.path("b/a-link.txt")).unwrap();
    // Also linked from outside the folder: only the names inside are synced.
    let outside = tmp.path().join("outside.txt");
    write(&agent.dir, "ext.txt", b"linked from outside");
    std::fs::hard_link(agent.path("ext.txt"), &outside).unwrap();
    for rel in ["pad0", "pad1", "pad2", "pad3", "a.txt", "ext.txt"] {
        age(&agent.path(rel));
    }
    agent.start(&NO_RESCAN);
    let client = server.client();
    assert!(
        eventually(FOLLOW, || async {
            remote_listing(&client, "links").await.len() == 7
        })
        .await,
        "initial sync did not finish:\n{}",
        agent.log_text()
    );
    assert!(remote_has(&client, "links/b/a-link.txt", Some(b"first version")).await);

    // Rewritten in place through a.txt: one inode, two names.
    std::fs::write(
        agent.path("a.txt"),
        b"second version, written through a.txt",
    )
    .unwrap();
    assert!(same_inode(
        &agent.path("a.txt"),
        &agent.path("b/a-link.txt")
    ));
    for path in ["links/a.txt", "links/b/a-link.txt"] {
        assert!(
            remote_has(
                &client,
                path,
                Some(b"second version, written through a.txt")
            )
            .await,
            "{path} did not follow a write through a.txt:\n{}",
            agent.log_text()
        );
    }

    // And the other way round, through the link in the subdirectory.
    std::fs::write(agent.path("b/a-link.txt"), b"third, through the link").unwrap();
    for path in ["links/a.txt", "links/b/a-link.txt"] {
        assert!(
            remote_has(&client, path, Some(b"third, through the link")).await,
            "{path} did not follow a write through b/a-link.txt:\n{}",
            agent.log_text()
        );
    }

    // A file whose other name is outside the folder is pushed as any other.
    std::fs::write(agent.path("ext.txt"), b"changed inside").unwrap();
    assert!(
        remote_has(&client, "links/ext.txt", Some(b"changed inside")).await,
        "{}",
        agent.log_text()
    );
    assert_eq!(std::fs::read(&outside).unwrap(), b"changed inside");
    assert_eq!(
        remote_listing(&client, "links").await.len(),
        7,
        "{}",
        agent.log_text()
    );

    assert_eq!(
        full_passes(&agent),
        1,
        "a rescan ran; it is not what is tested:\n{}",
        agent.log_text()
    );
    agent.signal("TERM");
    assert!(
        agent.wait(Duration::from_secs(30)).success(),
        "{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_hard_link_is_pushed_and_removing_one_deletes_only_that_name() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "newlink");
    for i in 0..4 {
        let rel = format!("b/pad{i}");
        write(&agent.dir, &rel, format!("pad {i}").as_bytes());
        age(&agent.path(&rel));
    }
    write(&agent.dir, "a.txt", b"shared content");
    age(&agent.path("a.txt"));
    agent.start(&NO_RESCAN);
    let client = server.client();
    assert!(
        eventually(FOLLOW, || async {
            remote_listing(&client, "newlink").await.len() == 5
        })
        .await,
        "initial sync did not finish:\n{}",
        agent.log_text()
    );

    // A new name of a file already synced: pushed, and not taken for a
    // rename (a.txt is still there).
    std::fs::hard_link(agent.path("a.txt"), agent.path("b/a-link.txt")).unwrap();
    assert!(
        remote_has(&client, "newlink/b/a-link.txt", Some(b"shared content")).await,
        "the new link was not pushed:\n{}",
        agent.log_text()
    );
    std::fs::hard_link(agent.path("a.txt"), agent.path("c.txt")).unwrap();
    assert!(
        remote_has(&client, "newlink/c.txt", Some(b"shared content")).await,
        "the new link was not pushed:\n{}",
        agent.log_text()
    );
    assert_eq!(
        remote_bytes(&client, "newlink/a.txt").await.as_deref(),
        Some(&b"shared content"[..]),
        "{}",
        agent.log_text()
    );

    // One name removed: that remote file goes, the others stay.
    std::fs::remove_file(agent.path("b/a-link.txt")).unwrap();
    assert!(
        remote_has(&client, "newlink/b/a-link.txt", None).await,
        "the removed link was not deleted:\n{}",
        agent.log_text()
    );
    for path in ["newlink/a.txt", "newlink/c.txt"] {
        assert_eq!(
            remote_bytes(&client, path).await.as_deref(),
            Some(&b"shared content"[..]),
            "{path}:\n{}",
            agent.log_text()
        );
    }

    // The names left still follow each other.
    std::fs::write(agent.path("c.txt"), b"edited through c.txt").unwrap();
    for path in ["newlink/a.txt", "newlink/c.txt"] {
        assert!(
            remote_has(&client, path, Some(b"edited through c.txt")).await,
            "{path} did not follow a write through c.txt:\n{}",
            agent.log_text()
        );
    }
    assert_eq!(
        remote_bytes(&client, "newlink/b/a-link.txt").await,
        None,
        "{}",
        agent.log_text()
    );
    assert_eq!(
        full_passes(&agent),
        1,
        "a rescan ran; it is not what is tested:\n{}",
        agent.log_text()
    );
}
