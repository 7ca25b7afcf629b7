//! Streaming a byte range of an already-open local file.
//!
//! Reads are positioned (`pread`) on the one file descriptor the caller
//! opened, so they neither share nor move a file offset, and every byte comes
//! from the file that descriptor was opened on, whatever has been renamed
//! over its path since.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::error::{Error, Result};

/// Bytes per read, each into a fresh buffer handed on as it is: a range up to
/// this size is a single read. A stream holds little beyond what hyper queues
/// for the socket (up to about 400 KiB per connection) when the client reads
/// slowly. Measured on 2 cores (bench/RESULTS.md, serve notes): 128 KiB reads
/// streamed one file at 1.5–1.7 GB/s, 256 KiB reads at 2.1–2.2 GB/s but
/// peaked near 90 MiB with 200 streams; 192 KiB: 1.8–2.1 GB/s and 75 MiB.
const CHUNK: usize = 192 * 1024;

/// Streams bytes `range` of `file`, one blocking-pool read per [`CHUNK`] and
/// one [`Bytes`] per read, never holding more than the chunk being read.
///
/// Yields exactly `range.end - range.start` bytes in order, or ends with an
/// error (e.g. if the file was truncated in place and ends early). Dropping
/// the stream closes the file.
pub(super) fn stream(file: File, range: Range<u64>) -> BoxStream<'static, Result<Bytes>> {
    futures::stream::try_unfold((file, range), |(file, range)| async move {
        if range.is_empty() {
            return Ok(None);
        }
        let len = CHUNK.min(usize::try_from(range.end - range.start).unwrap_or(CHUNK));
        // Allocated here rather than on a blocking-pool thread, so buffers come
        // from the async workers' few malloc arenas, not one arena per thread.
        let buf = Vec::with_capacity(len);
        let offset = range.start;
        let (file, read) = tokio::task::spawn_blocking(move || {
            let read = read_at(&file, buf, len, offset);
            (file, read)
        })
        .await
        .map_err(|e| Error::Storage(format!("file read task failed: {e}")))?;
        let chunk = read?;
        Ok(Some((chunk, (file, offset + len as u64..range.end))))
    })
    .boxed()
}

/// Exactly `len` bytes of `file` from `offset`, read into `buf`.
fn read_at(file: &File, mut buf: Vec<u8>, len: usize, offset: u64) -> Result<Bytes> {
    buf.resize(len, 0);
    match file.read_exact_at(&mut buf, offset) {
        Ok(()) => Ok(Bytes::from(buf)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::Storage(format!(
            "file truncated while read: it ends before byte {}",
            offset + len as u64
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
        stream(file, range).try_collect().await
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
