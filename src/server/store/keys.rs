//! Mapping between logical paths and object keys.
//!
//! Each segment goes through `object_store`'s own percent-encoding of
//! characters that are unsafe in object keys; decoding is its exact inverse.

use object_store::path::{Path, PathPart};
use percent_encoding::percent_decode_str;

use crate::protocol::RemotePath;
use crate::protocol::path::{DIR_MARKER, STATE_PREFIX};

pub fn object_path(path: &RemotePath) -> Path {
    Path::from_iter(path.segments())
}

/// Key of the marker that keeps the directory `dir` alive.
pub fn marker_path(dir: &RemotePath) -> Path {
    object_path(dir).join(DIR_MARKER)
}

/// Listing prefix for the directory `dir` (`None` lists the whole store).
pub fn dir_prefix(dir: &RemotePath) -> Option<Path> {
    (!dir.is_root()).then(|| object_path(dir))
}

pub fn decode_part(part: &PathPart<'_>) -> Option<String> {
    percent_decode_str(part.as_ref())
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The logical relative path of `key` below `base`, if `key` lies below it and
/// every segment decodes. Server state under `.ferry/` never has one.
pub fn relative_segments(key: &Path, base: &RemotePath) -> Option<Vec<String>> {
    let prefix = object_path(base);
    let parts: Option<Vec<String>> = key
        .prefix_match(&prefix)?
        .map(|p| decode_part(&p))
        .collect();
    let parts = parts?;
    if base.is_root() && parts.first().is_some_and(|p| p == STATE_PREFIX) {
        return None;
    }
    Some(parts)
}

pub fn is_marker(segment: &str) -> bool {
    segment == DIR_MARKER
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_names_round_trip() {
        let base = RemotePath::root();
        for name in ["a#1", "50%", "x y", "ü[1]{2}", "a|b"] {
            let p = RemotePath::parse(&format!("d/{name}")).unwrap();
            let key = object_path(&p);
            assert_eq!(relative_segments(&key, &base).unwrap(), ["d", name]);
        }
    }

    #[test]
    fn stored_lengths_count_escapes() {
        use crate::protocol::path::stored_name_len;
        assert_eq!(stored_name_len("plain name.txt"), 14);
        assert_eq!(stored_name_len("é"), 6);
        assert_eq!(stored_name_len("50%#1"), 9);
        assert_eq!(stored_name_len(&"a".repeat(255)), 255);
        for (name, fits) in [
            ("a".repeat(253), true),
            ("a".repeat(254), false),
            ("é".repeat(42), true),
            ("é".repeat(43), false),
        ] {
            let limits = crate::protocol::WriteLimits {
                max_stored_name_bytes: Some(253),
            };
            assert_eq!(limits.name_fits(&name), fits, "{name}");
        }
    }

    #[test]
    fn state_prefix_is_hidden_from_the_root() {
        let key = Path::from(".ferry/uploads/x");
        assert!(relative_segments(&key, &RemotePath::root()).is_none());
    }
}
