//! `RemotePath`: the one validator for logical paths, used by the server's
//! routes and by every client before a path goes on the wire.

use std::cell::RefCell;
use std::fmt;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Serialize};

/// Longest allowed path, in bytes of UTF-8.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest allowed segment, in bytes of UTF-8.
pub const MAX_SEGMENT_BYTES: usize = 255;
/// Top-level prefix holding server state; never reachable through the API.
pub const STATE_PREFIX: &str = ".ferry";
/// Leaf name of the marker object that keeps an empty directory alive.
pub const DIR_MARKER: &str = ".ferry-dir";

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is not valid UTF-8 after percent-decoding")]
    NotUtf8,
    #[error("path must be relative (no leading '/')")]
    Absolute,
    #[error("path has an empty segment ('//' or a trailing '/')")]
    EmptySegment,
    #[error("path segments '.' and '..' are not allowed")]
    DotSegment,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path contains a backslash")]
    Backslash,
    #[error("path segment is longer than {MAX_SEGMENT_BYTES} bytes")]
    SegmentTooLong,
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("'{0}' is reserved for the server")]
    Reserved(&'static str),
    #[error("a name must be a single path segment")]
    NotASegment,
    /// A name longer than the server's store can write, counted as the
    /// store keeps it (see docs/API.md, Paths).
    #[error(
        "a name takes {stored} bytes as this store keeps it on disk, more than the {max} it can write \
         (bytes outside ASCII, control characters and each of % # \" < > [ ] {{ }} | ^ ` ~ * ? take 3 bytes)"
    )]
    NameTooLongForStore { stored: usize, max: usize },
    /// The store's filesystem refused a name as too long.
    #[error("a name is too long for the store's filesystem")]
    NameTooLongForFilesystem,
}

impl PathError {
    /// Whether the path is refused only for its length (a name or the whole
    /// path): `name_too_long` on the wire, ENAMETOOLONG in a mount.
    pub fn is_too_long(&self) -> bool {
        matches!(
            self,
            PathError::SegmentTooLong
                | PathError::TooLong
                | PathError::NameTooLongForStore { .. }
                | PathError::NameTooLongForFilesystem
        )
    }
}

/// Bytes a name takes as a local-directory store keeps it on disk: the
/// object-store key's own percent-encoding (docs/API.md, Paths).
pub fn stored_name_len(name: &str) -> usize {
    object_store::path::PathPart::from(name).as_ref().len()
}

/// A validated logical path: UTF-8, `/`-separated, relative to the store root.
///
/// The empty path is the root directory. Every other value has only non-empty
/// segments other than `.` and `..`, no NUL and no backslash, segments of at most
/// 255 bytes and at most 1024 bytes in all, and never names the reserved
/// `.ferry/` prefix or a `.ferry-dir` marker.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RemotePath(String);

/// Characters escaped when a path is put into a URL: everything that is not
/// unreserved or a separator we keep literally.
const URL_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b']')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}')
    .add(b'/');

impl RemotePath {
    /// The root directory.
    pub fn root() -> Self {
        Self(String::new())
    }

    /// Validates an already-decoded path. `""` is the root.
    pub fn parse(path: &str) -> Result<Self, PathError> {
        if path.is_empty() {
            return Ok(Self::root());
        }
        if path.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        if path.starts_with('/') {
            return Err(PathError::Absolute);
        }
        for (i, segment) in path.split('/').enumerate() {
            check_segment(segment)?;
            if i == 0 && segment == STATE_PREFIX {
                return Err(PathError::Reserved(STATE_PREFIX));
            }
        }
        Ok(Self(path.to_owned()))
    }

    /// Percent-decodes the path part of a URL, then validates it.
    pub fn from_url_path(raw: &str) -> Result<Self, PathError> {
        let decoded = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| PathError::NotUtf8)?;
        Self::parse(&decoded)
    }

    /// The path with each segment percent-encoded, ready to append to a URL.
    pub fn to_url_path(&self) -> String {
        self.segments()
            .map(|s| utf8_percent_encode(s, URL_SEGMENT).to_string())
            .collect::<Vec<_>>()
            .join("/")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    /// Last segment; `None` for the root.
    pub fn name(&self) -> Option<&str> {
        self.segments().last()
    }

    /// Parent directory; `None` for the root.
    pub fn parent(&self) -> Option<RemotePath> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(i) => Self(self.0[..i].to_owned()),
            None => Self::root(),
        })
    }

    /// Every proper ancestor, nearest first, ending before the root.
    pub fn ancestors(&self) -> impl Iterator<Item = RemotePath> {
        std::iter::successors(self.parent(), |p| p.parent()).filter(|p| !p.is_root())
    }

    /// Appends one segment (a file or directory name).
    pub fn join(&self, name: &str) -> Result<RemotePath, PathError> {
        if name.contains('/') {
            return Err(PathError::NotASegment);
        }
        if self.is_root() {
            Self::parse(name)
        } else {
            Self::parse(&format!("{}/{}", self.0, name))
        }
    }

    /// Appends a relative path of one or more segments.
    pub fn join_relative(&self, rel: &str) -> Result<RemotePath, PathError> {
        if self.is_root() {
            Self::parse(rel)
        } else {
            Self::parse(&format!("{}/{}", self.0, rel))
        }
    }

    /// True when `self` is `base` or lies beneath it, segment-wise.
    pub fn starts_with(&self, base: &RemotePath) -> bool {
        self.strip_prefix(base).is_some()
    }

    /// True when `self` lies beneath `dir` (and is not `dir` itself).
    pub fn is_beneath(&self, dir: &RemotePath) -> bool {
        self.strip_prefix(dir).is_some_and(|rest| !rest.is_empty())
    }

    /// Where `self` is once `from` (itself or an ancestor) is moved to `to`;
    /// `None` when it is not beneath `from`.
    pub fn moved(&self, from: &RemotePath, to: &RemotePath) -> Option<RemotePath> {
        match self.strip_prefix(from)? {
            "" => Some(to.clone()),
            rest => to.join_relative(rest).ok(),
        }
    }

    /// The part of `self` below `base` (`""` when equal), segment-wise.
    pub fn strip_prefix(&self, base: &RemotePath) -> Option<&str> {
        if base.is_root() {
            return Some(&self.0);
        }
        let rest = self.0.strip_prefix(&base.0)?;
        if rest.is_empty() {
            Some(rest)
        } else {
            rest.strip_prefix('/')
        }
    }
}

fn check_segment(segment: &str) -> Result<(), PathError> {
    match segment {
        "" => Err(PathError::EmptySegment),
        "." | ".." => Err(PathError::DotSegment),
        DIR_MARKER => Err(PathError::Reserved(DIR_MARKER)),
        s if s.len() > MAX_SEGMENT_BYTES => Err(PathError::SegmentTooLong),
        s if s.contains('\0') => Err(PathError::Nul),
        s if s.contains('\\') => Err(PathError::Backslash),
        _ => Ok(()),
    }
}

impl fmt::Display for RemotePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RemotePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::str::FromStr for RemotePath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for RemotePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RemotePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(|e| {
            note_refusal(&e);
            serde::de::Error::custom(e)
        })
    }
}

thread_local! {
    /// The first path refused on this thread while [`noting_refused_paths`]
    /// runs (`Some(None)` until one is): a deserializer's error keeps only
    /// the refusal's message, not which refusal it was.
    static REFUSED: RefCell<Option<Option<PathError>>> = const { RefCell::new(None) };
}

fn note_refusal(e: &PathError) {
    REFUSED.with_borrow_mut(|refused| {
        if let Some(first @ None) = refused {
            *first = Some(e.clone());
        }
    });
}

/// Runs `deserialize` and returns, with what it returned, the first path
/// that [`RemotePath`]'s deserializer refused meanwhile: what a request
/// body's error code depends on (`name_too_long` for a path too long).
pub fn noting_refused_paths<R>(deserialize: impl FnOnce() -> R) -> (R, Option<PathError>) {
    let outer = REFUSED.replace(Some(None));
    let result = deserialize();
    let refused = REFUSED.replace(outer).flatten();
    (result, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for p in [
            "a",
            "a/b/c.txt",
            "movies/Über film (2020).mp4",
            "a/.hidden",
            "a/..b",
            "…",
        ] {
            assert_eq!(RemotePath::parse(p).unwrap().as_str(), p);
        }
        assert!(RemotePath::parse("").unwrap().is_root());
    }

    #[test]
    fn refuses_every_escape() {
        let cases: &[(&str, PathError)] = &[
            ("../etc/passwd", PathError::DotSegment),
            ("a/../../x", PathError::DotSegment),
            ("a/./b", PathError::DotSegment),
            ("a//b", PathError::EmptySegment),
            ("a/", PathError::EmptySegment),
            ("/abs", PathError::Absolute),
            ("a\\b", PathError::Backslash),
            ("a\0b", PathError::Nul),
            (".ferry/uploads/x", PathError::Reserved(STATE_PREFIX)),
            (".ferry", PathError::Reserved(STATE_PREFIX)),
            ("dir/.ferry-dir", PathError::Reserved(DIR_MARKER)),
            (".ferry-dir/x", PathError::Reserved(DIR_MARKER)),
        ];
        for (p, want) in cases {
            assert_eq!(RemotePath::parse(p).unwrap_err(), *want, "{p:?}");
        }
        assert_eq!(
            RemotePath::parse(&"x".repeat(256)).unwrap_err(),
            PathError::SegmentTooLong
        );
        let long = vec!["y".repeat(200); 6].join("/");
        assert_eq!(RemotePath::parse(&long).unwrap_err(), PathError::TooLong);
        // `.ferry` is reserved only at the top.
        assert!(RemotePath::parse("a/.ferry/x").is_ok());
    }

    #[test]
    fn decodes_before_validating() {
        assert_eq!(
            RemotePath::from_url_path("%2e%2e/x").unwrap_err(),
            PathError::DotSegment
        );
        assert_eq!(
            RemotePath::from_url_path("a/%2e%2e/%2e%2e/x").unwrap_err(),
            PathError::DotSegment
        );
        assert_eq!(
            RemotePath::from_url_path("a%00b").unwrap_err(),
            PathError::Nul
        );
        assert_eq!(
            RemotePath::from_url_path("a%FFb").unwrap_err(),
            PathError::NotUtf8
        );
        assert_eq!(RemotePath::from_url_path("a%20b").unwrap().as_str(), "a b");
    }

    #[test]
    fn deserializing_notes_the_first_refused_path() {
        #[derive(Debug, Deserialize)]
        struct Body {
            #[serde(rename = "a")]
            _a: RemotePath,
        }
        let long = format!(r#"{{"a":"{}"}}"#, "x".repeat(300));
        let (parsed, refused) = noting_refused_paths(|| serde_json::from_str::<Body>(&long));
        assert!(parsed.is_err());
        assert_eq!(refused, Some(PathError::SegmentTooLong));
        let (parsed, refused) = noting_refused_paths(|| serde_json::from_str::<Body>("{}"));
        assert!(parsed.is_err());
        assert_eq!(refused, None, "a missing field is no refused path");
        // A refusal outside a scope is not noted; a scope starts with none.
        assert!(serde_json::from_str::<Body>(r#"{"a":"../x"}"#).is_err());
        let (parsed, refused) =
            noting_refused_paths(|| serde_json::from_str::<Body>(r#"{"a":"ok"}"#));
        assert!(parsed.is_ok());
        assert_eq!(refused, None);
    }

    #[test]
    fn url_encoding_round_trips() {
        for p in ["a b/c#d?e%f", "ü/[x]"] {
            let path = RemotePath::parse(p).unwrap();
            assert_eq!(
                RemotePath::from_url_path(&path.to_url_path()).unwrap(),
                path
            );
        }
    }

    #[test]
    fn family_relations() {
        let p = RemotePath::parse("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.name(), Some("c"));
        let anc: Vec<_> = p.ancestors().map(|a| a.to_string()).collect();
        assert_eq!(anc, ["a/b", "a"]);
        let a = RemotePath::parse("a").unwrap();
        assert_eq!(p.strip_prefix(&a), Some("b/c"));
        assert!(!RemotePath::parse("ab/c").unwrap().starts_with(&a));
        assert_eq!(a.join("x").unwrap().as_str(), "a/x");
        assert_eq!(a.join("x/y").unwrap_err(), PathError::NotASegment);
        assert_eq!(
            RemotePath::root().join("..").unwrap_err(),
            PathError::DotSegment
        );
    }

    #[test]
    fn paths_move_with_what_holds_them() {
        let path = |s: &str| RemotePath::parse(s).unwrap();
        let (from, to) = (path("a/b"), path("x"));
        assert_eq!(path("a/b/c/d").moved(&from, &to), Some(path("x/c/d")));
        assert_eq!(path("a/b").moved(&from, &to), Some(path("x")));
        assert_eq!(path("a/bc").moved(&from, &to), None);
        assert_eq!(path("a").moved(&from, &to), None);
        assert!(path("a/b/c").is_beneath(&from));
        assert!(!path("a/b").is_beneath(&from));
        assert!(!path("a/bc").is_beneath(&from));
        assert_eq!(path("f").moved(&RemotePath::root(), &to), Some(path("x/f")));
    }
}
