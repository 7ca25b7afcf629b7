//! Temporaries a local store's writes leave behind when the server dies.
//!
//! A write to a local store goes through a temporary file beside its target,
//! `{name}#{n}` (`n` ≥ 1 for a `PUT` or form upload, 0 for a copy), renamed
//! over the target at commit. A server killed mid-write leaves it: hidden
//! from listings, yet holding disk space and keeping its directory in being.
//! No file of the store's own is named so (`#` in a name is stored
//! percent-encoded), so such a file untouched for long is a leftover.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// How long a temporary must have gone unwritten to be a leftover. A write
/// in progress touches its temporary at least every request body timeout;
/// an hour leaves room for other nodes on the same directory, with their
/// own settings.
pub const STRAY_AFTER: Duration = Duration::from_secs(3600);

/// The server's own state lives under this top-level directory; its
/// directories are kept even when a sweep leaves them empty.
const STATE_DIR: &str = ".ferry";

/// Whether `name` is a write's temporary: something, `#`, then digits only.
fn is_temporary(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    match name.rsplit_once('#') {
        Some((stem, digits)) => {
            !stem.is_empty() && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// Removes the temporaries under `root` last modified before `cutoff`, then
/// each directory that only they kept (never `root` nor the state
/// directory's). Returns how many temporaries were removed. Blocking.
pub fn collect(root: &Path, cutoff: SystemTime) -> io::Result<usize> {
    let mut removed = 0;
    sweep(root, root, cutoff, &mut removed)?;
    Ok(removed)
}

/// Sweeps `dir`; true when it held leftovers and is empty now.
fn sweep(root: &Path, dir: &Path, cutoff: SystemTime, removed: &mut usize) -> io::Result<bool> {
    let mut emptied = false;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            // A directory may go meanwhile (a rename, a delete): not an error.
            match sweep(root, &path, cutoff, removed) {
                Ok(true) => emptied |= std::fs::remove_dir(&path).is_ok(),
                Ok(false) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        } else if kind.is_file() && is_temporary(&entry.file_name()) {
            let stale = entry.metadata()?.modified()? < cutoff;
            if stale && std::fs::remove_file(&path).is_ok() {
                tracing::info!(temporary = %path.display(), "removed a write's leftover temporary");
                *removed += 1;
                emptied = true;
            }
        }
    }
    let kept = dir == root
        || dir
            .strip_prefix(root)
            .is_ok_and(|rel| rel.starts_with(STATE_DIR));
    Ok(emptied && !kept && std::fs::read_dir(dir)?.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_temporaries_from_names() {
        for name in ["a#1", "a.txt#0", "x#123", "a#b#7"] {
            assert!(is_temporary(OsStr::new(name)), "{name}");
        }
        for name in ["a", "#1", "a#", "a#1x", "a#-1", "a%231", "a#1.txt"] {
            assert!(!is_temporary(OsStr::new(name)), "{name}");
        }
    }

    #[test]
    fn removes_old_temporaries_and_the_directories_only_they_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let write = |rel: &str, age: Duration| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let file = std::fs::File::create(&path).unwrap();
            file.set_modified(SystemTime::now() - age).unwrap();
        };
        let old = Duration::from_secs(7200);
        write("only/temp/a.bin#1", old);
        write("kept/a.bin#2", old);
        write("kept/b.txt", old);
        write("fresh/c.bin#1", Duration::ZERO);
        write("top#0", old);
        write(".ferry/uploads/x/manifest.json#1", old);
        write("named/a%231", old);
        std::fs::create_dir_all(root.join("empty")).unwrap();

        let cutoff = SystemTime::now() - STRAY_AFTER;
        assert_eq!(collect(root, cutoff).unwrap(), 4);
        let mut left = Vec::new();
        for entry in walk(root) {
            left.push(entry);
        }
        left.sort();
        assert_eq!(
            left,
            [
                ".ferry/uploads/x/",
                "empty/",
                "fresh/c.bin#1",
                "kept/b.txt",
                "named/a%231",
            ]
        );
        assert_eq!(collect(root, cutoff).unwrap(), 0);
    }

    /// Files, and directories with nothing in them (with a trailing `/`).
    fn walk(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![root.to_owned()];
        while let Some(dir) = dirs.pop() {
            let mut any = false;
            for entry in std::fs::read_dir(&dir).unwrap() {
                any = true;
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    out.push(path.strip_prefix(root).unwrap().display().to_string());
                }
            }
            if !any && dir != root {
                out.push(format!("{}/", dir.strip_prefix(root).unwrap().display()));
            }
        }
        out
    }
}
