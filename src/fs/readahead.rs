//! Per-handle sequential-read detection: the readahead window doubles while
//! reads follow each other and drops to nothing on a seek.

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
        self.window = if self.next_expected == Some(offset) {
            (self.window * 2).clamp(block, MAX_WINDOW)
        } else {
            0
        };
        self.next_expected = Some(offset + len);
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
}
