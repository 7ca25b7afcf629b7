//! Raising the kernel's readahead for a mount.
//!
//! FUSE cannot ask for more than the kernel offers at `INIT`, and the kernel
//! offers its default of 128 KiB. Sequential reads then reach the filesystem
//! as 128 KiB requests, each waited for in turn. The readahead of a mount is
//! its backing device's `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`, which
//! root may raise once `INIT` is answered (the answer would lower it again):
//! the first request after `INIT` starts it. The device is looked up in
//! `/proc/self/mountinfo`, not by looking at the mount, which would keep it
//! busy for a moment and make an unmount right after mounting fail.
//! With 1 MiB, sequential reads through the mount ran about 30 % faster
//! (bench/RESULTS.md, mount-read notes).

use std::path::{Path, PathBuf};

/// Readahead asked of the kernel, in KiB: one block of the block cache.
pub const READAHEAD_KB: u64 = 1024;

/// Raises the readahead of the mount at `mountpoint` (absolute, without
/// symlinks) in the background. Call it once `INIT` is answered. Without the
/// right to (not root), the mount keeps the kernel's default and says so in
/// the log.
pub fn raise(mountpoint: &Path) {
    let mountpoint = mountpoint.to_path_buf();
    std::thread::spawn(move || match set(&mountpoint, READAHEAD_KB) {
        Ok(file) => {
            tracing::debug!(file = %file.display(), kb = READAHEAD_KB, "raised the kernel's readahead")
        }
        Err(e) => tracing::info!(error = %e, "keeping the kernel's default readahead (128 KiB)"),
    });
}

/// Sets the readahead of the mount at `mountpoint` to `kb`; returns the
/// sysfs file written.
fn set(mountpoint: &Path, kb: u64) -> std::io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let device = device_of(&mountinfo, mountpoint).ok_or_else(|| {
        std::io::Error::other(format!("{} is not in mountinfo", mountpoint.display()))
    })?;
    let file = bdi_file(device);
    std::fs::write(&file, kb.to_string()).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot write {}: {e}", file.display()))
    })?;
    Ok(file)
}

fn bdi_file(device: &str) -> PathBuf {
    PathBuf::from(format!("/sys/class/bdi/{device}/read_ahead_kb"))
}

/// The `MAJOR:MINOR` of the newest mount at `mountpoint`, from a
/// `/proc/self/mountinfo` text.
fn device_of<'a>(mountinfo: &'a str, mountpoint: &Path) -> Option<&'a str> {
    let wanted = mountpoint.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let device = fields.nth(2)?;
        let at = fields.nth(1)?;
        (unescape(at) == wanted).then_some(device)
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_device_of_the_newest_mount_at_a_path() {
        let mountinfo = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
90 22 0:39 / /tmp/my\\040mnt rw,nosuid shared:50 - fuse.ferry ferry:http://h rw
91 22 0:41 / /tmp/other rw shared:51 - fuse.ferry ferry:http://h rw
95 90 0:44 / /tmp/my\\040mnt rw shared:52 - fuse.ferry ferry:http://h rw
";
        assert_eq!(device_of(mountinfo, Path::new("/tmp/my mnt")), Some("0:44"));
        assert_eq!(device_of(mountinfo, Path::new("/tmp/other")), Some("0:41"));
        assert_eq!(device_of(mountinfo, Path::new("/tmp/none")), None);
        assert_eq!(
            bdi_file("0:44"),
            PathBuf::from("/sys/class/bdi/0:44/read_ahead_kb")
        );
    }
}
