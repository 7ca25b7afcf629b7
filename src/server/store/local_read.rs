//! Reading a local store's files: opening one with its metadata, and
//! streaming a byte range of it.
//!
//! Reads are positioned (`pread`) on the one file descriptor opened with the
//! metadata, so they neither share nor move a file offset, and every byte
//! comes from the file that descriptor was opened on, whatever has been
//! renamed over its path since.
//!
//! What needs no disk access is done on the async worker itself: opening a
//! path whose lookup the kernel can answer from its caches (`openat2` with
//! `RESOLVE_CACHED`, then `fstat` of the open file), and copying bytes the
//! page cache holds (`preadv2` with `RWF_NOWAIT`). Both fail rather than wait
//! for the disk, and only then is the work handed to the blocking pool: a
//! handoff there and back cost more CPU than the cached open and 64 KiB read
//! themselves (bench/RESULTS.md, serve notes).

use std::fs::{File, Metadata};
use std::io::IoSliceMut;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::ObjectMeta;
use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::error::{Error, Result};

/// Opens the file at `path` (a path inside the store) with its metadata.
/// `None` when no file is there: nothing, a directory, or a path through a
/// file.
pub(super) async fn open(path: PathBuf) -> Result<Option<(File, Metadata)>> {
    if let Ok(file) = open_cached(&path) {
        return with_metadata(Ok(file), &path);
    }
    // Not in the kernel's caches (or an error, which the plain open reports).
    tokio::task::spawn_blocking(move || with_metadata(File::open(&path), &path))
        .await
        .map_err(|e| Error::Storage(format!("file open task failed: {e}")))?
}

/// Opens `path` read-only if every step of its lookup is cached; fails
/// (`EAGAIN`) rather than read a directory from the disk.
fn open_cached(path: &Path) -> std::io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC;
    let fd = rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        flags,
        Mode::empty(),
        ResolveFlags::CACHED,
    )?;
    Ok(File::from(fd))
}

fn with_metadata(opened: std::io::Result<File>, path: &Path) -> Result<Option<(File, Metadata)>> {
    use std::io::ErrorKind::{NotADirectory, NotFound};
    let cannot = |e: std::io::Error| Error::local_store("cannot open the file", path, e);
    let file = match opened {
        Ok(file) => file,
        Err(e) if matches!(e.kind(), NotFound | NotADirectory) => return Ok(None),
        Err(e) => return Err(cannot(e)),
    };
    let metadata = file.metadata().map_err(cannot)?;
    Ok((!metadata.is_dir()).then_some((file, metadata)))
}

/// The object store's metadata of a local file, exactly as its local backend
/// reports it (`head`, listings), etag format included, so etags do not
/// depend on how the file was opened.
pub(super) fn object_meta(
    metadata: &Metadata,
    location: object_store::path::Path,
) -> Result<ObjectMeta> {
    let modified = metadata
        .modified()
        .map_err(|e| Error::Storage(format!("no modification time: {e}")))?;
    let micros = modified
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    let size = metadata.len();
    Ok(ObjectMeta {
        location,
        last_modified: modified.into(),
        size,
        e_tag: Some(format!("\"{:x}-{micros:x}-{size:x}\"", metadata.ino())),
        version: None,
    })
}

/// Bytes per read, each into a fresh buffer handed on as it is: a range up to
/// this size is a single read. A stream holds little beyond what hyper queues
/// for the socket (up to about 400 KiB per connection) when the client reads
/// slowly. Measured on 2 cores (bench/RESULTS.md, serve notes): 128 KiB reads
/// streamed one file at 1.5–1.7 GB/s, 256 KiB reads at 2.1–2.2 GB/s but
/// peaked near 90 MiB with 200 streams; 192 KiB: 1.8–2.1 GB/s and 75 MiB.
const CHUNK: usize = 192 * 1024;

/// Streams bytes `range` of `file`, one read per [`CHUNK`] and one [`Bytes`]
/// per read, never holding more than the chunk being read.
///
/// Yields exactly `range.end - range.start` bytes in order, or ends with an
/// error (e.g. if the file was truncated in place and ends early). Dropping
/// the stream closes the file.
pub(super) fn stream(file: Arc<File>, range: Range<u64>) -> BoxStream<'static, Result<Bytes>> {
    futures::stream::try_unfold((file, range), |(file, range)| async move {
        if range.is_empty() {
            return Ok(None);
        }
        let len = CHUNK.min(usize::try_from(range.end - range.start).unwrap_or(CHUNK));
        // Allocated here rather than on a blocking-pool thread, so buffers come
        // from the async workers' few malloc arenas, not one arena per thread.
        let mut buf = vec![0; len];
        let offset = range.start;
        let cached = read_cached(&file, &mut buf, offset);
        let (file, read) = if cached == len {
            (file, Ok(buf))
        } else {
            tokio::task::spawn_blocking(move || {
                let read = read_exact_at(&file, &mut buf[cached..], offset + cached as u64);
                (file, read.map(|()| buf))
            })
            .await
            .map_err(|e| Error::Storage(format!("file read task failed: {e}")))?
        };
        let chunk = Bytes::from(read?);
        Ok(Some((chunk, (file, offset + len as u64..range.end))))
    })
    .boxed()
}

/// Whether the page cache holds the byte at `offset` (false past the end):
/// reading it then cannot wait for the disk.
pub fn byte_is_cached(file: &File, offset: u64) -> bool {
    read_cached(file, &mut [0; 1], offset) == 1
}

/// Reads into `buf` from `offset` what the page cache already holds, without
/// blocking; returns how many bytes it read (a prefix of `buf`). Anything it
/// cannot read at once (not cached, end of file, no `RWF_NOWAIT` support) is
/// left to [`read_exact_at`].
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let mut slice = [IoSliceMut::new(&mut buf[done..])];
        let nowait = rustix::io::ReadWriteFlags::NOWAIT;
        match rustix::io::preadv2(file, &mut slice, offset + done as u64, nowait) {
            Ok(n) if n > 0 => done += n,
            _ => break,
        }
    }
    done
}

/// Fills `buf` with the bytes of `file` from `offset`, waiting for the disk.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::Storage(format!(
            "file truncated while read: it ends before byte {}",
            offset + buf.len() as u64
        ))),
        Err(e) => Err(Error::Storage(format!("cannot read file: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use futures::TryStreamExt;

    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn temp_file(data: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        (dir, path)
    }

    async fn chunks(file: File, range: Range<u64>) -> Result<Vec<Bytes>> {
        stream(Arc::new(file), range).try_collect().await
    }

    #[tokio::test]
    async fn yields_exactly_the_range_in_chunks_of_at_most_chunk() {
        let data = pattern(3 * CHUNK + 1000);
        let (_dir, path) = temp_file(&data);
        for (start, end) in [(0, data.len()), (5, 3 * CHUNK + 7), (CHUNK, 2 * CHUNK)] {
            let got = chunks(File::open(&path).unwrap(), start as u64..end as u64)
                .await
                .unwrap();
            assert!(got.iter().all(|c| !c.is_empty() && c.len() <= CHUNK));
            assert_eq!(got.concat(), &data[start..end]);
        }
    }

    #[tokio::test]
    async fn a_range_up_to_one_chunk_is_one_read() {
        let data = pattern(2 * CHUNK);
        let (_dir, path) = temp_file(&data);
        let got = chunks(File::open(&path).unwrap(), 100..100 + CHUNK as u64)
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0], &data[100..100 + CHUNK]);
        let empty = chunks(File::open(&path).unwrap(), 7..7).await.unwrap();
        assert!(empty.is_empty());
    }

    #[tokio::test]
    async fn bytes_not_in_the_page_cache_are_read_from_the_disk() {
        let data = pattern(2 * CHUNK + 10);
        let (_dir, path) = temp_file(&data);
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        // Evicts the clean pages where the filesystem allows it (not tmpfs).
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let got = chunks(file, 3..data.len() as u64).await.unwrap();
        assert_eq!(got.concat(), &data[3..]);
    }

    #[tokio::test]
    async fn reads_the_opened_file_after_its_path_is_replaced() {
        let old = pattern(CHUNK + 10);
        let (dir, path) = temp_file(&old);
        let file = File::open(&path).unwrap();
        let replacement = dir.path().join("new");
        std::fs::write(&replacement, b"new contents").unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        let got = chunks(file, 0..old.len() as u64).await.unwrap();
        assert_eq!(got.concat(), old);
    }

    #[tokio::test]
    async fn a_file_truncated_in_place_ends_with_an_error() {
        let (_dir, path) = temp_file(&pattern(100));
        let file = File::open(&path).unwrap();
        let mut writer = std::fs::File::create(&path).unwrap(); // truncates
        writer.write_all(b"short").unwrap();
        let err = chunks(file, 0..100).await.unwrap_err();
        assert!(matches!(err, Error::Storage(m) if m.contains("truncated")));
    }
}
