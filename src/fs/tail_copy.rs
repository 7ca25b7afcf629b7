//! A close made durable without syncing the whole staging file.
//!
//! When write-behind's session already holds most of a new file (the run of
//! chunks the server acknowledged, each synced there before it answered),
//! syncing those bytes locally too only doubles the disk writes of a copy
//! into the mount. The close instead copies what the session lacks (chunk 0
//! and the unacknowledged tail) into a sparse file beside the staging file,
//! at the same offsets, syncs only that, and journals the whole file's
//! SHA-256 (from write-behind's hash of the start plus the tail read here).
//!
//! What a crash then leaves:
//! - of the mount: the page cache still holds the whole staging file; the
//!   upload goes on from it as usual.
//! - of the machine: the staging file may be torn, so the upload reads the
//!   copy instead, resuming the session for the rest, and commits only what
//!   hashes to the journaled digest. Should the server have lost the session
//!   meanwhile (it expires `--upload-ttl` after creation), the file cannot
//!   be rebuilt, and the upload says so rather than commit anything else.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::write_behind::HeldOnServer;

/// Bytes read per step while copying and hashing.
const PIECE: usize = 1 << 20;

/// How a journaled upload's staging file was made durable in part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailCopy {
    /// The sparse copy of the bytes the session lacked.
    pub path: PathBuf,
    /// The write-behind session holding the rest.
    pub session: String,
    /// The boot within which the staging file itself is whole.
    pub boot: String,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
}

/// Where the copy of `local`'s tail goes.
pub fn path_for(local: &Path) -> PathBuf {
    local.with_extension("tail")
}

/// Copies the bytes of `file` (`size` long) that `held` does not cover to
/// [`path_for`]`(local)` and syncs the copy. `None` when there is no boot id
/// to name (the caller syncs the whole file instead).
pub fn write(
    file: &File,
    local: &Path,
    size: u64,
    held: HeldOnServer,
) -> std::io::Result<Option<TailCopy>> {
    let Some(boot) = super::pending::boot_id() else {
        return Ok(None);
    };
    let path = path_for(local);
    let copy = File::create(&path)?;
    let mut buf = vec![0u8; PIECE];
    for range in copied_ranges(size, &held) {
        for_each_piece(file, range, &mut buf, |offset, piece| {
            copy.write_all_at(piece, offset)
        })?;
    }
    copy.set_len(size)?;
    let mut hasher: Sha256 = held.prefix.hasher;
    for_each_piece(file, held.prefix.len..size, &mut buf, |_, piece| {
        hasher.update(piece);
        Ok(())
    })?;
    copy.sync_all()?;
    // A new name: durable only once its directory is.
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    drop(copy);
    Ok(Some(TailCopy {
        path,
        session: held.session,
        boot,
        sha256: hex::encode(hasher.finalize()),
    }))
}

/// The ranges of a file of `size` bytes that its copy holds: what `held`
/// lacks.
fn copied_ranges(size: u64, held: &HeldOnServer) -> Vec<std::ops::Range<u64>> {
    super::staging::write_back_ranges(size, Some(held.bytes.clone()))
}

/// How many bytes the copy of a file of `size` bytes takes.
pub fn copied_bytes(size: u64, held: &HeldOnServer) -> u64 {
    copied_ranges(size, held)
        .iter()
        .map(|r| r.end - r.start)
        .sum()
}

/// Calls `each` with `range` of `file` in pieces of `buf`'s length.
fn for_each_piece(
    file: &File,
    range: std::ops::Range<u64>,
    buf: &mut [u8],
    mut each: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut offset = range.start;
    while offset < range.end {
        let len = buf.len().min((range.end - offset) as usize);
        file.read_exact_at(&mut buf[..len], offset)?;
        each(offset, &buf[..len])?;
        offset += len as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::digest::DigestPrefix;

    #[test]
    fn the_copy_holds_what_the_server_lacks_and_the_digest_is_the_whole_files() {
        let tmp = tempfile::tempdir().unwrap();
        let local = tmp.path().join("staged");
        let data: Vec<u8> = (0..(5 << 20) + 12345u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&local, &data).unwrap();
        let held_bytes = (1 << 20)..(3 << 20);
        // Write-behind hashed chunk 0 through the end of the held run.
        let mut prefix = Sha256::new();
        prefix.update(&data[..3 << 20]);
        let held = HeldOnServer {
            session: "s1".into(),
            bytes: held_bytes.clone(),
            prefix: DigestPrefix {
                hasher: prefix,
                len: 3 << 20,
            },
        };
        let file = File::open(&local).unwrap();
        let copy = write(&file, &local, data.len() as u64, held)
            .unwrap()
            .expect("Linux names its boot");
        assert_eq!(copy.path, path_for(&local));
        assert_eq!(copy.session, "s1");
        assert_eq!(copy.sha256, hex::encode(Sha256::digest(&data)));
        let copied = std::fs::read(&copy.path).unwrap();
        assert_eq!(copied.len(), data.len());
        assert_eq!(copied[..1 << 20], data[..1 << 20]);
        assert!(
            copied[held_bytes.start as usize..held_bytes.end as usize]
                .iter()
                .all(|b| *b == 0)
        );
        assert_eq!(copied[3 << 20..], data[3 << 20..]);
        // The held bytes are a hole, not zeros written out.
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&copy.path).unwrap().blocks() * 512;
        assert!(allocated < data.len() as u64 - (1 << 20), "{allocated}");
    }
}
