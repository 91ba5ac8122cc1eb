//! Range requests answered from a stored complete 200 (RFC 9110 §14): one range, a suffix or an open end as a 206
//! with `Content-Range`, a 416 when no range is satisfiable, `If-Range` by strong comparison only.
//!
//! Choices where the RFC leaves them to the server: several ranges that do not merge into one get the whole 200
//! (a server may ignore `Range`; a `multipart/byteranges` answer is rarely used by clients and multiplies the work
//! a request can ask for). A `Range` that does not parse, in a unit other than `bytes`, with more than
//! [`MAX_RANGES`] ranges, on a HEAD, on a stored response other than a 200, or on an empty body, is ignored: the
//! whole response is served.

use http::header::{IF_RANGE, RANGE};
use http::{HeaderMap, Method, StatusCode};

use crate::entry::{Entry, http_date};

/// The most ranges one `Range` may list before it is ignored.
pub(super) const MAX_RANGES: usize = 64;

/// How a stored response answers a request's `Range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ranged {
    /// The whole response: no `Range`, or one that is ignored.
    Whole,
    /// The bytes `first..=last` as a 206.
    Partial { first: u64, last: u64 },
    /// No range overlaps the body: a 416.
    Unsatisfiable,
}

/// What `entry` gives a request with these fields.
pub(super) fn select(request: &HeaderMap, method: &Method, entry: &Entry) -> Ranged {
    let Some(range) = request.get(RANGE) else {
        return Ranged::Whole;
    };
    let length = entry.body.len() as u64;
    if *method != Method::GET || entry.status != StatusCode::OK || length == 0 {
        return Ranged::Whole;
    }
    if request.contains_key(IF_RANGE) && !if_range_holds(request, entry) {
        return Ranged::Whole;
    }
    let Some(ranges) = range.to_str().ok().and_then(|value| parse(value, length)) else {
        return Ranged::Whole;
    };
    match merged(ranges).as_slice() {
        [] => Ranged::Unsatisfiable,
        [(first, last)] => Ranged::Partial {
            first: *first,
            last: *last,
        },
        _ => Ranged::Whole,
    }
}

/// The satisfiable ranges of a `bytes` range set over a body of `length` bytes, as inclusive pairs; `None` when the
/// field is to be ignored (another unit, bad syntax, too many ranges).
fn parse(value: &str, length: u64) -> Option<Vec<(u64, u64)>> {
    let (unit, set) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut ranges = Vec::new();
    let mut specs = 0;
    for spec in set.split(',') {
        let spec = spec.trim();
        if spec.is_empty() {
            continue; // empty list elements are allowed (RFC 9110 §5.6.1)
        }
        specs += 1;
        if specs > MAX_RANGES {
            return None;
        }
        let (first, last) = spec.split_once('-')?;
        let range = match (first.trim(), last.trim()) {
            ("", suffix) => {
                let suffix = position(suffix)?;
                (suffix > 0).then(|| (length - suffix.min(length), length - 1))
            }
            (first, "") => {
                let first = position(first)?;
                (first < length).then_some((first, length - 1))
            }
            (first, last) => {
                let (first, last) = (position(first)?, position(last)?);
                if last < first {
                    return None; // an invalid range-spec makes the field invalid (§14.1.1)
                }
                (first < length).then(|| (first, last.min(length - 1)))
            }
        };
        ranges.extend(range);
    }
    (specs > 0).then_some(ranges)
}

/// A byte position: digits only, saturated when too large to hold (it then lies past any body).
fn position(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(digits.parse().unwrap_or(u64::MAX))
}

/// The ranges sorted, with overlapping and adjacent ones joined.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (first, last) in ranges {
        match out.last_mut() {
            Some((_, end)) if first <= end.saturating_add(1) => *end = (*end).max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// `If-Range` (RFC 9110 §13.1.5): an entity tag matches by strong comparison, a date only a `Last-Modified` that is
/// exactly equal and strong, which for a cache means at least 60 seconds before the stored `Date` (§8.8.2.2).
fn if_range_holds(request: &HeaderMap, entry: &Entry) -> bool {
    let Some(condition) = request.get(IF_RANGE) else {
        return true;
    };
    let Ok(text) = condition.to_str() else {
        return false;
    };
    let text = text.trim();
    if text.starts_with('"') || text.starts_with("W/") {
        let Some(etag) = entry
            .facts
            .etag
            .as_ref()
            .and_then(|etag| etag.to_str().ok())
        else {
            return false;
        };
        let etag = etag.trim();
        return !text.starts_with("W/") && !etag.starts_with("W/") && text == etag;
    }
    let (Some(date), Some(last_modified)) = (http_date(condition), entry.facts.last_modified)
    else {
        return false;
    };
    let Some(sent) = entry.facts.date else {
        return false;
    };
    date == last_modified && sent.saturating_sub(last_modified) >= 60_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_suffix_open_and_several_ranges() {
        assert_eq!(parse("bytes=0-4", 26), Some(vec![(0, 4)]));
        assert_eq!(parse("BYTES = 0-4", 26), Some(vec![(0, 4)]));
        assert_eq!(parse("bytes=-3", 26), Some(vec![(23, 25)]));
        assert_eq!(parse("bytes=-100", 26), Some(vec![(0, 25)]));
        assert_eq!(parse("bytes=20-", 26), Some(vec![(20, 25)]));
        assert_eq!(parse("bytes=24-100", 26), Some(vec![(24, 25)]));
        assert_eq!(parse("bytes=0-1, ,3-4", 26), Some(vec![(0, 1), (3, 4)]));
        assert_eq!(
            parse("bytes=0-99999999999999999999999", 26),
            Some(vec![(0, 25)])
        );
    }

    #[test]
    fn unsatisfiable_ranges_are_dropped_and_bad_fields_ignored() {
        assert_eq!(parse("bytes=26-", 26), Some(vec![]));
        assert_eq!(parse("bytes=-0", 26), Some(vec![]));
        assert_eq!(parse("bytes=30-40, 1-2", 26), Some(vec![(1, 2)]));
        for ignored in [
            "bytes=5-1",
            "items=0-1",
            "bytes=",
            "bytes=a-b",
            "bytes=1",
            "0-1",
            "bytes=--1",
            "bytes=+1-2",
        ] {
            assert_eq!(parse(ignored, 26), None, "{ignored:?}");
        }
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(parse(&many, 26), None);
    }

    #[test]
    fn merges_overlapping_and_adjacent_ranges() {
        assert_eq!(merged(vec![(2, 3), (0, 1)]), [(0, 3)]);
        assert_eq!(merged(vec![(0, 5), (3, 4)]), [(0, 5)]);
        assert_eq!(merged(vec![(0, 1), (3, 4)]), [(0, 1), (3, 4)]);
    }
}
