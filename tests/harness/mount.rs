//! Real FUSE mounts for the mount tests: a `ferry mount --foreground`
//! process, unmounted and stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Server, eventually};

pub fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!(
            "\n*** SKIPPED: /dev/fuse is absent; mount tests need FUSE (apt-get install fuse3) ***\n"
        );
    }
    ok
}

pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let wanted = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(wanted))
}

/// A `ferry mount --foreground` process; unmounted and stopped on drop.
pub struct MountProc {
    pub child: Child,
    pub path: PathBuf,
    /// `FERRY_STATE_DIR` of the mount (staging and the upload journal).
    pub state: PathBuf,
    _dir: tempfile::TempDir,
}

impl MountProc {
    pub fn start(server: &Server, extra: &[&str]) -> MountProc {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        Self::start_in(&server.url, dir, state, extra)
    }

    /// A mount of the server at `url` (a proxy in front of one, say).
    pub fn start_url(url: &str, extra: &[&str]) -> MountProc {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        Self::start_in(url, dir, state, extra)
    }

    /// A mount whose state directory is `state` (kept by the caller to
    /// remount with the same journal), on a fresh mount point.
    pub fn start_with_state(url: &str, state: &Path, extra: &[&str]) -> MountProc {
        Self::start_in(url, tempfile::tempdir().unwrap(), state.to_owned(), extra)
    }

    /// A mount on `dir/mnt` with state directory `state`.
    fn start_in(url: &str, dir: tempfile::TempDir, state: PathBuf, extra: &[&str]) -> MountProc {
        let path = dir.path().join("mnt");
        std::fs::create_dir_all(&path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["mount", url, path.to_str().unwrap(), "--foreground"])
            .args(extra)
            .env("FERRY_LOG", "warn")
            .env("FERRY_STATE_DIR", &state)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            eventually(Duration::from_secs(15), || is_mounted(&path)),
            "the mount did not appear"
        );
        MountProc {
            child,
            path,
            state,
            _dir: dir,
        }
    }

    pub fn at(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// SIGKILLs the mount process; dropping then detaches what it left
    /// (lazily: descriptors still open on it do not keep it mounted).
    pub fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.path)
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory a mount keeps its journal and staging files in, under
/// its `FERRY_STATE_DIR` (one per server URL).
pub fn mount_state_dir(state: &Path) -> PathBuf {
    std::fs::read_dir(state.join("mounts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

pub fn store_file(server: &Server, rel: &str, data: &[u8]) {
    let path = server.store_dir.as_ref().unwrap().join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// True when running as root (needed to mount a tmpfs); says so when not.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        eprintln!("\n*** SKIPPED: mounting a small tmpfs needs root ***\n");
    }
    root
}

/// A small tmpfs (a disk that fills up), unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs at {}", path.display());
        Tmpfs { path, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a mount process being stopped): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// The finished journal records in `journal`, as text (records are
/// written beside as `.tmp`, then renamed).
pub fn journal_records(journal: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(journal)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Bytes the staging files of mounts under `state` take on disk.
pub fn staged_bytes(state: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path, in_staging: bool, total: &mut u64) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.metadata() {
                Ok(m) if m.is_dir() => walk(&path, entry.file_name() == "staging", total),
                Ok(m) if in_staging => *total += m.blocks() * 512,
                _ => {}
            }
        }
    }
    let mut total = 0;
    walk(state, false, &mut total);
    total
}

/// The duration in seconds `ffprobe` reads from a media file's container.
pub fn probe_duration(path: &Path) -> f64 {
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    String::from_utf8_lossy(&probe.stdout)
        .trim()
        .parse()
        .unwrap()
}
