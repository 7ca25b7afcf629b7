//! HTTP byte ranges (RFC 9110 §14) reduced to what ferry serves: one range, or
//! the whole body.

/// An inclusive byte range already resolved against a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    /// Inclusive.
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// `Content-Range` value for a 206.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, size)
    }
}

/// What a `Range` header asks for, once resolved against the object's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No header, several ranges, or a header we do not understand: send it all.
    Full,
    Partial(ByteRange),
    /// A well-formed range that lies wholly past the end: 416.
    Unsatisfiable,
}

/// `Content-Range` value for a 416.
pub fn unsatisfied_content_range(size: u64) -> String {
    format!("bytes */{size}")
}

enum Spec {
    FromTo(u64, Option<u64>),
    Suffix(u64),
}

impl RangeRequest {
    /// Resolves a `Range` header value against an object of `size` bytes.
    pub fn resolve(header: Option<&str>, size: u64) -> RangeRequest {
        let Some(spec) = header.and_then(parse_single) else {
            return RangeRequest::Full;
        };
        match spec {
            Spec::FromTo(start, _) if start >= size => RangeRequest::Unsatisfiable,
            Spec::FromTo(start, end) => RangeRequest::Partial(ByteRange {
                start,
                end: end.map_or(size - 1, |e| e.min(size - 1)),
            }),
            Spec::Suffix(0) => RangeRequest::Unsatisfiable,
            Spec::Suffix(_) if size == 0 => RangeRequest::Unsatisfiable,
            Spec::Suffix(n) => RangeRequest::Partial(ByteRange {
                start: size.saturating_sub(n),
                end: size - 1,
            }),
        }
    }
}

/// Parses `bytes=a-b`, `bytes=a-` or `bytes=-n`. Anything else, several ranges
/// included, yields `None` (the caller then serves the full body).
///
/// A number too big for a `u64` is well-formed (RFC 9110 sets no bound) and
/// lies past the end of any file: it becomes `u64::MAX`, so a last byte is
/// clamped, a first byte is unsatisfiable and a suffix is the whole file.
fn parse_single(header: &str) -> Option<Spec> {
    let header = header.trim();
    let (unit, set) = header.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
        return None;
    }
    let (first, last) = set.trim().split_once('-')?;
    match (digits(first), digits(last)) {
        (None, None) => None,
        (None, Some(n)) if first.trim().is_empty() => Some(Spec::Suffix(saturating(n))),
        (Some(a), None) if last.trim().is_empty() => Some(Spec::FromTo(saturating(a), None)),
        // Compared as written: two numbers past u64::MAX are both u64::MAX.
        (Some(a), Some(b)) if !exceeds(a, b) => {
            Some(Spec::FromTo(saturating(a), Some(saturating(b))))
        }
        _ => None,
    }
}

/// `s` without surrounding whitespace, if it is a non-empty run of digits.
fn digits(s: &str) -> Option<&str> {
    let s = s.trim();
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then_some(s)
}

/// The value of a run of digits, `u64::MAX` when it is larger.
fn saturating(digits: &str) -> u64 {
    digits.parse().unwrap_or(u64::MAX)
}

/// Whether the number written `a` is greater than the one written `b`,
/// however many digits either has.
fn exceeds(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    (a.len(), a) > (b.len(), b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(h: &str) -> RangeRequest {
        RangeRequest::resolve(Some(h), 10_000)
    }
    fn p(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { start, end })
    }

    #[test]
    fn resolves_the_usual_forms() {
        assert_eq!(r("bytes=0-499"), p(0, 499));
        assert_eq!(r("bytes=500-999"), p(500, 999));
        assert_eq!(r("bytes=-500"), p(9500, 9999));
        assert_eq!(r("bytes=9500-"), p(9500, 9999));
        assert_eq!(r("bytes=0-0"), p(0, 0));
        assert_eq!(r("bytes=9990-20000"), p(9990, 9999));
        assert_eq!(r("bytes=-20000"), p(0, 9999));
        assert_eq!(r("Bytes = 1-2"), p(1, 2));
    }

    #[test]
    fn unsatisfiable_and_ignored() {
        assert_eq!(r("bytes=10000-"), RangeRequest::Unsatisfiable);
        assert_eq!(r("bytes=-0"), RangeRequest::Unsatisfiable);
        assert_eq!(
            RangeRequest::resolve(Some("bytes=0-"), 0),
            RangeRequest::Unsatisfiable
        );
        for bad in [
            "bytes=0-1,5-6",
            "bytes=abc",
            "items=0-1",
            "bytes=5-1",
            "bytes=-",
            "0-1",
            "bytes=1-2-3",
            "bytes=99999999999999999999999-5",
        ] {
            assert_eq!(r(bad), RangeRequest::Full, "{bad}");
        }
        assert_eq!(RangeRequest::resolve(None, 5), RangeRequest::Full);
    }

    /// Regression: positions too big for a u64 were taken for malformed,
    /// which served the whole body instead of clamping or refusing.
    #[test]
    fn positions_beyond_u64_lie_past_any_end() {
        let huge = "99999999999999999999999";
        assert_eq!(r(&format!("bytes=0-{huge}")), p(0, 9999));
        assert_eq!(r(&format!("bytes=9990-{huge}")), p(9990, 9999));
        assert_eq!(r(&format!("bytes=-{huge}")), p(0, 9999));
        assert_eq!(r(&format!("bytes={huge}-")), RangeRequest::Unsatisfiable);
        assert_eq!(
            r(&format!("bytes={huge}-{huge}")),
            RangeRequest::Unsatisfiable
        );
        // u64::MAX itself, and one past it.
        assert_eq!(r("bytes=0-18446744073709551615"), p(0, 9999));
        assert_eq!(r("bytes=0-18446744073709551616"), p(0, 9999));
        assert_eq!(
            RangeRequest::resolve(Some(&format!("bytes=0-{huge}")), 0),
            RangeRequest::Unsatisfiable
        );
        // Leading zeros are no overflow.
        assert_eq!(
            r("bytes=00000000000000000000000001-00000000000000000000002"),
            p(1, 2)
        );
        // A last byte before the first is malformed however big both are.
        for bad in [
            format!("bytes={huge}-5"),
            "bytes=18446744073709551617-18446744073709551616".to_owned(),
            format!("bytes=1{huge}-{huge}"),
        ] {
            assert_eq!(r(&bad), RangeRequest::Full, "{bad}");
        }
    }

    #[test]
    fn content_range_text() {
        assert_eq!(
            ByteRange { start: 0, end: 499 }.content_range(10_000),
            "bytes 0-499/10000"
        );
        assert_eq!(unsatisfied_content_range(10_000), "bytes */10000");
    }
}
