//! Positioned reads that skip the page cache where they can, for the
//! server's staged uploads, and dropping a synced range from the cache.
//!
//! A staged chunk is written once, synced before it is acknowledged, and
//! then dropped from the page cache ([`forget_cached`]): it is read again
//! only by the running digest when chunks arrived out of order (write-behind
//! sends chunk 0 last), and at download. Left cached, an upload of
//! gigabytes fills memory with bytes nobody reads soon; dropped at once,
//! the next chunk's copy lands in pages just freed, which on a VM whose
//! fresh memory is slow to touch was most of the server's CPU for an
//! upload (bench/RESULTS.md, mount-write notes).
//!
//! Writes go through the page cache, not `O_DIRECT`: the filesystem then
//! allocates and writes back whole runs of a chunk at once, which the
//! benchmark disk took faster than 1 MiB direct writes (a 1 GiB `cp`
//! through the mount committed 20 % sooner; bench/RESULTS.md, mount-write
//! notes of 2026-12-07).
//!
//! Reads of those bytes go directly (`O_DIRECT`) into a small pool of
//! reused aligned buffers where the range is aligned; anything else, or a
//! filesystem without direct I/O, goes through the page cache. The kernel
//! keeps the two coherent: a direct read first writes back cached pages
//! of its range.
//!
//! The mount's staging files are not read this way: write-behind reads
//! those pages while they are still hot.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;

/// Offsets, lengths and buffers of direct reads are multiples of this,
/// which covers every logical block size up to a page.
const ALIGN: usize = 4096;

/// Read buffers kept for reuse once their bytes are dropped (beyond these,
/// a dropped buffer is freed).
const POOLED_READ_BUFFERS: usize = 4;

static READ_POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A direct (`O_DIRECT`) descriptor for reading `path`, or `None` where
/// the filesystem refuses one or only plays along: tmpfs takes `O_DIRECT`
/// but reads through its page cache all the same, so going "direct" there
/// gains nothing. A filesystem that really does direct I/O says so, and
/// with which alignments, through `statx` (Linux 6.1 on).
pub fn open_direct(path: &Path) -> Option<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    does_direct_io(&file).then_some(file)
}

/// Whether the filesystem of `file` does direct I/O at alignments that
/// [`ALIGN`] covers.
fn does_direct_io(file: &File) -> bool {
    use rustix::fs::{AtFlags, StatxFlags};
    let Ok(stat) = rustix::fs::statx(file, c"", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) else {
        return false;
    };
    let covered = |align: u32| align > 0 && ALIGN as u32 % align == 0;
    StatxFlags::from_bits_retain(stat.stx_mask).contains(StatxFlags::DIOALIGN)
        && covered(stat.stx_dio_mem_align)
        && covered(stat.stx_dio_offset_align)
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

/// Reads exactly `len` bytes at `offset` of a file open as `buffered` and,
/// if it could be, `direct`; directly when the range is aligned, into a
/// pooled buffer that goes back to the pool when the bytes are dropped.
pub fn read_exact_at(
    buffered: &File,
    direct: Option<&File>,
    offset: u64,
    len: usize,
) -> io::Result<Bytes> {
    let mut buffer = PooledBuffer::take(len);
    let slice = buffer.slice_mut();
    let mut done = 0;
    if let Some(direct) = direct.filter(|_| aligned(offset, len)) {
        // Until the end, an error, or a short read leaving an unaligned
        // position: the rest, if any, goes through the page cache.
        while done < len && done % ALIGN == 0 {
            match direct.read_at(&mut slice[done..], offset + done as u64) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // An alignment the device does not take after all.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => return Err(e),
            }
        }
    }
    buffered.read_exact_at(&mut slice[done..], offset + done as u64)?;
    Ok(Bytes::from_owner(buffer))
}

fn aligned(offset: u64, len: usize) -> bool {
    offset % ALIGN as u64 == 0 && len % ALIGN == 0
}

/// `len` bytes at an aligned start inside a reused allocation.
struct PooledBuffer {
    memory: Vec<u8>,
    start: usize,
    len: usize,
}

impl PooledBuffer {
    fn take(len: usize) -> PooledBuffer {
        let reused = {
            let mut pool = READ_POOL.lock().unwrap();
            let fits = pool.iter().position(|m| m.len() >= len + ALIGN);
            fits.map(|at| pool.swap_remove(at))
        };
        let memory = reused.unwrap_or_else(|| vec![0; len + ALIGN]);
        let start = memory.as_ptr().align_offset(ALIGN);
        PooledBuffer { memory, start, len }
    }

    fn slice_mut(&mut self) -> &mut [u8] {
        &mut self.memory[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.memory[self.start..self.start + self.len]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let mut pool = READ_POOL.lock().unwrap();
        if pool.len() < POOLED_READ_BUFFERS {
            pool.push(std::mem::take(&mut self.memory));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIECE: usize = 1 << 20;

    #[test]
    fn reads_see_every_write_and_reuse_their_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let size = 2 * PIECE;
        let bytes: Vec<u8> = (0..size).map(|i| (i * 13 % 253) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let direct = open_direct(&path);
        // A buffered write still in the page cache (unaligned, so it stays
        // there) is seen by an aligned read.
        buffered.write_all_at(b"fresh", 5).unwrap();
        let mut expected = bytes.clone();
        expected[5..10].copy_from_slice(b"fresh");
        let read = |offset: usize, len: usize| {
            read_exact_at(&buffered, direct.as_ref(), offset as u64, len).unwrap()
        };
        assert!(read(0, PIECE) == expected[..PIECE]);
        assert!(read(4096, PIECE) == expected[4096..PIECE + 4096]);
        assert!(
            read(7, 100) == expected[7..107],
            "unaligned: through the cache"
        );
        // A buffer dropped goes back to the pool and is taken again.
        let first = read(PIECE, PIECE);
        let memory = first.as_ptr();
        drop(first);
        let again = read(PIECE, PIECE);
        assert!(again == expected[PIECE..]);
        assert_eq!(again.as_ptr(), memory);
        // Past the end is an error, not zeros.
        let past = read_exact_at(&buffered, direct.as_ref(), size as u64, 4096).unwrap_err();
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Pages of the first `len` bytes of `file` in the page cache.
    fn cached_pages(file: &File, len: usize) -> usize {
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

    #[test]
    fn tmpfs_is_not_taken_for_direct_io() {
        let shm = Path::new("/dev/shm");
        if !rustix::fs::statfs(shm).is_ok_and(|s| s.f_type == libc::TMPFS_MAGIC) {
            eprintln!("no tmpfs at /dev/shm: nothing to check");
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        let path = dir.path().join("data");
        File::create(&path).unwrap();
        let taken = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        assert!(taken.is_ok(), "tmpfs accepts O_DIRECT");
        assert!(open_direct(&path).is_none());
    }
}
