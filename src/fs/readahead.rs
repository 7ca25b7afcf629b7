//! Per-handle sequential-read detection: the readahead window doubles while
//! reads follow each other and drops to nothing on a seek. The kernel sends
//! its readahead as several requests at once, which may arrive out of order:
//! a read within two blocks of where the last one ended is not a seek.

/// Largest readahead window.
pub const MAX_WINDOW: u64 = 64 << 20;

#[derive(Debug, Default)]
pub struct Readahead {
    next_expected: Option<u64>,
    window: u64,
}

impl Readahead {
    /// Records a read of `len` bytes at `offset`; returns how many bytes past
    /// its end to prefetch.
    pub fn observe(&mut self, offset: u64, len: u64, block: u64) -> u64 {
        let near = |next: u64| offset.abs_diff(next) <= 2 * block;
        match self.next_expected {
            Some(next) if next == offset => {
                self.window = (self.window * 2).clamp(block, MAX_WINDOW);
                self.next_expected = Some(offset + len);
            }
            Some(next) if near(next) => {
                self.window = self.window.max(block);
                self.next_expected = Some(next.max(offset + len));
            }
            _ => {
                self.window = 0;
                self.next_expected = Some(offset + len);
            }
        }
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_on_sequential_reads_and_resets_on_seek() {
        let mut r = Readahead::default();
        let b = 1 << 20;
        assert_eq!(r.observe(0, 131072, b), 0);
        assert_eq!(r.observe(131072, 131072, b), b);
        assert_eq!(r.observe(262144, 131072, b), 2 * b);
        for i in 3..20 {
            r.observe(i * 131072, 131072, b);
        }
        assert_eq!(r.observe(20 * 131072, 131072, b), MAX_WINDOW);
        assert_eq!(r.observe(0, 4096, b), 0, "a seek resets");
        assert_eq!(r.observe(4096, 4096, b), b);
    }

    #[test]
    fn reads_arriving_out_of_order_near_the_last_are_not_seeks() {
        let mut r = Readahead::default();
        let b = 1 << 20;
        let k = 131072;
        assert_eq!(r.observe(2 * k, k, b), 0, "the first read");
        assert_eq!(
            r.observe(0, k, b),
            b,
            "an earlier request of the same readahead"
        );
        assert_eq!(r.observe(k, k, b), b);
        assert_eq!(r.observe(3 * k, k, b), 2 * b, "in order again: grows");
        assert_eq!(
            r.observe(3 * k + 3 * b, k, b),
            0,
            "farther than two blocks: a seek"
        );
    }
}
