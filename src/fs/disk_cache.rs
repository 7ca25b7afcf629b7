//! An optional second cache tier on local disk (`--cache-dir`), bounded in
//! bytes, for blocks evicted from memory. It lives as long as the mount: it is
//! emptied when the mount starts.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest, Sha256};

use super::block_cache::BlockKey;

pub struct DiskCache {
    dir: PathBuf,
    index: Mutex<Index>,
}

struct Index {
    files: LruCache<BlockKey, u64>,
    bytes: u64,
    capacity: u64,
}

impl DiskCache {
    /// Opens (and empties) the cache in `dir/blocks`.
    pub fn open(dir: &std::path::Path, capacity: u64) -> std::io::Result<Arc<DiskCache>> {
        let dir = dir.join("blocks");
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(&dir)?;
        Ok(Arc::new(DiskCache {
            dir,
            index: Mutex::new(Index {
                files: LruCache::unbounded(),
                bytes: 0,
                capacity,
            }),
        }))
    }

    fn file(&self, key: &BlockKey) -> PathBuf {
        let mut hasher = Sha256::new();
        hasher.update(key.path.as_str());
        hasher.update([0]);
        hasher.update(&key.etag);
        hasher.update(key.block.to_be_bytes());
        self.dir.join(hex::encode(hasher.finalize()))
    }

    /// Whether the block is on disk (without touching its recency).
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.index.lock().unwrap().files.contains(key)
    }

    /// The block if it is on disk.
    pub async fn get(self: &Arc<Self>, key: &BlockKey) -> Option<Bytes> {
        // Also marks the block as recently used.
        self.index.lock().unwrap().files.get(key)?;
        let path = self.file(key);
        let data = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .ok()?
            .ok()?;
        Some(Bytes::from(data))
    }

    /// Stores the block, evicting the least recently used beyond the budget.
    pub fn put(self: &Arc<Self>, key: BlockKey, data: Bytes) {
        let cache = self.clone();
        tokio::task::spawn_blocking(move || {
            let len = data.len() as u64;
            if len > cache.index.lock().unwrap().capacity {
                return;
            }
            let path = cache.file(&key);
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, &data)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .is_err()
            {
                let _ = std::fs::remove_file(&tmp);
                return;
            }
            let evicted = {
                let mut index = cache.index.lock().unwrap();
                if let Some(old) = index.files.put(key, len) {
                    index.bytes -= old;
                }
                index.bytes += len;
                let mut evicted = Vec::new();
                while index.bytes > index.capacity {
                    match index.files.pop_lru() {
                        Some((k, n)) => {
                            index.bytes -= n;
                            evicted.push(k);
                        }
                        None => break,
                    }
                }
                evicted
            };
            for key in evicted {
                let _ = std::fs::remove_file(cache.file(&key));
            }
        });
    }
}
