//! Exponential backoff with full jitter.

use std::time::Duration;

/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// When and how long to wait before trying again.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// First delay; each retry doubles it.
    pub base_delay: Duration,
    /// Longest single delay.
    pub max_delay: Duration,
    /// Give up once this much time has passed without progress: since the
    /// first attempt, or since bytes last moved (a piece of an answer that
    /// was kept, or of a request's body the server took).
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            give_up_after: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1-based): random in
    /// `[0, min(max, base * 2^(attempt-1))]`, unless the server said when.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return wait.min(MAX_RETRY_AFTER);
        }
        let ceiling = self
            .base_delay
            .saturating_mul(
                1u32.checked_shl(attempt.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max_delay);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_bounded() {
        let p = RetryPolicy::default();
        for attempt in 1..40 {
            let d = p.delay(attempt, None);
            assert!(d <= p.max_delay);
            assert!(d <= p.base_delay * 2u32.saturating_pow(attempt - 1));
        }
        assert_eq!(
            p.delay(3, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
    }
}
