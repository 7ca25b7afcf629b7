//! A response body that is a byte range of an open local file, so that a
//! connection able to (plain HTTP/1.1 over TCP, `listen/sendfile_conn.rs`) can
//! send it with `sendfile` instead of copying it through user space.
//!
//! The handler puts a [`FileRegion`] in the response's extensions beside the
//! usual streamed body. A connection that cannot use it (TLS, HTTP/2)
//! ignores it and polls the body; one that can takes the region and drops
//! the body unpolled once the bytes are sent. So a layer that wraps the body
//! has to mind the region: one that counts the bytes registers an observer
//! here too (both ways of sending are then counted alike); what one holds
//! for the transfer's length can stay in the body; one that would change
//! the bytes (compression) must remove the region.

use std::fs::File;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

type Observer = Box<dyn FnMut(usize) + Send>;

/// A file range offered for zero-copy sending. Cloning shares the offer:
/// whoever [`FileRegion::take`]s it first owns it.
#[derive(Clone)]
pub struct FileRegion(Arc<Mutex<Option<Region>>>);

/// A taken [`FileRegion`].
pub struct Region {
    pub file: Arc<File>,
    /// Bytes of `file` to send; `span.end - span.start` is the body's
    /// `Content-Length`.
    pub span: Range<u64>,
    observers: Vec<Observer>,
}

impl FileRegion {
    pub fn new(file: Arc<File>, span: Range<u64>) -> Self {
        Self(Arc::new(Mutex::new(Some(Region {
            file,
            span,
            observers: Vec::new(),
        }))))
    }

    /// Calls `on_data` with the size of each piece sent, as a body observer
    /// would be called with the size of each frame.
    pub fn observe(&self, on_data: impl FnMut(usize) + Send + 'static) {
        if let Some(region) = self.lock().as_mut() {
            region.observers.push(Box::new(on_data));
        }
    }

    pub fn take(&self) -> Option<Region> {
        self.lock().take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Region>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Region {
    /// Reports `n` more bytes sent to the observers.
    pub fn sent(&mut self, n: usize) {
        for observer in &mut self.observers {
            observer(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn observers_see_what_the_taker_reports_and_only_one_taker_gets_it() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let offer = FileRegion::new(file, 10..20);
        let seen = Arc::new(AtomicUsize::new(0));
        let counted = seen.clone();
        offer.observe(move |n| {
            counted.fetch_add(n, Ordering::Relaxed);
        });
        let mut region = offer.clone().take().expect("first taker");
        assert!(offer.take().is_none(), "a region is sent once");
        assert_eq!(region.span, 10..20);
        region.sent(4);
        region.sent(6);
        assert_eq!(seen.load(Ordering::Relaxed), 10);
    }
}
