//! What keeps the agent from doing harm: the delete limit, ignore rules,
//! conflict copies, dry runs; and `status`.

mod harness;

use std::collections::BTreeSet;

use ferry::protocol::RemotePath;
use harness::{Agent, Server, age, remote_bytes, remote_listing, set_mtime, write};

fn names(listing: &std::collections::BTreeMap<String, (u64, String)>) -> BTreeSet<String> {
    listing.keys().cloned().collect()
}

#[tokio::test]
async fn max_delete_stops_a_mass_delete_until_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "md");
    for i in 0..10 {
        write(&agent.dir, &format!("f{i}"), b"data");
        age(&agent.path(&format!("f{i}")));
    }
    agent.once_ok(&[]);
    let client = server.client();
    assert_eq!(remote_listing(&client, "md").await.len(), 10);

    // Deleting 2 of 10 is fine by default.
    for i in 0..2 {
        std::fs::remove_file(agent.path(&format!("f{i}"))).unwrap();
    }
    agent.once_ok(&[]);
    assert_eq!(remote_listing(&client, "md").await.len(), 8);

    // 7 of the remaining 8 is more than half: nothing is deleted.
    for i in 2..9 {
        std::fs::remove_file(agent.path(&format!("f{i}"))).unwrap();
    }
    let out = agent.once(&[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("refusing to delete 7 remote files"), "{log}");
    assert!(log.contains("--max-delete 7"), "{log}");
    assert_eq!(remote_listing(&client, "md").await.len(), 8);
    let status = agent.status();
    assert!(status.contains("held deletes:    7"), "{status}");

    // An explicit limit below the count still refuses; one at the count allows.
    assert_eq!(agent.once(&["--max-delete", "6"]).status.code(), Some(1));
    assert_eq!(remote_listing(&client, "md").await.len(), 8);
    agent.once_ok(&["--max-delete", "7"]);
    assert_eq!(
        names(&remote_listing(&client, "md").await),
        BTreeSet::from(["f9".to_string()])
    );
    assert!(!agent.status().contains("held deletes"));
}

/// `ferry-agent once` as `nobody` (permissions do not hold for root), the
/// folder (in `tmp`) handed to it: whether it succeeded, and its log.
fn as_nobody(agent: &Agent, tmp: &std::path::Path, extra: &[&str]) -> (bool, String) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    let chown = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&agent.dir)
        .status()
        .unwrap();
    assert!(chown.success());
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let out = agent.once_wrapped(&nobody, extra);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), log)
}

/// A file the agent may not read is not taken for one being written (it
/// was retried every two seconds as "changed during the upload"): its push
/// fails, is retried with backoff, and `status` says why.
#[tokio::test]
async fn a_file_that_cannot_be_read_is_reported_not_retried_as_changing() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "unread");
    for rel in ["ok.txt", "secret.txt"] {
        write(&agent.dir, rel, rel.as_bytes());
        age(&agent.path(rel));
    }
    let secret = agent.path("secret.txt");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    let (ok, log) = as_nobody(&agent, tmp.path(), &[]);
    assert!(!ok, "{log}");
    assert!(log.contains("cannot read the file"), "{log}");
    assert!(!log.contains("changed during the upload"), "{log}");
    assert_eq!(
        names(&remote_listing(&server.client(), "unread").await),
        BTreeSet::from(["ok.txt".to_string()])
    );
    let status = agent.status();
    assert!(
        status.contains("secret.txt: cannot read the file"),
        "{status}"
    );
}

/// A directory that can be listed but not entered (`chmod -R 644`, a
/// common slip) hides its files' metadata, not the files: they are left as
/// they are on the server, not deleted. The agent runs as `nobody` here,
/// as permissions do not hold for root.
#[tokio::test]
async fn files_of_a_directory_that_cannot_be_entered_are_not_deleted() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "perm");
    let files = [
        "photos/a.jpg",
        "photos/b.jpg",
        "c.txt",
        "d.txt",
        "e.txt",
        "f.txt",
    ];
    for rel in files {
        write(&agent.dir, rel, rel.as_bytes());
        age(&agent.path(rel));
    }
    let once = |extra: &[&str]| as_nobody(&agent, tmp.path(), extra);
    let (ok, log) = once(&[]);
    assert!(ok, "{log}");
    let client = server.client();
    assert_eq!(remote_listing(&client, "perm").await.len(), 6);

    let photos = agent.path("photos");
    std::fs::set_permissions(&photos, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, log) = once(&[]);
    assert!(ok, "{log}");
    assert!(log.contains("cannot read; left as it is"), "{log}");
    assert_eq!(
        remote_listing(&client, "perm").await.len(),
        6,
        "nothing deleted: {log}"
    );
    // Entered again: in sync, nothing to send.
    std::fs::set_permissions(&photos, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, log) = once(&[]);
    assert!(ok, "{log}");
    assert_eq!(remote_listing(&client, "perm").await.len(), 6);
}

#[tokio::test]
async fn ferryignore_and_editor_temporaries_are_not_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "ig");
    let files = [
        (".ferryignore", "*.log\nbuild/\n!keep.log\n"),
        ("sub/.ferryignore", "secret*\n"),
        ("a.log", "x"),
        ("keep.log", "x"),
        ("build/out.o", "x"),
        ("src/build.rs", "x"),
        ("src/main.rs", "x"),
        ("sub/secret.txt", "x"),
        ("sub/deeper/secret.key", "x"),
        ("sub/ok.txt", "x"),
        ("secret.txt", "x"),
        (".notes.txt.swp", "x"),
        ("draft.txt~", "x"),
        (".#draft.txt", "x"),
        ("4913", "x"),
        (".goutputstream-QX81Z2", "x"),
        ("save.tmp", "x"),
    ];
    for (rel, data) in files {
        write(&agent.dir, rel, data.as_bytes());
        age(&agent.path(rel));
    }
    agent.once_ok(&[]);
    let synced = names(&remote_listing(&server.client(), "ig").await);
    let expected: BTreeSet<String> = [
        ".ferryignore",
        "keep.log",
        "secret.txt",
        "src/build.rs",
        "src/main.rs",
        "sub/.ferryignore",
        "sub/ok.txt",
    ]
    .map(String::from)
    .into();
    assert_eq!(synced, expected);
    assert!(
        agent.state_db().exists(),
        "the journal lives in the folder by default"
    );
}

#[tokio::test]
async fn a_change_on_both_sides_keeps_both_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "cf");
    write(&agent.dir, "doc.txt", b"version 1");
    age(&agent.path("doc.txt"));
    agent.once_ok(&[]);
    let client = server.client();

    // Someone else changes the remote copy; the local one changes too.
    client
        .put_bytes(
            &RemotePath::parse("cf/doc.txt").unwrap(),
            "their edit".into(),
        )
        .await
        .unwrap();
    write(&agent.dir, "doc.txt", b"my local edit");
    age(&agent.path("doc.txt"));
    // A new local file where an unknown remote file already is.
    client
        .put_bytes(
            &RemotePath::parse("cf/other.txt").unwrap(),
            "remote other".into(),
        )
        .await
        .unwrap();
    write(&agent.dir, "other.txt", b"local other, longer");
    age(&agent.path("other.txt"));
    agent.once_ok(&[]);

    assert_eq!(
        remote_bytes(&client, "cf/doc.txt").await.unwrap(),
        b"their edit"
    );
    assert_eq!(
        remote_bytes(&client, "cf/other.txt").await.unwrap(),
        b"remote other"
    );
    let listing = remote_listing(&client, "cf").await;
    for (name, mine) in [
        ("doc.txt", &b"my local edit"[..]),
        ("other.txt", b"local other, longer"),
    ] {
        let copies: Vec<&String> = listing
            .keys()
            .filter(|k| k.starts_with(&format!("{name}.conflict-")))
            .collect();
        assert_eq!(copies.len(), 1, "{listing:?}");
        assert_eq!(
            remote_bytes(&client, &format!("cf/{}", copies[0]))
                .await
                .unwrap(),
            mine
        );
    }
    let status = agent.status();
    assert!(
        status.contains("doc.txt: changed on the server"),
        "{status}"
    );

    // Nothing more happens on the next pass: no new conflict copies.
    agent.once_ok(&[]);
    assert_eq!(remote_listing(&client, "cf").await.len(), 4);

    // Here the files are ours, there theirs: a local rename or delete is
    // not passed on to theirs (the rename used to move theirs to the new
    // name and call it in sync; the delete, to delete it).
    std::fs::rename(agent.path("doc.txt"), agent.path("final.txt")).unwrap();
    std::fs::remove_file(agent.path("other.txt")).unwrap();
    agent.once_ok(&[]);
    for (path, content) in [
        ("cf/doc.txt", &b"their edit"[..]),
        ("cf/final.txt", b"my local edit"),
        ("cf/other.txt", b"remote other"),
    ] {
        assert_eq!(
            remote_bytes(&client, path).await.unwrap(),
            content,
            "{path}"
        );
    }
    // And the files pushed normally since go as usual.
    std::fs::remove_file(agent.path("final.txt")).unwrap();
    agent.once_ok(&[]);
    assert_eq!(remote_bytes(&client, "cf/final.txt").await, None);
}

/// Both sides change a file to the same size within the same second (here:
/// the same mtime). Theirs used to be taken for an upload of ours that a
/// stopped run had not recorded: the local edit was never pushed, and the
/// next one replaced theirs without a conflict copy. Only a session of ours
/// that committed that version makes it ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_size_change_on_both_sides_in_the_same_second_keeps_both_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "samesec");
    write(&agent.dir, "f", b"AAAA");
    age(&agent.path("f"));
    agent.once_ok(&[]);

    let when = std::time::SystemTime::now() - std::time::Duration::from_secs(30);
    write(&agent.dir, "f", b"BBBB");
    set_mtime(&agent.path("f"), when);
    // Another client's edit: same size and mtime (`ferry put` keeps it).
    let theirs = tmp.path().join("theirs");
    std::fs::write(&theirs, b"CCCC").unwrap();
    set_mtime(&theirs, when);
    let client = server.client();
    ferry::client::upload::upload_file(
        &client,
        &theirs,
        &RemotePath::parse("samesec/f").unwrap(),
        Default::default(),
    )
    .await
    .unwrap();
    let log = agent.once_ok(&[]);

    assert_eq!(remote_bytes(&client, "samesec/f").await.unwrap(), b"CCCC");
    let listing = remote_listing(&client, "samesec").await;
    let copies: Vec<&String> = listing
        .keys()
        .filter(|k| k.starts_with("f.conflict-"))
        .collect();
    assert_eq!(copies.len(), 1, "{listing:?}\n{log}");
    assert_eq!(
        remote_bytes(&client, &format!("samesec/{}", copies[0]))
            .await
            .unwrap(),
        b"BBBB"
    );
    assert!(agent.status().contains("f: changed on the server"));
}

/// A directory of ours replaced by a file of the same name: the files that
/// were in it are deleted on the server before the file is uploaded. The
/// upload used to come first, found a directory there, and made the file a
/// conflict copy; the name then stayed empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_replaced_by_a_file_is_not_a_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "dtf");
    for (rel, data) in [
        ("x/a", "a"),
        ("x/b", "b"),
        ("c", "c"),
        ("d", "d"),
        ("e", "e"),
    ] {
        write(&agent.dir, rel, data.as_bytes());
        age(&agent.path(rel));
    }
    agent.once_ok(&[]);

    std::fs::remove_dir_all(agent.path("x")).unwrap();
    write(&agent.dir, "x", b"now a file");
    age(&agent.path("x"));
    let log = agent.once_ok(&[]);

    let client = server.client();
    assert_eq!(
        names(&remote_listing(&client, "dtf").await),
        BTreeSet::from(["c", "d", "e", "x"].map(String::from)),
        "{log}"
    );
    assert_eq!(remote_bytes(&client, "dtf/x").await.unwrap(), b"now a file");
    assert!(!log.contains("conflict"), "{log}");
    // In sync: the next pass has nothing to do.
    let log = agent.once_ok(&[]);
    assert!(log.contains("0 to upload"), "{log}");
}

/// A new local file whose name someone else creates on the server while it
/// is being uploaded: theirs stays, this one becomes a conflict copy (it
/// used to replace theirs at the commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_created_remotely_during_its_upload_keeps_both_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "race");
    let ours = harness::random_bytes(6 << 20);
    write(&agent.dir, "new.bin", &ours);
    age(&agent.path("new.bin"));
    // About 3 s at 2 MiB/s; theirs comes a second in.
    let once = std::thread::spawn(move || {
        let out = agent.once(&["--bwlimit", "2M"]);
        (agent, out)
    });
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let client = server.client();
    client
        .put_bytes(&RemotePath::parse("race/new.bin").unwrap(), "theirs".into())
        .await
        .unwrap();
    let (agent, out) = once.join().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let at_the_name = remote_bytes(&client, "race/new.bin").await.unwrap();
    assert!(at_the_name == b"theirs", "theirs was replaced:\n{log}");
    let listing = remote_listing(&client, "race").await;
    let copies: Vec<&String> = listing
        .keys()
        .filter(|k| k.starts_with("new.bin.conflict-"))
        .collect();
    assert_eq!(copies.len(), 1, "{listing:?}");
    assert!(
        remote_bytes(&client, &format!("race/{}", copies[0]))
            .await
            .unwrap()
            == ours
    );
    // Settled: the next pass changes nothing.
    agent.once_ok(&[]);
    assert_eq!(remote_listing(&client, "race").await.len(), 2);
}

/// A file deleted on the server while a new version of it is uploaded over
/// it: the upload, made on condition that the server still has the version
/// it replaces, is refused at its commit, and the file is pushed again as a
/// new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_deleted_remotely_during_its_upload_is_pushed_again() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "gone");
    write(&agent.dir, "f.bin", b"first version");
    age(&agent.path("f.bin"));
    agent.once_ok(&[]);
    let ours = harness::random_bytes(6 << 20);
    write(&agent.dir, "f.bin", &ours);
    age(&agent.path("f.bin"));
    // About 3 s at 2 MiB/s; the delete comes a second in.
    let once = std::thread::spawn(move || {
        let out = agent.once(&["--bwlimit", "2M"]);
        (agent, out)
    });
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let client = server.client();
    client
        .delete(&RemotePath::parse("gone/f.bin").unwrap())
        .await
        .unwrap();
    let (agent, out) = once.join().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        remote_bytes(&client, "gone/f.bin").await.unwrap() == ours,
        "{log}"
    );
    assert_eq!(remote_listing(&client, "gone").await.len(), 1, "{log}");
    // Settled: the next pass has nothing to do.
    let log = agent.once_ok(&[]);
    assert!(log.contains("0 to upload"), "{log}");
}

#[tokio::test]
async fn dry_run_prints_the_plan_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "dry");
    for rel in ["a.txt", "b.txt", "c.txt", "d/e.txt"] {
        write(&agent.dir, rel, rel.as_bytes());
        age(&agent.path(rel));
    }
    let out = agent.once(&["--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rel in ["a.txt", "b.txt", "c.txt", "d/e.txt"] {
        assert!(stdout.contains(&format!("upload {rel} ")), "{stdout}");
    }
    let client = server.client();
    assert!(remote_listing(&client, "dry").await.is_empty());
    assert!(
        !agent.dir.join(".ferry-agent").exists(),
        "a dry run created the state directory"
    );

    agent.once_ok(&[]);
    let before = remote_listing(&client, "dry").await;
    let status_before = agent.status();
    std::fs::remove_file(agent.path("a.txt")).unwrap();
    std::fs::rename(agent.path("b.txt"), agent.path("b2.txt")).unwrap();
    write(&agent.dir, "c.txt", b"changed");
    age(&agent.path("c.txt"));
    let out = agent.once(&["--dry-run", "--max-delete", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("delete a.txt"), "{stdout}");
    assert!(stdout.contains("rename b.txt -> b2.txt"), "{stdout}");
    assert!(stdout.contains("upload c.txt "), "{stdout}");
    assert_eq!(remote_listing(&client, "dry").await, before);
    assert_eq!(agent.status(), status_before);
}

#[tokio::test]
async fn status_reports_the_folder_and_bad_arguments_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "st");
    let status = agent.status();
    assert!(status.contains("never synced"), "{status}");
    write(&agent.dir, "x.bin", &[7u8; 1000]);
    age(&agent.path("x.bin"));
    agent.once_ok(&[]);
    let status = agent.status();
    for line in [
        format!("remote:          {}/st", server.url),
        "synced:          1 files, 1000 bytes".to_string(),
        "agent:           not running".to_string(),
        "pending uploads: 0".to_string(),
        "errors:          none".to_string(),
    ] {
        assert!(status.contains(&line), "missing {line:?} in\n{status}");
    }
    assert!(status.contains("last full sync:  20"), "{status}");

    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = tmp.path().join("nope");
    let (code, err) = run(&[
        "once",
        "--dir",
        missing.to_str().unwrap(),
        "--server",
        &server.url,
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot be used"), "{err}");
    let (code, err) = run(&["once", "--dir", agent.dir.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--server"), "{err}");
    let (code, err) = run(&[
        "once",
        "--dir",
        agent.dir.to_str().unwrap(),
        "--server",
        "ftp://x",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("http://"), "{err}");
    let (code, err) = run(&[
        "once",
        "--dir",
        agent.dir.to_str().unwrap(),
        "--server",
        &server.url,
        "--prefix",
        "a/../b",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("prefix"), "{err}");
}

#[tokio::test]
async fn bwlimit_paces_the_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "bw");
    // 16 MiB in two files at 4 MiB/s: about 4 s (unlimited, well under 1 s).
    for name in ["a.bin", "b.bin"] {
        write(&agent.dir, name, &harness::random_bytes(8 << 20));
        age(&agent.path(name));
    }
    let started = std::time::Instant::now();
    agent.once_ok(&["--bwlimit", "4M"]);
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_secs(3),
        "16 MiB at 4 MiB/s took {took:?}"
    );
    assert_eq!(remote_listing(&server.client(), "bw").await.len(), 2);
}

#[tokio::test]
async fn a_config_file_syncs_several_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    for (dir, name) in [("docs", "letter.txt"), ("photos", "cat.jpg")] {
        write(&tmp.path().join(dir), name, dir.as_bytes());
        age(&tmp.path().join(dir).join(name));
    }
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"{}\"\ntransfers = 2\n\n[[folder]]\ndir = \"docs\"\nprefix = \"laptop/docs\"\n\n\
             [[folder]]\ndir = \"photos\"\nprefix = \"laptop/photos\"\nstate = \"{}\"\n",
            server.url,
            tmp.path().join("photos-state").display()
        ),
    )
    .unwrap();
    let run = |sub: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
            .args([sub, "--config", config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run("once");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = server.client();
    assert_eq!(
        remote_bytes(&client, "laptop/docs/letter.txt")
            .await
            .unwrap(),
        b"docs"
    );
    assert_eq!(
        remote_bytes(&client, "laptop/photos/cat.jpg")
            .await
            .unwrap(),
        b"photos"
    );
    assert!(tmp.path().join("photos-state/state.db").exists());
    assert!(!tmp.path().join("photos/.ferry-agent").exists());

    let status = String::from_utf8(run("status").stdout).unwrap();
    assert_eq!(
        status.matches("synced:          1 files").count(),
        2,
        "{status}"
    );
    assert!(status.contains("laptop/photos"), "{status}");
}

#[tokio::test]
async fn a_second_agent_on_the_same_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "two");
    agent.start(&[]);
    assert!(
        harness::eventually(std::time::Duration::from_secs(10), || async {
            agent.log_text().contains("full pass")
        })
        .await
    );
    let out = agent.once(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("another ferry-agent is already syncing"),
        "{err}"
    );
    assert!(agent.status().contains("agent:           running (pid"));

    // Killed, its pid left in the journal and taken by another process (this
    // one, here): it is not running.
    agent.signal("KILL");
    agent.wait(std::time::Duration::from_secs(10));
    let journal = rusqlite::Connection::open(agent.state_db()).unwrap();
    journal
        .execute(
            "UPDATE meta SET value = ?1 WHERE key = 'pid'",
            [std::process::id().to_string()],
        )
        .unwrap();
    let status = agent.status();
    assert!(status.contains("agent:           not running"), "{status}");
}

/// A dry run whose reader stops reading (`| head -1`) ends, as other tools
/// do, instead of hanging with a panicked printing thread (deaf to
/// SIGTERM); so does `status`.
#[tokio::test]
async fn a_dry_run_piped_into_head_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "dry");
    // More plan than a pipe holds (64 KiB).
    for i in 0..2500 {
        let rel = format!("some/longer/directory/name/file-{i:05}.txt");
        write(&agent.dir, &rel, b"x");
        age(&agent.path(&rel));
    }
    let started = std::time::Instant::now();
    let piped = [
        "timeout",
        "-k",
        "5",
        "60",
        "sh",
        "-c",
        "\"$0\" \"$@\" | head -1",
    ];
    let out = agent.once_wrapped(&piped, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(50),
        "{:?}",
        started.elapsed()
    );
    let first = String::from_utf8_lossy(&out.stdout);
    assert!(first.starts_with("upload "), "{first}");
    assert!(server.session_count() == 0, "a dry run uploads nothing");
}
