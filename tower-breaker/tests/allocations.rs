//! Heap allocations on the hot paths, counted by a global allocator.
//!
//! The workspace forbids `unsafe` (and `forbid` cannot be lifted by an `allow`), so the counting `GlobalAlloc` comes
//! from the `allocation-counter` crate: it counts per thread, so tests running in parallel on other threads do not
//! disturb a measurement. Every test warms the path up first (lazily initialised statics, tracing's callsite
//! registration), then measures `CALLS` calls on its own thread.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use allocation_counter::AllocationInfo;
use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use tower::{Layer, Service, service_fn};
use tower_breaker::{BreakerLayer, CircuitBreaker, FallbackRequest};

const WARM_UP: u64 = 1_000;
const CALLS: u64 = 10_000;

/// Heap allocations `http::HeaderMap` makes to hold its first entry (the 503's `Retry-After`): its index table and
/// its entry vector. Observed with http 1.x; the value itself is a clone of a pre-built `HeaderValue` and allocates
/// nothing.
const RETRY_AFTER_ALLOCATIONS: u64 = 2;

fn breaker() -> CircuitBreaker {
    CircuitBreaker::builder()
        .name("allocations")
        .count_window(100)
        .minimum_calls(20)
        .failure_rate(0.5)
        .open_for(Duration::from_secs(3_600))
        .build()
        .expect("a valid configuration")
}

/// Opens `breaker` with 20 failures, so rejections carry a retry-after (unlike a forced open).
fn trip(breaker: &CircuitBreaker) {
    for _ in 0..20 {
        breaker.try_acquire().expect("closed").failure();
    }
    assert!(breaker.try_acquire().is_err(), "the breaker did not trip");
}

async fn ok(_request: Request<()>) -> Result<Response<Empty<Bytes>>, Infallible> {
    Ok(Response::new(Empty::new()))
}

/// Runs `call` `WARM_UP` times unmeasured, then `CALLS` times measured.
fn measure(mut call: impl FnMut()) -> AllocationInfo {
    for _ in 0..WARM_UP {
        call();
    }
    allocation_counter::measure(|| {
        for _ in 0..CALLS {
            call();
        }
    })
}

/// One call through a layered service, polled by hand with a no-op waker: every future here is ready at once.
fn call_now<S>(service: &mut S) -> Result<S::Response, S::Error>
where
    S: Service<Request<()>>,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(
        matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(()))),
        "the service is not ready"
    );
    let future = pin!(service.call(Request::new(())));
    match future.poll(&mut cx) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("the call future is pending"),
    }
}

#[test]
fn the_counting_allocator_is_installed() {
    let info = allocation_counter::measure(|| {
        std::hint::black_box(Box::new(1_u64));
    });
    assert_eq!(
        info.count_total, 1,
        "a zero count below would prove nothing"
    );
}

#[test]
fn the_closed_path_allocates_nothing() {
    let breaker = breaker();
    let info = measure(|| breaker.try_acquire().expect("closed").success());
    assert_eq!(info.count_total, 0, "{info:?}");
    assert_eq!(breaker.stats().state, tower_breaker::State::Closed);
}

#[test]
fn failures_below_the_threshold_allocate_nothing() {
    // One failure in four keeps the rate under 0.5: the failure branch of the window, without tripping.
    let breaker = breaker();
    let mut n = 0u64;
    let info = measure(|| {
        n += 1;
        let permit = breaker.try_acquire().expect("closed");
        if n.is_multiple_of(4) {
            permit.failure();
        } else {
            permit.success();
        }
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn rejections_while_forced_open_allocate_nothing() {
    let breaker = breaker();
    breaker.force_open();
    let info = measure(|| {
        std::hint::black_box(breaker.try_acquire().expect_err("forced open"));
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn rejections_while_tripped_open_allocate_nothing() {
    let breaker = breaker();
    trip(&breaker);
    let info = measure(|| {
        let rejected = breaker.try_acquire().expect_err("open");
        assert!(rejected.retry_after().is_some());
        std::hint::black_box(rejected);
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn the_layer_closed_path_allocates_nothing() {
    let mut service = BreakerLayer::new(breaker())
        .for_http()
        .layer(service_fn(ok));
    let info = measure(|| {
        let response = call_now(&mut service).expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

/// With a `call_timeout`, the deadline is made only when the service does not answer on the first poll: a call
/// answered at once allocates nothing. (A call that waits boxes its deadline: one allocation.)
#[test]
fn a_call_timeout_allocates_nothing_when_the_service_answers_at_once() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let _entered = runtime.enter();
    let breaker = CircuitBreaker::builder()
        .name("allocations-timeout")
        .call_timeout(Duration::from_secs(5))
        .build()
        .expect("a valid configuration");
    let mut service = BreakerLayer::new(breaker.clone())
        .for_http()
        .layer(service_fn(ok));
    let info = measure(|| {
        let response = call_now(&mut service).expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
    });
    assert_eq!(info.count_total, 0, "{info:?}");
    assert_eq!(breaker.stats().successes, WARM_UP + CALLS);
}

#[test]
fn the_layer_closed_path_with_the_default_classifier_allocates_nothing_for_http() {
    let mut service = BreakerLayer::new(breaker()).layer(service_fn(ok));
    let info = measure(|| {
        let response = call_now(&mut service).expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

async fn grpc_streaming(_request: Request<()>) -> Result<Response<Empty<Bytes>>, Infallible> {
    // No grpc-status in the headers: the status comes in the trailers, at the end of the body.
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(Empty::new())
        .expect("a valid response"))
}

#[test]
fn a_grpc_response_classified_at_its_end_allocates_nothing_when_its_body_is_dropped() {
    let breaker = breaker();
    let mut service = BreakerLayer::new(breaker.clone())
        .for_grpc()
        .layer(service_fn(grpc_streaming));
    let info = measure(|| {
        let response = call_now(&mut service).expect("a response");
        std::hint::black_box(response);
    });
    // The handler's own content-type header makes the HeaderMap allocations counted in the control.
    let control = measure(|| {
        let response = call_now(&mut service_fn(grpc_streaming)).expect("a response");
        std::hint::black_box(response);
    });
    assert_eq!(info.count_total, control.count_total, "{info:?}");
    // Every body was dropped before its end: ignored (the default `dropped_body`), and recorded.
    let stats = breaker.stats();
    assert_eq!(stats.ignored, WARM_UP + CALLS);
    assert_eq!(stats.requests, WARM_UP + CALLS);
}

/// A body of trailers only (`grpc-status: 0`), as tonic ends a successful reply.
#[derive(Default)]
struct TrailersBody {
    sent: bool,
}

impl http_body::Body for TrailersBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if std::mem::replace(&mut self.sent, true) {
            return Poll::Ready(None);
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }
}

/// A reply whose status comes in trailers, as tonic sends a successful unary reply.
async fn grpc_with_trailers(_request: Request<()>) -> Result<Response<TrailersBody>, Infallible> {
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(TrailersBody::default())
        .expect("a valid response"))
}

/// Polls `body` to its end with a no-op waker (every body here is ready at once); returns its frames.
fn read_to_end<B: http_body::Body>(body: B) -> usize {
    let mut cx = Context::from_waker(Waker::noop());
    let mut body = pin!(body);
    let mut frames = 0;
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(_))) => frames += 1,
            Poll::Ready(None) => return frames,
            Poll::Ready(Some(Err(_))) => panic!("the body failed"),
            Poll::Pending => panic!("the body is pending"),
        }
    }
}

#[test]
fn a_grpc_response_read_to_its_trailers_allocates_nothing() {
    let breaker = breaker();
    let mut service = BreakerLayer::new(breaker.clone())
        .for_grpc()
        .layer(service_fn(grpc_with_trailers));
    let info = measure(|| {
        let response = call_now(&mut service).expect("a response");
        assert_eq!(read_to_end(response.into_body()), 1);
    });
    // The handler's header and trailers allocate the same in the control.
    let control = measure(|| {
        let response = call_now(&mut service_fn(grpc_with_trailers)).expect("a response");
        assert_eq!(read_to_end(response.into_body()), 1);
    });
    assert_eq!(info.count_total, control.count_total, "{info:?}");
    let stats = breaker.stats();
    assert_eq!(stats.successes, WARM_UP + CALLS);
    assert_eq!(stats.requests, WARM_UP + CALLS);
}

#[test]
fn the_layer_rejects_while_forced_open_without_allocating() {
    // A forced-open breaker gives no retry-after, so the 503 has no header to insert.
    let breaker = breaker();
    breaker.force_open();
    let mut service = BreakerLayer::new(breaker).for_http().layer(service_fn(ok));
    let info = measure(|| {
        let response = call_now(&mut service).expect("a 503");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().is_empty());
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn the_layer_rejects_while_tripped_open_with_only_the_retry_after_header_allocating() {
    let breaker = breaker();
    trip(&breaker);
    let mut service = BreakerLayer::new(breaker).for_http().layer(service_fn(ok));
    let info = measure(|| {
        let response = call_now(&mut service).expect("a 503");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key(RETRY_AFTER));
    });
    assert_eq!(
        info.count_total,
        CALLS * RETRY_AFTER_ALLOCATIONS,
        "{info:?}"
    );
    assert_eq!(info.count_current, 0, "a rejection leaks: {info:?}");
}

#[test]
fn inserting_the_first_header_costs_what_the_rejection_costs() {
    // The same figure, from `http` alone: what a rejection allocates is the header map's, not the breaker's.
    let value = http::HeaderValue::from_static("30");
    let info = measure(|| {
        let mut response = Response::new(Empty::<Bytes>::new());
        response.headers_mut().insert(RETRY_AFTER, value.clone());
        std::hint::black_box(response);
    });
    assert_eq!(
        info.count_total,
        CALLS * RETRY_AFTER_ALLOCATIONS,
        "{info:?}"
    );
}

#[test]
fn the_layer_open_path_with_a_fallback_allocates_nothing() {
    let breaker = breaker();
    trip(&breaker);
    let mut service = BreakerLayer::new(breaker)
        .for_http()
        .fallback(|_request: FallbackRequest<()>| Response::new(Empty::<Bytes>::new()))
        .layer(service_fn(ok));
    let info = measure(|| {
        let response = call_now(&mut service).expect("the fallback's response");
        assert_eq!(response.status(), StatusCode::OK);
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}
