//! Whether a file has stopped changing long enough to be pushed.
//!
//! A file is pushed only when two observations agree (same size, mtime and
//! inode) and it has been quiet for the settle time: either its mtime is that
//! old, or the first observation is (for files whose mtime lies in the
//! future or was set by an archiver).
//!
//! A file that never stays quiet that long (a log appended every second, a
//! database written all the time) is pushed anyway once it has waited the
//! maximum delay: as a snapshot of its content as it is then (see
//! [`Waiting`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::journal::FileStamp;

/// How long a file must stay unchanged before it is pushed.
pub const QUIET: Duration = Duration::from_secs(2);
/// How long a file that keeps changing waits before a snapshot of it is
/// pushed anyway (`--max-settle-delay`).
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(60);

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

/// Paths waiting to settle, and since when: one that has waited the
/// maximum delay is pushed as it is, a snapshot, instead of waiting on.
///
/// After a snapshot the clock starts again, from the snapshot's end and no
/// sooner than it took to push: a file that keeps changing is pushed at
/// most once per maximum delay, and a large one whose upload takes longer
/// than that spends at most half of the time being uploaded.
#[derive(Default)]
pub struct Waiting(Mutex<HashMap<String, Since>>);

#[derive(Debug, Clone, Copy)]
struct Since {
    /// When the path began to wait (nanoseconds since the epoch).
    since_ns: i64,
    /// When it was last found waiting.
    seen_ns: i64,
}

/// A path not found waiting for this long is forgotten (it settled or went
/// away unnoticed): its clock starts again if it waits once more.
const FORGET_WAITING_NS: i64 = 600_000_000_000;

impl Waiting {
    /// `path` has not settled at `now_ns`. Whether it has waited
    /// `max_delay` or longer, and is to be pushed as it is.
    pub fn overdue(&self, path: &str, now_ns: i64, max_delay: Duration) -> bool {
        let mut waiting = self.0.lock().unwrap();
        if waiting.len() >= 1024 {
            waiting.retain(|_, w| now_ns - w.seen_ns < FORGET_WAITING_NS);
        }
        let w = waiting.entry(path.to_owned()).or_insert(Since {
            since_ns: now_ns,
            seen_ns: now_ns,
        });
        w.seen_ns = now_ns;
        now_ns - w.since_ns >= max_delay.as_nanos() as i64
    }

    /// `path` settled or is gone: it waits no longer.
    pub fn settled(&self, path: &str) {
        self.0.lock().unwrap().remove(path);
    }

    /// A snapshot of `path` ended at `now_ns` (pushed or not), after
    /// `took`: the next waits `max_delay` from now, and at least `took`.
    pub fn snapshot_ended(&self, path: &str, now_ns: i64, took: Duration, max_delay: Duration) {
        let extra = took.saturating_sub(max_delay).as_nanos() as i64;
        self.0.lock().unwrap().insert(
            path.to_owned(),
            Since {
                since_ns: now_ns + extra,
                seen_ns: now_ns,
            },
        );
    }

    /// How long `path` has been waiting at `now_ns`, if it is.
    pub fn waited(&self, path: &str, now_ns: i64) -> Option<Duration> {
        let waiting = self.0.lock().unwrap();
        let w = waiting.get(path)?;
        Some(Duration::from_nanos((now_ns - w.since_ns).max(0) as u64))
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
    fn a_file_that_keeps_changing_is_overdue_after_the_maximum_delay() {
        let waiting = Waiting::default();
        let max = Duration::from_secs(60);
        // Found waiting every two seconds, never settling.
        for t in (1000..1060).step_by(2) {
            assert!(!waiting.overdue("log", t * S, max), "at {t} s");
        }
        assert!(waiting.overdue("log", 1060 * S, max));
        assert_eq!(
            waiting.waited("log", 1061 * S),
            Some(Duration::from_secs(61))
        );
        // Another path has its own clock.
        assert!(!waiting.overdue("db", 1060 * S, max));
    }

    #[test]
    fn a_file_that_settles_starts_its_clock_again() {
        let waiting = Waiting::default();
        let max = Duration::from_secs(60);
        assert!(!waiting.overdue("log", 1000 * S, max));
        waiting.settled("log");
        assert_eq!(waiting.waited("log", 1059 * S), None);
        assert!(!waiting.overdue("log", 1059 * S, max));
        assert!(!waiting.overdue("log", 1100 * S, max));
        assert!(waiting.overdue("log", 1119 * S, max));
    }

    #[test]
    fn after_a_snapshot_the_next_waits_the_delay_and_at_least_as_long_as_it_took() {
        let waiting = Waiting::default();
        let max = Duration::from_secs(60);
        assert!(!waiting.overdue("log", 1000 * S, max));
        assert!(waiting.overdue("log", 1060 * S, max));
        // A quick snapshot: the next one a maximum delay after it ended.
        waiting.snapshot_ended("log", 1061 * S, Duration::from_secs(1), max);
        assert!(!waiting.overdue("log", 1062 * S, max));
        assert!(!waiting.overdue("log", 1120 * S, max));
        assert!(waiting.overdue("log", 1121 * S, max));
        // A snapshot that took ten minutes to upload: the next one ten
        // minutes after it ended, not one.
        waiting.snapshot_ended("big", 2000 * S, Duration::from_secs(600), max);
        assert!(!waiting.overdue("big", 2060 * S, max));
        assert!(!waiting.overdue("big", 2599 * S, max));
        assert!(waiting.overdue("big", 2600 * S, max));
    }

    #[test]
    fn paths_no_longer_waiting_are_forgotten() {
        let waiting = Waiting::default();
        let max = Duration::from_secs(60);
        for i in 0..1024 {
            waiting.overdue(&format!("old{i}"), 0, max);
        }
        waiting.overdue("recent", 599 * S, max);
        waiting.overdue("new", 601 * S, max);
        assert_eq!(waiting.0.lock().unwrap().len(), 2);
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
