//! The SHA-256 an upload sends with `complete`, computed from the chunks as
//! they are read for sending, so the file is read once rather than twice.
//!
//! Hashing runs on blocking threads beside the transfer, so a chunk can be
//! sent while it is hashed; at most [`HASHING_AHEAD`] chunks wait to be
//! hashed before reading stops.
//!
//! Chunks are fed in whatever order their reads finish. One that arrives
//! ahead of the next offset to hash waits (a reference to its buffer, up to
//! [`AHEAD_LIMIT`] bytes); beyond that it is dropped. At the end, whatever
//! the chunks did not cover is read from the file: the chunks a resumed
//! upload finds on the server already, or any that were dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};

/// Bytes of chunks kept while they wait for the chunks before them.
const AHEAD_LIMIT: usize = 64 << 20;
/// Bytes read per read when hashing from the file.
const READ_PIECE: usize = 1 << 20;
/// Chunks handed to hashing and not hashed yet.
const HASHING_AHEAD: usize = 4;

/// The hash of a file's first `len` bytes, computed before its upload (by a
/// writer that hashed the file as it was written).
#[derive(Clone)]
pub struct DigestPrefix {
    pub hasher: Sha256,
    pub len: u64,
}

impl std::fmt::Debug for DigestPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestPrefix")
            .field("len", &self.len)
            .finish()
    }
}

pub struct UploadDigest {
    file: Arc<File>,
    size: u64,
    state: Mutex<State>,
    /// A permit per chunk being hashed.
    hashing: Arc<Semaphore>,
}

struct State {
    hasher: Sha256,
    /// Everything before this offset is in `hasher`.
    next: u64,
    ahead: BTreeMap<u64, Bytes>,
    ahead_bytes: usize,
}

impl UploadDigest {
    /// `prefix`: the hash of the file's start, when already known.
    pub fn new(file: Arc<File>, size: u64, prefix: Option<DigestPrefix>) -> Self {
        let prefix = prefix.filter(|p| p.len <= size).unwrap_or(DigestPrefix {
            hasher: Sha256::new(),
            len: 0,
        });
        Self {
            file,
            size,
            state: Mutex::new(State {
                hasher: prefix.hasher,
                next: prefix.len,
                ahead: BTreeMap::new(),
                ahead_bytes: 0,
            }),
            hashing: Arc::new(Semaphore::new(HASHING_AHEAD)),
        }
    }

    /// Takes the file's bytes at `offset`, just read, and hashes them on a
    /// blocking thread. Waits only while [`HASHING_AHEAD`] chunks are
    /// being hashed already.
    pub async fn feed(self: &Arc<Self>, offset: u64, data: Bytes) {
        let permit = self
            .hashing
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.feed_blocking(offset, &data);
            drop(permit);
        });
    }

    /// Hashes the bytes (and any waiting chunks they make contiguous) when
    /// they are next in line, or keeps them until they are.
    fn feed_blocking(&self, offset: u64, data: &Bytes) {
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        if offset == state.next {
            state.hash(data);
            while let Some(waiting) = state.ahead.remove(&state.next) {
                state.ahead_bytes -= waiting.len();
                state.hash(&waiting);
            }
        } else if offset > state.next
            && state.ahead_bytes + data.len() <= AHEAD_LIMIT
            && !state.ahead.contains_key(&offset)
        {
            state.ahead_bytes += data.len();
            state.ahead.insert(offset, data.clone());
        }
    }

    /// The whole file's digest, reading what the chunks did not cover.
    pub async fn finish(self: &Arc<Self>) -> Result<String> {
        // Every chunk fed so far is hashed (or waiting) once all permits are free.
        drop(
            self.hashing
                .acquire_many(HASHING_AHEAD as u32)
                .await
                .expect("never closed"),
        );
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.finish_blocking())
            .await
            .map_err(|e| Error::Storage(format!("hash task failed: {e}")))?
    }

    fn finish_blocking(&self) -> Result<String> {
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        let mut buf = Vec::new();
        while state.next < self.size {
            if let Some(waiting) = state.ahead.remove(&state.next) {
                state.ahead_bytes -= waiting.len();
                state.hash(&waiting);
                continue;
            }
            // Up to the next waiting chunk, which is not read again.
            let until = state
                .ahead
                .keys()
                .next()
                .copied()
                .unwrap_or(self.size)
                .min(state.next + READ_PIECE as u64);
            buf.resize((until - state.next) as usize, 0);
            self.file
                .read_exact_at(&mut buf, state.next)
                .map_err(Error::io("hashing the local file"))?;
            state.hash(&buf);
        }
        Ok(hex::encode(state.hasher.clone().finalize()))
    }
}

impl State {
    fn hash(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.next += data.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(data: &[u8]) -> (tempfile::TempDir, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        (dir, Arc::new(File::open(&path).unwrap()))
    }

    fn data() -> Vec<u8> {
        (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn digest_of(data: &[u8], fed: &[std::ops::Range<usize>]) -> String {
        let (_dir, file) = file_of(data);
        let digest = Arc::new(UploadDigest::new(file, data.len() as u64, None));
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            for range in fed {
                let bytes = Bytes::copy_from_slice(&data[range.clone()]);
                digest.feed(range.start as u64, bytes).await;
            }
            digest.finish().await.unwrap()
        })
    }

    #[test]
    fn chunks_in_any_order_or_none_give_the_files_digest() {
        let data = data();
        let expected = hex::encode(Sha256::digest(&data));
        let chunks = |order: &[usize]| -> Vec<std::ops::Range<usize>> {
            order
                .iter()
                .map(|i| i * 3000..((i + 1) * 3000).min(data.len()))
                .collect()
        };
        assert_eq!(digest_of(&data, &chunks(&[0, 1, 2, 3])), expected);
        assert_eq!(digest_of(&data, &chunks(&[2, 0, 3, 1])), expected);
        assert_eq!(digest_of(&data, &chunks(&[1, 1, 0, 0, 3])), expected);
        // A resumed upload: chunk 0 sits on the server and is never fed.
        assert_eq!(digest_of(&data, &chunks(&[3, 1])), expected);
        assert_eq!(digest_of(&data, &[]), expected);
    }

    #[test]
    fn a_known_prefix_is_not_read_again() {
        let data = data();
        let (_dir, file) = file_of(&data);
        let mut hasher = Sha256::new();
        hasher.update(&data[..6000]);
        let prefix = DigestPrefix { hasher, len: 6000 };
        // The file's start is overwritten: only a digest that did not read
        // it again still gives the original file's digest.
        let changed = {
            let mut changed = data.clone();
            changed[..6000].fill(0);
            changed
        };
        std::fs::write(_dir.path().join("f"), &changed).unwrap();
        let digest = Arc::new(UploadDigest::new(file, data.len() as u64, Some(prefix)));
        let sha = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(digest.finish())
            .unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(&data)));
    }

    #[test]
    fn bytes_fed_again_are_hashed_once() {
        let data = data();
        // Bytes fed after the start was hashed are ignored.
        let expected = hex::encode(Sha256::digest(&data));
        assert_eq!(
            digest_of(&data, &[0..4000, 0..3000, 4000..10_000]),
            expected
        );
    }
}
