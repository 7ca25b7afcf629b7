//! Which byte ranges of a sparse staging file hold content: what was written
//! through the mount or copied from the remote version. Holes are neither.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent ranges `[start, end)`.
#[derive(Debug, Default)]
pub struct Extents {
    /// start → end.
    ranges: BTreeMap<u64, u64>,
}

impl Extents {
    /// Bytes of `[start, end)` already covered.
    fn covered(&self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let before = self.ranges.range(..start).next_back();
        let within = self.ranges.range(start..end);
        before
            .into_iter()
            .chain(within)
            .map(|(&s, &e)| e.min(end).saturating_sub(s.max(start)))
            .sum()
    }

    /// Bytes of `[start, end)` not covered yet.
    pub fn missing(&self, start: u64, end: u64) -> u64 {
        end.saturating_sub(start) - self.covered(start, end)
    }

    pub fn covers(&self, start: u64, end: u64) -> bool {
        self.missing(start, end) == 0
    }

    /// Covers `[start, end)`; returns how many bytes were not covered before.
    pub fn insert(&mut self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let added = self.missing(start, end);
        let (mut from, mut to) = (start, end);
        // A range touching or overlapping from the left merges in.
        if let Some((&s, &e)) = self.ranges.range(..start).next_back()
            && e >= start
        {
            from = s;
            to = to.max(e);
        }
        let merged: Vec<u64> = self.ranges.range(from..=to).map(|(&s, _)| s).collect();
        for s in merged {
            let e = self.ranges.remove(&s).expect("listed just now");
            to = to.max(e);
        }
        self.ranges.insert(from, to);
        added
    }

    /// The parts of `[start, end)` not covered, in order, leaving out
    /// those inside any of `also` (ranges that may overlap one another).
    pub fn gaps(&self, start: u64, end: u64, also: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut taken = Extents::default();
        for &(s, e) in also {
            taken.insert(s.max(start), e.min(end));
        }
        let before = self.ranges.range(..start).next_back();
        let covered = before
            .into_iter()
            .chain(self.ranges.range(start..end))
            .chain(taken.ranges.iter());
        let mut covered: Vec<(u64, u64)> = covered.map(|(&s, &e)| (s, e)).collect();
        covered.sort_unstable();
        let mut gaps = Vec::new();
        let mut at = start;
        for (s, e) in covered {
            if s > at {
                gaps.push((at, s.min(end)));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            gaps.push((at, end));
        }
        gaps
    }

    /// Forgets everything at or past `len`; returns how many bytes that was.
    pub fn truncate(&mut self, len: u64) -> u64 {
        let dropped = self.covered(len, u64::MAX);
        let cut: Vec<(u64, u64)> = self
            .ranges
            .range(..)
            .rev()
            .take_while(|&(_, &e)| e > len)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, _) in &cut {
            self.ranges.remove(s);
        }
        if let Some(&(s, _)) = cut.last()
            && s < len
        {
            self.ranges.insert(s, len);
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Extents {
        fn total(&self) -> u64 {
            self.ranges.iter().map(|(s, e)| e - s).sum()
        }
    }

    #[test]
    fn overlapping_writes_count_each_byte_once() {
        let mut x = Extents::default();
        assert_eq!(x.insert(100, 200), 100);
        assert_eq!(x.insert(150, 250), 50);
        assert_eq!(x.insert(0, 10), 10);
        assert_eq!(x.insert(100, 250), 0);
        assert_eq!(x.total(), 160);
        assert_eq!(x.missing(0, 300), 140);
        // Bridging the gap joins everything into one range.
        assert_eq!(x.insert(5, 120), 90);
        assert_eq!(x.total(), 250);
        assert!(x.covers(0, 250));
        assert!(!x.covers(0, 251));
        assert_eq!(x.ranges.len(), 1);
    }

    #[test]
    fn gaps_leave_out_what_is_covered_and_what_is_also_taken() {
        let mut x = Extents::default();
        x.insert(10, 20);
        x.insert(40, 50);
        assert_eq!(x.gaps(0, 60, &[]), [(0, 10), (20, 40), (50, 60)]);
        assert_eq!(x.gaps(15, 45, &[]), [(20, 40)]);
        assert_eq!(x.gaps(12, 18, &[]), []);
        assert_eq!(
            x.gaps(0, 60, &[(25, 30), (28, 35), (55, 70)]),
            [(0, 10), (20, 25), (35, 40), (50, 55)]
        );
        assert_eq!(x.gaps(0, 60, &[(0, 100)]), []);
        assert_eq!(Extents::default().gaps(5, 9, &[]), [(5, 9)]);
    }

    #[test]
    fn adjacent_ranges_merge() {
        let mut x = Extents::default();
        x.insert(0, 10);
        x.insert(10, 20);
        x.insert(30, 40);
        x.insert(20, 30);
        assert_eq!(x.ranges.len(), 1);
        assert_eq!(x.total(), 40);
    }

    #[test]
    fn sparse_writes_count_only_what_was_written() {
        let mut x = Extents::default();
        x.insert(0, 1);
        x.insert(1 << 40, (1 << 40) + 1);
        assert_eq!(x.total(), 2);
        assert_eq!(x.missing(0, 1 << 20), (1 << 20) - 1);
    }

    #[test]
    fn truncate_releases_what_lies_past_the_new_end() {
        let mut x = Extents::default();
        x.insert(0, 100);
        x.insert(200, 300);
        x.insert(400, 500);
        assert_eq!(x.truncate(250), 150);
        assert_eq!(x.total(), 150);
        assert!(x.covers(200, 250));
        assert_eq!(x.missing(250, 600), 350);
        assert_eq!(x.truncate(1000), 0);
        assert_eq!(x.truncate(0), 150);
        assert_eq!(x.total(), 0);
        assert!(x.ranges.is_empty());
    }
}
