//! A server's hint of when to come back, read from a failed response: `Retry-After` (RFC 9110 §10.2.3) on a 503 or
//! a 429 (not a gRPC reply), as delay-seconds or an HTTP date, and gRPC's `grpc-retry-pushback-ms` in the headers of a trailers-only
//! reply or in the trailers. Anything that does not parse is no hint; a negative pushback (gRPC's "do not retry")
//! is no hint either, so the breaker's own `open_duration` applies.

use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderName, StatusCode};

/// gRPC's retry pushback (gRFC A6), in milliseconds.
pub(crate) const GRPC_RETRY_PUSHBACK_MS: HeaderName =
    HeaderName::from_static("grpc-retry-pushback-ms");

/// The hint in a response's status and headers.
pub(crate) fn from_response(status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        // gRPC speaks through its own field; a gRPC reply's HTTP status says nothing of when to come back.
        return grpc_pushback(headers);
    }
    if status != StatusCode::SERVICE_UNAVAILABLE && status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    retry_after(headers, SystemTime::now())
}

/// The hint in a gRPC stream's trailers.
pub(crate) fn from_trailers(trailers: Option<&HeaderMap>) -> Option<Duration> {
    grpc_pushback(trailers?)
}

fn grpc_pushback(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(&GRPC_RETRY_PUSHBACK_MS)?.to_str().ok()?.trim();
    digits(text).map(Duration::from_millis)
}

/// `Retry-After` as delay-seconds or an HTTP date (a date already past is no wait at all).
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Some(seconds) = digits(text) {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A non-negative integer, saturated when too large.
fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn retry_after_counts_on_503_and_429_only() {
        let seven = headers(&[("retry-after", "7")]);
        assert_eq!(
            from_response(StatusCode::SERVICE_UNAVAILABLE, &seven),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            from_response(StatusCode::TOO_MANY_REQUESTS, &seven),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            from_response(StatusCode::INTERNAL_SERVER_ERROR, &seven),
            None
        );
        assert_eq!(
            from_response(StatusCode::SERVICE_UNAVAILABLE, &headers(&[])),
            None
        );
        for bad in ["-1", "7.5", "soon", ""] {
            assert_eq!(
                from_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &headers(&[("retry-after", bad)])
                ),
                None,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn retry_after_as_a_date() {
        let now = SystemTime::now();
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let hint = retry_after(&headers(&[("retry-after", &later)]), now).unwrap();
        assert!(
            hint > Duration::from_secs(28) && hint <= Duration::from_secs(30),
            "{hint:?}"
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn grpc_pushback_in_headers_or_trailers() {
        let pushback = headers(&[
            ("content-type", "application/grpc"),
            ("grpc-retry-pushback-ms", "1500"),
        ]);
        assert_eq!(
            from_response(StatusCode::OK, &pushback),
            Some(Duration::from_millis(1500))
        );
        // Not on a plain HTTP reply.
        let plain = headers(&[("grpc-retry-pushback-ms", "1500")]);
        assert_eq!(from_response(StatusCode::SERVICE_UNAVAILABLE, &plain), None);
        assert_eq!(
            from_trailers(Some(&pushback)),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            from_trailers(Some(&headers(&[("grpc-retry-pushback-ms", "-1")]))),
            None
        );
        assert_eq!(from_trailers(None), None);
    }
}
