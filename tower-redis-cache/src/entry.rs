//! A stored response and its versioned binary encoding.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! "TRC" 0x01                       magic and version
//! u16 status
//! u64 request time, u64 response time   (milliseconds since the Unix epoch)
//! u16 header count, then per header: u16 name length, name, u32 value length, value
//! u16 selecting-header count, then per header: u16 name length, name, u8 present, u32 length, value
//! u32 body length, body
//! ```
//!
//! Every header line is kept in the order received (lines of one name stay in order). What comes back from Redis is
//! not trusted: anything that does not decode exactly, including trailing bytes, an unknown version, more than
//! [`MAX_HEADERS`] header lines or selecting headers, and a count or length larger than the bytes after it could
//! hold, is `None`: a miss, never an error or a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{AGE, DATE, ETAG, EXPIRES, HeaderName, HeaderValue, LAST_MODIFIED};
use http::{HeaderMap, StatusCode};

use crate::directives::{CacheControl, Targets};

const MAGIC: &[u8; 4] = b"TRC\x01";

/// The most header lines (and, separately, selecting headers) a decoded entry may have. hyper refuses messages with
/// more than 100 header lines by default, so this is far above anything a real origin sends, and far below what
/// `HeaderMap` can hold (it panics past 24,576 reserved or 32,768 stored lines). A response with more lines is not
/// stored (the policy refuses it, "too-many-headers"), and an entry in Redis that claims more is a miss.
pub(crate) const MAX_HEADERS: u16 = 1_024;

/// One stored response, with what the policy reads from its headers parsed once.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// When the request that produced this response was sent (ms since the epoch).
    pub(crate) request_time: u64,
    /// When the response arrived (ms since the epoch).
    pub(crate) response_time: u64,
    /// The request's values of the headers the response's `Vary` names, in `Vary` order.
    pub(crate) selecting: Vec<(HeaderName, Option<HeaderValue>)>,
    pub(crate) facts: Facts,
    /// When a soft purge marked this entry stale (ms since the epoch): it is then stale from that moment on, and
    /// the next request revalidates it. Not part of the encoding: Redis keeps it beside the entry.
    pub(crate) purged_at: Option<u64>,
}

/// What the policy needs from the stored headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    /// The directives this cache obeys: those of the first valid target field (RFC 9213), else `Cache-Control`'s.
    pub(crate) cc: CacheControl,
    /// `Date` in ms since the epoch.
    pub(crate) date: Option<u64>,
    /// `Expires`: `None` when absent, `Some(None)` when present but invalid (already expired).
    pub(crate) expires: Option<Option<u64>>,
    pub(crate) last_modified: Option<u64>,
    /// `Age` in seconds.
    pub(crate) age: u64,
    pub(crate) etag: Option<HeaderValue>,
}

impl Facts {
    /// What `headers` say. A valid target field replaces `Cache-Control` and `Expires` alike (RFC 9213 §2.2).
    pub(crate) fn read(headers: &HeaderMap, targets: &Targets) -> Self {
        let targeted = targets.directives(headers);
        let expires = if targeted.is_some() {
            None
        } else {
            let mut lines = headers.get_all(EXPIRES).iter();
            match (lines.next(), lines.next()) {
                (None, _) => None,
                (Some(value), None) => Some(http_date(value)),
                // Two Expires lines: RFC 9111 §4.2 lets a cache consider the response stale.
                (Some(_), Some(_)) => Some(None),
            }
        };
        Self {
            cc: targeted.unwrap_or_else(|| CacheControl::parse(headers, false)),
            date: headers.get(DATE).and_then(http_date),
            expires,
            last_modified: headers.get(LAST_MODIFIED).and_then(http_date),
            age: headers.get(AGE).and_then(age_seconds).unwrap_or(0),
            etag: headers.get(ETAG).cloned(),
        }
    }
}

/// `Age` in seconds: the first value of the first line (`Age: 7200, 0` is 7200, RFC 9111 §5.1 and §4.2.3, as is a
/// second `Age` line after a first of 7200). A value past 2^31 is 2^31, as §1.2.2 asks; one that is not a number
/// is ignored.
pub(crate) fn age_seconds(value: &HeaderValue) -> Option<u64> {
    const MAX: u64 = 1 << 31;
    let first = value.to_str().ok()?.split(',').next()?.trim();
    if first.is_empty() || !first.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(first.parse::<u64>().map_or(MAX, |seconds| seconds.min(MAX)))
}

/// An HTTP date in ms since the epoch: IMF-fixdate, or the obsolete RFC 850 and asctime formats (RFC 9110 §5.6.7),
/// with day and month names in any case (RFC 9111 §4.2 lets a cache read them so).
pub(crate) fn http_date(value: &HeaderValue) -> Option<u64> {
    let text = value.to_str().ok()?.trim();
    let time = httpdate::parse_http_date(text)
        .or_else(|_| httpdate::parse_http_date(&canonical_case(text)))
        .ok()?;
    let since = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// `text` with each run of letters capitalised as the date formats spell them: `Sunday`, `Nov`, `GMT`.
fn canonical_case(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.eq_ignore_ascii_case("gmt") {
            out.push_str("GMT");
        } else {
            let mut letters = word.chars();
            if let Some(first) = letters.next() {
                out.push(first.to_ascii_uppercase());
                out.extend(letters.map(|letter| letter.to_ascii_lowercase()));
            }
        }
        word.clear();
    };
    for character in text.chars() {
        if character.is_ascii_alphabetic() {
            word.push(character);
        } else {
            flush(&mut word, &mut out);
            out.push(character);
        }
    }
    flush(&mut word, &mut out);
    out
}

impl Entry {
    pub(crate) fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        request_time: u64,
        response_time: u64,
        selecting: Vec<(HeaderName, Option<HeaderValue>)>,
        targets: &Targets,
    ) -> Self {
        let facts = Facts::read(&headers, targets);
        Self {
            status,
            headers,
            body,
            request_time,
            response_time,
            selecting,
            facts,
            purged_at: None,
        }
    }

    /// This entry marked stale as of `at` by a soft purge (an earlier mark stands).
    pub(crate) fn purged(&self, at: u64) -> Self {
        let mut entry = self.clone();
        entry.purged_at = Some(self.purged_at.map_or(at, |earlier| earlier.min(at)));
        entry
    }

    /// Bytes this entry holds, for the memory tier's bound.
    pub(crate) fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        let selecting: usize = self
            .selecting
            .iter()
            .map(|(name, value)| name.as_str().len() + value.as_ref().map_or(0, HeaderValue::len))
            .sum();
        self.body.len() + headers + selecting + 160
    }

    pub(crate) fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.weight());
        out.put_slice(MAGIC);
        out.put_u16(self.status.as_u16());
        out.put_u64(self.request_time);
        out.put_u64(self.response_time);
        out.put_u16(u16::try_from(self.headers.len()).unwrap_or(u16::MAX));
        for (name, value) in self.headers.iter().take(usize::from(u16::MAX)) {
            put_short(&mut out, name.as_str().as_bytes());
            put_long(&mut out, value.as_bytes());
        }
        out.put_u16(u16::try_from(self.selecting.len()).unwrap_or(u16::MAX));
        for (name, value) in self.selecting.iter().take(usize::from(u16::MAX)) {
            put_short(&mut out, name.as_str().as_bytes());
            match value {
                Some(value) => {
                    out.put_u8(1);
                    put_long(&mut out, value.as_bytes());
                }
                None => {
                    out.put_u8(0);
                    out.put_u32(0);
                }
            }
        }
        put_long(&mut out, &self.body);
        out.freeze()
    }

    /// Reads back what [`Entry::encode`] wrote. The bytes come from Redis, so nothing in them is trusted: a count
    /// is bounded by [`MAX_HEADERS`] and by what the bytes left could hold before it sizes anything, a length is
    /// checked against the bytes left before it is read, and whatever else is off makes the entry `None` (a miss).
    pub(crate) fn decode(mut bytes: Bytes, targets: &Targets) -> Option<Self> {
        if !bytes.starts_with(MAGIC) {
            return None;
        }
        bytes.advance(MAGIC.len());
        let status = StatusCode::from_u16(take_u16(&mut bytes)?).ok()?;
        let request_time = take_u64(&mut bytes)?;
        let response_time = take_u64(&mut bytes)?;
        let count = take_count(&mut bytes, MIN_HEADER_SIZE)?;
        // `try_`: `HeaderMap` panics past 24,576 reserved or 32,768 stored lines, and a count is no proof of either.
        let mut headers = HeaderMap::try_with_capacity(count).ok()?;
        for _ in 0..count {
            let name = take_short(&mut bytes)?;
            let value = take_long(&mut bytes)?;
            headers
                .try_append(
                    HeaderName::from_bytes(&name).ok()?,
                    HeaderValue::from_maybe_shared(value).ok()?,
                )
                .ok()?;
        }
        let count = take_count(&mut bytes, MIN_SELECTING_SIZE)?;
        let mut selecting = Vec::with_capacity(count);
        for _ in 0..count {
            let name = HeaderName::from_bytes(&take_short(&mut bytes)?).ok()?;
            let present = take_u8(&mut bytes)?;
            let value = take_long(&mut bytes)?;
            let value = match present {
                0 if value.is_empty() => None,
                1 => Some(HeaderValue::from_maybe_shared(value).ok()?),
                _ => return None,
            };
            selecting.push((name, value));
        }
        let body = take_long(&mut bytes)?;
        if bytes.has_remaining() {
            return None;
        }
        Some(Self::new(
            status,
            headers,
            body,
            request_time,
            response_time,
            selecting,
            targets,
        ))
    }
}

/// The fewest bytes a stored header line takes: its two lengths and a one-byte name.
const MIN_HEADER_SIZE: usize = 2 + 1 + 4;

/// The fewest bytes a stored selecting header takes: its name's length, a one-byte name, the flag, the length.
const MIN_SELECTING_SIZE: usize = 2 + 1 + 1 + 4;

fn put_short(out: &mut BytesMut, bytes: &[u8]) {
    let len = bytes.len().min(usize::from(u16::MAX));
    out.put_u16(len as u16);
    out.put_slice(&bytes[..len]);
}

fn put_long(out: &mut BytesMut, bytes: &[u8]) {
    let len = bytes.len().min(u32::MAX as usize);
    out.put_u32(len as u32);
    out.put_slice(&bytes[..len]);
}

fn take_u8(bytes: &mut Bytes) -> Option<u8> {
    (bytes.remaining() >= 1).then(|| bytes.get_u8())
}

fn take_u16(bytes: &mut Bytes) -> Option<u16> {
    (bytes.remaining() >= 2).then(|| bytes.get_u16())
}

fn take_u32(bytes: &mut Bytes) -> Option<u32> {
    (bytes.remaining() >= 4).then(|| bytes.get_u32())
}

fn take_u64(bytes: &mut Bytes) -> Option<u64> {
    (bytes.remaining() >= 8).then(|| bytes.get_u64())
}

/// A count of items of at least `min_size` bytes each: `None` above [`MAX_HEADERS`] or above what the remaining
/// bytes could hold, so that a count never sizes more than the bytes it came with.
fn take_count(bytes: &mut Bytes, min_size: usize) -> Option<usize> {
    let count = usize::from(take_u16(bytes)?);
    (count <= usize::from(MAX_HEADERS) && count.checked_mul(min_size)? <= bytes.remaining())
        .then_some(count)
}

fn take_short(bytes: &mut Bytes) -> Option<Bytes> {
    let len = usize::from(take_u16(bytes)?);
    (bytes.remaining() >= len).then(|| bytes.split_to(len))
}

fn take_long(bytes: &mut Bytes) -> Option<Bytes> {
    let len = usize::try_from(take_u32(bytes)?).ok()?;
    (bytes.remaining() >= len).then(|| bytes.split_to(len))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn age_is_the_first_value_of_the_first_line_and_saturates_at_2_pow_31() {
        let age = |text: &'static str| age_seconds(&HeaderValue::from_static(text));
        assert_eq!(age("7200, 0"), Some(7200));
        assert_eq!(age(" 12 "), Some(12));
        assert_eq!(age("99999999999999999999999"), Some(1 << 31));
        assert_eq!(age("-1"), None);
        assert_eq!(age("soon"), None);
        assert_eq!(age(""), None);
        let mut headers = HeaderMap::new();
        headers.append(AGE, HeaderValue::from_static("7200"));
        headers.append(AGE, HeaderValue::from_static("0"));
        assert_eq!(Facts::read(&headers, &Targets::default()).age, 7200);
    }

    #[test]
    fn dates_in_the_three_formats_are_read_with_names_in_any_case() {
        let at = |text: &'static str| http_date(&HeaderValue::from_static(text));
        let expected = Some(784_111_777_000);
        for text in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "sun, 06 NOV 1994 08:49:37 gmt",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "SUNDAY, 06-nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "sUN nOV  6 08:49:37 1994",
        ] {
            assert_eq!(at(text), expected, "{text}");
        }
        assert_eq!(at("Funday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(at("0"), None);
    }

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.append("content-type", HeaderValue::from_static("text/plain"));
        headers.append("vary", HeaderValue::from_static("accept-encoding"));
        headers.append("vary", HeaderValue::from_static("accept-language"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers.append("cache-control", HeaderValue::from_static("max-age=60"));
        Entry::new(
            StatusCode::NOT_FOUND,
            headers,
            Bytes::from_static(b"hello"),
            1_000,
            1_250,
            vec![
                (
                    HeaderName::from_static("accept-encoding"),
                    Some(HeaderValue::from_static("gzip")),
                ),
                (HeaderName::from_static("accept-language"), None),
            ],
            &Targets::default(),
        )
    }

    #[test]
    fn round_trips_status_repeated_headers_selecting_headers_and_body() {
        let entry = sample();
        let decoded = Entry::decode(entry.encode(), &Targets::default()).unwrap();
        assert_eq!(decoded.status, StatusCode::NOT_FOUND);
        assert_eq!(decoded.headers, entry.headers);
        let multi: Vec<_> = decoded.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        assert_eq!(decoded.body, "hello");
        assert_eq!(decoded.request_time, 1_000);
        assert_eq!(decoded.response_time, 1_250);
        assert_eq!(decoded.selecting, entry.selecting);
        assert_eq!(decoded.facts.cc.max_age, entry.facts.cc.max_age);
    }

    #[test]
    fn anything_that_does_not_decode_exactly_is_none() {
        let encoded = entry_bytes();
        assert!(Entry::decode(Bytes::from_static(b"garbage"), &Targets::default()).is_none());
        assert!(Entry::decode(Bytes::new(), &Targets::default()).is_none());
        for cut in 0..encoded.len() {
            assert!(
                Entry::decode(encoded.slice(..cut), &Targets::default()).is_none(),
                "truncated at {cut}"
            );
        }
        let mut longer = BytesMut::from(&encoded[..]);
        longer.put_u8(0);
        assert!(Entry::decode(longer.freeze(), &Targets::default()).is_none());
        let mut other_version = BytesMut::from(&encoded[..]);
        other_version[3] = 2;
        assert!(Entry::decode(other_version.freeze(), &Targets::default()).is_none());
    }

    fn entry_bytes() -> Bytes {
        sample().encode()
    }

    #[test]
    fn facts_read_dates_expires_and_age() {
        let mut headers = HeaderMap::new();
        headers.insert(
            DATE,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        headers.insert(EXPIRES, HeaderValue::from_static("0"));
        headers.insert(AGE, HeaderValue::from_static("12"));
        let facts = Facts::read(&headers, &Targets::default());
        assert_eq!(facts.date, Some(784_111_777_000));
        assert_eq!(
            facts.expires,
            Some(None),
            "an invalid Expires means already expired"
        );
        assert_eq!(facts.age, 12);
        headers.append(
            EXPIRES,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(
            Facts::read(&headers, &Targets::default()).expires,
            Some(None)
        );
    }

    /// An entry claiming `count` headers, each the smallest that decodes (`a: ` with an empty value).
    fn crafted(count: u16) -> Bytes {
        let mut out = BytesMut::new();
        out.put_slice(MAGIC);
        out.put_u16(200);
        out.put_u64(0);
        out.put_u64(0);
        out.put_u16(count);
        for _ in 0..count {
            put_short(&mut out, b"a");
            put_long(&mut out, b"");
        }
        out.put_u16(0);
        put_long(&mut out, b"");
        out.freeze()
    }

    /// Where the header count sits: after the magic, the status and both times.
    const HEADER_COUNT_AT: usize = 4 + 2 + 8 + 8;

    #[test]
    fn a_crafted_entry_with_too_many_headers_is_a_miss_not_a_panic() {
        // `HeaderMap::with_capacity` panics from 24,577 on, and `append` past 32,768 lines.
        for count in [24_577, 32_769, 40_000, u16::MAX] {
            assert!(
                Entry::decode(crafted(count), &Targets::default()).is_none(),
                "{count} headers"
            );
        }
        assert!(Entry::decode(crafted(MAX_HEADERS), &Targets::default()).is_some());
        assert!(Entry::decode(crafted(MAX_HEADERS + 1), &Targets::default()).is_none());
    }

    #[test]
    fn a_count_or_length_the_bytes_cannot_hold_is_refused() {
        // One header, but a count of 65,535.
        let mut lying = BytesMut::from(&crafted(1)[..]);
        lying[HEADER_COUNT_AT..HEADER_COUNT_AT + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(Entry::decode(lying.freeze(), &Targets::default()).is_none());
        // A count within the cap, but more than the 14 bytes after it could hold (7 bytes a header at least).
        let mut lying = BytesMut::from(&crafted(1)[..]);
        lying[HEADER_COUNT_AT..HEADER_COUNT_AT + 2].copy_from_slice(&3u16.to_be_bytes());
        assert!(Entry::decode(lying.freeze(), &Targets::default()).is_none());
        // A body of 4 GiB - 1 in an entry of a few bytes.
        let mut lying = BytesMut::from(&crafted(0)[..]);
        let body_at = lying.len() - 4;
        lying[body_at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Entry::decode(lying.freeze(), &Targets::default()).is_none());
        // An absent selecting header with a value.
        let mut entry = sample();
        entry.selecting = vec![(HeaderName::from_static("accept"), None)];
        let mut odd = BytesMut::from(&entry.encode()[..]);
        let value_len_at = odd.len() - 4 - entry.body.len() - 4;
        odd[value_len_at..value_len_at + 4].copy_from_slice(&1u32.to_be_bytes());
        odd.put_u8(0);
        assert!(Entry::decode(odd.freeze(), &Targets::default()).is_none());
    }

    /// The offset and width (2 or 4 bytes) of every count and length field in a valid encoding.
    fn length_fields(encoded: &[u8]) -> Vec<(usize, usize)> {
        let read = |at: usize, width: usize| {
            encoded[at..at + width]
                .iter()
                .fold(0usize, |value, byte| (value << 8) | usize::from(*byte))
        };
        let mut fields = Vec::new();
        let mut at = HEADER_COUNT_AT;
        for present_flag in [false, true] {
            fields.push((at, 2));
            let count = read(at, 2);
            at += 2;
            for _ in 0..count {
                fields.push((at, 2));
                at += 2 + read(at, 2);
                at += usize::from(present_flag);
                fields.push((at, 4));
                at += 4 + read(at, 4);
            }
        }
        fields.push((at, 4));
        fields
    }

    /// One change to a valid encoding.
    #[derive(Debug, Clone)]
    enum Edit {
        Replace(prop::sample::Index, u8),
        Insert(prop::sample::Index, u8),
        Remove(prop::sample::Index),
        /// A count or length field set to a huge value (`u64` truncated to the field's width).
        Huge(prop::sample::Index, u64),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let huge = prop_oneof![
            Just(u64::MAX),
            Just(u64::from(u32::MAX) - 1),
            Just(u64::from(u16::MAX)),
            Just(24_577),
            Just(32_769),
            Just(u64::from(MAX_HEADERS) + 1),
            any::<u64>(),
        ];
        prop_oneof![
            (any::<prop::sample::Index>(), any::<u8>())
                .prop_map(|(at, byte)| Edit::Replace(at, byte)),
            (any::<prop::sample::Index>(), any::<u8>())
                .prop_map(|(at, byte)| Edit::Insert(at, byte)),
            any::<prop::sample::Index>().prop_map(Edit::Remove),
            (any::<prop::sample::Index>(), huge).prop_map(|(at, value)| Edit::Huge(at, value)),
        ]
    }

    /// `encoded` with `edits` applied; the huge values land on the fields of the original layout.
    fn apply(encoded: &[u8], edits: &[Edit]) -> Vec<u8> {
        let fields = length_fields(encoded);
        let mut bytes = encoded.to_vec();
        for edit in edits {
            match edit {
                Edit::Huge(field, value) => {
                    let (at, width) = fields[field.index(fields.len())];
                    let value = value.to_be_bytes();
                    if let Some(slot) = bytes.get_mut(at..at + width) {
                        slot.copy_from_slice(&value[8 - width..]);
                    }
                }
                Edit::Replace(at, byte) if !bytes.is_empty() => {
                    let at = at.index(bytes.len());
                    bytes[at] = *byte;
                }
                Edit::Insert(at, byte) => {
                    let at = at.index(bytes.len() + 1);
                    bytes.insert(at, *byte);
                }
                Edit::Remove(at) if !bytes.is_empty() => {
                    bytes.remove(at.index(bytes.len()));
                }
                Edit::Replace(..) | Edit::Remove(_) => {}
            }
        }
        bytes
    }

    /// Any entry that can be stored: header lines with repeated names, selecting headers present or not, any
    /// status, times and body.
    fn any_entry() -> impl Strategy<Value = Entry> {
        let name = "[a-z][a-z0-9-]{0,12}";
        let value = "[!-~]([ -~]{0,38}[!-~])?";
        (
            100u16..1000,
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec((name, value), 0..24),
            prop::collection::vec((name, prop::option::of(value)), 0..4),
            prop::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(
                |(status, request_time, response_time, lines, selecting, body)| {
                    let mut headers = HeaderMap::new();
                    for (name, value) in lines {
                        if let (Ok(name), Ok(value)) =
                            (HeaderName::try_from(name), HeaderValue::try_from(value))
                        {
                            headers.append(name, value);
                        }
                    }
                    let selecting = selecting
                        .into_iter()
                        .filter_map(|(name, value)| {
                            let value = value.map(HeaderValue::try_from).transpose().ok()?;
                            Some((HeaderName::try_from(name).ok()?, value))
                        })
                        .collect();
                    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                    Entry::new(
                        status,
                        headers,
                        Bytes::from(body),
                        request_time,
                        response_time,
                        selecting,
                        &Targets::default(),
                    )
                },
            )
    }

    fn assert_same(decoded: &Entry, entry: &Entry) {
        assert_eq!(decoded.status, entry.status);
        assert_eq!(decoded.headers, entry.headers);
        assert_eq!(decoded.selecting, entry.selecting);
        assert_eq!(decoded.body, entry.body);
        assert_eq!(
            (decoded.request_time, decoded.response_time),
            (entry.request_time, entry.response_time)
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Entry::decode(Bytes::from(bytes), &Targets::default());
        }

        #[test]
        fn decoding_arbitrary_bytes_after_the_magic_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut all = MAGIC.to_vec();
            all.extend(bytes);
            let _ = Entry::decode(Bytes::from(all), &Targets::default());
        }

        #[test]
        fn decoding_a_mutated_entry_never_panics_and_what_decodes_round_trips(
            entry in any_entry(),
            edits in prop::collection::vec(edit(), 1..6),
        ) {
            let bytes = apply(&entry.encode(), &edits);
            if let Some(decoded) = Entry::decode(Bytes::from(bytes), &Targets::default()) {
                let again = Entry::decode(decoded.encode(), &Targets::default());
                prop_assert!(again.is_some());
                if let Some(again) = again {
                    assert_same(&again, &decoded);
                }
            }
        }

        #[test]
        fn a_count_or_length_set_huge_is_a_miss(entry in any_entry(), field in any::<prop::sample::Index>()) {
            let encoded = entry.encode();
            // Every count and length is at most what it was plus the bytes after it; `u32::MAX - 1` is more.
            let huge = apply(&encoded, &[Edit::Huge(field, u64::from(u32::MAX) - 1)]);
            prop_assert!(Entry::decode(Bytes::from(huge), &Targets::default()).is_none());
        }

        #[test]
        fn any_stored_entry_round_trips(entry in any_entry()) {
            let decoded = Entry::decode(entry.encode(), &Targets::default());
            prop_assert!(decoded.is_some());
            if let Some(decoded) = decoded {
                assert_same(&decoded, &entry);
            }
        }
    }
}
