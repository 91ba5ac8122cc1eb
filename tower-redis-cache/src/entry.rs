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
//! Every header line is kept in the order received (lines of one name stay in order). Anything that does not decode
//! exactly, including trailing bytes and an unknown version, is `None`: a miss, never an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{AGE, DATE, ETAG, EXPIRES, HeaderName, HeaderValue, LAST_MODIFIED};
use http::{HeaderMap, StatusCode};

use crate::directives::CacheControl;

const MAGIC: &[u8; 4] = b"TRC\x01";

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
}

/// What the policy needs from the stored headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
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
    pub(crate) fn read(headers: &HeaderMap) -> Self {
        let expires = {
            let mut lines = headers.get_all(EXPIRES).iter();
            match (lines.next(), lines.next()) {
                (None, _) => None,
                (Some(value), None) => Some(http_date(value)),
                // Two Expires lines: RFC 9111 §4.2 lets a cache consider the response stale.
                (Some(_), Some(_)) => Some(None),
            }
        };
        Self {
            cc: CacheControl::parse(headers, false),
            date: headers.get(DATE).and_then(http_date),
            expires,
            last_modified: headers.get(LAST_MODIFIED).and_then(http_date),
            age: headers
                .get(AGE)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())
                .unwrap_or(0),
            etag: headers.get(ETAG).cloned(),
        }
    }
}

/// An HTTP date in ms since the epoch.
pub(crate) fn http_date(value: &HeaderValue) -> Option<u64> {
    let text = value.to_str().ok()?;
    let time = httpdate::parse_http_date(text.trim()).ok()?;
    let since = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

impl Entry {
    pub(crate) fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        request_time: u64,
        response_time: u64,
        selecting: Vec<(HeaderName, Option<HeaderValue>)>,
    ) -> Self {
        let facts = Facts::read(&headers);
        Self {
            status,
            headers,
            body,
            request_time,
            response_time,
            selecting,
            facts,
        }
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

    pub(crate) fn decode(mut bytes: Bytes) -> Option<Self> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return None;
        }
        bytes.advance(MAGIC.len());
        let status = StatusCode::from_u16(take_u16(&mut bytes)?).ok()?;
        let request_time = take_u64(&mut bytes)?;
        let response_time = take_u64(&mut bytes)?;
        let count = take_u16(&mut bytes)?;
        let mut headers = HeaderMap::with_capacity(usize::from(count));
        for _ in 0..count {
            let name = take_short(&mut bytes)?;
            let value = take_long(&mut bytes)?;
            headers.append(
                HeaderName::from_bytes(&name).ok()?,
                HeaderValue::from_maybe_shared(value).ok()?,
            );
        }
        let count = take_u16(&mut bytes)?;
        let mut selecting = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let name = HeaderName::from_bytes(&take_short(&mut bytes)?).ok()?;
            let present = take_u8(&mut bytes)?;
            let value = take_long(&mut bytes)?;
            let value = match present {
                0 => None,
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
        ))
    }
}

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

fn take_u64(bytes: &mut Bytes) -> Option<u64> {
    (bytes.remaining() >= 8).then(|| bytes.get_u64())
}

fn take_short(bytes: &mut Bytes) -> Option<Bytes> {
    let len = usize::from(take_u16(bytes)?);
    (bytes.remaining() >= len).then(|| bytes.split_to(len))
}

fn take_long(bytes: &mut Bytes) -> Option<Bytes> {
    let len = usize::try_from((bytes.remaining() >= 4).then(|| bytes.get_u32())?).ok()?;
    (bytes.remaining() >= len).then(|| bytes.split_to(len))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        )
    }

    #[test]
    fn round_trips_status_repeated_headers_selecting_headers_and_body() {
        let entry = sample();
        let decoded = Entry::decode(entry.encode()).unwrap();
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
        assert!(Entry::decode(Bytes::from_static(b"garbage")).is_none());
        assert!(Entry::decode(Bytes::new()).is_none());
        for cut in 0..encoded.len() {
            assert!(
                Entry::decode(encoded.slice(..cut)).is_none(),
                "truncated at {cut}"
            );
        }
        let mut longer = BytesMut::from(&encoded[..]);
        longer.put_u8(0);
        assert!(Entry::decode(longer.freeze()).is_none());
        let mut other_version = BytesMut::from(&encoded[..]);
        other_version[3] = 2;
        assert!(Entry::decode(other_version.freeze()).is_none());
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
        let facts = Facts::read(&headers);
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
        assert_eq!(Facts::read(&headers).expires, Some(None));
    }
}
