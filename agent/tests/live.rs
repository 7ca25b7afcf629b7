//! A running agent follows changes as they happen.

mod harness;

use std::io::Write;
use std::time::Duration;

use ferry::client::watch::{WatchEvent, Watcher};
use ferry::protocol::RemotePath;
use harness::{
    Agent, Server, age, eventually, pending_session, random_bytes, remote_bytes, remote_listing,
    write,
};

/// How long the remote may lag behind a change.
const FOLLOW: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_modify_append_delete_and_renames_are_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "live");
    for i in 0..500 {
        let rel = format!("album/{i:04}.jpg");
        write(&agent.dir, &rel, format!("photo {i}").repeat(50).as_bytes());
        age(&agent.path(&rel));
    }
    write(&agent.dir, "notes.txt", b"first notes");
    write(&agent.dir, "log.txt", b"line 1\n");
    age(&agent.path("notes.txt"));
    age(&agent.path("log.txt"));
    agent.start(&[]);
    let client = server.client();
    assert!(
        eventually(Duration::from_secs(60), || async {
            remote_listing(&client, "live").await.len() == 502
        })
        .await,
        "initial sync did not finish:\n{}",
        agent.log_text()
    );

    let has = |path: &'static str, want: Option<Vec<u8>>| {
        let client = client.clone();
        async move {
            eventually(FOLLOW, || {
                let (client, want) = (client.clone(), want.clone());
                async move { remote_bytes(&client, path).await == want }
            })
            .await
        }
    };

    write(&agent.dir, "new.txt", b"created");
    assert!(
        has("live/new.txt", Some(b"created".to_vec())).await,
        "create:\n{}",
        agent.log_text()
    );

    write(&agent.dir, "notes.txt", b"second version of the notes");
    assert!(
        has(
            "live/notes.txt",
            Some(b"second version of the notes".to_vec())
        )
        .await,
        "modify:\n{}",
        agent.log_text()
    );

    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(agent.path("log.txt"))
        .unwrap();
    log.write_all(b"line 2\n").unwrap();
    drop(log);
    assert!(
        has("live/log.txt", Some(b"line 1\nline 2\n".to_vec())).await,
        "append:\n{}",
        agent.log_text()
    );

    std::fs::remove_file(agent.path("new.txt")).unwrap();
    assert!(
        has("live/new.txt", None).await,
        "delete:\n{}",
        agent.log_text()
    );

    // A file rename is a server-side rename: no upload session, same stored object.
    let sessions = server.session_count();
    let inode = server.stored_inode("live/notes.txt");
    std::fs::rename(agent.path("notes.txt"), agent.path("notes-renamed.txt")).unwrap();
    assert!(
        has(
            "live/notes-renamed.txt",
            Some(b"second version of the notes".to_vec())
        )
        .await,
        "rename:\n{}",
        agent.log_text()
    );
    assert!(has("live/notes.txt", None).await);
    assert_eq!(
        server.session_count(),
        sessions,
        "the rename uploaded the file again"
    );
    assert_eq!(server.stored_inode("live/notes-renamed.txt"), inode);

    // A directory rename moves 500 files without sending their contents.
    let inodes: Vec<u64> = (0..500)
        .step_by(50)
        .map(|i| server.stored_inode(&format!("live/album/{i:04}.jpg")))
        .collect();
    std::fs::rename(agent.path("album"), agent.path("album-2024")).unwrap();
    assert!(
        eventually(FOLLOW, || async {
            let listing = remote_listing(&client, "live").await;
            listing
                .keys()
                .filter(|k| k.starts_with("album-2024/"))
                .count()
                == 500
                && !listing.keys().any(|k| k.starts_with("album/"))
        })
        .await,
        "directory rename:\n{}",
        agent.log_text()
    );
    assert_eq!(
        server.session_count(),
        sessions,
        "the directory rename uploaded files"
    );
    let moved: Vec<u64> = (0..500)
        .step_by(50)
        .map(|i| server.stored_inode(&format!("live/album-2024/{i:04}.jpg")))
        .collect();
    assert_eq!(
        moved, inodes,
        "the stored objects were rewritten, not renamed"
    );
    assert_eq!(
        remote_bytes(&client, "live/album-2024/0123.jpg")
            .await
            .unwrap(),
        "photo 123".repeat(50).as_bytes()
    );

    // A copy then a delete (a new inode) is found by content: a rename too.
    std::fs::copy(agent.path("notes-renamed.txt"), agent.path("copied.txt")).unwrap();
    std::fs::remove_file(agent.path("notes-renamed.txt")).unwrap();
    assert!(
        has(
            "live/copied.txt",
            Some(b"second version of the notes".to_vec())
        )
        .await,
        "copy and delete:\n{}",
        agent.log_text()
    );
    assert!(has("live/notes-renamed.txt", None).await);
    assert_eq!(
        server.session_count(),
        sessions,
        "the copied file was uploaded"
    );
    assert_eq!(server.stored_inode("live/copied.txt"), inode);

    agent.signal("TERM");
    assert!(
        agent.wait(Duration::from_secs(20)).success(),
        "{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_slowly_is_committed_once_and_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "slow");
    let client = server.client();

    // Every commit under the prefix shows up on the change feed, once it has
    // subscribed: probe until a probe's commit arrives.
    let mut feed = Watcher::start(&client, &RemotePath::parse("slow").unwrap());
    let feed_started = async {
        loop {
            client
                .put_bytes(&RemotePath::parse("slow/probe").unwrap(), "p".into())
                .await
                .unwrap();
            while let Ok(event) = tokio::time::timeout(Duration::from_secs(1), feed.next()).await {
                match event {
                    Some(WatchEvent::Change(c)) if c.path.as_str() == "slow/probe" => return,
                    Some(_) => {}
                    None => panic!("the watcher stopped"),
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), feed_started)
        .await
        .expect("the change feed did not start");

    agent.start(&[]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut expected = Vec::new();
    let mut file = std::fs::File::create(agent.path("recording.wav")).unwrap();
    for i in 0..20u8 {
        let piece = vec![i; 64 << 10];
        file.write_all(&piece).unwrap();
        file.flush().unwrap();
        expected.extend_from_slice(&piece);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(file);

    assert!(
        eventually(FOLLOW, || async {
            remote_bytes(&client, "slow/recording.wav").await.as_deref() == Some(&expected[..])
        })
        .await,
        "the finished file was not pushed:\n{}",
        agent.log_text()
    );
    // Give a second commit the time to happen, if there were one.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut commits = 0;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(200), feed.next()).await
    {
        if let WatchEvent::Change(c) = event {
            if c.path.as_str() == "slow/recording.wav" {
                commits += 1;
                assert_eq!(
                    c.size,
                    Some(expected.len() as u64),
                    "a partial version was committed"
                );
            }
        }
    }
    assert_eq!(commits, 1, "{}", agent.log_text());
}

/// A writer closing a file is taken as its being done: the file is pushed
/// at once, without waiting for it to stay unchanged for the settle time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_file_is_pushed_without_waiting_to_settle() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "closed");
    agent.start(&[]);
    let client = server.client();
    assert!(
        eventually(FOLLOW, || async { agent.log_text().contains("full pass:") }).await,
        "{}",
        agent.log_text()
    );
    for round in 0..3 {
        let body = format!("edit {round}");
        write(&agent.dir, "notes.txt", body.as_bytes());
        assert!(
            eventually(FOLLOW, || async {
                remote_bytes(&client, "closed/notes.txt").await.as_deref() == Some(body.as_bytes())
            })
            .await,
            "{}",
            agent.log_text()
        );
    }
    // Its write and its close are separate events: a pass that runs between
    // them finds the file still being written and schedules a look after the
    // settle time. The close must push it long before that.
    let log = agent.log_text();
    let lines: Vec<&str> = log.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if !(line.contains("still being written") && line.contains("path=\"notes.txt\"")) {
            continue;
        }
        let wait = log_duration(line, "wait=");
        let pushed = lines[i..]
            .iter()
            .find(|l| l.contains("uploaded path=\"notes.txt\""))
            .unwrap_or_else(|| panic!("never pushed after waiting:\n{log}"));
        let took = log_time(pushed) - log_time(line);
        assert!(
            took.to_std().unwrap() < wait,
            "a closed file waited to settle:\n{log}"
        );
    }
}

/// The timestamp that starts a log line.
fn log_time(line: &str) -> chrono::DateTime<chrono::FixedOffset> {
    let stamp = line.split_whitespace().next().unwrap();
    chrono::DateTime::parse_from_rfc3339(stamp).unwrap()
}

/// A `Duration` field (`Debug` form, e.g. `1.5s` or `250ms`) of a log line.
fn log_duration(line: &str, field: &str) -> Duration {
    let value = line
        .split(field)
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let (number, unit) =
        value.split_at(value.find(|c: char| c.is_alphabetic() || c == 'µ').unwrap());
    let number: f64 = number.parse().unwrap();
    Duration::from_secs_f64(match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" => number / 1e6,
        "ns" => number / 1e9,
        other => panic!("unit {other} in {line}"),
    })
}

/// Regression: the agent's own directory reads (open events on the watched
/// directories) used to trigger a pass, whose reads triggered the next one.
/// And its journal's writes must not either, wherever in the folder it is
/// kept: in its default directory, in the folder itself, or in a directory
/// of it named through a symlink. None of its files is synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_does_not_react_to_its_own_scans() {
    for kept in ["by default", "in the folder", "through a symlink"] {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start(&tmp.path().join("store"));
        let mut agent = Agent::new(&tmp.path().join("folder"), &server, "idle");
        for i in 0..20 {
            let rel = format!("d{}/f{i}", i % 4);
            write(&agent.dir, &rel, b"x");
            age(&agent.path(&rel));
        }
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&agent.dir, &link).unwrap();
        let state = match kept {
            "in the folder" => Some(agent.path("agent.db")),
            "through a symlink" => Some(link.join("state")),
            _ => None,
        };
        let state_args = match &state {
            Some(state) => vec!["--state", state.to_str().unwrap()],
            None => Vec::new(),
        };
        agent.start(&state_args);
        let client = server.client();
        assert!(
            eventually(Duration::from_secs(30), || async {
                remote_listing(&client, "idle").await.len() == 20
            })
            .await,
            "{kept}: {:?}",
            remote_listing(&client, "idle").await.keys()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = agent.log_text().matches("partial pass").count();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let log = agent.log_text();
        assert_eq!(
            log.matches("partial pass").count(),
            before,
            "{kept}: passes while idle:\n{log}"
        );
        // It still reacts to real changes, and syncs nothing of its own.
        write(&agent.dir, "d1/new", b"new");
        assert!(
            eventually(FOLLOW, || async {
                remote_bytes(&client, "idle/d1/new").await.as_deref() == Some(&b"new"[..])
            })
            .await
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let listed = remote_listing(&client, "idle").await;
        assert_eq!(listed.len(), 21, "{kept}: {:?}", listed.keys());
        agent.signal("TERM");
        agent.wait(Duration::from_secs(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_change_is_pushed_while_a_big_upload_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "busy");
    write(&agent.dir, "video.mkv", &random_bytes(96 << 20));
    age(&agent.path("video.mkv"));
    // About 12 s for the video.
    agent.start(&["--bwlimit", "8M"]);
    let mut session = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            session = pending_session(&agent, "video.mkv");
            std::future::ready(session.is_some())
        })
        .await,
        "{}",
        agent.log_text()
    );
    let client = server.client();
    write(&agent.dir, "notes.txt", b"written during the upload");
    assert!(
        eventually(FOLLOW, || async {
            remote_bytes(&client, "busy/notes.txt").await.as_deref()
                == Some(&b"written during the upload"[..])
        })
        .await,
        "{}",
        agent.log_text()
    );
    let status = client.upload_status(&session.unwrap()).await.unwrap();
    assert_eq!(
        status.state,
        ferry::protocol::upload::UploadState::Open,
        "the small file waited for the big upload"
    );
}

/// A synced file renamed over a new file while that one is still being
/// uploaded (`mv a.txt big.bin`). The agent used to rename `a.txt` to
/// `big.bin` on the server at once; the upload in flight, which creates
/// `big.bin` only if the server has no file there, then found the agent's
/// own rename there, took it for someone else's file and kept both:
/// `big.bin.conflict-…` appeared, and `big.bin` was no longer deleted or
/// renamed with the local file, as a conflict leaves the name to the other
/// writer. The same happened when a pass saw a moved file under its new
/// name before the events of its old one arrived (random_changes_… in
/// churn.rs, now and then). Now the rename waits for the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_renamed_over_a_new_file_being_uploaded_is_no_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "over");
    write(&agent.dir, "a.txt", b"renamed over the upload");
    age(&agent.path("a.txt"));
    // About 8 s for big.bin.
    agent.start(&["--bwlimit", "256K", "--max-delete", "10"]);
    let client = server.client();
    assert!(
        eventually(FOLLOW, || async {
            remote_bytes(&client, "over/a.txt").await.is_some()
        })
        .await,
        "{}",
        agent.log_text()
    );
    write(&agent.dir, "big.bin", &random_bytes(2 << 20));
    age(&agent.path("big.bin"));
    let mut session = None;
    assert!(
        eventually(FOLLOW, || {
            session = pending_session(&agent, "big.bin");
            std::future::ready(session.is_some())
        })
        .await,
        "{}",
        agent.log_text()
    );
    std::fs::rename(agent.path("a.txt"), agent.path("big.bin")).unwrap();
    // That upload ends (committed, or refused at its commit).
    assert!(
        eventually(Duration::from_secs(60), || std::future::ready(
            pending_session(&agent, "big.bin") != session
        ))
        .await,
        "{}",
        agent.log_text()
    );

    let in_sync = || async {
        if pending_session(&agent, "big.bin").is_some() {
            return false;
        }
        let listing = remote_listing(&client, "over").await;
        listing.keys().eq(["big.bin"])
            && remote_bytes(&client, "over/big.bin").await.as_deref()
                == Some(&b"renamed over the upload"[..])
    };
    assert!(
        eventually(Duration::from_secs(60), in_sync).await,
        "{:?}\n{}",
        remote_listing(&client, "over").await.keys(),
        agent.log_text()
    );
    // The file at the name is the agent's: a local delete is passed on.
    std::fs::remove_file(agent.path("big.bin")).unwrap();
    assert!(
        eventually(FOLLOW, || async {
            remote_listing(&client, "over").await.is_empty()
        })
        .await,
        "{:?}\n{}",
        remote_listing(&client, "over").await.keys(),
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(!log.contains("conflict"), "{log}");
    agent.signal("TERM");
    agent.wait(Duration::from_secs(10));
}

/// The synced folder itself moved away and a new one made at its path
/// (`mv D D.old; mkdir D`): the agent says so, watches the new one and
/// follows its changes. It used to go on watching the old one, silently,
/// and saw the new one's changes only at the next rescan (hourly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_moved_away_and_made_again_is_watched_again() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "again");
    for i in 0..4 {
        let rel = format!("pad{i}");
        write(&agent.dir, &rel, format!("pad {i}").as_bytes());
        age(&agent.path(&rel));
    }
    let state = tmp.path().join("state");
    agent.start(&[
        "--state",
        state.to_str().unwrap(),
        "--rescan-interval",
        "1h",
    ]);
    let client = server.client();
    assert!(
        eventually(Duration::from_secs(60), || async {
            remote_listing(&client, "again").await.len() == 4
        })
        .await,
        "initial sync did not finish:\n{}",
        agent.log_text()
    );

    std::fs::rename(&agent.dir, tmp.path().join("folder.old")).unwrap();
    std::fs::create_dir(&agent.dir).unwrap();
    for i in 0..4 {
        write(
            &agent.dir,
            &format!("pad{i}"),
            format!("new pad {i}").as_bytes(),
        );
    }
    assert!(
        eventually(FOLLOW, || std::future::ready(
            agent.log_text().contains("watching the folder again")
        ))
        .await,
        "{}",
        agent.log_text()
    );
    write(&agent.dir, "later.txt", b"written in the new folder");
    assert!(
        eventually(FOLLOW, || async {
            remote_bytes(&client, "again/later.txt").await.as_deref()
                == Some(&b"written in the new folder"[..])
        })
        .await,
        "{}",
        agent.log_text()
    );
    assert!(
        agent.log_text().contains("the folder was moved or removed"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn log_fields_are_read_as_the_agent_writes_them() {
    let waiting = "2026-11-22T00:48:26.680051Z DEBUG ferry_agent::pipeline: still being written; waiting path=\"notes.txt\" wait=1.686132505s";
    let pushed = "2026-11-22T00:48:26.852068Z  INFO ferry_agent::pipeline: uploaded path=\"notes.txt\" bytes=6 resumed_bytes=0";
    assert_eq!(
        log_duration(waiting, "wait="),
        Duration::from_nanos(1_686_132_505)
    );
    assert_eq!(
        log_duration("x wait=250ms", "wait="),
        Duration::from_millis(250)
    );
    let took = log_time(pushed) - log_time(waiting);
    assert_eq!(took.num_microseconds(), Some(172_017));
}
