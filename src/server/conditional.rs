//! Conditional requests (RFC 9110 §13): `If-Match`, `If-None-Match`,
//! `If-Modified-Since`, `If-Unmodified-Since` and `If-Range`.

use std::time::SystemTime;

use axum::http::{HeaderMap, header};

use crate::protocol::FileMeta;

/// What the preconditions decide for a request on an existing or missing file.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Proceed,
    /// 304 for GET/HEAD.
    NotModified,
    /// 412.
    Failed(&'static str),
}

/// The HTTP form of an etag: quoted.
pub fn http_etag(meta: &FileMeta) -> Option<String> {
    meta.etag.as_ref().map(|e| format!("\"{e}\""))
}

/// The `Last-Modified` of `meta`: none for a time that an HTTP date cannot
/// express (before 1970 or after 9999), such as an old file's on a local
/// disk.
pub fn http_date(meta: &FileMeta) -> Option<String> {
    /// 10000-01-01T00:00:00Z.
    const END_OF_HTTP_DATES: u64 = 253_402_300_800;
    let t = SystemTime::from(meta.mtime?);
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    (secs < END_OF_HTTP_DATES).then(|| httpdate::fmt_http_date(t))
}

/// Evaluates the preconditions in the order RFC 9110 §13.2.2 gives.
/// `current` is the file as it is now (`None`: no file). `safe` is true for
/// GET and HEAD, where a matching `If-None-Match` means 304 rather than 412.
pub fn evaluate(headers: &HeaderMap, current: Option<&FileMeta>, safe: bool) -> Verdict {
    let etag = current.and_then(http_etag);
    let mtime = current.and_then(|m| m.mtime).map(|t| t.timestamp());

    if let Some(value) = text(headers, header::IF_MATCH) {
        if !list_matches(value, current.is_some(), etag.as_deref(), Compare::Strong) {
            return Verdict::Failed("If-Match does not match the current version");
        }
    } else if let (Some(since), Some(mtime)) = (date(headers, header::IF_UNMODIFIED_SINCE), mtime)
        && mtime > since
    {
        return Verdict::Failed("modified since the If-Unmodified-Since date");
    }

    if let Some(value) = text(headers, header::IF_NONE_MATCH) {
        if list_matches(value, current.is_some(), etag.as_deref(), Compare::Weak) {
            return if safe {
                Verdict::NotModified
            } else {
                Verdict::Failed("If-None-Match matches the current version")
            };
        }
    } else if safe
        && let (Some(since), Some(mtime)) = (date(headers, header::IF_MODIFIED_SINCE), mtime)
        && mtime <= since
    {
        return Verdict::NotModified;
    }
    Verdict::Proceed
}

/// True when a `Range` header should be honoured given `If-Range`: absent, or
/// naming the current version (strong etag, or the exact last-modified date).
pub fn if_range_allows(headers: &HeaderMap, current: &FileMeta) -> bool {
    let Some(value) = text(headers, header::IF_RANGE) else {
        return true;
    };
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        return http_etag(current).is_some_and(|e| strong_eq(value, &e));
    }
    match (parse_date(value), current.mtime) {
        (Some(date), Some(mtime)) => mtime.timestamp() == date,
        _ => false,
    }
}

#[derive(Clone, Copy)]
enum Compare {
    Strong,
    Weak,
}

fn list_matches(value: &str, exists: bool, etag: Option<&str>, how: Compare) -> bool {
    if value.trim() == "*" {
        return exists;
    }
    let Some(etag) = etag else { return false };
    value.split(',').map(str::trim).any(|candidate| match how {
        Compare::Strong => strong_eq(candidate, etag),
        Compare::Weak => opaque(candidate) == opaque(etag),
    })
}

fn strong_eq(a: &str, b: &str) -> bool {
    !a.starts_with("W/") && !b.starts_with("W/") && a == b
}

fn opaque(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A date header's time in whole seconds since 1970 (HTTP dates have
/// one-second resolution; negative before 1970).
fn date(headers: &HeaderMap, name: header::HeaderName) -> Option<i64> {
    text(headers, name).and_then(parse_date)
}

/// An HTTP date in any of its three forms (RFC 9110 §5.6.7). The usual
/// form is also read before 1970, which files on a local disk may be dated.
fn parse_date(value: &str) -> Option<i64> {
    if let Ok(t) = httpdate::parse_http_date(value) {
        return Some(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs() as i64);
    }
    let t = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
    value.trim_end().ends_with(" GMT").then(|| t.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{EntryKind, RemotePath};
    use axum::http::HeaderValue;

    fn meta() -> FileMeta {
        FileMeta {
            path: RemotePath::parse("f").unwrap(),
            kind: EntryKind::File,
            size: 1,
            mtime: Some(chrono::DateTime::from_timestamp(1_700_000_000, 500).unwrap()),
            etag: Some("abc".into()),
        }
    }

    fn with(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn etag_preconditions() {
        let m = meta();
        assert_eq!(
            evaluate(&with(header::IF_MATCH, "\"abc\""), Some(&m), true),
            Verdict::Proceed
        );
        assert!(matches!(
            evaluate(&with(header::IF_MATCH, "\"old\""), Some(&m), true),
            Verdict::Failed(_)
        ));
        assert!(matches!(
            evaluate(&with(header::IF_MATCH, "W/\"abc\""), Some(&m), true),
            Verdict::Failed(_)
        ));
        assert!(matches!(
            evaluate(&with(header::IF_MATCH, "*"), None, false),
            Verdict::Failed(_)
        ));
        assert_eq!(
            evaluate(
                &with(header::IF_NONE_MATCH, "\"x\", W/\"abc\""),
                Some(&m),
                true
            ),
            Verdict::NotModified
        );
        assert!(matches!(
            evaluate(&with(header::IF_NONE_MATCH, "*"), Some(&m), false),
            Verdict::Failed(_)
        ));
        assert_eq!(
            evaluate(&with(header::IF_NONE_MATCH, "*"), None, false),
            Verdict::Proceed
        );
    }

    #[test]
    fn times_an_http_date_cannot_express_have_none() {
        let at = |secs: i64| FileMeta {
            mtime: Some(chrono::DateTime::from_timestamp(secs, 0).unwrap()),
            ..meta()
        };
        assert_eq!(http_date(&at(-1)), None);
        assert_eq!(http_date(&at(253_402_300_800)), None, "year 10000");
        assert_eq!(
            http_date(&at(253_402_300_799)).as_deref(),
            Some("Fri, 31 Dec 9999 23:59:59 GMT")
        );
        assert_eq!(
            http_date(&at(0)).as_deref(),
            Some("Thu, 01 Jan 1970 00:00:00 GMT")
        );
    }

    #[test]
    fn date_preconditions() {
        let m = meta();
        let same = http_date(&m).unwrap();
        assert_eq!(
            evaluate(&with(header::IF_MODIFIED_SINCE, &same), Some(&m), true),
            Verdict::NotModified
        );
        assert_eq!(
            evaluate(&with(header::IF_UNMODIFIED_SINCE, &same), Some(&m), false),
            Verdict::Proceed
        );
        let before = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH);
        assert!(matches!(
            evaluate(&with(header::IF_UNMODIFIED_SINCE, &before), Some(&m), false),
            Verdict::Failed(_)
        ));
        assert!(if_range_allows(&with(header::IF_RANGE, &same), &m));
        assert!(if_range_allows(&with(header::IF_RANGE, "\"abc\""), &m));
        assert!(!if_range_allows(&with(header::IF_RANGE, "\"old\""), &m));
        assert!(!if_range_allows(&with(header::IF_RANGE, &before), &m));
    }

    #[test]
    fn dates_before_1970_are_read_and_compared() {
        let in_1965 = FileMeta {
            mtime: Some(chrono::DateTime::from_timestamp(-144_720_000, 0).unwrap()),
            ..meta()
        };
        let in_1960 = "Fri, 01 Jan 1960 00:00:00 GMT";
        assert_eq!(parse_date(in_1960), Some(-315_619_200));
        assert_eq!(parse_date("Fri, 01 Jan 1960 00:00:00 +0100"), None);
        for m in [meta(), in_1965.clone()] {
            assert!(matches!(
                evaluate(&with(header::IF_UNMODIFIED_SINCE, in_1960), Some(&m), false),
                Verdict::Failed(_)
            ));
            assert_eq!(
                evaluate(&with(header::IF_MODIFIED_SINCE, in_1960), Some(&m), true),
                Verdict::Proceed
            );
        }
        let at_1965 = "Tue, 01 Jun 1965 00:00:00 GMT";
        assert_eq!(
            evaluate(
                &with(header::IF_MODIFIED_SINCE, at_1965),
                Some(&in_1965),
                true
            ),
            Verdict::NotModified
        );
        assert!(if_range_allows(&with(header::IF_RANGE, at_1965), &in_1965));
    }
}
