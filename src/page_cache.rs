//! Page-cache hints for staged data: writing it back early, and dropping
//! an upload's synced chunks.
//!
//! A staged chunk is written once (through the page cache: the filesystem
//! then allocates and writes back a piece of a megabyte or more at once),
//! its pieces start on their way to the disk as soon as they are written
//! ([`write_back`]), so that the sync before the chunk is acknowledged
//! finds most of it written (by hand, a 1 GiB copy into a mount committed
//! 4.75 s against 5.13 s, medians of 6, bench/RESULTS.md, mount-write
//! notes of 2026-12-07), and it is then dropped from the cache
//! ([`forget_cached`]). Left cached, an upload of gigabytes fills memory
//! with bytes nobody reads soon; dropped at once, the next chunk's copy
//! lands in pages just freed, which on a VM whose fresh memory is slow to
//! touch was most of the server's CPU for an upload (bench/RESULTS.md,
//! mount-write notes).
//!
//! The exception is a chunk the running digest will read back (it arrived
//! ahead of an earlier one and could not be held in memory; write-behind
//! sends chunk 0 only once the file is closed): it stays cached until the
//! digest has read it, so that the read-back costs no disk reads (800 MiB
//! of them for a 1 GiB copy into a mount, bench/RESULTS.md, mount-write
//! notes of 2026-12-07).

use std::fs::File;

/// Starts writing `len` bytes at `offset` of `file` back to the disk and,
/// with `wait`, waits until they are. A hint for what a later sync has to
/// write: nothing is durable for it (neither the file's metadata nor the
/// disk's cache is flushed). Errors are left to that sync, which reports
/// them.
pub fn write_back(file: &File, offset: u64, len: u64, wait: bool) {
    use std::os::fd::AsRawFd;
    let mut flags = libc::SYNC_FILE_RANGE_WRITE;
    if wait {
        flags |= libc::SYNC_FILE_RANGE_WAIT_AFTER;
    }
    // SAFETY: a plain system call on a descriptor the caller keeps open.
    unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
}

/// Drops `len` bytes at `offset` of `file` from the page cache. Only
/// clean pages go, so the range must have been synced; this is advice,
/// and a filesystem that keeps the pages (tmpfs, whose pages are the
/// data) only costs memory.
pub fn forget_cached(file: &File, offset: u64, len: u64) {
    if let Some(len) = std::num::NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    use super::*;

    const PIECE: usize = 1 << 20;

    /// Pages of the first `len` bytes of `file` in the page cache.
    pub(crate) fn cached_pages(file: &File, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let page = 4096;
        let mut resident = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of `len` bytes of an open
        // file, only passed to mincore and unmapped before returning.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
            libc::munmap(map, len);
        }
        resident.iter().filter(|r| *r & 1 == 1).count()
    }

    #[test]
    fn a_synced_range_leaves_the_cache_and_the_rest_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let bytes = vec![9u8; 2 * PIECE];
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        // Written as the store writes, a piece at a time: a page-cache
        // folio never spans two writes, so none spans the range dropped.
        file.write_all_at(&bytes[..PIECE], 0).unwrap();
        file.write_all_at(&bytes[PIECE..], PIECE as u64).unwrap();
        file.sync_data().unwrap();
        let pages = 2 * PIECE / 4096;
        if cached_pages(&file, 2 * PIECE) < pages {
            eprintln!("written pages not cached here: nothing to check");
            return;
        }
        forget_cached(&file, 0, PIECE as u64);
        let dropped =
            matches!(rustix::fs::statfs(dir.path()), Ok(s) if s.f_type != libc::TMPFS_MAGIC);
        if dropped {
            assert_eq!(cached_pages(&file, PIECE), 0);
        }
        // The range not named stays, and the bytes are all still there.
        assert_eq!(
            cached_pages(&file, 2 * PIECE),
            pages - if dropped { pages / 2 } else { 0 }
        );
        assert!(std::fs::read(&path).unwrap() == bytes);
    }
}
