//! How much local space staged writes may take: the bytes of files open for
//! writing plus those of closed files whose upload is pending, bounded by
//! `--max-staging` and by the free space of the staging filesystem.
//!
//! A write that needs more waits while pending uploads can free enough; it
//! fails with ENOSPC at once when they cannot (only open files hold the
//! space, or even a full drain would leave too little), and as soon as the
//! uploads stall (an attempt failed after its retries, and none progressed
//! since). Nothing is ever written in part for want of space.
//!
//! ```text
//! let charge = space.reserve(len).await?;   // may wait, or ENOSPC
//! file.write_all_at(&data, offset)?;       // then keep `charge` as long as the bytes
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::core::{FsResult, errno};

/// Free space always left on the staging filesystem, for the upload journal
/// (a record per closed file) and for the bookkeeping of the filesystem itself.
pub const DISK_RESERVE: u64 = 1 << 20;

pub struct StagingSpace {
    /// `--max-staging`; `None` leaves only the disk as the bound.
    limit: Option<u64>,
    /// A directory on the staging filesystem.
    dir: PathBuf,
    usage: Mutex<Usage>,
    /// Signalled when bytes are released and when uploads progress or stall.
    changed: Notify,
}

#[derive(Debug, Default)]
struct Usage {
    /// Bytes charged in all.
    used: u64,
    /// The part held by pending uploads: freed when they commit.
    draining: u64,
    /// The last upload event was a failed attempt.
    stalled: bool,
}

/// What a request for more bytes can expect.
enum Outlook {
    Fits,
    AfterDrain,
    Never,
}

impl StagingSpace {
    pub fn new(dir: PathBuf, limit: Option<u64>) -> Arc<StagingSpace> {
        Arc::new(StagingSpace {
            limit,
            dir,
            usage: Mutex::default(),
            changed: Notify::new(),
        })
    }

    /// Bytes charged now (open files and pending uploads).
    pub fn used(&self) -> u64 {
        self.usage.lock().unwrap().used
    }

    /// A charge of nothing, to grow with [`Charge::merge`].
    pub fn empty(self: &Arc<Self>) -> Charge {
        Charge {
            space: Some(self.clone()),
            bytes: 0,
            draining: false,
        }
    }

    /// Charges `bytes` for new content, waiting for pending uploads to free
    /// room if needed. ENOSPC when they cannot or stall.
    pub async fn reserve(self: &Arc<Self>, bytes: u64) -> FsResult<Charge> {
        if bytes == 0 {
            return Ok(self.empty());
        }
        let mut waited = false;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let free = self.disk_free();
            {
                let mut usage = self.usage.lock().unwrap();
                match self.outlook(&usage, bytes, free) {
                    Outlook::Fits => return Ok(self.charge(&mut usage, bytes)),
                    Outlook::AfterDrain if !usage.stalled => {}
                    _ => {
                        tracing::warn!(
                            bytes,
                            used = usage.used,
                            draining = usage.draining,
                            free,
                            limit = self.limit,
                            stalled = usage.stalled,
                            "no staging space for a write: ENOSPC"
                        );
                        return Err(errno::ENOSPC);
                    }
                }
            }
            if !waited {
                tracing::debug!(bytes, "staging is full; waiting for uploads to drain");
                waited = true;
            }
            changed.await;
        }
    }

    /// Charges `bytes` if they fit now; `None` when [`reserve`] would have
    /// to wait or refuse.
    ///
    /// [`reserve`]: Self::reserve
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Charge> {
        if bytes == 0 {
            return Some(self.empty());
        }
        let free = self.disk_free();
        let mut usage = self.usage.lock().unwrap();
        matches!(self.outlook(&usage, bytes, free), Outlook::Fits)
            .then(|| self.charge(&mut usage, bytes))
    }

    fn charge(self: &Arc<Self>, usage: &mut Usage, bytes: u64) -> Charge {
        usage.used += bytes;
        Charge {
            space: Some(self.clone()),
            bytes,
            draining: false,
        }
    }

    fn outlook(&self, usage: &Usage, bytes: u64, free: Option<u64>) -> Outlook {
        let wanted = usage.used.saturating_add(bytes);
        let within_limit = self.limit.is_none_or(|l| wanted <= l);
        let on_disk = free.is_none_or(|f| f >= bytes.saturating_add(DISK_RESERVE));
        if within_limit && on_disk {
            return Outlook::Fits;
        }
        // What draining every pending upload would give back.
        let drained_limit = self.limit.is_none_or(|l| wanted - usage.draining <= l);
        let drained_disk = free
            .is_none_or(|f| f.saturating_add(usage.draining) >= bytes.saturating_add(DISK_RESERVE));
        if usage.draining > 0 && drained_limit && drained_disk {
            Outlook::AfterDrain
        } else {
            Outlook::Never
        }
    }

    /// Bytes available to unprivileged writers on the staging filesystem.
    fn disk_free(&self) -> Option<u64> {
        match rustix::fs::statvfs(&self.dir) {
            Ok(stat) => Some(stat.f_bavail.saturating_mul(stat.f_frsize)),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "statvfs of the staging directory failed");
                None
            }
        }
    }

    /// Charges what a pending upload found at mount time holds, without
    /// waiting: it is on disk already.
    pub fn draining(self: &Arc<Self>, bytes: u64) -> Charge {
        let mut usage = self.usage.lock().unwrap();
        usage.used += bytes;
        usage.draining += bytes;
        Charge {
            space: Some(self.clone()),
            bytes,
            draining: true,
        }
    }

    /// An upload moved forward: writers waiting for room keep waiting.
    pub fn upload_progressed(&self) {
        let was_stalled = std::mem::replace(&mut self.usage.lock().unwrap().stalled, false);
        if was_stalled {
            self.changed.notify_waiters();
        }
    }

    /// An upload attempt failed after its retries: writers waiting for room
    /// give up (ENOSPC) until an upload moves again.
    pub fn upload_failed(&self) {
        self.usage.lock().unwrap().stalled = true;
        self.changed.notify_waiters();
    }

    fn give_back(&self, bytes: u64, draining: bool) {
        if bytes == 0 {
            return;
        }
        let mut usage = self.usage.lock().unwrap();
        usage.used -= bytes;
        if draining {
            usage.draining -= bytes;
        }
        drop(usage);
        self.changed.notify_waiters();
    }
}

/// Staged bytes held by one file or one pending upload; released on drop.
#[must_use]
pub struct Charge {
    space: Option<Arc<StagingSpace>>,
    bytes: u64,
    draining: bool,
}

impl Charge {
    /// Charges nothing and belongs to no space (uploads of files that are
    /// still charged elsewhere).
    pub fn none() -> Charge {
        Charge {
            space: None,
            bytes: 0,
            draining: false,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes over `other`'s bytes.
    pub fn merge(&mut self, mut other: Charge) {
        if self.space.is_none() {
            self.space = other.space.clone();
        }
        debug_assert_eq!(self.draining, other.draining);
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Gives back up to `bytes` of the charge.
    pub fn release(&mut self, bytes: u64) {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        if let Some(space) = &self.space {
            space.give_back(bytes, self.draining);
        }
    }

    /// Moves the whole charge to a pending upload: from now on waiting
    /// writers may count on it being freed.
    pub fn into_draining(mut self) -> Charge {
        let bytes = std::mem::take(&mut self.bytes);
        let space = self.space.clone();
        if let Some(space) = &space
            && !self.draining
        {
            space.usage.lock().unwrap().draining += bytes;
            space.changed.notify_waiters();
        }
        Charge {
            space,
            bytes,
            draining: true,
        }
    }

    /// Takes the whole charge, leaving this one empty.
    pub fn take(&mut self) -> Charge {
        Charge {
            space: self.space.clone(),
            bytes: std::mem::take(&mut self.bytes),
            draining: self.draining,
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let bytes = self.bytes;
        self.release(bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn space(limit: u64) -> Arc<StagingSpace> {
        StagingSpace::new(std::env::temp_dir(), Some(limit))
    }

    #[tokio::test]
    async fn within_the_limit_a_reservation_is_immediate() {
        let space = space(100);
        let a = space.reserve(60).await.unwrap();
        let mut b = space.reserve(40).await.unwrap();
        assert_eq!(space.used(), 100);
        b.release(15);
        assert_eq!(space.used(), 85);
        drop(a);
        assert_eq!(space.used(), 25);
        drop(b);
        assert_eq!(space.used(), 0);
    }

    #[tokio::test]
    async fn with_nothing_to_drain_an_overflow_is_enospc() {
        let space = space(100);
        let _open = space.reserve(90).await.unwrap();
        assert_eq!(space.reserve(11).await.err(), Some(errno::ENOSPC));
        assert_eq!(space.used(), 90);
    }

    #[tokio::test]
    async fn a_request_larger_than_a_full_drain_is_enospc_at_once() {
        let space = space(100);
        let _open = space.reserve(50).await.unwrap();
        let _uploading = space.reserve(40).await.unwrap().into_draining();
        // Even with the upload gone, 50 + 60 > 100.
        assert_eq!(space.reserve(60).await.err(), Some(errno::ENOSPC));
    }

    #[tokio::test]
    async fn a_writer_waits_for_an_upload_to_drain() {
        let space = space(100);
        let uploading = space.reserve(80).await.unwrap().into_draining();
        let waiter = tokio::spawn({
            let space = space.clone();
            async move { space.reserve(50).await.map(|c| c.bytes()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "the writer waits while the upload runs"
        );
        space.upload_progressed();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "progress alone frees nothing");
        drop(uploading);
        assert_eq!(waiter.await.unwrap(), Ok(50));
        assert_eq!(space.used(), 0, "the waiter's charge was dropped with it");
    }

    #[tokio::test]
    async fn a_stalled_upload_turns_waiting_into_enospc() {
        let space = space(100);
        let uploading = space.reserve(80).await.unwrap().into_draining();
        let waiter = tokio::spawn({
            let space = space.clone();
            async move { space.reserve(50).await.map(|c| c.bytes()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        space.upload_failed();
        assert_eq!(waiter.await.unwrap(), Err(errno::ENOSPC));
        // Until an upload moves again, no one waits.
        assert_eq!(space.reserve(50).await.err(), Some(errno::ENOSPC));
        space.upload_progressed();
        drop(uploading);
        assert!(space.reserve(50).await.is_ok());
    }

    #[tokio::test]
    async fn try_reserve_charges_only_what_fits_at_once() {
        let space = space(100);
        let open = space.try_reserve(60).expect("fits");
        assert_eq!(space.used(), 60);
        assert!(space.try_reserve(0).is_some(), "nothing always fits");
        // Nothing to drain: `reserve` would refuse; `try_reserve` declines.
        assert!(space.try_reserve(50).is_none());
        let uploading = open.into_draining();
        // An upload to drain: `reserve` would wait; `try_reserve` declines.
        assert!(space.try_reserve(50).is_none());
        assert_eq!(space.used(), 60, "a declined try charges nothing");
        drop(uploading);
        assert_eq!(space.try_reserve(100).map(|c| c.bytes()), Some(100));
        assert_eq!(space.used(), 0);
    }

    #[tokio::test]
    async fn merged_and_taken_charges_keep_the_count() {
        let space = space(1000);
        let mut file = space.empty();
        file.merge(space.reserve(100).await.unwrap());
        file.merge(space.reserve(50).await.unwrap());
        assert_eq!(file.bytes(), 150);
        let upload = file.take().into_draining();
        assert_eq!((file.bytes(), upload.bytes(), space.used()), (0, 150, 150));
        assert_eq!(space.usage.lock().unwrap().draining, 150);
        drop(upload);
        assert_eq!(space.used(), 0);
        assert_eq!(space.usage.lock().unwrap().draining, 0);
    }
}
