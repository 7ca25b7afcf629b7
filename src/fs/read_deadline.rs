//! How long a read waits for the server: until the server has sent nothing
//! for the give-up time (`--retry-for`, at least a second), counted from
//! the later of the read's start and the last answer or piece of a body the
//! server sent for any request. Every block a read waits for shares this
//! one deadline, and so does the wait for a turn among the fetches in
//! flight: a read fails about the give-up time after the server stopped
//! answering, however many prefetches are queued or retrying ahead of it,
//! while a server that is slow but sending never fails it.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// The shortest wait a read gets, however short the give-up time.
const SHORTEST_WAIT: Duration = Duration::from_secs(1);

pub struct ReadDeadline {
    started: Instant,
    give_up: Duration,
}

impl ReadDeadline {
    /// The deadline of a read starting now.
    pub fn new(give_up: Duration) -> Self {
        Self {
            started: Instant::now(),
            give_up: give_up.max(SHORTEST_WAIT),
        }
    }

    /// When the read gives up, the server last heard from at `last_heard`.
    pub fn at(&self, last_heard: Instant) -> Instant {
        self.started.max(last_heard) + self.give_up
    }

    /// How long the server has been quiet, as far as this read is concerned.
    pub fn quiet_for(&self, last_heard: Instant) -> Duration {
        self.started.max(last_heard).elapsed()
    }

    pub fn passed(&self, last_heard: Instant) -> bool {
        Instant::now() >= self.at(last_heard)
    }

    /// What `work` returns, or `None` once the deadline passes first;
    /// `last_heard` says when the server was last heard from.
    pub async fn wait<T>(
        &self,
        last_heard: impl Fn() -> Instant,
        work: impl Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return Some(out),
                () = tokio::time::sleep_until(self.at(last_heard())) => {
                    if self.passed(last_heard()) {
                        return None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn heard_at(at: &Arc<Mutex<Instant>>) -> impl Fn() -> Instant + use<> {
        let at = at.clone();
        move || *at.lock().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_once_the_server_is_quiet_for_the_give_up_time() {
        let long_ago = Arc::new(Mutex::new(Instant::now()));
        tokio::time::advance(Duration::from_secs(60)).await;
        let deadline = ReadDeadline::new(Duration::from_secs(2));
        let started = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(deadline.wait(heard_at(&long_ago), never).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // What ends in time is returned.
        let deadline = ReadDeadline::new(Duration::from_secs(2));
        let quick = tokio::time::sleep(Duration::from_millis(1500));
        assert_eq!(deadline.wait(heard_at(&long_ago), quick).await, Some(()));
    }

    /// A server still sending (for other fetches, say) keeps the read
    /// waiting; the give-up time counts from its last byte.
    #[tokio::test(start_paused = true)]
    async fn a_server_still_sending_keeps_the_read_waiting() {
        let heard = Arc::new(Mutex::new(Instant::now()));
        let sending = {
            let heard = heard.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    *heard.lock().unwrap() = Instant::now();
                }
            })
        };
        let deadline = ReadDeadline::new(Duration::from_secs(2));
        let started = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(deadline.wait(heard_at(&heard), never).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(12));
        sending.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_at_least_a_second() {
        let deadline = ReadDeadline::new(Duration::ZERO);
        let started = Instant::now();
        let heard = Arc::new(Mutex::new(Instant::now()));
        assert_eq!(
            deadline
                .wait(heard_at(&heard), std::future::pending::<()>())
                .await,
            None
        );
        assert_eq!(started.elapsed(), SHORTEST_WAIT);
    }
}
