//! A bandwidth limit shared by the transfers of one program.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Paces transfers to at most `bytes_per_sec` on average.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: u64,
    /// When the bytes granted so far will have been "paid for".
    next_free: Mutex<Instant>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let wait_until = {
            let mut next = self.next_free.lock().unwrap();
            let start = (*next).max(Instant::now());
            *next = start + cost;
            start
        };
        tokio::time::sleep_until(wait_until).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_rate() {
        let t = Throttle::new(1000);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            t.acquire(1000).await;
        }
        // The first grant is immediate; four more seconds' worth follow.
        assert_eq!(start.elapsed().as_secs(), 4);
    }
}
