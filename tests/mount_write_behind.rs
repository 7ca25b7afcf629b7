//! Write-behind on real FUSE mounts: the chunks of a file being written
//! reach the server before it is closed, the upload at close continues that
//! session (after a mount or a server killed mid-upload too), and a write
//! into a chunk already sent loses nothing.

mod harness;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::mount::{MountProc, fuse_available, journal_records, mount_state_dir};
use harness::{Server, eventually, random_bytes};

const MIB: usize = 1 << 20;

/// Upload sessions in a local store.
fn sessions(store: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(store.join(".ferry/uploads"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Chunks the server holds for sessions still open.
fn chunks_received(store: &Path) -> usize {
    sessions(store)
        .iter()
        .filter_map(|s| std::fs::read(s.join("chunks")).ok())
        .map(|map| map.iter().filter(|b| **b == 1).count())
        .sum()
}

/// Writes `data` in 1 MiB writes, keeping the file open.
fn write_open(path: &Path, data: &[u8]) -> std::fs::File {
    let mut file = std::fs::File::create(path).unwrap();
    for piece in data.chunks(MIB) {
        file.write_all(piece).unwrap();
    }
    file
}

/// A fresh directory and the path of a local store in it; `None` where
/// FUSE is not available.
fn fuse_and_store() -> Option<(tempfile::TempDir, PathBuf)> {
    if !fuse_available() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    Some((tmp, store))
}

/// The server serves `data` as `name`, uploaded through a single session:
/// the upload at close continued write-behind's.
async fn assert_committed_through_one_session(
    server: &Server,
    store: &Path,
    name: &str,
    data: &[u8],
) {
    let (code, body) = server.get_bytes(name).await;
    assert_eq!(code, 200);
    assert!(body == data, "the server's copy differs");
    assert_eq!(
        sessions(store).len(),
        1,
        "the upload continued the write-behind session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_being_written_reaches_the_server_before_it_is_closed() {
    let Some((_tmp, store)) = fuse_and_store() else {
        return;
    };
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let mount = MountProc::start(&server, &[]);
    let mut data = random_bytes(64 * MIB);
    let mut file = write_open(&mount.at("growing.bin"), &data);
    assert!(
        eventually(Duration::from_secs(20), || chunks_received(&store) >= 5),
        "chunks are sent while the file is open"
    );
    // A header patched at the start (as MP4 muxers do) is fine: chunk 0 is
    // never sent early.
    file.write_all_at(b"patched header", 4).unwrap();
    data[4..18].copy_from_slice(b"patched header");
    let tail = random_bytes(3 * MIB + 17);
    file.write_all(&tail).unwrap();
    data.extend_from_slice(&tail);
    file.sync_all().unwrap();
    drop(file);
    assert_committed_through_one_session(&server, &store, "growing.bin", &data).await;
}

/// A large file removed while still open (a scratch file): write-behind
/// stops sending it at the unlink and its session goes, rather than the
/// server taking every chunk written until the last close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_while_open_is_no_longer_sent_to_the_server() {
    let Some((_tmp, store)) = fuse_and_store() else {
        return;
    };
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let mount = MountProc::start(&server, &[]);
    let mut file = write_open(&mount.at("scratch.bin"), &random_bytes(64 * MIB));
    assert!(
        eventually(Duration::from_secs(20), || chunks_received(&store) >= 3),
        "chunks are sent while the file is open"
    );
    std::fs::remove_file(mount.at("scratch.bin")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || sessions(&store).is_empty()),
        "the session is aborted at the unlink"
    );
    for piece in random_bytes(32 * MIB).chunks(MIB) {
        file.write_all(piece).unwrap();
    }
    file.sync_all().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(sessions(&store).is_empty(), "nothing more was sent");
    drop(file);
    std::fs::write(mount.at("marker"), "m").unwrap();
    assert!(server.eventually_has("marker", b"m").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.listed_names("").await, ["marker"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_closed_after_dup_keeps_write_behind_going() {
    let Some((_tmp, store)) = fuse_and_store() else {
        return;
    };
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let mount = MountProc::start(&server, &[]);
    // What a shell's `> file` and dd do: open, dup, close the first
    // descriptor (a FUSE flush), then write through the other.
    let first = std::fs::File::create(mount.at("redirected.bin")).unwrap();
    let mut file = first.try_clone().unwrap();
    drop(first);
    let data = random_bytes(64 * MIB);
    for piece in data.chunks(MIB) {
        file.write_all(piece).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(20), || chunks_received(&store) >= 5),
        "chunks are sent while the file is open, after the flush"
    );
    drop(file);
    let committed = eventually(Duration::from_secs(30), || {
        std::fs::read(store.join("redirected.bin")).is_ok_and(|b| b.len() == data.len())
    });
    assert!(committed, "the file is committed after its last close");
    assert_committed_through_one_session(&server, &store, "redirected.bin", &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_into_chunks_already_sent_upload_the_file_whole() {
    let Some((_tmp, store)) = fuse_and_store() else {
        return;
    };
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let mount = MountProc::start(&server, &["--no-write-behind"]);
    let plain = random_bytes(40 * MIB);
    std::fs::write(mount.at("plain.bin"), &plain).unwrap();
    assert!(server.eventually_has("plain.bin", &plain).await);
    assert!(sessions(&store).len() <= 1, "--no-write-behind");
    drop(mount);

    let mount = MountProc::start(&server, &[]);
    let before = sessions(&store).len();
    // An overwrite inside a sent chunk.
    let mut over = random_bytes(64 * MIB);
    let file = write_open(&mount.at("overwritten.bin"), &over);
    assert!(eventually(Duration::from_secs(20), || chunks_received(
        &store
    ) >= 3));
    file.write_all_at(b"changed", 9 * MIB as u64).unwrap();
    over[9 * MIB..9 * MIB + 7].copy_from_slice(b"changed");
    drop(file);
    assert!(server.eventually_has("overwritten.bin", &over).await);
    // A truncate below a sent chunk.
    let mut cut = random_bytes(64 * MIB);
    let file = write_open(&mount.at("truncated.bin"), &cut);
    assert!(eventually(Duration::from_secs(20), || chunks_received(
        &store
    ) >= 3));
    file.set_len(20 * MIB as u64 + 3).unwrap();
    cut.truncate(20 * MIB + 3);
    drop(file);
    assert!(server.eventually_has("truncated.bin", &cut).await);
    // Each abandoned session is aborted; one new session per file remains.
    assert!(
        eventually(Duration::from_secs(10), || sessions(&store).len()
            == before + 2),
        "{:?}",
        sessions(&store)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_killed_after_close_finishes_the_write_behind_session() {
    let Some((tmp, store)) = fuse_and_store() else {
        return;
    };
    let state = tmp.path().join("state");
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let url = server.url.clone();
    let mount = MountProc::start_with_state(&url, &state, &[]);
    let data = random_bytes(48 * MIB + 5);
    let file = write_open(&mount.at("killed.bin"), &data);
    assert!(eventually(Duration::from_secs(20), || chunks_received(
        &store
    ) >= 3));
    // The server stops answering; close still returns (it only journals).
    server.pause();
    drop(file);
    mount.sigkill();
    server.resume();
    let _remount = MountProc::start_with_state(&url, &state, &[]);
    assert!(server.eventually_has("killed.bin", &data).await);
    assert_eq!(
        sessions(&store).len(),
        1,
        "the next mount continued the journaled session"
    );
}

/// The state of session `dir` (`open` or `committed`), from its manifest.
fn session_state(dir: &Path) -> Option<String> {
    let manifest = std::fs::read(dir.join("manifest.json")).ok()?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).ok()?;
    manifest["state"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_upload_is_caught_up_with_when_it_returns() {
    let Some((_tmp, store)) = fuse_and_store() else {
        return;
    };
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let addr = server.addr.to_string();
    let mount = MountProc::start(&server, &["--retry-for", "2"]);
    let data = random_bytes(48 * MIB + 5);
    let mut file = write_open(&mount.at("interrupted.bin"), &data[..40 * MIB]);
    // Opened now: creating a name needs the server.
    let mut later_file = std::fs::File::create(mount.at("later.bin")).unwrap();
    assert!(eventually(Duration::from_secs(20), || chunks_received(
        &store
    ) >= 3));
    let session = sessions(&store).pop().expect("write-behind's session");
    // SIGKILL, with some of the file's chunks on the server.
    drop(server);
    // Writes, closes and reads of open files still work locally.
    file.write_all(&data[40 * MIB..]).unwrap();
    let closing = std::time::Instant::now();
    drop(file);
    assert!(
        closing.elapsed() < Duration::from_secs(5),
        "close waits for the server ({:?})",
        closing.elapsed()
    );
    let later = random_bytes(3 * MIB + 1);
    later_file.write_all(&later).unwrap();
    drop(later_file);
    assert!(std::fs::read(mount.at("interrupted.bin")).unwrap() == data);
    // The server returns at the same address; the same mount catches up.
    let server = Server::spawn(store.to_str().unwrap(), &addr, &[]);
    assert!(server.eventually_has("interrupted.bin", &data).await);
    assert!(server.eventually_has("later.bin", &later).await);
    assert_eq!(
        session_state(&session).as_deref(),
        Some("committed"),
        "the upload continued the session the server held"
    );
}

/// Bytes of the disk that the tail copy a journal `record` names takes.
fn tail_copy_allocated(record: &serde_json::Value) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let copy = &record["tail_copy"];
    assert!(copy.is_object(), "the close synced a tail copy: {record}");
    std::fs::metadata(copy["path"].as_str().unwrap())
        .unwrap()
        .blocks()
        * 512
}

/// Writes `data` to `name` through a mount whose server keeps any pace,
/// and closes it while a second descriptor keeps it open: the close
/// completes and journals the file, and the upload waits for the last
/// descriptor. Checks that the close left all of the file but its last,
/// partial chunk on the server; returns the mount, that descriptor and the
/// journal record.
fn closed_on_the_server_while_open_elsewhere(
    server: &Server,
    store: &Path,
    state: &Path,
    name: &str,
    data: &[u8],
) -> (MountProc, std::fs::File, serde_json::Value) {
    // Any pace will do, whatever else keeps the machine busy.
    let mount = MountProc::start_with_state(&server.url, state, &["--server-pace", "1M"]);
    let file = write_open(&mount.at(name), data);
    let other = file.try_clone().unwrap();
    drop(file);
    let records = journal_records(&mount_state_dir(state).join("journal"));
    assert_eq!(records.len(), 1);
    let record: serde_json::Value = serde_json::from_str(&records[0]).unwrap();
    let copied = tail_copy_allocated(&record);
    assert!(
        copied <= 64 << 10,
        "the copy holds only the last, partial chunk ({copied} bytes)"
    );
    assert_eq!(
        chunks_received(store),
        (data.len() / (8 * MIB)),
        "every whole chunk, chunk 0 too, was acknowledged before the close returned"
    );
    (mount, other, record)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_while_the_server_keeps_up_leaves_only_the_last_chunk_to_the_local_disk() {
    let Some((tmp, store)) = fuse_and_store() else {
        return;
    };
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    // Eight whole chunks of 8 MiB, then 5 bytes.
    let data = random_bytes(64 * MIB + 5);
    let state = tmp.path().join("state");
    let (_mount, other, _) =
        closed_on_the_server_while_open_elsewhere(&server, &store, &state, "settled.bin", &data);
    drop(other);
    assert!(server.eventually_has("settled.bin", &data).await);
    assert_committed_through_one_session(&server, &store, "settled.bin", &data).await;
}

/// A file closed while open elsewhere, its record counting on write-behind's
/// session, is then written into a chunk already sent, through the
/// descriptor left open: the session is no use to the new content, but it
/// is kept while the record of the closed content counts on it (a crash of
/// the machine must still rebuild that), and aborted once that record is
/// replaced by the next close's (while the file stays open), or dropped
/// after an `fsync` committed the new content or with the file removed;
/// not left on the server until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_only_a_replaced_record_counted_on_is_aborted() {
    let Some((tmp, _)) = fuse_and_store() else {
        return;
    };
    // Three whole chunks of 8 MiB, then 5 bytes.
    let data = random_bytes(24 * MIB + 5);
    let mut changed = data.clone();
    changed[9 * MIB..9 * MIB + 7].copy_from_slice(b"changed");
    for then in ["closed", "synced", "removed"] {
        let name = format!("{then}.bin");
        let store = tmp.path().join(then).join("store");
        let server = Server::start_on(store.to_str().unwrap(), &[]);
        let state = tmp.path().join(then).join("state");
        let (mount, other, record) =
            closed_on_the_server_while_open_elsewhere(&server, &store, &state, &name, &data);
        let held = record["tail_copy"]["session"].as_str().unwrap().to_owned();
        let held_exists = || sessions(&store).iter().any(|s| s.ends_with(&held));
        assert!(held_exists(), "{held}: {:?}", sessions(&store));
        other.write_all_at(b"changed", 9 * MIB as u64).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            held_exists(),
            "{then}: the record of the closed content still counts on it"
        );
        match then {
            "closed" => {
                // Closed again, still open through `other`: the new record
                // replaces the old one, and the session goes at once.
                drop(other.try_clone().unwrap());
                assert!(
                    eventually(Duration::from_secs(10), || !held_exists()),
                    "closed: the session no record counts on is aborted: {:?}",
                    sessions(&store)
                );
            }
            "synced" => other.sync_all().unwrap(),
            "removed" => std::fs::remove_file(mount.at(&name)).unwrap(),
            _ => {}
        }
        drop(other);
        if then != "removed" {
            assert!(server.eventually_has(&name, &changed).await, "{then}");
        }
        assert!(
            eventually(Duration::from_secs(10), || !held_exists()),
            "{then}: the session no record counts on is aborted: {:?}",
            sessions(&store)
        );
        let uploads = usize::from(then != "removed");
        assert_eq!(
            sessions(&store).len(),
            uploads,
            "{then}: only the upload's own"
        );
    }
}

/// The copy of a closed file's tail takes staging space like the file:
/// with no room for it under `--max-staging`, the close syncs the whole
/// file instead; with room, it copies the tail. Either way the file
/// commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_copy_without_room_under_max_staging_gives_way_to_a_whole_sync() {
    let Some((tmp, store)) = fuse_and_store() else {
        return;
    };
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    // Eight whole chunks on the server by the close; a 3 MiB tail to copy.
    let data = random_bytes(67 * MIB);
    for (name, room, copies) in [("tight.bin", MIB, false), ("roomy.bin", 8 * MIB, true)] {
        let state = tmp.path().join(name);
        let limit = (data.len() + room).to_string();
        let mount = MountProc::start_with_state(
            &server.url,
            &state,
            &["--server-pace", "1M", "--max-staging", &limit],
        );
        let file = write_open(&mount.at(name), &data);
        let other = file.try_clone().unwrap();
        drop(file);
        let records = journal_records(&mount_state_dir(&state).join("journal"));
        assert_eq!(records.len(), 1);
        let record: serde_json::Value = serde_json::from_str(&records[0]).unwrap();
        assert_eq!(record["tail_copy"].is_object(), copies, "{name}: {record}");
        drop(other);
        assert!(server.eventually_has(name, &data).await, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_machine_restart_a_file_its_close_left_on_the_server_is_rebuilt() {
    let Some((tmp, store)) = fuse_and_store() else {
        return;
    };
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let data = random_bytes(64 * MIB + 5);
    let state = tmp.path().join("state");
    let (mount, other, mut record) =
        closed_on_the_server_while_open_elsewhere(&server, &store, &state, "settled.bin", &data);
    mount.sigkill();
    drop(other);
    restart_the_machine(&mount_state_dir(&state).join("journal"), &mut record);
    let _remount = MountProc::start_with_state(&server.url, &state, &[]);
    assert!(server.eventually_has("settled.bin", &data).await);
    assert_committed_through_one_session(&server, &store, "settled.bin", &data).await;
}

/// The machine "restarts" under a killed mount's journal, whose only
/// record is `record`: the record's boot becomes another one and the
/// staging file, never synced, is torn (overwritten here with garbage).
fn restart_the_machine(journal: &Path, record: &mut serde_json::Value) {
    let local = PathBuf::from(record["local"].as_str().unwrap());
    let len = std::fs::metadata(&local).unwrap().len() as usize;
    std::fs::write(&local, random_bytes(len)).unwrap();
    record["tail_copy"]["boot"] = "00000000-0000-0000-0000-000000000000".into();
    let name = std::fs::read_dir(journal)
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))
        .unwrap()
        .path();
    std::fs::write(name, serde_json::to_vec(&*record).unwrap()).unwrap();
}

/// A file closed while write-behind's session held most of it and the
/// server stopped answering: the close syncs only a copy of what the
/// session lacks. Then the mount is killed and the machine restarts (see
/// [`restart_the_machine`]). Returns the record.
async fn closed_with_a_tail_copy_then_restarted(
    server: &Server,
    store: &Path,
    state: &Path,
    data: &[u8],
) -> serde_json::Value {
    let mount = MountProc::start_with_state(&server.url, state, &[]);
    let file = write_open(&mount.at("restarted.bin"), data);
    // Chunks 1 to 6 of the 8 can go early; the close needs half acknowledged.
    assert!(eventually(Duration::from_secs(20), || chunks_received(
        store
    ) >= 6));
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.pause();
    drop(file);
    let journal = mount_state_dir(state).join("journal");
    let records = journal_records(&journal);
    assert_eq!(records.len(), 1);
    mount.sigkill();
    let mut record: serde_json::Value = serde_json::from_str(&records[0]).unwrap();
    let copied = tail_copy_allocated(&record);
    assert!(
        copied < data.len() as u64 / 2,
        "the copy holds only what the session lacks ({copied} bytes)"
    );
    restart_the_machine(&journal, &mut record);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_machine_restart_a_file_is_rebuilt_from_its_session_and_its_synced_tail() {
    let Some((tmp, store)) = fuse_and_store() else {
        return;
    };
    let state = tmp.path().join("state");
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let data = random_bytes(64 * MIB + 5);
    closed_with_a_tail_copy_then_restarted(&server, &store, &state, &data).await;
    server.resume();
    let _remount = MountProc::start_with_state(&server.url, &state, &[]);
    assert!(server.eventually_has("restarted.bin", &data).await);
    let dir = mount_state_dir(&state);
    assert!(eventually(Duration::from_secs(5), || {
        journal_records(&dir.join("journal")).is_empty()
            && std::fs::read_dir(dir.join("staging")).unwrap().count() == 0
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_machine_restart_a_lost_session_commits_nothing_in_the_files_place() {
    let Some((tmp, store)) = fuse_and_store() else {
        return;
    };
    let state = tmp.path().join("state");
    let server = Server::start_on(store.to_str().unwrap(), &[]);
    let data = random_bytes(64 * MIB + 5);
    let record = closed_with_a_tail_copy_then_restarted(&server, &store, &state, &data).await;
    server.resume();
    let session = record["session_id"].as_str().unwrap();
    let aborted = server
        .client()
        .delete(format!("{}/v1/uploads/{session}", server.url))
        .send()
        .await
        .unwrap();
    assert!(aborted.status().is_success(), "{}", aborted.status());
    let remount = MountProc::start_with_state(&server.url, &state, &[]);
    let dir = mount_state_dir(&state);
    assert!(
        eventually(Duration::from_secs(20), || journal_records(
            &dir.join("journal")
        )
        .is_empty()),
        "the upload gives up"
    );
    assert_eq!(server.get_bytes("restarted.bin").await.0, 404);
    assert!(
        std::fs::read_dir(dir.join("staging")).unwrap().count() > 0,
        "its files are kept"
    );
    drop(remount);
}
