//! `ferry mount` write path on real FUSE mounts: staging, upload on close,
//! fsync, crash recovery and conflicts. Skipped (loudly) only where
//! /dev/fuse is absent.

mod harness;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use harness::mount::{
    MountProc, fuse_available, is_mounted, journal_records, mount_state_dir, probe_duration,
    store_file,
};
use harness::{Server, eventually, random_bytes};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_of_a_1_gib_file_is_committed_by_fsync() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    let data = random_bytes(1 << 30);
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("src.bin");
    std::fs::write(&source, &data).unwrap();
    let status = Command::new("cp")
        .arg(&source)
        .arg(mount.at("copied.bin"))
        .status()
        .unwrap();
    assert!(status.success());
    // fsync returns only once the server has committed the file.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.at("copied.bin"))
        .unwrap();
    file.sync_all().unwrap();
    let (code, body) = server.get_bytes("copied.bin").await;
    assert_eq!(code, 200);
    assert!(body == data, "the server's copy differs");
    assert!(std::fs::read(mount.at("copied.bin")).unwrap() == data);
}

/// A random mix of writes, truncates and reads through the mount, checked
/// against an in-memory model of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_writes_truncates_and_reads_match_a_model() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let initial = random_bytes(3 * MIB + 777);
    store_file(&server, "fsx.bin", &initial);
    let mount = MountProc::start(&server, &[]);
    let mut model = initial.clone();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.at("fsx.bin"))
        .unwrap();
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut next = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound.max(1)
    };
    for op in 0..3000 {
        let limit = 5 * MIB as u64;
        match next(10) {
            0..=4 => {
                let offset = next(limit);
                let big = next(4) == 0;
                let len = 1 + next(if big { 300_000 } else { 5000 }) as usize;
                let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ offset ^ op) as u8).collect();
                file.write_all_at(&data, offset).unwrap();
                let end = offset as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].copy_from_slice(&data);
            }
            5 => {
                let size = next(limit);
                file.set_len(size).unwrap();
                model.resize(size as usize, 0);
            }
            _ => {
                let offset = next(model.len() as u64 + 100);
                let len = 1 + next(70_000) as usize;
                let mut buf = vec![0u8; len];
                let n = read_fully_at(&file, &mut buf, offset);
                let want_end = (offset as usize + len).min(model.len());
                let want = if (offset as usize) < model.len() {
                    &model[offset as usize..want_end]
                } else {
                    &[][..]
                };
                assert_eq!(n, want.len(), "op {op}: read length at {offset}");
                assert!(
                    buf[..n] == *want,
                    "op {op}: bytes at {offset} differ from the model"
                );
            }
        }
    }
    assert_eq!(file.metadata().unwrap().len(), model.len() as u64);
    file.sync_all().unwrap();
    drop(file);
    assert!(
        server.eventually_has("fsx.bin", &model).await,
        "the committed file differs from the model"
    );
}

fn read_fully_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let n = file
            .read_at(&mut buf[done..], offset + done as u64)
            .unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_editor_save_replaces_the_file_atomically() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("notes/todo.txt", "old contents").await;
    let mount = MountProc::start(&server, &[]);
    let tmp_path = mount.at("notes/.todo.txt.swp");
    let mut tmp = std::fs::File::create(&tmp_path).unwrap();
    tmp.write_all(b"new contents, saved by an editor").unwrap();
    tmp.sync_all().unwrap();
    drop(tmp);
    std::fs::rename(&tmp_path, mount.at("notes/todo.txt")).unwrap();
    assert_eq!(
        std::fs::read(mount.at("notes/todo.txt")).unwrap(),
        b"new contents, saved by an editor"
    );
    assert!(
        server
            .eventually_has("notes/todo.txt", b"new contents, saved by an editor")
            .await
    );
    assert_eq!(server.get_bytes("notes/.todo.txt.swp").await.0, 404);
}

/// An editor that keeps its descriptor open across the rename (or whose
/// close reaches the mount only after the rename, as FUSE releases are
/// sent asynchronously): `fsync` committed the file under its temporary
/// name, so the rename, and an unlink, must apply on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_fsynced_then_renamed_or_removed_while_open_follows_on_the_server() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("notes/todo.txt", "old contents").await;
    let mount = MountProc::start(&server, &[]);
    let mut tmp = std::fs::File::create(mount.at("notes/.todo.txt.swp")).unwrap();
    tmp.write_all(b"saved while open").unwrap();
    tmp.sync_all().unwrap();
    std::fs::rename(mount.at("notes/.todo.txt.swp"), mount.at("notes/todo.txt")).unwrap();
    assert_eq!(
        server.get_bytes("notes/todo.txt").await.1,
        b"saved while open"
    );
    assert_eq!(server.get_bytes("notes/.todo.txt.swp").await.0, 404);
    drop(tmp);

    let mut scratch = std::fs::File::create(mount.at("notes/scratch.txt")).unwrap();
    scratch.write_all(b"scratch").unwrap();
    scratch.sync_all().unwrap();
    assert_eq!(server.get_bytes("notes/scratch.txt").await.1, b"scratch");
    std::fs::remove_file(mount.at("notes/scratch.txt")).unwrap();
    assert_eq!(server.get_bytes("notes/scratch.txt").await.0, 404);
    drop(scratch);

    // Nothing comes back once the descriptors are closed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.get_bytes("notes/.todo.txt.swp").await.0, 404);
    assert_eq!(server.get_bytes("notes/scratch.txt").await.0, 404);
    assert_eq!(
        server.get_bytes("notes/todo.txt").await.1,
        b"saved while open"
    );
}

/// A directory renamed while a file in it is open, and while the upload
/// of another file in it is still under way: both land under the new name,
/// nothing under the old one. And a directory holding only a file the
/// server does not have yet cannot be removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_open_or_uploading_in_a_renamed_directory_follow_it() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("old/keep.txt", "kept").await;
    let mount = MountProc::start(&server, &[]);
    let closed = random_bytes(8 * MIB + 1);
    std::fs::write(mount.at("old/closed.bin"), &closed).unwrap();
    let mut open = std::fs::File::create(mount.at("old/open.txt")).unwrap();
    open.write_all(b"written before").unwrap();
    // A directory whose only file the server does not have yet is not
    // empty either.
    std::fs::create_dir(mount.at("fresh")).unwrap();
    let fresh = std::fs::File::create(mount.at("fresh/f")).unwrap();
    let refused = std::fs::remove_dir(mount.at("fresh")).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::ENOTEMPTY));
    drop(fresh);
    std::fs::rename(mount.at("old"), mount.at("new")).unwrap();
    open.write_all(b" and after the rename").unwrap();
    drop(open);
    assert!(server.eventually_has("new/closed.bin", &closed).await);
    assert!(
        server
            .eventually_has("new/open.txt", b"written before and after the rename")
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.get_bytes("old/closed.bin").await.0, 404);
    assert_eq!(server.get_bytes("old/open.txt").await.0, 404);
    let mut names = server.listed_names("").await;
    names.sort();
    assert_eq!(names, ["fresh", "new"]);
    assert_eq!(
        std::fs::read(mount.at("new/open.txt")).unwrap(),
        b"written before and after the rename"
    );
}

/// `ls`, `find` and `rm -r` see the files the mount is writing or has yet
/// to upload, with their sizes, each name once. readdir listed only what
/// the server had: the file just written was missing from `ls`, and `rm -r`
/// of a directory holding one failed with ENOTEMPTY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdir_lists_files_being_written_or_uploaded() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (store, state) = (tmp.path().join("store"), tmp.path().join("state"));
    // Uploads of more than 16 bytes are refused (and retried) until the
    // server comes back without the limit.
    let server = Server::start_on(store.to_str().unwrap(), &["--max-body-bytes", "16"]);
    assert_eq!(
        server.op("mkdir", serde_json::json!({"path": "d"})).await.0,
        201
    );
    server.put("d/on-server", "both").await;
    // A directory only its one file keeps.
    server.put("lone/last", "x").await;
    // An upload an earlier mount left: it has no staged file.
    drop(MountProc::start_with_state(&server.url, &state, &[]));
    let left = mount_state_dir(&state).join("staging").join("left");
    std::fs::write(&left, b"left by an earlier mount").unwrap();
    let record = serde_json::json!({
        "path": "d/left.txt", "local": left, "base_etag": null, "session_id": null,
        "queued_at": "2026-12-07T00:00:00Z",
    });
    let journal = mount_state_dir(&state).join("journal");
    std::fs::write(journal.join("left.json"), record.to_string()).unwrap();
    let mount = MountProc::start_with_state(&server.url, &state, &[]);

    let held = b"closed, its upload refused for now";
    std::fs::write(mount.at("d/held.txt"), held).unwrap();
    std::fs::create_dir_all(mount.at("d/sub/deeper")).unwrap();
    std::fs::write(mount.at("d/sub/deeper/held.txt"), held).unwrap();
    let mut open = std::fs::File::create(mount.at("d/open.txt")).unwrap();
    open.write_all(b"open, being written").unwrap();
    let mut rewritten = std::fs::OpenOptions::new()
        .append(true)
        .open(mount.at("d/on-server"))
        .unwrap();
    rewritten.write_all(b" and more").unwrap();
    // A directory the server loses with its last file still holds the file
    // being written in it.
    let mut lone = std::fs::File::create(mount.at("lone/new.txt")).unwrap();
    lone.write_all(b"new").unwrap();
    std::fs::remove_file(mount.at("lone/last")).unwrap();
    assert_eq!(server.listed_names("").await, ["d"]);

    let listing = |rel: &str| {
        let mut entries: Vec<(String, bool, u64)> = std::fs::read_dir(mount.at(rel))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                let name = e.file_name().into_string().unwrap();
                (name, meta.is_dir(), meta.len())
            })
            .collect();
        entries.sort();
        entries
    };
    let file = |name: &str, len: usize| (name.to_owned(), false, len as u64);
    let dir = |name: &str| (name.to_owned(), true, 0);
    assert_eq!(listing(""), [dir("d"), dir("lone")]);
    assert_eq!(
        listing("d"),
        [
            file("held.txt", held.len()),
            file("left.txt", 24),
            file("on-server", 13),
            file("open.txt", 19),
            dir("sub"),
        ]
    );
    assert_eq!(listing("d/sub"), [dir("deeper")]);
    assert_eq!(listing("d/sub/deeper"), [file("held.txt", held.len())]);
    assert_eq!(listing("lone"), [file("new.txt", 3)]);
    let found = Command::new("find")
        .arg(".")
        .arg("-type")
        .arg("f")
        .current_dir(&mount.path)
        .output()
        .unwrap();
    let mut found: Vec<_> = String::from_utf8(found.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            "./d/held.txt",
            "./d/left.txt",
            "./d/on-server",
            "./d/open.txt",
            "./d/sub/deeper/held.txt",
            "./lone/new.txt",
        ]
    );

    // `rm -r` removes the open files at once and the others once their
    // uploads land, which the server lets them do when it comes back.
    let (addr, top) = (server.addr.to_string(), mount.at("d"));
    let removal =
        std::thread::spawn(move || Command::new("rm").arg("-r").arg(top).output().unwrap());
    drop(server);
    let server = Server::spawn(store.to_str().unwrap(), &addr, &[]);
    let removal = removal.join().unwrap();
    assert!(
        removal.status.success(),
        "{}",
        String::from_utf8_lossy(&removal.stderr)
    );
    open.write_all(b", and after its removal").unwrap();
    drop((open, rewritten, lone));
    assert!(server.eventually_has("lone/new.txt", b"new").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.listed_names("").await, ["lone"]);
    assert_eq!(listing(""), [dir("lone")]);
}

/// Writes after an `fsync` are the same writer's: their upload commits
/// over the version that `fsync` committed, with no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_an_fsync_replace_the_fsynced_version_without_a_conflict() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("log.txt", "original").await;
    let mount = MountProc::start(&server, &[]);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.at("log.txt"))
        .unwrap();
    file.write_all(b"first").unwrap();
    file.sync_all().unwrap();
    assert_eq!(server.get_bytes("log.txt").await.1, b"firstnal");
    file.write_all(b" second").unwrap();
    file.sync_all().unwrap();
    assert_eq!(server.get_bytes("log.txt").await.1, b"first second");
    file.write_all(b" third").unwrap();
    drop(file);
    assert!(
        server
            .eventually_has("log.txt", b"first second third")
            .await
    );
    let names = server.listed_names("").await;
    assert_eq!(names, ["log.txt"], "no conflict copy");
}

/// git's way of writing its config: create `config.lock` exclusively, write,
/// close, rename it over `config`, at once again. FUSE sends a close's
/// release asynchronously, so it may reach the mount during the rename,
/// while that waits for the last round's upload to `config`; here the
/// descriptor is closed while the rename runs to make that likely. The lock
/// name must be free again every round, and only the last content remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_file_renamed_over_its_target_in_quick_rounds_frees_its_name() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    std::fs::create_dir(mount.at("repo")).unwrap();
    let (lock, config) = (mount.at("repo/config.lock"), mount.at("repo/config"));
    let content = |round: usize| format!("round {round:>4}\n").repeat(MIB / 11 + round * 97);
    let rounds = 40;
    for round in 0..rounds {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
            .unwrap_or_else(|e| panic!("round {round}: the lock name is taken: {e}"));
        file.write_all(content(round).as_bytes()).unwrap();
        let renaming = {
            let (lock, config) = (lock.clone(), config.clone());
            std::thread::spawn(move || std::fs::rename(lock, config))
        };
        std::thread::sleep(Duration::from_micros(300 * (round as u64 % 8)));
        drop(file);
        renaming
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("round {round}: rename failed: {e}"));
    }
    let last = content(rounds - 1);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), last);
    assert!(server.eventually_has("repo/config", last.as_bytes()).await);
    assert_eq!(server.listed_names("repo").await, ["config"]);
}

/// A file removed right after its close (its release still on the way, or
/// its upload starting) never comes back on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_right_after_its_close_stays_removed() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    std::fs::create_dir(mount.at("scratch")).unwrap();
    for round in 0..100 {
        let path = mount.at(&format!("scratch/{}.tmp", round % 3));
        std::fs::write(&path, format!("round {round}")).unwrap();
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("round {round}: unlink failed: {e}"));
    }
    std::fs::write(mount.at("scratch/kept"), "kept").unwrap();
    assert!(server.eventually_has("scratch/kept", b"kept").await);
    // Uploads run in order of close per name, and `kept` was closed last.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.listed_names("scratch").await, ["kept"]);
}

/// A descriptor opened only to write bypasses the kernel's page cache; a
/// reader of the same file (a `tail -f` of a log) must still see every
/// write, including those into a page it has cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_sees_what_a_write_only_descriptor_writes() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    let path = mount.at("app.log");
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .unwrap();
    log.write_all(b"first line\n").unwrap();
    let reader = std::fs::File::open(&path).unwrap();
    let read_all = || {
        let mut buf = vec![0u8; 4096];
        let n = read_fully_at(&reader, &mut buf, 0);
        buf.truncate(n);
        buf
    };
    assert_eq!(read_all(), b"first line\n");
    log.write_all(b"second line\n").unwrap();
    assert_eq!(read_all(), b"first line\nsecond line\n");
    // Overwrites inside the page the reader has cached, and a truncate.
    let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    writer.write_all_at(b"FIRST", 0).unwrap();
    assert_eq!(read_all(), b"FIRST line\nsecond line\n");
    writer.set_len(5).unwrap();
    log.write_all(b"-third\n").unwrap();
    assert_eq!(read_all(), b"FIRST-third\n");
    drop((log, writer));
    assert_eq!(read_all(), b"FIRST-third\n");
    // The writers' last close starts the upload; the reader reads on.
    assert!(server.eventually_has("app.log", b"FIRST-third\n").await);
    assert_eq!(read_all(), b"FIRST-third\n");
    drop(reader);
    assert_eq!(server.get_bytes("app.log").await.1, b"FIRST-third\n");
}

/// A log on the server, followed by a reader that keeps reading at its end
/// (`tail -f`) while a writer appends to it with `O_APPEND` (a logger, a
/// shell's `>>`). Each read at the end made the kernel ask for the file's
/// attributes naming the reader's handle, which answered with the version
/// it had opened: the kernel took that size back, the next appends landed
/// over the first lines, and the server got a short, scrambled log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_followed_by_a_reader_at_the_end_all_land_in_order() {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    for (name, read_write) in [("wronly.log", false), ("rdwr.log", true)] {
        server.put(name, "").await;
        let path = mount.at(name);
        assert!(eventually(Duration::from_secs(5), || path.exists()));
        let mut reader = std::fs::File::open(&path).unwrap();
        let (seen, stop) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let follower = std::thread::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    match reader.read(&mut buf).unwrap() {
                        0 => std::thread::sleep(Duration::from_millis(5)),
                        n => seen.lock().unwrap().extend_from_slice(&buf[..n]),
                    }
                }
            }
        });
        let mut log = std::fs::OpenOptions::new()
            .read(read_write)
            .append(true)
            .open(&path)
            .unwrap();
        let mut expected = Vec::new();
        for i in 1..=40 {
            let line = format!("line {i:02}\n");
            log.write_all(line.as_bytes()).unwrap();
            expected.extend_from_slice(line.as_bytes());
            std::thread::sleep(Duration::from_millis(15));
        }
        drop(log);
        let on_mount = std::fs::read(&path).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&on_mount),
            String::from_utf8_lossy(&expected),
            "{name}: the mount lost or reordered appended lines"
        );
        let followed = eventually(Duration::from_secs(5), || *seen.lock().unwrap() == expected);
        stop.store(true, Ordering::Relaxed);
        follower.join().unwrap();
        assert!(
            followed,
            "{name}: the reader saw {:?}",
            String::from_utf8_lossy(&seen.lock().unwrap())
        );
        // Uploaded at the writer's close.
        assert!(
            server.eventually_has(name, &expected).await,
            "{name}: the server holds {:?}",
            String::from_utf8_lossy(&server.get_bytes(name).await.1)
        );
    }
}

/// A reader still on a version that another client replaced since keeps
/// reading at that version's end while a shell loop appends to the file
/// through the mount (`echo … >> log`). Each of its reads had the kernel
/// take its version's size for the file's: an append opened at such a
/// moment landed there, over the replacing content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_land_at_the_end_while_a_reader_follows_a_replaced_version() {
    use std::io::Read;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    let path = mount.at("svc.log");
    server.put("svc.log", "old\n").await;
    assert!(eventually(Duration::from_secs(5), || path.exists()));
    let mut reader = std::fs::File::open(&path).unwrap();
    let mut old = Vec::new();
    reader.read_to_end(&mut old).unwrap();
    assert_eq!(old, b"old\n");
    let replaced = b"replaced on the server\n";
    server.put("svc.log", &replaced[..]).await;
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::metadata(&path).unwrap().len() == replaced.len() as u64
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let follower = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                // Its version's bytes, its end, or ESTALE: any will do.
                let _ = reader.read(&mut buf);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    let mut expected = replaced.to_vec();
    for i in 1..=30 {
        let line = format!("line {i:02}\n");
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        log.write_all(line.as_bytes()).unwrap();
        expected.extend_from_slice(line.as_bytes());
    }
    stop.store(true, Ordering::Relaxed);
    follower.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&path).unwrap()),
        String::from_utf8_lossy(&expected),
        "the mount lost or misplaced appended lines"
    );
    assert!(
        server.eventually_has("svc.log", &expected).await,
        "the server holds {:?}",
        String::from_utf8_lossy(&server.get_bytes("svc.log").await.1)
    );
}

/// `prog >> app.log` beside a `tail -f app.log` that never ends: the
/// reader's descriptor counted among the file's open ones, so no close of
/// the writer was the last, and the log never reached the server (nor,
/// until the reader closed, the journal). The writer's close uploads it
/// now; the reader reads on, also across a second round of appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_followed_by_tail_f_reaches_the_server_at_each_writers_close() {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    server.put("app.log", "started\n").await;
    let path = mount.at("app.log");
    assert!(eventually(Duration::from_secs(5), || path.exists()));
    let mut reader = std::fs::File::open(&path).unwrap();
    let (seen, stop) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(AtomicBool::new(false)),
    );
    let follower = std::thread::spawn({
        let (seen, stop) = (seen.clone(), stop.clone());
        move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                match reader.read(&mut buf).unwrap() {
                    0 => std::thread::sleep(Duration::from_millis(5)),
                    n => seen.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
            reader
        }
    });
    let mut expected = b"started\n".to_vec();
    for round in 1..=2 {
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        for i in 1..=20 {
            let line = format!("round {round} line {i:02}\n");
            log.write_all(line.as_bytes()).unwrap();
            expected.extend_from_slice(line.as_bytes());
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(log);
        // The reader is still open (and reading at the end).
        let mut on_server = (0, Vec::new());
        for _ in 0..100 {
            on_server = server.get_bytes("app.log").await;
            if on_server.1 == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            String::from_utf8_lossy(&on_server.1),
            String::from_utf8_lossy(&expected),
            "round {round}: the server did not get the log within 5 s of its writer's close"
        );
        let followed = eventually(Duration::from_secs(5), || *seen.lock().unwrap() == expected);
        assert!(
            followed,
            "round {round}: the reader saw {:?}",
            String::from_utf8_lossy(&seen.lock().unwrap())
        );
        assert_eq!(std::fs::read(&path).unwrap(), expected, "round {round}");
    }
    stop.store(true, Ordering::Relaxed);
    let reader = follower.join().unwrap();
    // Still the whole log through the reader, from its start.
    let mut whole = vec![0u8; expected.len() + 10];
    let n = read_fully_at(&reader, &mut whole, 0);
    assert_eq!(&whole[..n], &expected[..]);
    drop(reader);
    assert_eq!(server.get_bytes("app.log").await.1, expected);
}

/// The same log's writer closes while a reader still has it open and the
/// server does not answer; the mount is then killed. The writer's close
/// journaled the log (before, only the reader's close would have), so
/// the next mount commits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_closed_by_its_writer_while_read_survives_a_crash_of_the_mount() {
    use std::io::Read;
    if !fuse_available() {
        return;
    }
    let (tmp, server) = server_with_store();
    server.put("app.log", "started\n").await;
    let state = tmp.path().join("state");
    let mount = MountProc::start_with_state(&server.url, &state, &[]);
    let journal = mount_state_dir(&state).join("journal");
    let path = mount.at("app.log");
    let mut reader = std::fs::File::open(&path).unwrap();
    let mut seen = Vec::new();
    reader.read_to_end(&mut seen).unwrap();
    assert_eq!(seen, b"started\n");
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    log.write_all(b"line 1\n").unwrap();
    server.pause();
    log.write_all(b"line 2\n").unwrap();
    drop(log);
    assert_eq!(
        journal_records(&journal).len(),
        1,
        "the writer's close journals the log"
    );
    mount.sigkill();
    drop(reader);
    server.resume();
    let _remount = MountProc::start_with_state(&server.url, &state, &[]);
    assert!(
        server
            .eventually_has("app.log", b"started\nline 1\nline 2\n")
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_extracts_a_thousand_files() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    for i in 0..1000 {
        let dir = tree.join(format!("d{:02}", i % 20));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("f{i:04}.txt")),
            format!("file {i}\n").repeat(i % 7 + 1),
        )
        .unwrap();
    }
    let archive = tmp.path().join("tree.tar");
    assert!(
        Command::new("tar")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(tmp.path())
            .arg("tree")
            .status()
            .unwrap()
            .success()
    );
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    let out = Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&mount.path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in (0..1000).step_by(37) {
        let rel = format!("tree/d{:02}/f{i:04}.txt", i % 20);
        let want = format!("file {i}\n").repeat(i % 7 + 1);
        assert!(server.eventually_has(&rel, want.as_bytes()).await, "{rel}");
    }
    let mut files = 0;
    for _ in 0..300 {
        let listing = server
            .json("/v1/list/tree?recursive=true&limit=10000")
            .await
            .1;
        files = listing["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "file")
            .count();
        if files == 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(files, 1000, "every extracted file reaches the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_into_the_mount_passes_fsck() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let git = |dir: &std::path::Path, args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .expect("git is installed");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    for i in 0..20 {
        std::fs::write(
            repo.join(format!("file{i}.txt")),
            format!("content {i}\n").repeat(50),
        )
        .unwrap();
        git(&repo, &["add", "."]);
        git(
            &repo,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-q",
                "-m",
                &format!("commit {i}"),
            ],
        );
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    let clone = mount.at("clone");
    let out = Command::new("git")
        .arg("clone")
        .arg("-q")
        .arg("--no-hardlinks")
        .arg(&repo)
        .arg(&clone)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git clone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    git(&clone, &["fsck", "--full"]);
    assert_eq!(
        std::fs::read_to_string(clone.join("file7.txt")).unwrap(),
        "content 7\n".repeat(50)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_writes_an_mp4_that_ffprobe_reads_back() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    let target = mount.at("made.mp4");
    let made = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=duration=20:size=320x240:rate=10",
        ])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-movflags",
            "+faststart",
        ])
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let duration = probe_duration(&target);
    assert!((duration - 20.0).abs() < 1.0, "{duration}");
    let local = std::fs::read(&target).unwrap();
    assert!(server.eventually_has("made.mp4", &local).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_closed_before_a_sigkill_are_committed_by_the_next_mount() {
    if !fuse_available() {
        return;
    }
    let (tmp, server) = server_with_store();
    let (store, state) = (tmp.path().join("store"), tmp.path().join("state"));
    let (addr, url) = (server.addr.to_string(), server.url.clone());
    let mut mount = MountProc::start_with_state(&url, &state, &[]);
    let contents: Vec<Vec<u8>> = (0..5).map(|i| random_bytes(2 * MIB + i * 1000)).collect();
    let mut files: Vec<std::fs::File> = (0..5)
        .map(|i| std::fs::File::create(mount.at(&format!("pending{i}.bin"))).unwrap())
        .collect();
    for (file, data) in files.iter_mut().zip(&contents) {
        file.write_all(data).unwrap();
    }
    // The server goes away, then the files are closed: their uploads cannot
    // happen, but close returns once each is journaled.
    drop(server);
    drop(files);
    let journal = mount_state_dir(&state).join("journal");
    assert!(eventually(Duration::from_secs(5), || journal_records(
        &journal
    )
    .len()
        == 5));
    mount.child.kill().unwrap(); // SIGKILL
    mount.child.wait().unwrap();
    let stale = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["mount", &url])
        .arg(&mount.path)
        .output()
        .unwrap();
    assert!(!stale.status.success());
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("stale mount"),
        "{}",
        String::from_utf8_lossy(&stale.stderr)
    );
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg(&mount.path)
        .status();
    let status = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["mount", &url, "--status"])
        .env("FERRY_STATE_DIR", &state)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&status.stdout).lines().count(),
        5,
        "--status lists the pending uploads"
    );
    drop(mount);
    // The server returns; the next mount of the same URL commits everything.
    let server = Server::spawn(store.to_str().unwrap(), &addr, &[]);
    let remount = MountProc::start_with_state(&url, &state, &[]);
    for (i, data) in contents.iter().enumerate() {
        assert!(
            server
                .eventually_has(&format!("pending{i}.bin"), data)
                .await,
            "pending{i}.bin"
        );
    }
    assert!(eventually(Duration::from_secs(5), || std::fs::read_dir(
        &journal
    )
    .map(|d| d.count())
    .unwrap_or(1)
        == 0));
    assert!(is_mounted(&remount.path));
}

/// An editor's descriptor still open (here a dup of it) when the file is
/// renamed: its close journaled the upload under the old name, so the rename
/// must rewrite that record. A mount killed then commits the file under the
/// new name when it comes back, and nothing under the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_renamed_while_still_open_is_recovered_under_its_new_name() {
    if !fuse_available() {
        return;
    }
    let (tmp, server) = server_with_store();
    let state = tmp.path().join("state");
    let mount = MountProc::start_with_state(&server.url, &state, &[]);
    let data = random_bytes(3 * MIB + 17);
    let mut file = std::fs::File::create(mount.at("draft.tmp")).unwrap();
    file.write_all(&data).unwrap();
    let still_open = file.try_clone().unwrap();
    drop(file); // a close: journaled, but not the last, so not uploaded
    let journal = mount_state_dir(&state).join("journal");
    assert_eq!(journal_records(&journal).len(), 1);
    std::fs::rename(mount.at("draft.tmp"), mount.at("final.txt")).unwrap();
    mount.sigkill();
    drop(still_open);
    let _remount = MountProc::start_with_state(&server.url, &state, &[]);
    assert!(server.eventually_has("final.txt", &data).await);
    assert!(eventually(Duration::from_secs(5), || journal_records(
        &journal
    )
    .is_empty()));
    assert_eq!(server.listed_names("").await, ["final.txt"]);
}

/// A file closed through one descriptor (so journaled) and still open
/// through another is removed, or replaced by a rename: its record goes
/// with it. Kept, a mount killed before the last close would have the next
/// one bring the removed file back, or put it over the file renamed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_or_renamed_over_while_open_stays_gone_after_a_crash() {
    if !fuse_available() {
        return;
    }
    for replaced in [false, true] {
        let (tmp, server) = server_with_store();
        let state = tmp.path().join("state");
        let mount = MountProc::start_with_state(&server.url, &state, &[]);
        let journal = mount_state_dir(&state).join("journal");
        let newer = random_bytes(MIB + 3);
        if replaced {
            std::fs::write(mount.at("new.txt"), &newer).unwrap();
            assert!(server.eventually_has("new.txt", &newer).await);
        }
        let mut file = std::fs::File::create(mount.at("target.txt")).unwrap();
        file.write_all(&random_bytes(2 * MIB + 5)).unwrap();
        let still_open = file.try_clone().unwrap();
        drop(file);
        assert_eq!(journal_records(&journal).len(), 1, "the close's record");
        match replaced {
            true => std::fs::rename(mount.at("new.txt"), mount.at("target.txt")).unwrap(),
            false => std::fs::remove_file(mount.at("target.txt")).unwrap(),
        }
        assert!(
            journal_records(&journal).is_empty(),
            "replaced: {replaced}: {:?}",
            journal_records(&journal)
        );
        mount.sigkill();
        drop(still_open);
        let _remount = MountProc::start_with_state(&server.url, &state, &[]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let expected: &[&str] = if replaced { &["target.txt"] } else { &[] };
        assert_eq!(server.listed_names("").await, expected);
        if replaced {
            let (_, body) = server.get_bytes("target.txt").await;
            assert!(body == newer, "the renamed file stays");
        }
    }
}

/// A file created, written, removed and then fsynced through the descriptor
/// still open (a scratch file a program unlinks at once): as on a local
/// disk the fsync succeeds, and nothing of the file reaches the server,
/// under its name or beside it, before or after the close. An fsync that
/// uploaded it brought the removed file back (a new one), or left a
/// conflict copy (one the server had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fsync_of_a_file_removed_while_open_does_not_bring_it_back() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("old.txt", "committed").await;
    let mount = MountProc::start(&server, &[]);
    for name in ["new.txt", "old.txt"] {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(name == "new.txt")
            .open(mount.at(name))
            .unwrap();
        file.write_all(b"private scratch data").unwrap();
        std::fs::remove_file(mount.at(name)).unwrap();
        file.sync_all()
            .unwrap_or_else(|e| panic!("{name}: fsync after the unlink: {e}"));
        drop(file);
    }
    settle_uploads(&server, &mount).await;
    assert_eq!(server.listed_names("").await, ["marker"]);
}

/// A file replaced by a rename while still open, then fsynced through the
/// old descriptor: the name keeps the file renamed in, and no conflict copy
/// of the replaced one appears (the fsync uploaded it as a second version
/// under that name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fsync_of_a_file_renamed_over_while_open_leaves_the_renamed_file_alone() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("existing/target", "v0").await;
    let mount = MountProc::start(&server, &[]);
    std::fs::create_dir(mount.at("new")).unwrap();
    for dir in ["new", "existing"] {
        let target = mount.at(&format!("{dir}/target"));
        let mut old = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&target)
            .unwrap();
        old.write_all(b"STALE-HANDLE-DATA").unwrap();
        let newer = mount.at(&format!("{dir}/newver"));
        let mut file = std::fs::File::create(&newer).unwrap();
        file.write_all(b"the new version").unwrap();
        file.sync_all().unwrap();
        drop(file);
        std::fs::rename(&newer, &target).unwrap();
        old.sync_all()
            .unwrap_or_else(|e| panic!("{dir}: fsync after the rename: {e}"));
        drop(old);
    }
    settle_uploads(&server, &mount).await;
    for dir in ["new", "existing"] {
        assert_eq!(server.listed_names(dir).await, ["target"], "{dir}");
        let (_, body) = server.get_bytes(&format!("{dir}/target")).await;
        assert_eq!(body, b"the new version", "{dir}");
    }
}

/// Writes a file after everything the test did and waits until the server
/// has it, then a little longer: an upload the test's calls started has
/// had its chance to land.
async fn settle_uploads(server: &Server, mount: &MountProc) {
    std::fs::write(mount.at("marker"), "m").unwrap();
    assert!(server.eventually_has("marker", b"m").await);
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A file removed while open stays usable through its descriptor, as on a
/// local disk: reads return what was written, `fstat` gives its size, and
/// `ftruncate` works, also after a write following the unlink and once the
/// kernel's attributes expired (it then asks the mount, which answered
/// ENOENT for the removed name). Python's `tempfile.TemporaryFile` works
/// so (the mount has no `O_TMPFILE`: it creates and removes a file at
/// once). Nothing of such a file reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_while_open_still_reads_stats_and_truncates_through_its_descriptor() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    let path = mount.at("scratch");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all(b"hello").unwrap();
    std::fs::remove_file(&path).unwrap();
    file.write_all(b" world").unwrap();
    let read_all = |file: &std::fs::File| {
        let mut buf = [0u8; 64];
        let n = file.read_at(&mut buf, 0).expect("pread after the unlink");
        buf[..n].to_vec()
    };
    assert_eq!(file.metadata().expect("fstat after the unlink").len(), 11);
    assert_eq!(read_all(&file), b"hello world");
    file.set_len(3).expect("ftruncate after the unlink");
    assert_eq!(file.metadata().unwrap().len(), 3);
    assert_eq!(read_all(&file), b"hel");
    // Past the attribute TTL (1 s) the kernel asks the mount again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(file.metadata().unwrap().len(), 3);
    file.write_all_at(b"p!", 3).unwrap();
    assert_eq!(read_all(&file), b"help!");
    assert_eq!(file.metadata().unwrap().len(), 5);
    file.set_modified(std::time::SystemTime::now())
        .expect("futimens after the unlink");
    file.sync_all().unwrap();
    drop(file);
    assert!(!path.exists(), "the removed name came back");

    let script = r#"
import os, sys, tempfile
with tempfile.TemporaryFile(dir=sys.argv[1]) as f:
    f.write(b"abc" * 1000)
    f.seek(0)
    assert f.read() == b"abc" * 1000, "read back"
    f.truncate(10)
    assert os.fstat(f.fileno()).st_size == 10, "fstat"
    f.seek(0)
    assert f.read() == b"abcabcabca", "read after truncate"
print("ok")
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&mount.path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "TemporaryFile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    settle_uploads(&server, &mount).await;
    assert_eq!(server.listed_names("").await, ["marker"]);
}

/// `prog > file`: the shell closes its descriptor after the dup (a close,
/// so the file, empty then, is journaled), and the program writes and
/// fsyncs through the other. The fsync commits the file, and the close's
/// record is of no use from then on. Were it kept, a crash of the machine
/// before the last close would have the next mount upload the staging file
/// (not synced since that close, so torn) over the version fsync made
/// durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fsync_retires_the_record_an_earlier_close_of_the_file_left() {
    if !fuse_available() {
        return;
    }
    let (tmp, server) = server_with_store();
    let state = tmp.path().join("state");
    let mount = MountProc::start_with_state(&server.url, &state, &[]);
    let journal = mount_state_dir(&state).join("journal");
    let shell = std::fs::File::create(mount.at("log.txt")).unwrap();
    let mut program = shell.try_clone().unwrap();
    drop(shell);
    assert_eq!(journal_records(&journal).len(), 1, "the close's record");
    let data = random_bytes(3 * MIB + 17);
    program.write_all(&data).unwrap();
    program.sync_all().unwrap();
    let (code, body) = server.get_bytes("log.txt").await;
    assert!(code == 200 && body == data, "fsync returned once committed");
    assert!(
        journal_records(&journal).is_empty(),
        "{:?}",
        journal_records(&journal)
    );
    // The machine restarts with the file open: the mount dies and the
    // staging file is torn.
    mount.sigkill();
    drop(program);
    for staged in std::fs::read_dir(mount_state_dir(&state).join("staging")).unwrap() {
        let staged = staged.unwrap().path();
        let len = std::fs::metadata(&staged).unwrap().len() as usize;
        std::fs::write(&staged, random_bytes(len)).unwrap();
    }
    let _remount = MountProc::start_with_state(&server.url, &state, &[]);
    assert!(eventually(Duration::from_secs(5), || journal_records(
        &journal
    )
    .is_empty()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, body) = server.get_bytes("log.txt").await;
    assert!(body == data, "the fsynced version stays");
}

/// A file closed through one descriptor (journaled) is written on and
/// fsynced through another while the server does not answer, and the mount
/// is killed: two records of the same file, the close's and the fsync's.
/// The next mount commits the newer content once, not a second time as a
/// conflict with itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_killed_during_an_fsync_after_a_close_commits_the_file_once() {
    use std::os::fd::IntoRawFd;
    if !fuse_available() {
        return;
    }
    let (tmp, server) = server_with_store();
    server.put("f.txt", "old").await;
    let state = tmp.path().join("state");
    let mount = MountProc::start_with_state(&server.url, &state, &[]);
    let journal = mount_state_dir(&state).join("journal");
    let data = random_bytes(2 * MIB + 9);
    let mut file = std::fs::File::create(mount.at("f.txt")).unwrap();
    file.write_all(&data[..MIB]).unwrap();
    let other = file.try_clone().unwrap();
    drop(file);
    assert_eq!(journal_records(&journal).len(), 1, "the close's record");
    (&other).write_all(&data[MIB..]).unwrap();
    server.pause();
    let fd = other.into_raw_fd();
    // SAFETY: `fd` is owned here and never used again; the dead mount
    // makes this fsync fail, and the descriptor goes with the process.
    let fsync = std::thread::spawn(move || unsafe { libc::fsync(fd) });
    assert!(
        eventually(Duration::from_secs(10), || journal_records(&journal).len()
            == 2),
        "{:?}",
        journal_records(&journal)
    );
    mount.sigkill();
    server.resume();
    let _ = fsync.join().unwrap();
    let _remount = MountProc::start_with_state(&server.url, &state, &[]);
    assert!(server.eventually_has("f.txt", &data).await);
    assert!(eventually(Duration::from_secs(5), || journal_records(
        &journal
    )
    .is_empty()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.listed_names("").await, ["f.txt"]);
}

/// A server on `store` in a fresh directory, beside which a mount's
/// `state` goes, so that both can be restarted on the same data.
fn server_with_store() -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    (tmp, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_during_a_stalled_fsync_makes_its_upload_durable() {
    use std::os::fd::IntoRawFd;
    if !fuse_available() {
        return;
    }
    let (tmp, server) = server_with_store();
    let (store, state) = (tmp.path().join("store"), tmp.path().join("state"));
    let (addr, url) = (server.addr.to_string(), server.url.clone());
    let mount = MountProc::start_with_state(&url, &state, &[]);
    let journal = mount_state_dir(&state).join("journal");
    let data = random_bytes(3 * MIB);
    let mut file = std::fs::File::create(mount.at("synced.bin")).unwrap();
    file.write_all(&data).unwrap();
    // The server goes away: fsync waits for a commit that cannot come yet.
    drop(server);
    let fd = file.into_raw_fd();
    // SAFETY: the descriptor stays open until the close below, which the
    // kernel lets run beside this fsync (it holds the open file itself).
    let fsync = std::thread::spawn(move || unsafe { libc::fsync(fd) });
    // fsync does not sync the staging file (the commit is what it waits
    // for); its upload's record says so.
    assert!(
        eventually(Duration::from_secs(10), || {
            journal_records(&journal)
                .iter()
                .any(|r| r.contains("unsynced_boot"))
        }),
        "{:?}",
        journal_records(&journal)
    );
    // The record is written just before fsync marks the file clean.
    std::thread::sleep(Duration::from_millis(200));
    // Another thread closes the descriptor while fsync waits. A closed file
    // must survive a crash of the machine, so close syncs it first.
    // SAFETY: `fd` is open and owned here; fsync holds its own reference.
    assert_eq!(unsafe { libc::close(fd) }, 0);
    let records = journal_records(&journal);
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(!records[0].contains("unsynced_boot"), "{}", records[0]);
    // The server returns; fsync returns once the file is committed.
    let server = Server::spawn(store.to_str().unwrap(), &addr, &[]);
    assert_eq!(fsync.join().unwrap(), 0);
    assert!(server.eventually_has("synced.bin", &data).await);
    assert!(eventually(Duration::from_secs(5), || journal_records(
        &journal
    )
    .is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_drops_only_unsynced_uploads_of_an_earlier_boot() {
    if !fuse_available() {
        return;
    }
    let (tmp, server) = server_with_store();
    let state = tmp.path().join("state");
    drop(MountProc::start_with_state(&server.url, &state, &[]));
    // What a mount killed during three fsyncs leaves: uploads whose staging
    // files were not synced, recorded in this boot, an earlier one, or
    // (from a mount before such records existed) synced.
    let dir = mount_state_dir(&state);
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let uploads = [
        ("this-boot.bin", Some(this_boot.trim())),
        (
            "earlier-boot.bin",
            Some("00000000-0000-0000-0000-000000000000"),
        ),
        ("synced.bin", None),
    ];
    let mut staged = Vec::new();
    for (i, (name, boot)) in uploads.iter().enumerate() {
        let local = dir.join("staging").join(format!("left{i}"));
        let data = random_bytes(MIB + i);
        std::fs::write(&local, &data).unwrap();
        let mut record = serde_json::json!({
            "path": name, "local": local, "base_etag": null, "session_id": null,
            "queued_at": "2026-12-07T00:00:00Z",
        });
        if let Some(boot) = boot {
            record["unsynced_boot"] = (*boot).into();
        }
        let record_path = dir.join("journal").join(format!("left{i}.json"));
        std::fs::write(record_path, record.to_string()).unwrap();
        staged.push((local, data));
    }
    let _mount = MountProc::start_with_state(&server.url, &state, &[]);
    assert!(server.eventually_has("this-boot.bin", &staged[0].1).await);
    assert!(server.eventually_has("synced.bin", &staged[2].1).await);
    let journal = dir.join("journal");
    assert!(eventually(Duration::from_secs(5), || journal_records(
        &journal
    )
    .is_empty()));
    // The earlier boot's file may be torn: neither uploaded nor kept.
    assert_eq!(server.get_bytes("earlier-boot.bin").await.0, 404);
    assert!(!staged[1].0.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_remotely_while_open_keeps_both_versions() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("shared.txt", "original").await;
    let mount = MountProc::start(&server, &[]);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.at("shared.txt"))
        .unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.write_all(b"LOCAL EDIT").unwrap();
    server.put("shared.txt", "remote edit").await;
    file.sync_all().unwrap();
    drop(file);
    assert_eq!(
        server.get_bytes("shared.txt").await.1,
        b"remote edit",
        "the remote version is not clobbered"
    );
    let conflict = server
        .listed_names("")
        .await
        .into_iter()
        .find(|n| n.starts_with("shared.txt.conflict-"))
        .expect("a conflict copy beside the file");
    assert_eq!(server.get_bytes(&conflict).await.1, b"LOCAL EDIT");
}

/// A new file, created elsewhere under the same name before this one is
/// uploaded (here while it is still open; with write-behind, while its
/// chunks are on their way): both are kept, as for an edited file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_created_elsewhere_meanwhile_keeps_both_versions() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    let mount = MountProc::start(&server, &[]);
    for (name, size) in [("small.txt", 1000), ("written-behind.bin", 40 * MIB + 3)] {
        let ours = random_bytes(size);
        let mut file = std::fs::File::create(mount.at(name)).unwrap();
        file.write_all(&ours).unwrap();
        server.put(name, "created elsewhere").await;
        drop(file);
        let mut found = None;
        for _ in 0..100 {
            found = server
                .listed_names("")
                .await
                .into_iter()
                .find(|n| n.starts_with(&format!("{name}.conflict-")));
            if found.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let conflict = found.unwrap_or_else(|| panic!("{name}: a conflict copy beside it"));
        assert!(server.get_bytes(&conflict).await.1 == ours, "{name}");
        assert_eq!(
            server.get_bytes(name).await.1,
            b"created elsewhere",
            "{name}: the other file is not clobbered"
        );
    }
}

/// Two writers opening one existing file at the same moment (two `dd
/// conv=notrunc` into one file, say) share it, as on a local disk: both
/// writes reach the server, and no conflict copy appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_opening_a_file_at_once_both_keep_their_writes() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    for round in 0..8 {
        store_file(&server, &format!("shared/{round}.txt"), &[b'.'; 100]);
    }
    let mount = MountProc::start(&server, &[]);
    for round in 0..8 {
        let path = mount.at(&format!("shared/{round}.txt"));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let writers: Vec<_> = [(10, b"AAAA"), (50, b"BBBB")]
            .into_iter()
            .map(|(offset, data)| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    file.write_all_at(data, offset).unwrap();
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let mut want = [b'.'; 100];
        want[10..14].copy_from_slice(b"AAAA");
        want[50..54].copy_from_slice(b"BBBB");
        assert_eq!(std::fs::read(&path).unwrap(), want, "round {round}");
        let name = format!("shared/{round}.txt");
        assert!(server.eventually_has(&name, &want).await, "round {round}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.listed_names("shared").await.len(),
        8,
        "no conflict copies"
    );
}

/// Pages of a shared mapping written back together (an `msync`) land in
/// one block of the remote version at once: each keeps its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_shared_mapping_all_reach_the_server() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    for round in 0..8 {
        store_file(&server, &format!("mapped/{round}.bin"), &[b'.'; 10_000]);
    }
    let mount = MountProc::start(&server, &[]);
    for round in 0..8 {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(mount.at(&format!("mapped/{round}.bin")))
            .unwrap();
        map_and_write(&file, &[(100, b"HELLO"), (9995, b"WORLD")]);
        drop(file);
        let mut want = vec![b'.'; 10_000];
        want[100..105].copy_from_slice(b"HELLO");
        want[9995..].copy_from_slice(b"WORLD");
        let name = format!("mapped/{round}.bin");
        assert!(server.eventually_has(&name, &want).await, "round {round}");
    }
}

/// Maps all of `file` shared, makes `writes` through the mapping, a few
/// milliseconds apart, and syncs them with `msync`.
fn map_and_write(file: &std::fs::File, writes: &[(usize, &[u8])]) {
    use std::os::fd::AsRawFd;
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a fresh shared mapping of the whole file, written only within
    // its length and unmapped before returning.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(at, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        for (offset, data) in writes {
            assert!(offset + data.len() <= len);
            std::ptr::copy_nonoverlapping(data.as_ptr(), at.cast::<u8>().add(*offset), data.len());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            libc::msync(at, len, libc::MS_SYNC),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::munmap(at, len), 0);
    }
}

/// A directory the server has only through the files in it (made by a PUT,
/// not `mkdir`) goes with its last file: `rm -r` of it still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_r_of_a_directory_that_only_its_files_made_succeeds() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("implicit/a.txt", "a").await;
    server.put("implicit/sub/b.txt", "b").await;
    let mount = MountProc::start(&server, &[]);
    let status = Command::new("rm")
        .arg("-r")
        .arg(mount.at("implicit"))
        .status()
        .unwrap();
    assert!(status.success(), "rm -r failed");
    assert!(!mount.at("implicit").exists());
    assert!(server.listed_names("").await.is_empty());
}

/// A name the server's local store cannot hold (254 bytes: its limit is 253)
/// is refused with ENAMETOOLONG when it is made, as a local filesystem
/// answers: a file created under it was staged and its upload refused, and
/// retried, for good, its fsync never returning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_too_long_for_the_store_is_enametoolong() {
    if !fuse_available() {
        return;
    }
    let server = Server::start();
    server.put("dir/short.txt", "short").await;
    let mount = MountProc::start(&server, &[]);
    let long = "a".repeat(254);
    let too_long = |e: std::io::Error| {
        assert_eq!(e.raw_os_error(), Some(36), "{e}");
    };
    too_long(std::fs::create_dir(mount.at(&format!("dir/{long}"))).unwrap_err());
    too_long(
        std::fs::rename(mount.at("dir/short.txt"), mount.at(&format!("dir/{long}"))).unwrap_err(),
    );
    assert_eq!(std::fs::read(mount.at("dir/short.txt")).unwrap(), b"short");

    too_long(std::fs::File::create(mount.at(&format!("dir/{long}"))).unwrap_err());
    let accented = "é".repeat(127);
    too_long(std::fs::File::create(mount.at(&format!("dir/{accented}"))).unwrap_err());
    let mut names: Vec<String> = std::fs::read_dir(mount.at("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["short.txt"]);
    assert_eq!(server.listed_names("dir").await, ["short.txt"]);
    // A name that fits is written as usual.
    let fits = "b".repeat(253);
    let mut file = std::fs::File::create(mount.at(&format!("dir/{fits}"))).unwrap();
    file.write_all(b"fits").unwrap();
    file.sync_all().unwrap();
    assert_eq!(server.get_bytes(&format!("dir/{fits}")).await.1, b"fits");
}

/// A server that refuses a file's upload for its name, though the mount
/// learnt no limit at its start (another store came up behind the same
/// address): `fsync` returns the reason instead of waiting for good, and
/// the file, kept, is tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_returns_when_the_server_refuses_the_name_for_good() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let first = Server::spawn("memory://", "127.0.0.1:0", &[]);
    let addr = first.addr.to_string();
    let mount = MountProc::start(&first, &[]);
    drop(first);
    let store = tmp.path().join("store");
    let server = Server::spawn(store.to_str().unwrap(), &addr, &[]);
    let long = mount.at(&"a".repeat(254));
    let mut file = std::fs::File::create(&long).unwrap();
    file.write_all(b"kept").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(file.sync_all()));
    let synced = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("fsync returned");
    assert_eq!(synced.unwrap_err().raw_os_error(), Some(36));
    // Still there, its upload still tried.
    assert_eq!(std::fs::read(&long).unwrap(), b"kept");
    assert_eq!(server.listed_names("").await, Vec::<String>::new());
}
