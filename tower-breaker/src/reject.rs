//! The responses the layer answers with by itself: a rejection (HTTP 503 with `Retry-After`, or a trailers-only
//! gRPC `UNAVAILABLE`) and a timeout (HTTP 504, or gRPC `DEADLINE_EXCEEDED`).

use std::sync::LazyLock;
use std::time::Duration;

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use crate::breaker::{RejectReason, Rejected};

/// `Retry-After` values for 0 to 3600 seconds, made once, so a rejection formats nothing.
static RETRY_AFTER_SECONDS: LazyLock<Vec<HeaderValue>> =
    LazyLock::new(|| (0..=3600u32).map(HeaderValue::from).collect());

const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

fn retry_after_value(retry_after: Duration) -> HeaderValue {
    // Round up, so a client that waits exactly this long finds the breaker ready to probe.
    let seconds = retry_after.as_millis().div_ceil(1000).max(1);
    usize::try_from(seconds)
        .ok()
        .and_then(|seconds| RETRY_AFTER_SECONDS.get(seconds).cloned())
        .unwrap_or_else(|| HeaderValue::from(u64::try_from(seconds).unwrap_or(u64::MAX)))
}

fn grpc_reply<B: Default>(code: &'static str, message: &'static str) -> Response<B> {
    let mut response = Response::new(B::default());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, GRPC);
    headers.insert("grpc-status", HeaderValue::from_static(code));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    response
}

/// The answer to a rejected request.
pub(crate) fn rejection<B: Default>(rejected: &Rejected, grpc: bool) -> Response<B> {
    let message = match rejected.reason() {
        RejectReason::Open => "circuit%20breaker%20is%20open",
        RejectReason::HalfOpenFull => "circuit%20breaker%20is%20half-open",
        RejectReason::ForcedOpen => "circuit%20breaker%20is%20forced%20open",
    };
    let mut response = if grpc {
        // 14 = UNAVAILABLE: tonic clients see a proper Status, and retry policies treat it as retryable.
        grpc_reply("14", message)
    } else {
        let mut response = Response::new(B::default());
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
    };
    if let Some(retry_after) = rejected.retry_after() {
        response
            .headers_mut()
            .insert(RETRY_AFTER, retry_after_value(retry_after));
    }
    response
}

/// The answer to a call that ran past the call timeout.
pub(crate) fn timeout<B: Default>(grpc: bool) -> Response<B> {
    if grpc {
        // 4 = DEADLINE_EXCEEDED.
        grpc_reply("4", "call%20timed%20out")
    } else {
        let mut response = Response::new(B::default());
        *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(1_001)), "2");
        assert_eq!(retry_after_value(Duration::from_secs(30)), "30");
        assert_eq!(retry_after_value(Duration::from_secs(7_200)), "7200");
    }
}
