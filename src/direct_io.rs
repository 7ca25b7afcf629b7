//! Positioned reads and writes that skip the page cache where they can,
//! for the server's staged uploads.
//!
//! A staged chunk is written once and synced before it is acknowledged; it
//! is read again only by the running digest when chunks arrived out of
//! order (write-behind sends chunk 0 last), and at download. Copying those
//! bytes into fresh page-cache memory was the largest single cost of an
//! upload on the server (up to two thirds of its CPU on a VM whose fresh
//! memory is slow to touch; bench/RESULTS.md, mount-write notes), while
//! that VM's disk moves 1 MiB direct writes at over 2 GB/s.
//!
//! So whole, aligned pieces go directly (`O_DIRECT`) between the disk and
//! buffers that are reused: a per-thread bounce buffer for writes, a small
//! pool of buffers for reads. Anything else (an unaligned head or tail, a
//! filesystem without direct I/O) goes through the page cache. The kernel
//! keeps the two coherent: direct I/O first writes back cached pages of
//! its range, and a direct write drops them.
//!
//! The mount's staging files are not written this way: a FUSE write would
//! wait for the disk, and write-behind reads those pages while they are
//! still hot (bench/RESULTS.md, mount-write notes).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;

/// The largest direct write, and the size of each thread's aligned buffer.
pub const PIECE: usize = 1 << 20;

/// Offsets, lengths and buffers of direct writes are multiples of this,
/// which covers every logical block size up to a page.
const ALIGN: usize = 4096;

thread_local! {
    /// Each writing thread's aligned buffer, reused so that its memory is
    /// touched once rather than per write.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Read buffers kept for reuse once their bytes are dropped (beyond these,
/// a dropped buffer is freed).
const POOLED_READ_BUFFERS: usize = 4;

static READ_POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A direct (`O_DIRECT`) descriptor for reading and writing `path`, or
/// `None` where the filesystem refuses one or only plays along: tmpfs
/// takes `O_DIRECT` but copies through its page cache all the same, so
/// going "direct" there would only add the bounce buffer's copy. A
/// filesystem that really does direct I/O says so, and with which
/// alignments, through `statx` (Linux 6.1 on).
pub fn open_direct(path: &Path) -> Option<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
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

/// Writes `pieces`, back to back, at `offset` of a file open as `buffered`
/// and, if it could be, `direct`: aligned whole pages directly, the rest
/// buffered.
///
/// A body that arrives as many small buffers (an HTTP chunk does) is
/// gathered straight into the thread's aligned buffer: one copy into
/// memory already touched, rather than a copy into a fresh allocation per
/// piece and another into the aligned buffer. Without direct I/O each
/// buffer is written as it is.
pub fn write_at<P: AsRef<[u8]>>(
    buffered: &File,
    direct: Option<&File>,
    offset: u64,
    pieces: &[P],
) -> io::Result<()> {
    let Some(direct) = direct else {
        let mut at = offset;
        for piece in pieces {
            buffered.write_all_at(piece.as_ref(), at)?;
            at += piece.as_ref().len() as u64;
        }
        return Ok(());
    };
    let total: usize = pieces.iter().map(|p| p.as_ref().len()).sum();
    // An unaligned head and tail go through the page cache; the pages
    // between them directly.
    let head = ((ALIGN as u64 - offset % ALIGN as u64) % ALIGN as u64).min(total as u64) as usize;
    let body = (total - head) / ALIGN * ALIGN;
    let tail = total - head - body;
    let mut source = Gather::new(pieces);
    BOUNCE.with_borrow_mut(|bounce| {
        if bounce.len() < PIECE + ALIGN {
            *bounce = vec![0; PIECE + ALIGN];
        }
        let start = bounce.as_ptr().align_offset(ALIGN);
        let buffer = &mut bounce[start..start + PIECE];
        let mut at = offset;
        if head > 0 {
            source.fill(&mut buffer[..head]);
            buffered.write_all_at(&buffer[..head], at)?;
            at += head as u64;
        }
        let mut left = body;
        while left > 0 {
            let piece = &mut buffer[..left.min(PIECE)];
            source.fill(piece);
            direct
                .write_all_at(piece, at)
                .or_else(|e| match e.raw_os_error() {
                    // An alignment the device does not take after all.
                    Some(libc::EINVAL) => buffered.write_all_at(piece, at),
                    _ => Err(e),
                })?;
            at += piece.len() as u64;
            left -= piece.len();
        }
        if tail > 0 {
            source.fill(&mut buffer[..tail]);
            buffered.write_all_at(&buffer[..tail], at)?;
        }
        Ok(())
    })
}

/// Reads a list of buffers as one run of bytes.
struct Gather<'a, P> {
    pieces: &'a [P],
    /// Bytes of `pieces[0]` already read.
    used: usize,
}

impl<'a, P: AsRef<[u8]>> Gather<'a, P> {
    fn new(pieces: &'a [P]) -> Self {
        Gather { pieces, used: 0 }
    }

    /// Fills `out` with the next bytes; the caller asks for no more than
    /// there are.
    fn fill(&mut self, out: &mut [u8]) {
        let mut filled = 0;
        while filled < out.len() {
            let (first, rest) = self.pieces.split_first().expect("enough bytes");
            let available = &first.as_ref()[self.used..];
            let n = available.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&available[..n]);
            filled += n;
            self.used += n;
            if self.used == first.as_ref().len() {
                self.pieces = rest;
                self.used = 0;
            }
        }
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

    #[test]
    fn aligned_unaligned_and_short_writes_land_where_they_belong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let size = 3 * PIECE + 5000;
        File::create(&path).unwrap().set_len(size as u64).unwrap();
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let buffered = OpenOptions::new().write(true).open(&path).unwrap();
        let direct = open_direct(&path);
        let write = |from: usize, to: usize| {
            write_at(&buffered, direct.as_ref(), from as u64, &[&bytes[from..to]]).unwrap()
        };
        // Out of order, with unaligned heads and tails, a write within one
        // page, and one larger than a piece.
        write(100, 200);
        write(2 * PIECE - 10, size);
        write(200, 2 * PIECE - 10);
        write(0, 100);
        buffered.sync_data().unwrap();
        assert!(std::fs::read(&path).unwrap() == bytes);
        // Overwrites reach the file whichever way they went.
        let again: Vec<u8> = bytes.iter().map(|b| b ^ 0xff).collect();
        write_at(&buffered, direct.as_ref(), 3, &[&again[3..PIECE + 3]]).unwrap();
        let read = std::fs::read(&path).unwrap();
        assert!(read[3..PIECE + 3] == again[3..PIECE + 3]);
        assert!(read[..3] == bytes[..3] && read[PIECE + 3..] == bytes[PIECE + 3..]);
    }

    #[test]
    fn pieces_of_any_sizes_are_written_as_one_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let size = PIECE + 3 * ALIGN;
        File::create(&path).unwrap().set_len(size as u64).unwrap();
        let bytes: Vec<u8> = (0..size).map(|i| (i * 11 % 241) as u8).collect();
        let buffered = OpenOptions::new().write(true).open(&path).unwrap();
        // Split at odd places, with an empty piece and pieces crossing
        // the head's and the body's ends; one run has a tail, one not.
        let split = |run: &[u8], cuts: &[usize]| -> Vec<Bytes> {
            let mut pieces = Vec::new();
            let mut from = 0;
            for &cut in cuts.iter().chain([run.len()].iter()) {
                pieces.push(Bytes::copy_from_slice(&run[from..cut]));
                from = cut;
            }
            pieces
        };
        let unaligned = split(&bytes[100..PIECE - 7], &[1, 1, 4000, 70_000, PIECE - 200]);
        let aligned = split(&bytes[PIECE - 7..], &[7, 9, 3 * ALIGN]);
        // Directly where the filesystem allows, and through the page cache.
        for direct in [open_direct(&path), None] {
            std::fs::write(&path, vec![0; size]).unwrap();
            write_at(&buffered, direct.as_ref(), 100, &unaligned).unwrap();
            write_at(&buffered, direct.as_ref(), (PIECE - 7) as u64, &aligned).unwrap();
            write_at(&buffered, direct.as_ref(), 0, &[&bytes[..100]]).unwrap();
            buffered.sync_data().unwrap();
            assert!(std::fs::read(&path).unwrap() == bytes);
        }
    }

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
