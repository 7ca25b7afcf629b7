//! The first sync of a large tree, and the pass after it.

mod harness;

use harness::{
    Agent, Server, age, diff, journal_tree, local_tree, random_bytes, remote_listing, remote_tree,
    write,
};

/// Names with spaces, accents, CJK and emoji.
const NAMES: &[&str] = &[
    "report",
    "café au lait",
    "日本語",
    "🎉 party",
    "naïve-ﬁle",
    "Ωmega",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_of_2000_files_gives_an_identical_remote_tree_and_a_second_pass_sends_nothing()
{
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "backup/laptop");

    // Mostly small files (0 B to 8 KiB) in nested directories, a few big ones.
    let big = [1 << 20, 3 << 20, 5 << 20, 8 << 20, 20 << 20];
    for i in 0..2000usize {
        let dir = format!("d{}/{}/e{}", i % 10, NAMES[i % NAMES.len()], i % 4);
        let size = if i < big.len() {
            big[i]
        } else if i % 97 == 0 {
            0
        } else {
            (i * 131) % 8192
        };
        let rel = format!("{dir}/{} {i}.bin", NAMES[(i / 7) % NAMES.len()]);
        write(&agent.dir, &rel, &random_bytes(size));
        age(&agent.path(&rel));
    }
    let local = local_tree(&agent.dir);
    assert_eq!(local.len(), 2000);

    agent.once_ok(&[]);
    let client = server.client();
    let remote = remote_tree(&client, "backup/laptop").await;
    assert!(remote == local, "{}", diff(&local, &remote));
    // The journal records what was sent: each file's size and digest.
    let journal = journal_tree(&agent);
    assert!(journal == local, "{}", diff(&local, &journal));

    let sessions = server.session_count();
    let etags = remote_listing(&client, "backup/laptop").await;
    let log = agent.once_ok(&[]);
    assert_eq!(
        server.session_count(),
        sessions,
        "the second pass uploaded something:\n{log}"
    );
    assert_eq!(remote_listing(&client, "backup/laptop").await, etags);
    assert!(log.contains("2000 unchanged"), "{log}");

    let status = agent.status();
    assert!(status.contains("synced:          2000 files"), "{status}");
    assert!(status.contains("pending uploads: 0"), "{status}");
}
