//! Whether a file has stopped changing long enough to be pushed.
//!
//! A file is pushed only when two observations agree (same size, mtime and
//! inode) and it has been quiet for the settle time: either its mtime is that
//! old, or the first observation is (for files whose mtime lies in the
//! future or was set by an archiver).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::journal::FileStamp;

/// How long a file must stay unchanged before it is pushed.
pub const QUIET: Duration = Duration::from_secs(2);

/// Files whose writer has closed them. Closing is the writer saying it is
/// done, so such a file is pushed as soon as two observations agree,
/// without the quiet time; unless it was modified after the close was seen.
#[derive(Default)]
pub struct Closed(Mutex<HashMap<String, i64>>);

/// A close no pass has used after this long is forgotten.
const FORGET_CLOSE_NS: i64 = 60_000_000_000;

impl Closed {
    /// The writer of `path` closed it; seen at `at_ns`.
    pub fn note(&self, path: String, at_ns: i64) {
        let mut closed = self.0.lock().unwrap();
        // Closes of files no pass looked at (ignored, unchanged) pile up.
        if closed.len() >= 1024 {
            closed.retain(|_, seen| at_ns - *seen < FORGET_CLOSE_NS);
        }
        closed.insert(path, at_ns);
    }

    /// `other` is another name (a hard link) of the file at `path`: a close
    /// of `path` noted and not used yet counts for it too.
    pub fn share(&self, path: &str, other: &str) {
        let mut closed = self.0.lock().unwrap();
        if let Some(at) = closed.get(path).copied() {
            closed.insert(other.to_owned(), at);
        }
    }

    /// The quiet time `path` needs, now that it was observed as `seen` and
    /// then as `current`. Uses up a noted close.
    pub fn quiet_time(&self, path: &str, seen: FileStamp, current: FileStamp) -> Duration {
        let closed_at = self.0.lock().unwrap().remove(path);
        match closed_at {
            Some(at) if seen == current && current.mtime_ns <= at => Duration::ZERO,
            _ => QUIET,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ready,
    /// Look again after this long.
    Wait(Duration),
}

/// `seen` was observed at `seen_at_ns`; `current` is what the file looks
/// like at `now_ns` (all nanoseconds since the epoch).
pub fn settle(
    seen: FileStamp,
    seen_at_ns: i64,
    current: FileStamp,
    now_ns: i64,
    quiet: Duration,
) -> Settle {
    let quiet_ns = quiet.as_nanos() as i64;
    if seen != current {
        return Settle::Wait(quiet);
    }
    let quiet_for = (now_ns - current.mtime_ns).max(now_ns - seen_at_ns);
    if quiet_for >= quiet_ns {
        Settle::Ready
    } else {
        Settle::Wait(Duration::from_nanos((quiet_ns - quiet_for) as u64))
    }
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn stamp(size: u64, mtime_s: i64) -> FileStamp {
        FileStamp {
            size,
            mtime_ns: mtime_s * S,
            inode: 9,
        }
    }

    #[test]
    fn an_old_unchanged_file_is_ready() {
        let s = stamp(10, 100);
        assert_eq!(settle(s, 200 * S, s, 200 * S, QUIET), Settle::Ready);
    }

    #[test]
    fn a_recently_modified_file_waits_out_the_rest_of_the_quiet_time() {
        let s = stamp(10, 100);
        let now = 100 * S + S / 2;
        assert_eq!(
            settle(s, now, s, now, QUIET),
            Settle::Wait(Duration::from_millis(1500))
        );
    }

    #[test]
    fn a_growing_or_touched_file_waits_the_full_quiet_time() {
        let before = stamp(10, 100);
        assert_eq!(
            settle(before, 150 * S, stamp(11, 100), 200 * S, QUIET),
            Settle::Wait(QUIET)
        );
        assert_eq!(
            settle(before, 150 * S, stamp(10, 101), 200 * S, QUIET),
            Settle::Wait(QUIET)
        );
        let replaced = FileStamp {
            inode: 10,
            ..before
        };
        assert_eq!(
            settle(before, 150 * S, replaced, 200 * S, QUIET),
            Settle::Wait(QUIET)
        );
    }

    #[test]
    fn a_closed_file_needs_no_quiet_time_unless_written_after_the_close() {
        let closed = Closed::default();
        let s = stamp(10, 100);
        assert_eq!(closed.quiet_time("a", s, s), QUIET, "never closed");
        closed.note("a".into(), 101 * S);
        assert_eq!(closed.quiet_time("a", s, s), Duration::ZERO);
        assert_eq!(closed.quiet_time("a", s, s), QUIET, "a close is used once");
        closed.note("a".into(), 101 * S);
        assert_eq!(
            closed.quiet_time("a", s, stamp(11, 100)),
            QUIET,
            "changed between looks"
        );
        closed.note("a".into(), 101 * S);
        let later = stamp(10, 102);
        assert_eq!(
            closed.quiet_time("a", later, later),
            QUIET,
            "written after the close"
        );
        assert_eq!(
            settle(s, 101 * S, s, 101 * S, Duration::ZERO),
            Settle::Ready
        );
    }

    #[test]
    fn a_close_counts_for_the_other_links_of_the_file() {
        let closed = Closed::default();
        let s = stamp(10, 100);
        closed.share("a", "b");
        assert_eq!(closed.quiet_time("b", s, s), QUIET, "a was never closed");
        closed.note("a".into(), 101 * S);
        closed.share("a", "b");
        assert_eq!(closed.quiet_time("b", s, s), Duration::ZERO);
        assert_eq!(closed.quiet_time("a", s, s), Duration::ZERO);
    }

    #[test]
    fn old_unused_closes_are_forgotten() {
        let closed = Closed::default();
        for i in 0..1024 {
            closed.note(format!("old{i}"), 0);
        }
        closed.note("new".into(), 61 * S);
        assert_eq!(closed.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_future_mtime_settles_once_observed_unchanged_long_enough() {
        let s = stamp(10, 1000);
        assert_eq!(
            settle(s, 100 * S, s, 101 * S, QUIET),
            Settle::Wait(Duration::from_secs(1))
        );
        assert_eq!(settle(s, 100 * S, s, 102 * S, QUIET), Settle::Ready);
    }
}
