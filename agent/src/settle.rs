//! Whether a file has stopped changing long enough to be pushed.
//!
//! A file is pushed only when two observations agree (same size, mtime and
//! inode) and it has been quiet for the settle time: either its mtime is that
//! old, or the first observation is (for files whose mtime lies in the
//! future or was set by an archiver).

use std::time::Duration;

use crate::journal::FileStamp;

/// How long a file must stay unchanged before it is pushed.
pub const QUIET: Duration = Duration::from_secs(2);

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
    fn a_future_mtime_settles_once_observed_unchanged_long_enough() {
        let s = stamp(10, 1000);
        assert_eq!(
            settle(s, 100 * S, s, 101 * S, QUIET),
            Settle::Wait(Duration::from_secs(1))
        );
        assert_eq!(settle(s, 100 * S, s, 102 * S, QUIET), Settle::Ready);
    }
}
