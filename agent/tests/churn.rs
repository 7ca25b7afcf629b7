//! A model test: random creates, edits, appends, deletes and renames of
//! files and directories while the agent runs; once things are quiet the
//! remote tree equals the local one.

mod harness;

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{Agent, Server, diff, eventually, local_tree, random_bytes, remote_tree, write};

/// xorshift64*: reproducible choices without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick(&mut self, items: &[PathBuf]) -> Option<PathBuf> {
        (!items.is_empty()).then(|| items[self.below(items.len())].clone())
    }
}

fn entries(root: &Path, dirs: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.file_name().unwrap() == ".ferry-agent" {
                continue;
            }
            if path.is_dir() {
                stack.push(path.clone());
                if dirs {
                    out.push(path);
                }
            } else if !dirs {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_changes_while_running_converge() {
    churn(0x5eed_f00d_1234_5678, false).await;
}

/// The agent is killed (SIGKILL) twice along the way and started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_changes_with_the_agent_killed_twice_converge() {
    churn(0x0dd_ba11_cafe_f00d, true).await;
}

async fn churn(default_seed: u64, kills: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let mut agent = Agent::new(&tmp.path().join("folder"), &server, "churn");
    for d in 0..5 {
        for f in 0..10 {
            write(
                &agent.dir,
                &format!("dir{d}/file{f}.txt"),
                &random_bytes(100 + f * 500),
            );
        }
    }
    agent.start(&["--max-delete", "1000000"]);
    let client = server.client();
    let root = agent.dir.clone();
    let seed = std::env::var("CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seed);
    let mut rng = Rng(seed);
    let mut counter = 0;
    for op in 0..300 {
        if kills && (op == 100 || op == 200) {
            agent.signal("KILL");
            agent.wait(Duration::from_secs(10));
            agent.start(&["--max-delete", "1000000"]);
        }
        counter += 1;
        let files = entries(&root, false);
        let dirs = entries(&root, true);
        let dir = rng.pick(&dirs).unwrap_or_else(|| root.clone());
        match rng.below(9) {
            0 | 1 => {
                let size = rng.below(64 << 10);
                std::fs::write(dir.join(format!("new{counter}.bin")), random_bytes(size)).unwrap();
            }
            2 => {
                if let Some(f) = rng.pick(&files) {
                    let size = rng.below(32 << 10);
                    std::fs::write(f, random_bytes(size)).unwrap();
                }
            }
            3 => {
                if let Some(f) = rng.pick(&files) {
                    use std::io::Write;
                    let mut file = std::fs::OpenOptions::new().append(true).open(f).unwrap();
                    file.write_all(&random_bytes(rng.below(4096))).unwrap();
                }
            }
            4 => {
                if let Some(f) = rng.pick(&files) {
                    std::fs::remove_file(f).unwrap();
                }
            }
            5 | 6 => {
                if let Some(f) = rng.pick(&files) {
                    std::fs::rename(f, dir.join(format!("moved{counter}.txt"))).unwrap();
                }
            }
            7 => {
                if let Some(d) = rng.pick(&dirs) {
                    let to = d.with_file_name(format!("renamed{counter}"));
                    std::fs::rename(d, to).unwrap();
                }
            }
            _ => {
                if rng.below(3) == 0 {
                    if let Some(d) = rng.pick(&dirs) {
                        std::fs::remove_dir_all(d).unwrap();
                    }
                } else {
                    std::fs::create_dir_all(dir.join(format!("sub{counter}"))).unwrap();
                    std::fs::write(dir.join(format!("sub{counter}/inner.txt")), b"inner").unwrap();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    let local = local_tree(&root);
    let remote = std::sync::Mutex::new(harness::Tree::new());
    let converged = eventually(Duration::from_secs(60), || {
        let (client, local, remote) = (client.clone(), &local, &remote);
        async move {
            let now = remote_tree(&client, "churn").await;
            let same = now == *local;
            *remote.lock().unwrap() = now;
            same
        }
    })
    .await;
    let remote = remote.into_inner().unwrap();
    assert!(converged, "{}\n{}", diff(&local, &remote), agent.log_text());
    // Nobody else writes to the server: a conflict would be the agent
    // tripping over its own changes.
    let log = agent.log_text();
    assert!(!log.contains("conflict"), "{log}");
}
