//! `ferry mount`: a FUSE filesystem over a ferry server.
//!
//! [`core::MountCore`] holds the logic (inodes, attribute cache, block cache,
//! readahead) as ordinary async methods; [`fuse`] only translates kernel
//! requests. docs/SEMANTICS.md says what the mount guarantees.

pub mod block_cache;
pub mod core;
mod disk_cache;
mod fuse;
pub mod inodes;
mod invalidate;
mod kernel_readahead;
pub mod pending;
pub mod read_deadline;
pub mod readahead;
mod staging;
pub mod staging_space;
mod tail_copy;
pub mod write_behind;

use std::path::Path;
use std::sync::Arc;

use fuser::{Config, MountOption};

use self::core::{MountCore, MountOptions};
pub use self::fuse::MAX_WRITE;
use crate::client::Client;
use crate::client::watch::Watcher;
use crate::error::{Error, Result};
use crate::protocol::RemotePath;

/// A live mount; dropping it unmounts.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    invalidator: tokio::task::JoinHandle<()>,
    pub core: Arc<MountCore>,
}

impl Mount {
    /// Mounts `client`'s server at `mountpoint`. Must run inside a tokio runtime.
    pub fn start(client: Client, mountpoint: &Path, options: MountOptions) -> Result<Mount> {
        let core =
            MountCore::new(client.clone(), options).map_err(Error::io("opening the disk cache"))?;
        let core = Arc::new(core);
        let resumed = core
            .start_writes()
            .map_err(Error::io("opening the upload journal"))?;
        if resumed > 0 {
            tracing::info!(
                uploads = resumed,
                "resuming uploads an earlier mount left unfinished"
            );
        }
        // Resolved before the mount hides the directory: the kernel names
        // the mount by this path.
        let resolved = std::fs::canonicalize(mountpoint)
            .map_err(Error::io(format!("resolving {}", mountpoint.display())))?;
        let filesystem =
            fuse::FerryFs::new(core.clone(), tokio::runtime::Handle::current(), resolved);
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("ferry:{}", client.base_url())),
            MountOption::Subtype("ferry".into()),
            MountOption::NoAtime,
        ];
        if core.options.read_only {
            config.mount_options.push(MountOption::RO);
        }
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(filesystem, mountpoint, &config)
            .map_err(Error::io(format!("mounting at {}", mountpoint.display())))?;
        let watcher = Watcher::start(&client, &RemotePath::root());
        let invalidator = tokio::spawn(invalidate::run(core.clone(), session.notifier(), watcher));
        Ok(Mount {
            session: Some(session),
            invalidator,
            core,
        })
    }

    /// True once the kernel side went away (e.g. `fusermount3 -u`).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> Result<()> {
        self.invalidator.abort();
        match self.session.take() {
            Some(session) if !session.guard.is_finished() => match session.umount_and_join() {
                // Unmounted from outside already (`fusermount3 -u` just
                // before a SIGTERM, or a lazy unmount with files still
                // open): nothing left to unmount, and the session ends as
                // the process does.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
                done => done.map_err(Error::io("unmounting")),
            },
            _ => Ok(()),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.invalidator.abort();
    }
}
