//! Changes made while the server is down reach it once it is back.

mod harness;

use std::time::Duration;

use harness::{
    Agent, Server, age, diff, eventually, local_tree, remote_listing, remote_tree, write,
};

/// The outage is shorter than a real one would be (CI time is limited); the
/// agent's behaviour is the same: retries with backoff, then convergence.
const OUTAGE: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_during_a_server_outage_converge_when_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let mut server = Server::start(&store);
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "outage");
    for i in 0..20 {
        let rel = format!("f{i}.txt");
        write(&agent.dir, &rel, format!("file {i}").as_bytes());
        age(&agent.path(&rel));
    }
    agent.start(&[]);
    let client = server.client();
    assert!(
        eventually(Duration::from_secs(30), || async {
            remote_listing(&client, "outage").await.len() == 20
        })
        .await,
        "{}",
        agent.log_text()
    );

    server.stop();
    write(&agent.dir, "created while down.txt", b"new");
    write(&agent.dir, "f1.txt", b"changed while down");
    std::fs::remove_file(agent.path("f2.txt")).unwrap();
    std::fs::rename(agent.path("f3.txt"), agent.path("f3 renamed.txt")).unwrap();
    write(
        &agent.dir,
        "sub/dir/deep.bin",
        &harness::random_bytes(3 << 20),
    );
    tokio::time::sleep(OUTAGE).await;

    let server = Server::start_at(&store, &server.listen);
    let client = server.client();
    let local = local_tree(&agent.dir);
    let remote = std::sync::Mutex::new(harness::Tree::new());
    let converged = eventually(Duration::from_secs(40), || {
        let (client, local, remote) = (client.clone(), &local, &remote);
        async move {
            let now = remote_tree(&client, "outage").await;
            let same = now == *local;
            *remote.lock().unwrap() = now;
            same
        }
    })
    .await;
    let remote = remote.into_inner().unwrap();
    assert!(converged, "{}\n{}", diff(&local, &remote), agent.log_text());
}
