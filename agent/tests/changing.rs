//! A file that never stays unchanged long enough to settle (a log appended
//! to by a program that keeps it open) is pushed anyway once it has waited
//! the maximum delay, as snapshots of what it held; once it stops changing,
//! its final version is pushed.

mod harness;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{Agent, Server, eventually, remote_bytes};

/// Generous: the machine running the tests may be busy.
const PATIENCE: Duration = Duration::from_secs(90);
/// Written before the first snapshot counts: more than the first few
/// appends, so that the file was already changing for a while.
const AT_LEAST: usize = 1000;

/// Appends a line to `path` every 300 ms, through one open file, until
/// told to stop (or for at most five minutes). Returns what was written so
/// far, shared, and the stop flag.
fn appender(path: std::path::PathBuf) -> (Arc<Mutex<Vec<u8>>>, Arc<AtomicBool>) {
    let written = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (w, s) = (written.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut file = std::fs::File::create(&path).unwrap();
        let until = Instant::now() + Duration::from_secs(300);
        let mut i = 0u32;
        while !s.load(Ordering::SeqCst) && Instant::now() < until {
            let line = format!("{i:06} the service is still running and logging\n");
            // Recorded first: the file never holds more than `written`.
            w.lock().unwrap().extend_from_slice(line.as_bytes());
            file.write_all(line.as_bytes()).unwrap();
            i += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    (written, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_appended_to_all_the_time_is_pushed_while_it_grows_and_whole_once_it_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "box");
    agent.start(&["--max-settle-delay", "3s"]);
    let client = server.client();
    let (written, stop) = appender(agent.path("service.log"));

    // A snapshot while it is being appended to: a prefix of what was written.
    let first = Arc::new(Mutex::new(0usize));
    let prefix_of_written = |at_least: usize| {
        let (client, written, first) = (client.clone(), written.clone(), first.clone());
        async move {
            let Some(remote) = remote_bytes(&client, "box/service.log").await else {
                return false;
            };
            let written = written.lock().unwrap();
            assert!(
                written.starts_with(&remote),
                "the server has {} bytes that are not what was written",
                remote.len()
            );
            *first.lock().unwrap() = remote.len();
            remote.len() >= at_least
        }
    };
    assert!(
        eventually(PATIENCE, || prefix_of_written(AT_LEAST)).await,
        "a file that keeps changing was not pushed:\n{}\n{}",
        agent.status(),
        agent.log_text()
    );
    assert!(!stop.load(Ordering::SeqCst));
    let first = *first.lock().unwrap();
    assert!(
        eventually(PATIENCE, || async {
            agent.status().contains("still changing:  1 files")
                && agent.status().contains("service.log (snapshot of ")
        })
        .await,
        "status does not say the file is still changing:\n{}",
        agent.status()
    );

    // The clock starts again after a snapshot: another, longer one follows
    // while it keeps growing.
    assert!(
        eventually(PATIENCE, || prefix_of_written(first + 1)).await,
        "no later snapshot of a file that keeps changing:\n{}",
        agent.log_text()
    );

    // Once the appends stop, the file settles and goes up whole (a little
    // more was appended since the last snapshot, most likely).
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = written.lock().unwrap().clone();
    assert!(
        eventually(PATIENCE, || async {
            remote_bytes(&client, "box/service.log").await.as_ref() == Some(&all)
        })
        .await,
        "the final version was not pushed ({} bytes written):\n{}",
        all.len(),
        agent.log_text()
    );
    assert!(
        eventually(PATIENCE, || async {
            !agent.status().contains("still changing")
        })
        .await,
        "status still lists a settled file as changing:\n{}\n{}",
        agent.status(),
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_pushes_a_snapshot_of_a_file_that_keeps_changing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let agent = Agent::new(&tmp.path().join("folder"), &server, "box");
    let (written, stop) = appender(agent.path("service.log"));
    std::thread::sleep(Duration::from_secs(1));
    let out = agent.once(&["--max-settle-delay", "3s"]);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ferry-agent once failed:\n{log}");
    assert!(!stop.load(Ordering::SeqCst));
    let remote = remote_bytes(&server.client(), "box/service.log")
        .await
        .unwrap_or_else(|| panic!("not pushed:\n{log}"));
    stop.store(true, Ordering::SeqCst);
    assert!(!remote.is_empty(), "{log}");
    assert!(
        written.lock().unwrap().starts_with(&remote),
        "the server has {} bytes that are not what was written",
        remote.len()
    );
}
