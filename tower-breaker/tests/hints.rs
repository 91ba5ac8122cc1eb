//! Server hints set how long the breaker opens: `Retry-After` on a 503 or a 429 from a real axum server, and
//! `grpc-retry-pushback-ms` from a real tonic server, on the failure that opens it; within the configured bounds,
//! and ignored when turned off or on other statuses. Time is the breaker's manual clock.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::routing::get;
use grpc_echo::{EchoClient, EchoRequest, EchoServer};
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceBuilder;
use tower_breaker::{BreakerBuilder, BreakerLayer, CircuitBreaker, ManualClock, State};
use tower_http::set_header::SetResponseHeaderLayer;

/// An app whose `/` answers `status` with `Retry-After: retry_after`.
fn app(status: StatusCode, retry_after: &'static str) -> Router {
    Router::new().route(
        "/",
        get(move || async move { (status, [("retry-after", retry_after)], "busy") }),
    )
}

/// A breaker that opens on the first failure, 30 s by default, on `clock`.
fn builder(clock: &ManualClock) -> BreakerBuilder {
    CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(30))
        .clock(clock.clone())
}

/// How long the breaker stays open after one answer from `app`: the first whole second at which it lets a call
/// through again (`None` if it never opened).
async fn opened_for(builder: BreakerBuilder, clock: &ManualClock, app: Router) -> Option<u64> {
    let breaker = builder.build().unwrap();
    let address: SocketAddr =
        test_support::serve(app.layer(BreakerLayer::new(breaker.clone()))).await;
    test_support::get(address, "/").await;
    if breaker.state() != State::Open {
        return None;
    }
    for second in 1..=120 {
        clock.advance(Duration::from_secs(1));
        if breaker.state() != State::Open || breaker.try_acquire().is_ok() {
            return Some(second);
        }
    }
    Some(u64::MAX)
}

#[tokio::test]
async fn retry_after_7_on_a_503_opens_for_7_seconds() {
    let clock = ManualClock::new();
    let breaker = builder(&clock).build().unwrap();
    let address = test_support::serve(
        app(StatusCode::SERVICE_UNAVAILABLE, "7").layer(BreakerLayer::new(breaker.clone())),
    )
    .await;
    test_support::get(address, "/").await;
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(breaker.retry_after(), Some(Duration::from_secs(7)));
    // The rejection tells the client the same.
    let rejected = test_support::get(address, "/").await;
    assert_eq!(rejected.header("retry-after").as_deref(), Some("7"));
    clock.advance(Duration::from_millis(6_999));
    assert!(breaker.try_acquire().is_err(), "still open just before 7 s");
    clock.advance(Duration::from_millis(1));
    assert!(breaker.try_acquire().is_ok(), "a probe at 7 s");
    assert_eq!(breaker.stats().hinted_openings, 1);
}

#[tokio::test]
async fn a_429_counted_as_a_failure_carries_its_hint_too_and_hints_are_bounded() {
    let clock = ManualClock::new();
    // 429 is ignored by the HTTP preset; counted as a failure it opens for its Retry-After.
    let classifier =
        tower_breaker::HttpClassifier::new().too_many_requests(tower_breaker::Outcome::Failure);
    let breaker = builder(&clock).build().unwrap();
    let address = test_support::serve(
        app(StatusCode::TOO_MANY_REQUESTS, "12").layer(
            BreakerLayer::new(breaker.clone())
                .classifier(tower_http::classify::SharedClassifier::new(classifier)),
        ),
    )
    .await;
    test_support::get(address, "/").await;
    assert_eq!(breaker.retry_after(), Some(Duration::from_secs(12)));

    // An hour is clamped to the bounds' minute; half a second to their second.
    let clock = ManualClock::new();
    assert_eq!(
        opened_for(
            builder(&clock),
            &clock,
            app(StatusCode::SERVICE_UNAVAILABLE, "3600")
        )
        .await,
        Some(60)
    );
    let clock = ManualClock::new();
    assert_eq!(
        opened_for(
            builder(&clock).server_hints(Duration::from_secs(5), Duration::from_secs(20)),
            &clock,
            app(StatusCode::SERVICE_UNAVAILABLE, "1")
        )
        .await,
        Some(5)
    );
}

#[tokio::test]
async fn without_a_hint_or_with_hints_ignored_the_open_duration_applies() {
    for (builder_of, status, retry_after) in [
        // A 500's Retry-After is no hint (RFC 9110 gives it meaning on 503 and 3xx).
        (
            builder as fn(&ManualClock) -> BreakerBuilder,
            StatusCode::INTERNAL_SERVER_ERROR,
            "7",
        ),
        (builder, StatusCode::SERVICE_UNAVAILABLE, "soon"),
        (
            |clock: &ManualClock| builder(clock).ignore_server_hints(),
            StatusCode::SERVICE_UNAVAILABLE,
            "7",
        ),
    ] {
        let clock = ManualClock::new();
        assert_eq!(
            opened_for(builder_of(&clock), &clock, app(status, retry_after)).await,
            Some(30),
            "{status} {retry_after}"
        );
    }
}

#[tokio::test]
async fn grpc_retry_pushback_on_a_trailers_only_failure_sets_the_opening() {
    let clock = ManualClock::new();
    let breaker = builder(&clock).build().unwrap();
    let pushback = SetResponseHeaderLayer::appending(
        HeaderName::from_static("grpc-retry-pushback-ms"),
        HeaderValue::from_static("2500"),
    );
    let (address, _server) = grpc_echo::serve_with_layer(pushback, EchoServer::new()).await;
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(
        ServiceBuilder::new()
            .layer(BreakerLayer::new(breaker.clone()))
            .service(channel),
    );
    let failed = client
        .say(EchoRequest {
            message: "hi".to_owned(),
            fail_with: Code::Unavailable as i32,
            delay_ms: 0,
        })
        .await;
    assert_eq!(failed.unwrap_err().code(), Code::Unavailable);
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(breaker.retry_after(), Some(Duration::from_millis(2500)));
}

#[test]
fn empty_bounds_are_a_configuration_error() {
    for (min, max) in [
        (Duration::from_secs(5), Duration::from_secs(1)),
        (Duration::ZERO, Duration::ZERO),
    ] {
        let error = CircuitBreaker::builder()
            .server_hints(min, max)
            .build()
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(error.contains("server_hints"), "{error}");
    }
}
