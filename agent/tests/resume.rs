//! A killed agent resumes its uploads where they stood.

mod harness;

use std::io::Write;
use std::time::Duration;

use ferry::protocol::upload::UploadState;
use harness::{
    Agent, Server, age, diff, eventually, local_tree, pending_session, random_bytes, remote_tree,
    write,
};

const BIG: usize = 500 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_halfway_then_restart_resumes_the_big_file_from_its_session() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "resume");
    for i in 0..1000 {
        let rel = format!("small/{}/{i}.txt", i % 10);
        write(&agent.dir, &rel, &random_bytes(1024 + i));
        age(&agent.path(&rel));
    }
    let block = random_bytes(1 << 20);
    let mut big = std::fs::File::create(agent.path("big.bin")).unwrap();
    for i in 0..(BIG >> 20) {
        big.write_all(&(i as u64).to_be_bytes()).unwrap();
        big.write_all(&block[8..]).unwrap();
    }
    drop(big);
    age(&agent.path("big.bin"));

    // Slowed down, so that it can be caught halfway through both.
    agent.start(&["--bwlimit", "40M", "--transfers", "1"]);
    let client = server.client();
    let mut session = None;
    assert!(
        eventually(Duration::from_secs(60), || {
            session = pending_session(&agent, "big.bin");
            std::future::ready(session.is_some())
        })
        .await,
        "no session for big.bin was journaled:\n{}",
        agent.log_text()
    );
    let session = session.unwrap();
    let mut received = 0;
    assert!(
        eventually(Duration::from_secs(60), || {
            let (client, session) = (client.clone(), session.clone());
            async move { client.upload_status(&session).await.unwrap().bytes_received >= 64 << 20 }
        })
        .await
    );
    agent.signal("KILL");
    agent.wait(Duration::from_secs(10));
    let status = client.upload_status(&session).await.unwrap();
    assert_eq!(status.state, UploadState::Open);
    assert!(
        status.bytes_received < BIG as u64,
        "the upload finished before the kill"
    );
    received = received.max(status.bytes_received);
    let remote_small = harness::remote_listing(&client, "resume/small").await.len();
    assert!(
        remote_small < 1000,
        "all small files were done before the kill"
    );

    let log = agent.once_ok(&[]);
    assert!(
        log.contains(&format!(
            "resuming an interrupted upload path=\"big.bin\" session=\"{session}\""
        )),
        "{log}"
    );
    let status = client.upload_status(&session).await.unwrap();
    assert_eq!(
        status.state,
        UploadState::Committed,
        "big.bin was sent in another session"
    );
    let resumed: u64 = log
        .lines()
        .find(|l| l.contains("uploaded path=\"big.bin\""))
        .and_then(|l| l.split("resumed_bytes=").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no upload line for big.bin:\n{log}"));
    assert!(
        resumed >= received,
        "resumed from {resumed}, but {received} bytes were on the server"
    );

    let local = local_tree(&agent.dir);
    let remote = remote_tree(&client, "resume").await;
    assert!(remote == local, "{}", diff(&local, &remote));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_mid_upload_and_the_next_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "term");
    write(&agent.dir, "video.mp4", &random_bytes(64 << 20));
    age(&agent.path("video.mp4"));
    agent.start(&["--bwlimit", "8M"]);
    let client = server.client();
    let mut session = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            session = pending_session(&agent, "video.mp4");
            std::future::ready(session.is_some())
        })
        .await,
        "{}",
        agent.log_text()
    );
    let session = session.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || {
            let (client, session) = (client.clone(), session.clone());
            async move { client.upload_status(&session).await.unwrap().bytes_received >= 8 << 20 }
        })
        .await
    );
    let stopping = std::time::Instant::now();
    agent.signal("TERM");
    let exit = agent.wait(Duration::from_secs(20));
    assert!(exit.success(), "{}", agent.log_text());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        stopping.elapsed()
    );
    assert!(
        agent
            .log_text()
            .contains("stopping: letting chunks in flight finish")
    );
    let status = client.upload_status(&session).await.unwrap();
    assert_eq!(
        status.state,
        UploadState::Open,
        "the upload was not interrupted"
    );
    assert!(
        agent
            .status()
            .contains(&format!("video.mp4 (67108864 bytes, session {session})"))
    );

    let log = agent.once_ok(&[]);
    assert!(log.contains("resuming an interrupted upload"), "{log}");
    assert_eq!(
        client.upload_status(&session).await.unwrap().state,
        UploadState::Committed
    );
    assert_eq!(
        harness::remote_bytes(&client, "term/video.mp4")
            .await
            .map(|d| harness::sha256(&d)),
        local_tree(&agent.dir)
            .get("video.mp4")
            .map(|(_, sha)| sha.clone())
    );
}

/// A run killed between the server's commit and its own journal entry
/// leaves a pending session that did commit. The next run records it as its
/// own version, so a later local delete still reaches the server instead of
/// being taken for a change made elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_committed_just_before_a_kill_is_recorded_as_ours() {
    use std::os::unix::fs::MetadataExt;

    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "killed");
    write(&agent.dir, "doc.txt", b"first version");
    age(&agent.path("doc.txt"));
    agent.once_ok(&[]);

    // What the killed run did: the second version committed through a
    // session it had journaled, and nothing recorded after that.
    write(&agent.dir, "doc.txt", b"second version, committed");
    let client = server.client();
    let remote = ferry::protocol::RemotePath::parse("killed/doc.txt").unwrap();
    let report = ferry::client::upload::upload_file(
        &client,
        &agent.path("doc.txt"),
        &remote,
        Default::default(),
    )
    .await
    .unwrap();
    let meta = std::fs::metadata(agent.path("doc.txt")).unwrap();
    let db = rusqlite::Connection::open(agent.state_db()).unwrap();
    db.execute(
        "INSERT INTO pending (path, target, session_id, size, mtime_ns, inode, sha256)
         VALUES ('doc.txt', 'killed/doc.txt', ?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![
            report.session_id,
            meta.len() as i64,
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            meta.ino() as i64,
            harness::sha256(b"second version, committed"),
        ],
    )
    .unwrap();
    drop(db);

    std::fs::remove_file(agent.path("doc.txt")).unwrap();
    let log = agent.once_ok(&["--max-delete", "1"]);
    assert!(
        log.contains("recorded an upload committed before the last stop"),
        "{log}"
    );
    assert_eq!(
        client.stat(&remote).await.err().map(|e| e.code()),
        Some(ferry::protocol::ErrorCode::NotFound),
        "the delete was not passed on:\n{log}"
    );
}

/// A run killed after the server renamed a file or a directory and before
/// the journal followed: the next start sees the rename made and records it,
/// so a later local delete of the renamed files reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_made_just_before_a_kill_is_recorded_as_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "killed");
    write(&agent.dir, "doc.txt", b"a file");
    write(&agent.dir, "dir/inner.txt", b"a file in a directory");
    age(&agent.path("doc.txt"));
    age(&agent.path("dir/inner.txt"));
    agent.once_ok(&[]);

    // What the killed run did: both renames noted, sent and made, and
    // nothing recorded after that.
    let client = server.client();
    let db = rusqlite::Connection::open(agent.state_db()).unwrap();
    for (from, to, dir) in [("doc.txt", "moved.txt", false), ("dir", "moved-dir", true)] {
        std::fs::rename(agent.path(from), agent.path(to)).unwrap();
        client
            .rename(&ferry::protocol::MoveRequest {
                from: ferry::protocol::RemotePath::parse(&format!("killed/{from}")).unwrap(),
                to: ferry::protocol::RemotePath::parse(&format!("killed/{to}")).unwrap(),
                overwrite: false,
                recursive: dir,
            })
            .await
            .unwrap();
        db.execute(
            "INSERT INTO moves (from_path, to_path, dir) VALUES (?1, ?2, ?3)",
            rusqlite::params![from, to, dir],
        )
        .unwrap();
    }
    drop(db);

    std::fs::remove_file(agent.path("moved.txt")).unwrap();
    std::fs::remove_dir_all(agent.path("moved-dir")).unwrap();
    let log = agent.once_ok(&["--max-delete", "2"]);
    assert_eq!(
        log.matches("recorded a rename made before the last stop")
            .count(),
        2,
        "{log}"
    );
    let left = harness::remote_listing(&client, "killed").await;
    assert!(
        left.is_empty(),
        "the deletes were not passed on: {left:?}\n{log}"
    );
}

/// Uploads interrupted by a kill, whose files are then deleted or renamed
/// while the agent is stopped: the next start aborts their sessions (the
/// server frees what they staged) and forgets them. They used to stay
/// "pending" for good, and the sessions open until they expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_uploads_of_files_removed_or_renamed_meanwhile_are_aborted() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "gone");
    for name in ["removed.bin", "renamed.bin"] {
        write(&agent.dir, name, &random_bytes(16 << 20));
        age(&agent.path(name));
    }
    agent.start(&["--bwlimit", "4M", "--transfers", "2"]);
    let client = server.client();
    let mut sessions = Vec::new();
    for name in ["removed.bin", "renamed.bin"] {
        let mut session = None;
        assert!(
            eventually(Duration::from_secs(30), || {
                session = pending_session(&agent, name);
                std::future::ready(session.is_some())
            })
            .await,
            "no session for {name} was journaled:\n{}",
            agent.log_text()
        );
        let session = session.unwrap();
        assert!(
            eventually(Duration::from_secs(30), || {
                let (client, session) = (client.clone(), session.clone());
                async move { client.upload_status(&session).await.unwrap().bytes_received > 0 }
            })
            .await
        );
        sessions.push(session);
    }
    agent.signal("KILL");
    agent.wait(Duration::from_secs(10));
    for session in &sessions {
        let status = client.upload_status(session).await.unwrap();
        assert_eq!(status.state, UploadState::Open, "finished before the kill");
    }

    std::fs::remove_file(agent.path("removed.bin")).unwrap();
    std::fs::rename(agent.path("renamed.bin"), agent.path("renamed-later.bin")).unwrap();
    let log = agent.once_ok(&[]);
    for session in &sessions {
        let status = client.upload_status(session).await;
        assert_eq!(
            status.err().map(|e| e.code()),
            Some(ferry::protocol::ErrorCode::NotFound),
            "session {session} was not aborted:\n{log}"
        );
    }
    assert_eq!(
        log.matches("dropped an interrupted upload").count(),
        2,
        "{log}"
    );
    assert!(
        agent.status().contains("pending uploads: 0"),
        "{}",
        agent.status()
    );
    let local = local_tree(&agent.dir);
    let remote = remote_tree(&client, "gone").await;
    assert!(remote == local, "{}", diff(&local, &remote));
}
