//! The SHA-256 of a locally staged session, computed while its chunks arrive
//! rather than by re-reading the whole file at `complete`.
//!
//! After each chunk this node writes, the digest advances over every chunk
//! now contiguous from the start. A chunk is hashed from the buffers it
//! arrived in (one WebSocket message, or an HTTP body's many) when it found
//! room to be held before it arrived: up to [`HELD_LIMIT`] bytes of chunks
//! per session, on their way or waiting for earlier ones, within what a
//! [`HeldBudget`] shared by a node's sessions allows. Others are read back
//! from the staged file, whose page cache keeps them until then (see
//! [`page_cache`]): reading back every HTTP chunk had an in-order 1 GiB
//! upload read its whole file from the disk again.
//! At `complete` only the chunks not yet covered are read. This is sound
//! because local staging never rewrites an acknowledged chunk: bytes once
//! hashed stay what the file holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::page_cache;
use crate::protocol::upload::ChunkLayout;

/// Bytes hashed per read while advancing.
const READ_PIECE: usize = 1 << 20;
/// Pieces read ahead of the one being hashed.
const READ_AHEAD: usize = 2;
/// Bytes of chunks a session holds in memory, on their way or written,
/// until their turn to be hashed: twice what the client keeps in flight by
/// default, so that chunks finishing a little out of order are all held.
const HELD_LIMIT: usize = 64 << 20;

/// Bytes of arrived chunks all of a node's sessions may hold for hashing
/// together, so that many sessions waiting for early chunks cannot pile up
/// memory.
#[derive(Clone)]
pub struct HeldBudget {
    limit: usize,
    used: Arc<AtomicUsize>,
}

impl HeldBudget {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: Arc::default(),
        }
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= self.limit).then_some(used + bytes)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

pub struct RunningDigest {
    /// Of an open-ended session, whole chunks until its size is declared.
    layout: Mutex<ChunkLayout>,
    budget: HeldBudget,
    written: Mutex<Written>,
    /// Locked only on blocking threads, while hashing.
    hashed: Mutex<Hashed>,
}

#[derive(Default)]
struct Written {
    /// Chunks durably written (by this node).
    chunks: BTreeSet<u64>,
    /// The bytes of some of them, in the buffers they arrived in.
    held: BTreeMap<u64, Vec<Bytes>>,
    held_bytes: usize,
}

struct Hashed {
    hasher: Sha256,
    /// The first chunk not yet in `hasher`.
    next: u64,
}

impl RunningDigest {
    pub fn new(layout: ChunkLayout, budget: HeldBudget) -> Self {
        Self {
            layout: Mutex::new(layout),
            budget,
            written: Mutex::default(),
            hashed: Mutex::new(Hashed {
                hasher: Sha256::new(),
                next: 0,
            }),
        }
    }

    /// The size of an open-ended session, now declared. Every chunk written
    /// so far lies whole within it, so nothing hashed changes.
    pub fn fix_size(&self, size: u64) {
        self.layout.lock().unwrap().size = size;
    }

    fn layout(&self) -> ChunkLayout {
        *self.layout.lock().unwrap()
    }

    /// Room to hold a chunk of `len` bytes until its turn to be hashed,
    /// taken before its bytes arrive (so that a streamed chunk's buffers are
    /// kept only when they may be held); `None` when the session's limit or
    /// the node's budget has no room.
    pub fn room_for(self: &Arc<Self>, len: usize) -> Option<HeldRoom> {
        let mut written = self.written.lock().unwrap();
        if written.held_bytes + len > HELD_LIMIT || !self.budget.take(len) {
            return None;
        }
        written.held_bytes += len;
        Some(HeldRoom {
            digest: self.clone(),
            len,
        })
    }

    /// After chunk `index` is durably written; `held`, when given, is the
    /// whole chunk as written (the buffers it arrived in, in order) and the
    /// room taken for it.
    pub fn written(&self, index: u64, held: Option<(Vec<Bytes>, HeldRoom)>) {
        let mut written = self.written.lock().unwrap();
        let first_time = written.chunks.insert(index);
        let Some((pieces, mut room)) = held else {
            return;
        };
        if first_time
            && self.layout().chunk_len(index) == Some(room.len as u64)
            && total_len(&pieces) == room.len
        {
            // The room's bytes now count for the held chunk.
            room.len = 0;
            written.held.insert(index, pieces);
        }
        // Else the room is given back, which takes the lock.
        drop(written);
        drop(room);
    }

    /// Whether chunk `index` is written, and its bytes if they are held.
    fn take(&self, index: u64) -> (bool, Option<Vec<Bytes>>) {
        let mut written = self.written.lock().unwrap();
        let held = written.held.remove(&index);
        if let Some(pieces) = &held {
            let len = total_len(pieces);
            written.held_bytes -= len;
            self.budget.give_back(len);
        }
        (written.chunks.contains(&index), held)
    }

    /// The end of the run of chunks from `from` on, below `limit`, that are
    /// to be read from the file: written (all of them when `all_written`)
    /// and not held.
    fn unheld_run_end(&self, from: u64, limit: u64, all_written: bool) -> u64 {
        let written = self.written.lock().unwrap();
        let mut end = from + 1;
        while end < limit
            && (all_written || written.chunks.contains(&end))
            && !written.held.contains_key(&end)
        {
            end += 1;
        }
        end
    }

    /// Hashes the chunks now contiguous from the start (blocking I/O).
    pub fn advance(&self, data: &Path) -> Result<()> {
        self.hash_from_start(data, false).map(drop)
    }

    /// The whole file's digest, hashing whatever is not covered yet (blocking
    /// I/O). Call once every chunk is in the file.
    pub fn finish(&self, data: &Path) -> Result<String> {
        let hashed = self.hash_from_start(data, true)?;
        Ok(hex::encode(hashed.hasher.clone().finalize()))
    }

    /// Hashes chunks in order from the first not yet hashed, while they are
    /// written (or to the end, when `all_written`): held ones from memory,
    /// runs of others from the file.
    fn hash_from_start(&self, data: &Path, all_written: bool) -> Result<MutexGuard<'_, Hashed>> {
        let mut hashed = self.hashed.lock().unwrap();
        let mut file = None;
        loop {
            let (next, layout) = (hashed.next, self.layout());
            if all_written && next >= layout.chunk_count() {
                return Ok(hashed);
            }
            match self.take(next) {
                (_, Some(pieces)) => {
                    pieces.iter().for_each(|p| hashed.hasher.update(p));
                    hashed.next += 1;
                }
                (false, None) if !all_written => return Ok(hashed),
                _ => {
                    let end = self.unheld_run_end(next, layout.chunk_count(), all_written);
                    let file = match &mut file {
                        Some(file) => file,
                        None => file.insert(open(data)?),
                    };
                    let start = layout.chunk_range(next).expect("a chunk of the file").0;
                    let stop = layout.chunk_range(end - 1).expect("a chunk of the file").1;
                    hash_range(file, start, stop, &mut hashed.hasher)?;
                    // Kept cached for this read (see `page_cache`).
                    page_cache::forget_cached(file, start, stop - start);
                    hashed.next = end;
                }
            }
        }
    }
}

/// Bytes of a session's and the node's limits set aside for one chunk;
/// given back when dropped unused.
pub struct HeldRoom {
    digest: Arc<RunningDigest>,
    len: usize,
}

impl Drop for HeldRoom {
    fn drop(&mut self) {
        if self.len > 0 {
            self.digest.written.lock().unwrap().held_bytes -= self.len;
            self.digest.budget.give_back(self.len);
        }
    }
}

impl Drop for RunningDigest {
    fn drop(&mut self) {
        let held = self.written.get_mut().map_or(0, |w| w.held_bytes);
        self.budget.give_back(held);
    }
}

fn total_len(pieces: &[Bytes]) -> usize {
    pieces.iter().map(Bytes::len).sum()
}

fn open(data: &Path) -> Result<File> {
    File::open(data).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound("upload session".into()),
        _ => Error::Io {
            context: "opening staged data".into(),
            source: e,
        },
    })
}

/// Hashes bytes `start..end` of the staged file. Pieces are read ahead on
/// another thread while one is hashed: read and hashed in turn, 1 GiB
/// took 0.4 s of reading plus 0.6 s of hashing on the benchmark machine.
fn hash_range(file: &File, start: u64, end: u64, hasher: &mut Sha256) -> Result<()> {
    let read = |at: u64| {
        let mut piece = vec![0; READ_PIECE.min((end - at) as usize)];
        file.read_exact_at(&mut piece, at)
            .map(|()| piece)
            .map_err(Error::io("reading staged data to hash it"))
    };
    if end - start <= READ_PIECE as u64 {
        hasher.update(&read(start)?);
        return Ok(());
    }
    let (pieces, arriving) = std::sync::mpsc::sync_channel(READ_AHEAD);
    std::thread::scope(|threads| {
        threads.spawn(move || {
            let mut at = start;
            while at < end {
                let piece = read(at);
                let failed = piece.is_err();
                at += piece.as_ref().map_or(0, |p| p.len() as u64);
                // Stops once the hashing side gave up, or after an error.
                if pieces.send(piece).is_err() || failed {
                    return;
                }
            }
        });
        arriving
            .into_iter()
            .try_for_each(|piece| piece.map(|p| hasher.update(&p)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk `index` written, its `pieces` held if there is room.
    fn hold(digest: &Arc<RunningDigest>, index: u64, pieces: Vec<Bytes>) {
        let room = digest.room_for(total_len(&pieces));
        digest.written(index, room.map(|room| (pieces, room)));
    }

    fn staged(data: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, data).unwrap();
        (dir, path)
    }

    #[test]
    fn out_of_order_chunks_give_the_files_digest() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (_dir, path) = staged(&data);
        let layout = ChunkLayout {
            size: data.len() as u64,
            chunk_size: 3000,
        };
        let digest = Arc::new(RunningDigest::new(layout, HeldBudget::new(1 << 20)));
        for index in [1, 3, 0, 2] {
            digest.written(index, None);
            digest.advance(&path).unwrap();
        }
        let expected = hex::encode(Sha256::digest(&data));
        assert_eq!(digest.finish(&path).unwrap(), expected);
    }

    /// Chunks read back (left cached for it by the store) leave the page
    /// cache once hashed.
    #[test]
    fn chunks_read_back_are_dropped_from_the_cache() {
        let piece = 1 << 20;
        let data: Vec<u8> = (0..4 * piece).map(|i| (i % 251) as u8).collect();
        let (dir, path) = staged(&data);
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        let cached = |len| crate::page_cache::tests::cached_pages(&file, len);
        let on_tmpfs =
            matches!(rustix::fs::statfs(dir.path()), Ok(s) if s.f_type == libc::TMPFS_MAGIC);
        if on_tmpfs || cached(data.len()) < data.len() / 4096 {
            eprintln!("written pages not cached here, or never dropped: nothing to check");
            return;
        }
        let layout = ChunkLayout {
            size: data.len() as u64,
            chunk_size: piece as u64,
        };
        let digest = Arc::new(RunningDigest::new(layout, HeldBudget::new(0)));
        for index in [1, 2, 3] {
            digest.written(index, None);
            digest.advance(&path).unwrap();
        }
        assert_eq!(cached(data.len()), data.len() / 4096, "waiting for chunk 0");
        digest.written(0, None);
        digest.advance(&path).unwrap();
        assert_eq!(cached(data.len()), 0);
        assert_eq!(
            digest.finish(&path).unwrap(),
            hex::encode(Sha256::digest(&data))
        );
    }

    #[test]
    fn held_bytes_are_hashed_instead_of_the_files() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        // The staged file differs from what arrived for chunks 0 and 1: the
        // digest shows which bytes were hashed.
        let mut on_disk = data.clone();
        on_disk[10] ^= 1;
        on_disk[3010] ^= 1;
        let (_dir, path) = staged(&on_disk);
        let layout = ChunkLayout {
            size: data.len() as u64,
            chunk_size: 3000,
        };
        let chunk =
            |i: usize| Bytes::copy_from_slice(&data[i * 3000..((i + 1) * 3000).min(data.len())]);
        let digest = Arc::new(RunningDigest::new(layout, HeldBudget::new(1 << 20)));
        // Chunk 1 held as the buffers it arrived in.
        let (mut head, tail) = (chunk(1), chunk(1).split_off(1000));
        head.truncate(1000);
        hold(&digest, 1, vec![head, Bytes::new(), tail]);
        hold(&digest, 0, vec![chunk(0)]);
        digest.advance(&path).unwrap();
        // Chunk 2 held, chunk 3 (the file's, unchanged there) not.
        hold(&digest, 2, vec![chunk(2)]);
        digest.written(3, None);
        let expected = hex::encode(Sha256::digest(&data));
        assert_eq!(digest.finish(&path).unwrap(), expected);
    }

    #[test]
    fn sessions_share_one_budget_for_held_bytes() {
        let data: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
        let (_dir, path) = staged(&data);
        let layout = ChunkLayout {
            size: data.len() as u64,
            chunk_size: 3000,
        };
        let budget = HeldBudget::new(4000);
        let (first, second) = (
            Arc::new(RunningDigest::new(layout, budget.clone())),
            Arc::new(RunningDigest::new(layout, budget.clone())),
        );
        let chunk = Bytes::copy_from_slice(&data[3000..]);
        // Chunk 1 waits for chunk 0 in both sessions: only one fits.
        hold(&first, 1, vec![chunk.clone()]);
        hold(&second, 1, vec![chunk.clone()]);
        assert_eq!(budget.used(), 3000);
        for digest in [&first, &second] {
            digest.written(0, None);
            digest.advance(&path).unwrap();
        }
        assert_eq!(budget.used(), 0, "hashed chunks give their bytes back");
        let expected = hex::encode(Sha256::digest(&data));
        assert_eq!(first.finish(&path).unwrap(), expected);
        assert_eq!(second.finish(&path).unwrap(), expected);
        // A session dropped with chunks still held gives them back too.
        let third = Arc::new(RunningDigest::new(layout, budget.clone()));
        hold(&third, 1, vec![chunk.clone()]);
        assert_eq!(budget.used(), 3000);
        drop(third);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn room_is_taken_before_a_chunk_arrives_and_given_back_unless_held() {
        let layout = ChunkLayout {
            size: 6000,
            chunk_size: 3000,
        };
        let budget = HeldBudget::new(4000);
        let digest = Arc::new(RunningDigest::new(layout, budget.clone()));
        let room = digest.room_for(3000).expect("room within the budget");
        assert!(
            digest.room_for(3000).is_none(),
            "a chunk on its way holds its room"
        );
        // Its request failed.
        drop(room);
        assert_eq!(budget.used(), 0);
        // Pieces short of the chunk are not held, and their room goes back.
        let room = digest.room_for(3000).unwrap();
        digest.written(0, Some((vec![Bytes::from(vec![0u8; 2999])], room)));
        assert_eq!(budget.used(), 0);
        // A session holds at most its own limit, whatever the node's budget.
        let big = HeldBudget::new(4 * HELD_LIMIT);
        let digest = Arc::new(RunningDigest::new(layout, big.clone()));
        let _room = digest.room_for(HELD_LIMIT).unwrap();
        assert!(digest.room_for(1).is_none());
        assert_eq!(big.used(), HELD_LIMIT);
    }

    #[test]
    fn runs_longer_than_a_read_are_read_ahead_and_hashed_in_order() {
        let data: Vec<u8> = (0..7 * READ_PIECE as u32 + 123)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let (_dir, path) = staged(&data);
        let chunk_size = 2 * READ_PIECE as u64 + 4096;
        let layout = ChunkLayout {
            size: data.len() as u64,
            chunk_size,
        };
        let digest = Arc::new(RunningDigest::new(layout, HeldBudget::new(64 << 20)));
        // Chunks 1 and 3 from the file; chunk 2 held; chunk 0 last.
        let at = |i: u64| (i * chunk_size) as usize;
        let held = Bytes::copy_from_slice(&data[at(2)..at(3)]);
        digest.written(1, None);
        hold(&digest, 2, vec![held.clone()]);
        digest.written(3, None);
        digest.advance(&path).unwrap();
        digest.written(0, None);
        digest.advance(&path).unwrap();
        let expected = hex::encode(Sha256::digest(&data));
        assert_eq!(digest.finish(&path).unwrap(), expected);
        // A digest that saw no chunk arrive reads the whole file at finish.
        let again = Arc::new(RunningDigest::new(layout, HeldBudget::new(0)));
        assert_eq!(again.finish(&path).unwrap(), expected);
    }

    #[test]
    fn a_staged_file_shorter_than_its_chunks_is_an_error_not_a_hang() {
        let data = vec![7u8; 3 * READ_PIECE];
        let (_dir, path) = staged(&data);
        let layout = ChunkLayout {
            size: 5 * READ_PIECE as u64,
            chunk_size: READ_PIECE as u64,
        };
        let digest = Arc::new(RunningDigest::new(layout, HeldBudget::new(0)));
        let err = digest.finish(&path).unwrap_err();
        assert!(err.to_string().contains("reading staged data"), "{err}");
    }
}
