//! Positioned writes into staged uploads that skip the page cache where
//! they can.
//!
//! A staged chunk is written once and synced before it is acknowledged;
//! its bytes are read again only if the running digest fell behind. Copying
//! them into the page cache was the largest single cost of an upload on the
//! server (up to two thirds of its CPU on a VM whose fresh page-cache memory
//! is slow to touch; bench/RESULTS.md, mount-write notes), while that VM's
//! disk takes 1 MiB direct writes at over 2 GB/s. A whole,
//! aligned piece is therefore written with `O_DIRECT` from a reused aligned
//! buffer; anything else (an unaligned or short piece, a filesystem without
//! direct I/O) goes through the page cache. The kernel keeps the two
//! coherent: a direct write first writes back and drops cached pages of its
//! range, and a later read finds the bytes on disk.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

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

/// A direct (`O_DIRECT`) descriptor for writing `path`, or `None` where the
/// filesystem refuses one.
pub fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Writes `data` at `offset` of a file open as `buffered` and, if it could
/// be, `direct`: aligned whole pages directly, the rest buffered.
pub fn write_at(
    buffered: &File,
    direct: Option<&File>,
    offset: u64,
    data: &[u8],
) -> io::Result<()> {
    let Some(direct) = direct else {
        return buffered.write_all_at(data, offset);
    };
    // An unaligned head and tail go through the page cache; the pages
    // between them directly.
    let head =
        ((ALIGN as u64 - offset % ALIGN as u64) % ALIGN as u64).min(data.len() as u64) as usize;
    let body = (data.len() - head) / ALIGN * ALIGN;
    let (head_bytes, rest) = data.split_at(head);
    let (body_bytes, tail_bytes) = rest.split_at(body);
    if !head_bytes.is_empty() {
        buffered.write_all_at(head_bytes, offset)?;
    }
    let mut at = offset + head as u64;
    for piece in body_bytes.chunks(PIECE) {
        write_direct(direct, at, piece).or_else(|e| match e.raw_os_error() {
            // An alignment the device does not take after all.
            Some(libc::EINVAL) => buffered.write_all_at(piece, at),
            _ => Err(e),
        })?;
        at += piece.len() as u64;
    }
    if !tail_bytes.is_empty() {
        buffered.write_all_at(tail_bytes, at)?;
    }
    Ok(())
}

fn write_direct(file: &File, offset: u64, piece: &[u8]) -> io::Result<()> {
    BOUNCE.with_borrow_mut(|bounce| {
        if bounce.len() < PIECE + ALIGN {
            *bounce = vec![0; PIECE + ALIGN];
        }
        let start = bounce.as_ptr().align_offset(ALIGN);
        let buffer = &mut bounce[start..start + piece.len()];
        buffer.copy_from_slice(piece);
        file.write_all_at(buffer, offset)
    })
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
            write_at(&buffered, direct.as_ref(), from as u64, &bytes[from..to]).unwrap()
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
        write_at(&buffered, direct.as_ref(), 3, &again[3..PIECE + 3]).unwrap();
        let read = std::fs::read(&path).unwrap();
        assert!(read[3..PIECE + 3] == again[3..PIECE + 3]);
        assert!(read[..3] == bytes[..3] && read[PIECE + 3..] == bytes[PIECE + 3..]);
    }
}
