//! Fixed-size blocks of remote files in an LRU bounded in bytes, keyed by
//! (path, etag, block): a changed file never serves old blocks. Concurrent
//! misses on one block make one request.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use lru::LruCache;

use crate::protocol::RemotePath;

/// Block size of every fetch.
pub const BLOCK_SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub path: RemotePath,
    pub etag: String,
    pub block: u64,
}

/// A fetch failure, shareable between the requests that waited on it.
#[derive(Debug, Clone)]
pub struct FetchError {
    pub errno: i32,
    pub message: String,
}

impl From<crate::Error> for FetchError {
    fn from(e: crate::Error) -> Self {
        FetchError {
            errno: e.errno(),
            message: e.to_string(),
        }
    }
}

type Fetch = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;

pub struct BlockCache {
    blocks: Mutex<Lru>,
    in_flight: Mutex<HashMap<BlockKey, Fetch>>,
    /// The most one fetch brings in: what each fetch in flight takes from
    /// the budget, so that cached and arriving blocks together stay within it.
    fetch_bytes: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Lru {
    map: LruCache<BlockKey, Bytes>,
    bytes: usize,
    capacity: usize,
}

/// What the cache did for a request (for tests and metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub cached_bytes: usize,
    pub blocks: usize,
    /// Block requests answered from memory.
    pub hits: u64,
    /// Block requests that waited for a fetch (their own or another's).
    pub misses: u64,
}

impl BlockCache {
    pub fn new(capacity_bytes: usize, fetch_bytes: usize) -> Self {
        Self {
            fetch_bytes,
            blocks: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
                capacity: capacity_bytes,
            }),
            in_flight: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> CacheStats {
        let lru = self.blocks.lock().unwrap();
        CacheStats {
            cached_bytes: lru.bytes,
            blocks: lru.map.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    pub fn capacity(&self) -> usize {
        self.blocks.lock().unwrap().capacity
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        self.blocks.lock().unwrap().map.contains(key)
    }

    /// True when the block is cached or already being fetched.
    pub fn has_or_fetching(&self, key: &BlockKey) -> bool {
        self.contains(key) || self.in_flight.lock().unwrap().contains_key(key)
    }

    /// The block, from the cache or fetched by `fetch` (once, however many
    /// callers ask at the same time). The fetch runs to its end on its own
    /// task, whether or not its callers still wait: a caller that stops
    /// waiting leaves nothing half done.
    pub async fn get_or_fetch<F>(
        self: &Arc<Self>,
        key: BlockKey,
        fetch: impl FnOnce() -> F,
    ) -> Result<Bytes, FetchError>
    where
        F: Future<Output = Result<Bytes, FetchError>> + Send + 'static,
    {
        if let Some(data) = self.blocks.lock().unwrap().map.get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(data.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let fetching = self.join_or_start(key.clone(), fetch);
        let result = fetching.clone().await;
        // Cached by now for whoever asks next, whether or not the fetch's
        // own task has run yet.
        self.retire(&key, &fetching, &result);
        result
    }

    /// Starts fetching the block unless it is cached or on its way.
    pub fn prefetch<F>(self: &Arc<Self>, key: BlockKey, fetch: impl FnOnce() -> F)
    where
        F: Future<Output = Result<Bytes, FetchError>> + Send + 'static,
    {
        if !self.has_or_fetching(&key) {
            self.misses.fetch_add(1, Ordering::Relaxed);
            drop(self.join_or_start(key, fetch));
        }
    }

    /// The fetch of `key` in flight, or a new one by `fetch`, run by a task
    /// of its own that caches what it brings and then retires it.
    fn join_or_start<F>(self: &Arc<Self>, key: BlockKey, fetch: impl FnOnce() -> F) -> Fetch
    where
        F: Future<Output = Result<Bytes, FetchError>> + Send + 'static,
    {
        let mut in_flight = self.in_flight.lock().unwrap();
        if let Some(f) = in_flight.get(&key) {
            return f.clone();
        }
        // Cached since the caller looked (a fetch just ended).
        if let Some(data) = self.blocks.lock().unwrap().map.peek(&key) {
            return futures::future::ready(Ok(data.clone())).boxed().shared();
        }
        let f = fetch().boxed().shared();
        in_flight.insert(key.clone(), f.clone());
        let (cache, running) = (self.clone(), f.clone());
        tokio::spawn(async move {
            let result = running.clone().await;
            cache.retire(&key, &running, &result);
        });
        f
    }

    /// Takes the ended fetch `done` of `key` out of those in flight, if
    /// still there, and caches what it brought. Retired and cached at
    /// once: a caller finds the block one way or the other.
    fn retire(&self, key: &BlockKey, done: &Fetch, result: &Result<Bytes, FetchError>) {
        let mut in_flight = self.in_flight.lock().unwrap();
        if !in_flight.get(key).is_some_and(|f| f.ptr_eq(done)) {
            return;
        }
        in_flight.remove(key);
        if let Ok(data) = result {
            self.insert(key.clone(), data.clone(), in_flight.len());
        }
    }

    /// Caches a fetched block, leaving room for the `fetching` fetches
    /// still in flight.
    fn insert(&self, key: BlockKey, data: Bytes, fetching: usize) {
        let arriving = fetching * self.fetch_bytes;
        let mut lru = self.blocks.lock().unwrap();
        let budget = lru.capacity.saturating_sub(arriving);
        if lru.map.contains(&key) || data.len() > budget {
            return;
        }
        lru.bytes += data.len();
        lru.map.put(key, data);
        while lru.bytes > budget {
            match lru.map.pop_lru() {
                Some((_, evicted)) => lru.bytes -= evicted.len(),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(block: u64) -> BlockKey {
        BlockKey {
            path: "f".parse().unwrap(),
            etag: "e".into(),
            block,
        }
    }

    #[tokio::test]
    async fn concurrent_misses_fetch_once() {
        let cache = Arc::new(BlockCache::new(10 << 20, 1 << 20));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for _ in 0..8 {
            let (cache, calls) = (cache.clone(), calls.clone());
            waiters.push(tokio::spawn(async move {
                cache
                    .get_or_fetch(key(0), || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        Ok(Bytes::from_static(b"data"))
                    })
                    .await
            }));
        }
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap(), Bytes::from_static(b"data"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn stays_within_its_byte_budget() {
        let cache = Arc::new(BlockCache::new(3000, 1000));
        for b in 0..10 {
            cache
                .get_or_fetch(key(b), || async { Ok(Bytes::from(vec![0u8; 1000])) })
                .await
                .unwrap();
        }
        assert_eq!(
            cache.stats(),
            CacheStats {
                cached_bytes: 3000,
                blocks: 3,
                hits: 0,
                misses: 10,
            }
        );
        cache
            .get_or_fetch(key(9), || async { unreachable!("cached") })
            .await
            .unwrap();
        assert_eq!(cache.stats().hits, 1);
        assert!(cache.contains(&key(9)) && !cache.contains(&key(6)));
        let err = cache
            .get_or_fetch(key(20), || async {
                Err(FetchError {
                    errno: 5,
                    message: "down".into(),
                })
            })
            .await
            .unwrap_err();
        assert_eq!(err.errno, 5);
        assert!(!cache.contains(&key(20)), "failures are not cached");
    }

    #[tokio::test]
    async fn fetches_in_flight_count_against_the_budget() {
        let cache = Arc::new(BlockCache::new(4000, 1000));
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let slow = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_fetch(key(100), || async move {
                        let _ = wait.await;
                        Ok(Bytes::from(vec![1u8; 1000]))
                    })
                    .await
            })
        };
        while !cache.has_or_fetching(&key(100)) {
            tokio::task::yield_now().await;
        }
        for b in 0..10 {
            cache
                .get_or_fetch(key(b), || async { Ok(Bytes::from(vec![0u8; 1000])) })
                .await
                .unwrap();
        }
        assert_eq!(cache.stats().cached_bytes, 3000, "room kept for the fetch");
        release.send(()).unwrap();
        slow.await.unwrap().unwrap();
        assert_eq!(cache.stats().cached_bytes, 4000);
        assert!(cache.contains(&key(100)));
    }

    /// A caller that stops waiting (a read past its deadline) leaves the
    /// fetch running: it ends, is cached and leaves the fetches in flight.
    #[tokio::test]
    async fn a_fetch_outlives_callers_that_stop_waiting() {
        let cache = Arc::new(BlockCache::new(4000, 1000));
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = || {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                Ok(Bytes::from(vec![1u8; 1000]))
            }
        };
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            cache.get_or_fetch(key(1), fetch),
        )
        .await;
        assert!(gave_up.is_err());
        cache.prefetch(key(2), fetch);
        cache.prefetch(key(2), fetch);
        assert!(cache.has_or_fetching(&key(1)) && cache.has_or_fetching(&key(2)));
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(cache.contains(&key(1)) && cache.contains(&key(2)));
        assert!(cache.in_flight.lock().unwrap().is_empty());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
