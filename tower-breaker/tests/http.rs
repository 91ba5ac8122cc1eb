//! The layer on a real axum server over loopback: classification, rejections, fallback, timeouts, accounting.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Response, StatusCode};
use axum::routing::get;
use test_support::serve;
use tower_breaker::{
    BreakerLayer, BreakerStats, CircuitBreaker, FallbackReason, FallbackRequest, State,
};

/// One request over a fresh HTTP/1.1 connection: (status, retry-after, body).
async fn get_path(address: SocketAddr, path: &str) -> (StatusCode, Option<String>, String) {
    let reply = test_support::get(address, path).await;
    (reply.status, reply.header("retry-after"), reply.body)
}

fn assert_accounting(stats: &BreakerStats) {
    assert_eq!(
        stats.requests,
        stats.successes + stats.failures + stats.ignored + stats.rejects,
        "{stats:#?}"
    );
}

/// An app whose `/status` answers with the status stored in `status`.
fn app_answering(status: Arc<AtomicU16>) -> Router {
    Router::new().route(
        "/status",
        get(move || {
            let status = status.clone();
            async move { StatusCode::from_u16(status.load(Ordering::Relaxed)).unwrap() }
        }),
    )
}

fn breaker(failures: u32) -> CircuitBreaker {
    CircuitBreaker::builder()
        .consecutive_failures(failures)
        .open_for(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test]
async fn server_errors_open_the_breaker_and_rejections_are_503_with_retry_after() {
    let status = Arc::new(AtomicU16::new(500));
    let breaker = breaker(3);
    let address =
        serve(app_answering(status.clone()).layer(BreakerLayer::new(breaker.clone()))).await;
    for _ in 0..3 {
        assert_eq!(
            get_path(address, "/status").await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert_eq!(breaker.state(), State::Open);
    status.store(200, Ordering::Relaxed);
    let (code, retry_after, _) = get_path(address, "/status").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after.as_deref(), Some("30"));
    let stats = breaker.stats();
    assert_eq!((stats.failures, stats.rejects), (3, 1));
    assert_accounting(&stats);
}

#[tokio::test]
async fn client_errors_succeed_and_too_many_requests_is_ignored() {
    let status = Arc::new(AtomicU16::new(404));
    let breaker = breaker(1);
    let address =
        serve(app_answering(status.clone()).layer(BreakerLayer::new(breaker.clone()))).await;
    for _ in 0..5 {
        assert_eq!(get_path(address, "/status").await.0, StatusCode::NOT_FOUND);
    }
    status.store(429, Ordering::Relaxed);
    for _ in 0..5 {
        assert_eq!(
            get_path(address, "/status").await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    assert_eq!(breaker.state(), State::Closed);
    let stats = breaker.stats();
    assert_eq!((stats.successes, stats.ignored, stats.failures), (5, 5, 0));
    assert_accounting(&stats);
}

#[tokio::test]
async fn a_route_layer_guards_only_its_route() {
    let breaker = breaker(1);
    let app = Router::new()
        .route(
            "/guarded",
            get(|| async { StatusCode::BAD_GATEWAY })
                .route_layer(BreakerLayer::new(breaker.clone())),
        )
        .route("/free", get(|| async { "free" }));
    let address = serve(app).await;
    assert_eq!(
        get_path(address, "/guarded").await.0,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        get_path(address, "/guarded").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get_path(address, "/free").await.0, StatusCode::OK);
    assert_eq!(breaker.stats().requests, 2);
}

#[tokio::test]
async fn the_fallback_answers_rejections_and_sees_the_request() {
    let breaker = breaker(1);
    breaker.force_open();
    let layer = BreakerLayer::new(breaker.clone()).fallback(|fallback: FallbackRequest<Body>| {
        let path = fallback
            .request
            .map(|request| request.uri().path().to_owned())
            .unwrap_or_default();
        let reason = match fallback.reason {
            FallbackReason::Rejected(rejected) => format!("{:?}", rejected.reason()),
            other => other.to_string(),
        };
        Response::new(Body::from(format!("fallback for {path}: {reason}")))
    });
    let address = serve(app_answering(Arc::new(AtomicU16::new(200))).layer(layer)).await;
    let (code, _, body) = get_path(address, "/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body, "fallback for /status: ForcedOpen");
    let stats = breaker.stats();
    assert_eq!((stats.rejects, stats.fallbacks.successes), (1, 1));
}

#[tokio::test]
async fn with_fallback_on_failure_a_server_error_is_replaced() {
    let breaker = breaker(100);
    let layer = BreakerLayer::new(breaker.clone())
        .fallback(|fallback: FallbackRequest<Body>| {
            assert!(fallback.request.is_none());
            Response::new(Body::from(fallback.reason.to_string()))
        })
        .fallback_on_failure(true);
    let address = serve(app_answering(Arc::new(AtomicU16::new(503))).layer(layer)).await;
    let (code, _, body) = get_path(address, "/status").await;
    assert_eq!(
        (code, body.as_str()),
        (
            StatusCode::OK,
            "the service answered 503 Service Unavailable"
        )
    );
    let stats = breaker.stats();
    assert_eq!((stats.failures, stats.fallbacks.successes), (1, 1));
}

#[tokio::test]
async fn a_call_past_the_timeout_is_a_504_a_failure_and_a_timeout() {
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(5)
        .call_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let finished = Arc::new(AtomicU64::new(0));
    let app = Router::new().route(
        "/slow",
        get({
            let finished = finished.clone();
            move || async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                finished.fetch_add(1, Ordering::Relaxed);
                "late"
            }
        }),
    );
    let address = serve(app.layer(BreakerLayer::new(breaker.clone()))).await;
    let (code, _, _) = get_path(address, "/slow").await;
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT);
    let stats = breaker.stats();
    assert_eq!((stats.failures, stats.timeouts), (1, 1));
    assert_eq!(
        finished.load(Ordering::Relaxed),
        0,
        "the handler was dropped at the deadline"
    );
    assert_accounting(&stats);
}

#[tokio::test]
async fn a_half_open_breaker_closes_after_successful_probes_over_http() {
    let status = Arc::new(AtomicU16::new(500));
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_millis(100))
        .half_open_permits(2)
        .build()
        .unwrap();
    let address =
        serve(app_answering(status.clone()).layer(BreakerLayer::new(breaker.clone()))).await;
    assert_eq!(
        get_path(address, "/status").await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        get_path(address, "/status").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    status.store(200, Ordering::Relaxed);
    // Poll until the open period is over; the first two calls after it are the probes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while get_path(address, "/status").await.0 != StatusCode::OK {
        assert!(tokio::time::Instant::now() < deadline, "never half-opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get_path(address, "/status").await.0, StatusCode::OK);
    assert_eq!(breaker.state(), State::Closed);
    assert_accounting(&breaker.stats());
}
