//! Staging on a local directory: one sparse file per session, written in place
//! with positioned writes, and a chunk map (one byte per chunk) persisted
//! beside it. Every chunk lands once, where it belongs; commit is a rename.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::IoSlice;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};

use super::ChunkCheck;
use crate::error::{Error, Result};
use crate::page_cache;
use crate::protocol::upload::ChunkLayout;

pub struct LocalStaging {
    dir: PathBuf,
}

impl LocalStaging {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The sparse file the chunks are written into.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Whether the staged data is still here (not yet moved into place).
    pub async fn has_data(&self) -> Result<bool> {
        let data = self.data();
        blocking(move || match std::fs::symlink_metadata(&data) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::storage_io("looking for staged data")(e)),
        })
        .await
    }

    fn map(&self) -> PathBuf {
        self.dir.join("chunks")
    }

    /// Creates the staging file and chunk map; `layout` is `None` for an
    /// open-ended session, whose file and map grow as chunks arrive.
    pub async fn create(&self, layout: Option<ChunkLayout>) -> Result<()> {
        let (dir, data, map) = (self.dir.clone(), self.data(), self.map());
        blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(Error::storage_io("creating the staging directory"))?;
            let file =
                File::create(&data).map_err(Error::storage_io("creating the staging file"))?;
            let map_file =
                File::create(&map).map_err(Error::storage_io("creating the chunk map"))?;
            if let Some(layout) = layout {
                size_files(&file, &map_file, layout)?;
            }
            map_file
                .sync_all()
                .map_err(Error::storage_io("syncing the chunk map"))?;
            sync_dir(&dir)
        })
        .await
    }

    /// Gives an open-ended session's file and map the size now declared.
    pub async fn fix_size(&self, layout: ChunkLayout) -> Result<()> {
        let (data, map) = (self.data(), self.map());
        blocking(move || {
            let file = open_data(&data)?;
            let map_file = OpenOptions::new()
                .write(true)
                .open(&map)
                .map_err(not_found_as_gone)?;
            size_files(&file, &map_file, layout)?;
            map_file
                .sync_all()
                .map_err(Error::storage_io("syncing the chunk map"))
        })
        .await
    }

    /// Indices of the chunks received and persisted.
    pub async fn received(&self) -> Result<Vec<u64>> {
        let map = self.map();
        blocking(move || {
            let bytes = std::fs::read(&map).map_err(not_found_as_gone)?;
            Ok(bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == 1)
                .map(|(i, _)| i as u64)
                .collect())
        })
        .await
    }

    /// Streams chunk `index` into place. A chunk already received is checked
    /// but not rewritten, so a faulty repeat cannot damage acknowledged data.
    /// With `keep`, returns the chunk's bytes, in the buffers they arrived
    /// in, when they were written (for the running digest to hash from
    /// memory rather than read back from the disk).
    pub async fn write_chunk(
        &self,
        layout: ChunkLayout,
        index: u64,
        check: ChunkCheck,
        body: &mut BoxStream<'static, Result<Bytes>>,
        keep: bool,
        stay_cached: bool,
    ) -> Result<Option<Vec<Bytes>>> {
        let (start, end) = layout
            .chunk_range(index)
            .expect("index checked by the caller");
        let first = match body.next().await {
            Some(piece) => piece?,
            None => Bytes::new(),
        };
        if first.len() as u64 == end - start {
            let written = self
                .write_whole(index, start, check, first, body, stay_cached)
                .await?;
            return Ok(written.filter(|_| keep).map(|bytes| vec![bytes]));
        }
        let (data, map) = (self.data(), self.map());
        // `None`: received already, so only checked.
        let claimed = blocking(move || {
            let Some(claim) = ChunkClaim::take(&data, &map, index)? else {
                return Ok(None);
            };
            let file = open_data(&data)?;
            Ok(Some((Arc::new(claim), Arc::new(file))))
        })
        .await?;
        let mut crc = 0u32;
        let mut written = 0u64;
        // Received but not yet written: less than a piece, kept as the
        // buffers they came in (copied once, when written).
        let mut held = Held::default();
        // Every buffer, for the caller.
        let mut arrived = Vec::new();
        let mut next = Some(first);
        loop {
            let piece = match next.take() {
                Some(piece) => piece,
                None => match body.next().await {
                    Some(piece) => piece?,
                    None => break,
                },
            };
            if written + (held.len + piece.len()) as u64 > end - start {
                return Err(check.too_long());
            }
            crc = crc32c::crc32c_append(crc, &piece);
            if keep && claimed.is_some() {
                arrived.push(piece.clone());
            }
            held.push(piece);
            // Written a piece at a time: one trip to the blocking pool per
            // piece, not per buffer.
            while held.len >= WRITE_PIECE {
                let whole = held.take(WRITE_PIECE);
                written += flush(&claimed, start + written, whole).await?;
            }
        }
        let rest = held.take(held.len);
        written += flush(&claimed, start + written, rest).await?;
        check.verify(written, crc)?;
        let Some((claim, file)) = claimed else {
            return Ok(None);
        };
        let map = self.map();
        let range = start..start + written;
        blocking(move || claim.record(&file, &map, range, stay_cached)).await?;
        Ok(keep.then_some(arrived))
    }

    /// A chunk that arrived whole: checked, then written, synced and
    /// recorded in one trip to the blocking pool.
    async fn write_whole(
        &self,
        index: u64,
        start: u64,
        check: ChunkCheck,
        bytes: Bytes,
        rest: &mut BoxStream<'static, Result<Bytes>>,
        stay_cached: bool,
    ) -> Result<Option<Bytes>> {
        while let Some(more) = rest.next().await {
            if !more?.is_empty() {
                return Err(check.too_long());
            }
        }
        check.verify(bytes.len() as u64, crc32c::crc32c(&bytes))?;
        let (data, map, chunk) = (self.data(), self.map(), bytes.clone());
        let written = blocking(move || {
            let Some(claim) = ChunkClaim::take(&data, &map, index)? else {
                return Ok(false);
            };
            let file = open_data(&data)?;
            let mut at = start;
            for piece in chunk.chunks(WRITE_PIECE) {
                claim.write(&file, at, &[piece])?;
                at += piece.len() as u64;
            }
            claim.record(&file, &map, start..at, stay_cached)?;
            Ok(true)
        })
        .await?;
        Ok(written.then_some(bytes))
    }

    pub async fn sha256(&self) -> Result<String> {
        let data = self.data();
        blocking(move || {
            let mut file = File::open(&data).map_err(not_found_as_gone)?;
            let mut hasher = Sha256::new();
            std::io::copy(&mut file, &mut hasher)
                .map_err(Error::storage_io("hashing staged data"))?;
            Ok(hex::encode(hasher.finalize()))
        })
        .await
    }

    /// Moves the staged file to `target` (atomically replacing what is there).
    /// `size`: the file's; anything staged past it (a chunk of an
    /// open-ended session sent past the end as its size was declared) goes.
    pub async fn commit(
        &self,
        target: PathBuf,
        size: u64,
        mtime: Option<std::time::SystemTime>,
    ) -> Result<()> {
        let (data, map) = (self.data(), self.map());
        blocking(move || {
            let file = OpenOptions::new()
                .write(true)
                .open(&data)
                .map_err(not_found_as_gone)?;
            if file
                .metadata()
                .map_err(Error::storage_io("reading staged data"))?
                .len()
                > size
            {
                file.set_len(size)
                    .map_err(Error::storage_io("sizing the staging file"))?;
            }
            if let Some(t) = mtime {
                file.set_modified(t)
                    .map_err(Error::storage_io("setting the modification time"))?;
            }
            file.sync_all()
                .map_err(Error::storage_io("syncing staged data"))?;
            let parent = target.parent().expect("a file has a parent directory");
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::local_store("cannot create the file's parents", parent, e))?;
            std::fs::rename(&data, &target).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => not_found_as_gone(e),
                _ => Error::local_store("cannot move the staged file into place", &target, e),
            })?;
            sync_dir(parent)?;
            let _ = std::fs::remove_file(&map);
            Ok(())
        })
        .await
    }

    /// Drops the chunk map left by a commit cut short.
    pub async fn remove_map(&self) -> Result<()> {
        let map = self.map();
        blocking(move || match std::fs::remove_file(&map) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::storage_io("removing the chunk map")(e))
            }
            _ => Ok(()),
        })
        .await
    }

    /// Frees every staged byte of the session, its manifest included.
    pub async fn remove(&self) -> Result<()> {
        let dir = self.dir.clone();
        blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::storage_io("removing the staging directory")(e))
            }
            _ => Ok(()),
        })
        .await
    }
}

impl LocalStaging {
    /// Removes the session's directory if neither it nor anything in it
    /// was modified since `cutoff`; whether it did.
    pub async fn remove_if_untouched_since(&self, cutoff: SystemTime) -> Result<bool> {
        let dir = self.dir.clone();
        blocking(move || {
            let untouched = || -> std::io::Result<bool> {
                if std::fs::metadata(&dir)?.modified()? >= cutoff {
                    return Ok(false);
                }
                for entry in std::fs::read_dir(&dir)? {
                    if entry?.metadata()?.modified()? >= cutoff {
                        return Ok(false);
                    }
                }
                Ok(true)
            };
            let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
            match untouched() {
                Ok(true) => {}
                Ok(false) => return Ok(false),
                Err(e) if gone(&e) => return Ok(false),
                Err(e) => return Err(Error::storage_io("examining a session's leftovers")(e)),
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(true),
                Err(e) if gone(&e) => Ok(false),
                Err(e) => Err(Error::storage_io("removing a session's leftovers")(e)),
            }
        })
        .await
    }
}

/// Writes `pieces` at `offset` for the chunk's claim; with none (the chunk
/// is received already), only counts them.
async fn flush(
    claimed: &Option<(Arc<ChunkClaim>, Arc<File>)>,
    offset: u64,
    pieces: Vec<Bytes>,
) -> Result<u64> {
    let len = pieces.iter().map(|p| p.len() as u64).sum();
    if let (Some((claim, file)), true) = (claimed, len > 0) {
        let (claim, file) = (claim.clone(), file.clone());
        blocking(move || claim.write(&file, offset, &pieces)).await?;
    }
    Ok(len)
}

/// The buffers of a chunk received and not yet written.
#[derive(Default)]
struct Held {
    pieces: VecDeque<Bytes>,
    len: usize,
}

impl Held {
    fn push(&mut self, piece: Bytes) {
        self.len += piece.len();
        self.pieces.push_back(piece);
    }

    /// The first `n` bytes held (`n` at most what is held), splitting a
    /// buffer where they end.
    fn take(&mut self, n: usize) -> Vec<Bytes> {
        let mut taken = Vec::new();
        let mut want = n;
        while want > 0 {
            let mut piece = self.pieces.pop_front().expect("n is held");
            if piece.len() > want {
                self.pieces.push_front(piece.split_off(want));
            }
            want -= piece.len();
            taken.push(piece);
        }
        self.len -= n;
        taken
    }
}

/// Size of each positioned write.
const WRITE_PIECE: usize = 1 << 20;

/// Writes `buffers`, back to back, at `offset`: an HTTP body's many small
/// buffers in one system call rather than one each.
fn write_all_vectored_at<P: AsRef<[u8]>>(
    file: &File,
    offset: u64,
    buffers: &[P],
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice> = buffers.iter().map(|b| IoSlice::new(b.as_ref())).collect();
    let mut slices = &mut slices[..];
    // Drops empty buffers in front, so that nothing to write writes nothing.
    IoSlice::advance_slices(&mut slices, 0);
    let mut at = offset;
    while !slices.is_empty() {
        // At most IOV_MAX buffers per call; the rest go in the next.
        let batch = &slices[..slices.len().min(1024)];
        let written = match rustix::io::pwritev(file, batch, at) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        at += written as u64;
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

/// The right to write chunk `index` of the staged file `data`. The newest
/// request for a chunk holds it; an older copy still arriving is refused
/// from then on, so two copies of a chunk never mix in the file. Only the
/// holder marks the chunk received, and a request that finds it received
/// writes nothing: nothing is written into a received chunk, nor (after
/// the commit, which needs every chunk received) into the committed file.
struct ChunkClaim {
    data: PathBuf,
    index: u64,
    ticket: u64,
}

/// Which claim holds each chunk being written: `(staged file, index)` →
/// ticket.
type Claims = BTreeMap<(PathBuf, u64), u64>;

impl ChunkClaim {
    /// Claims chunk `index`, taking it from an earlier request. `None` if it
    /// is received already (and durably so, when this returns).
    fn take(data: &Path, map: &Path, index: u64) -> Result<Option<Self>> {
        static TICKETS: AtomicU64 = AtomicU64::new(0);
        let ticket = TICKETS.fetch_add(1, Ordering::Relaxed);
        let key = (data.to_owned(), index);
        {
            // The map is read under the lock it is marked under.
            let mut claims = claims_of(data);
            if !chunk_received(map, index)? {
                claims.insert(key, ticket);
                return Ok(Some(Self {
                    data: data.to_owned(),
                    index,
                    ticket,
                }));
            }
        }
        // Its holder may not have synced the mark yet.
        File::open(map)
            .and_then(|m| m.sync_data())
            .map_err(Error::storage_io("syncing the chunk map"))?;
        Ok(None)
    }

    fn check_held(&self, claims: &Claims) -> Result<()> {
        match claims.get(&(self.data.clone(), self.index)) {
            Some(ticket) if *ticket == self.ticket => Ok(()),
            _ => Err(Error::Conflict(format!(
                "chunk {} is being received again, by a newer request; this copy is dropped",
                self.index
            ))),
        }
    }

    /// Writes one piece (at most [`WRITE_PIECE`] bytes, in the buffers it
    /// came in) at `offset`, if the claim still holds.
    fn write<P: AsRef<[u8]>>(&self, file: &File, offset: u64, buffers: &[P]) -> Result<()> {
        let claims = claims_of(&self.data);
        self.check_held(&claims)?;
        write_all_vectored_at(file, offset, buffers)
            .map_err(Error::storage_io("writing staged data"))?;
        // On its way to the disk while the rest of the chunk arrives.
        let len = buffers.iter().map(|b| b.as_ref().len() as u64).sum();
        page_cache::write_back(file, offset, len, false);
        Ok(())
    }

    /// Makes the chunk's data (`range` of the file) durable, then marks it
    /// received, if the claim still holds. Its pages then leave the cache
    /// (see [`page_cache`]) unless they are to `stay_cached` for the
    /// running digest, which drops them once it has read them.
    fn record(&self, file: &File, map: &Path, range: Range<u64>, stay_cached: bool) -> Result<()> {
        file.sync_data()
            .map_err(Error::storage_io("syncing staged data"))?;
        if !stay_cached {
            page_cache::forget_cached(file, range.start, range.end - range.start);
        }
        let map_file = OpenOptions::new()
            .write(true)
            .open(map)
            .map_err(not_found_as_gone)?;
        {
            let claims = claims_of(&self.data);
            self.check_held(&claims)?;
            // Only after the data is durable does the chunk count as received.
            map_file
                .write_all_at(&[1], self.index)
                .map_err(Error::storage_io("updating the chunk map"))?;
        }
        map_file
            .sync_data()
            .map_err(Error::storage_io("syncing the chunk map"))
    }
}

impl Drop for ChunkClaim {
    fn drop(&mut self) {
        let mut claims = claims_of(&self.data);
        let key = (std::mem::take(&mut self.data), self.index);
        if claims.get(&key) == Some(&self.ticket) {
            claims.remove(&key);
        }
    }
}

/// The claims of the chunks of staged file `data`, locked. The same lock
/// orders the writes into the file: the filesystem takes the file's inode
/// lock for every buffered write anyway, and a writer waiting for it spins
/// for as long as the holder copies (up to [`WRITE_PIECE`] bytes); with a
/// session's chunks written in parallel, that spinning was 6-17 % of the
/// server's CPU in an upload (bench/RESULTS.md, ws notes). A writer waiting
/// here sleeps instead. Striped by path, so unrelated sessions seldom share
/// a lock.
fn claims_of(data: &Path) -> MutexGuard<'static, Claims> {
    const STRIPES: usize = 256;
    static CLAIMS: [Mutex<Claims>; STRIPES] = [const { Mutex::new(BTreeMap::new()) }; STRIPES];
    let mut hasher = std::hash::DefaultHasher::new();
    data.hash(&mut hasher);
    CLAIMS[(hasher.finish() % STRIPES as u64) as usize]
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

fn open_data(data: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .open(data)
        .map_err(not_found_as_gone)
}

/// Sizes the staging file and the chunk map (one byte per chunk) for `layout`.
fn size_files(data: &File, map: &File, layout: ChunkLayout) -> Result<()> {
    data.set_len(layout.size)
        .map_err(Error::storage_io("sizing the staging file"))?;
    map.set_len(layout.chunk_count())
        .map_err(Error::storage_io("sizing the chunk map"))
}

/// Whether the chunk map marks chunk `index` received. An open-ended
/// session's map ends after the last chunk received.
fn chunk_received(map: &Path, index: u64) -> Result<bool> {
    let mut mark = [0u8];
    let read = File::open(map)
        .map_err(not_found_as_gone)?
        .read_at(&mut mark, index)
        .map_err(Error::storage_io("reading the chunk map"))?;
    Ok(read == 1 && mark[0] == 1)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::storage_io("syncing a directory"))
}

/// The staging file vanishes when another request committed or aborted the
/// session; the caller re-reads the manifest to say which.
fn not_found_as_gone(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::NotFound("staged data of the upload".into())
    } else {
        Error::storage_io("staged data")(e)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Storage(format!("staging task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_buffers_are_written_back_to_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 239) as u8).collect();
        // More buffers than one call takes, empty ones among them.
        let mut buffers = vec![Bytes::new()];
        let mut from = 0;
        for (i, step) in [1usize, 0, 7, 100, 13].iter().cycle().enumerate() {
            let to = (from + step + i % 3).min(bytes.len());
            buffers.push(Bytes::copy_from_slice(&bytes[from..to]));
            from = to;
            if from == bytes.len() {
                break;
            }
        }
        buffers.push(Bytes::new());
        assert!(buffers.len() > 2048);
        File::create(&path).unwrap();
        let file = open_data(&path).unwrap();
        write_all_vectored_at(&file, 10, &buffers).unwrap();
        write_all_vectored_at(&file, 0, &[Bytes::new()]).unwrap();
        write_all_vectored_at::<Bytes>(&file, 0, &[]).unwrap();
        let read = std::fs::read(&path).unwrap();
        assert_eq!(read.len(), 10 + bytes.len());
        assert!(read[..10] == [0; 10] && read[10..] == bytes[..]);
    }

    #[test]
    fn held_buffers_are_taken_in_order_split_where_asked() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut held = Held::default();
        for (from, to) in [(0, 1), (1, 1), (1, 4000), (4000, 9000), (9000, 10_000)] {
            held.push(Bytes::copy_from_slice(&bytes[from..to]));
        }
        assert_eq!(held.len, 10_000);
        let mut out = Vec::new();
        for n in [3000, 0, 2500, 4499, 1] {
            let taken = held.take(n);
            assert_eq!(taken.iter().map(Bytes::len).sum::<usize>(), n);
            taken.iter().for_each(|p| out.extend_from_slice(p));
        }
        assert_eq!(held.len, 0);
        assert!(held.pieces.iter().all(Bytes::is_empty));
        assert!(out == bytes);
    }
}
