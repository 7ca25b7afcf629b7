//! Positioned writes into a session's staged file that skip the page cache
//! where they can.
//!
//! Every chunk is synced to disk before it is acknowledged, so keeping its
//! bytes in the page cache buys nothing until the file is read, and copying
//! them there was the largest single cost of an upload on the server (up to
//! two thirds of its CPU on a VM whose fresh page-cache memory is slow to
//! touch; bench/RESULTS.md, mount-write notes). A whole, aligned piece is
//! therefore written with `O_DIRECT` from a reused aligned buffer; anything
//! else (a short last chunk, a filesystem without direct I/O) is written
//! through the page cache as before. The kernel keeps the two coherent.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

/// Size of each positioned write.
pub const WRITE_PIECE: usize = 1 << 20;

/// Offsets, lengths and buffers of direct writes are multiples of this,
/// which covers every logical block size up to a page.
const ALIGN: usize = 4096;

thread_local! {
    /// Each writing thread's aligned buffer, reused so that its memory is
    /// touched once rather than per chunk.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A staged file open for writing, buffered and (when the filesystem allows
/// it) direct.
pub struct StagedFile {
    buffered: File,
    direct: Option<File>,
}

impl StagedFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        let buffered = OpenOptions::new().write(true).open(path)?;
        // Filesystems without direct I/O refuse the flag at open.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(Self { buffered, direct })
    }

    /// The buffered descriptor, for syncing and sizing.
    pub fn file(&self) -> &File {
        &self.buffered
    }

    /// Writes `data` at `offset`, one [`WRITE_PIECE`] at a time, each under
    /// `lock`, which orders the file's writers (see `write_lock`).
    pub fn write_at(&self, lock: &Mutex<()>, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut at = offset;
        for piece in data.chunks(WRITE_PIECE) {
            let _turn = lock.lock().unwrap_or_else(PoisonError::into_inner);
            match &self.direct {
                Some(direct) if aligned(at, piece.len()) => write_direct(direct, at, piece)
                    .or_else(|e| match e.raw_os_error() {
                        // Alignment the device does not accept after all.
                        Some(libc::EINVAL) => self.buffered.write_all_at(piece, at),
                        _ => Err(e),
                    })?,
                _ => self.buffered.write_all_at(piece, at)?,
            }
            at += piece.len() as u64;
        }
        Ok(())
    }
}

fn aligned(offset: u64, len: usize) -> bool {
    offset % ALIGN as u64 == 0 && len % ALIGN == 0 && len > 0
}

fn write_direct(file: &File, offset: u64, piece: &[u8]) -> io::Result<()> {
    BOUNCE.with_borrow_mut(|bounce| {
        if bounce.len() < WRITE_PIECE + ALIGN {
            *bounce = vec![0; WRITE_PIECE + ALIGN];
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
    fn aligned_unaligned_and_short_pieces_land_where_they_belong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let size = 3 * WRITE_PIECE + 5000;
        File::create(&path).unwrap().set_len(size as u64).unwrap();
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let staged = StagedFile::open(&path).unwrap();
        let lock = Mutex::new(());
        // Out of order: an unaligned tail, an aligned run of pieces, an
        // unaligned start.
        staged.write_at(&lock, 100, &bytes[100..ALIGN]).unwrap();
        staged
            .write_at(&lock, (2 * WRITE_PIECE) as u64, &bytes[2 * WRITE_PIECE..])
            .unwrap();
        staged
            .write_at(&lock, ALIGN as u64, &bytes[ALIGN..2 * WRITE_PIECE])
            .unwrap();
        staged.write_at(&lock, 0, &bytes[..100]).unwrap();
        staged.file().sync_data().unwrap();
        assert!(std::fs::read(&path).unwrap() == bytes);
    }
}
