//! The layer with a real tonic client and server over loopback: trailers-only replies, status in trailers, a
//! stream dropped mid-way, and rejections that tonic sees as a proper `Status`.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::Duration;

use grpc_echo::{EchoClient, EchoRequest, EchoServer, StreamRequest};
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceBuilder;
use tower_breaker::{BreakerLayer, BreakerStats, CircuitBreaker, State};

fn assert_accounting(stats: &BreakerStats) {
    assert_eq!(
        stats.requests,
        stats.successes + stats.failures + stats.ignored + stats.rejects,
        "{stats:#?}"
    );
}

fn breaker(failures: u32) -> CircuitBreaker {
    CircuitBreaker::builder()
        .name("echo")
        .consecutive_failures(failures)
        .open_for(Duration::from_secs(30))
        .build()
        .unwrap()
}

type GuardedChannel =
    tower_breaker::Breaker<Channel, tower_breaker::AutoClassifier, tower_breaker::NoFallback>;

async fn guarded_client(breaker: &CircuitBreaker) -> EchoClient<GuardedChannel> {
    let (address, _server) = grpc_echo::serve(EchoServer::new()).await;
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    EchoClient::new(
        ServiceBuilder::new()
            .layer(BreakerLayer::new(breaker.clone()))
            .service(channel),
    )
}

fn say(fail_with: Code) -> EchoRequest {
    EchoRequest {
        message: "hi".to_owned(),
        fail_with: fail_with as i32,
        delay_ms: 0,
    }
}

#[tokio::test]
async fn trailers_only_failures_open_the_breaker_and_rejections_reach_tonic_as_unavailable() {
    let breaker = breaker(3);
    let mut client = guarded_client(&breaker).await;
    assert_eq!(
        client
            .say(say(Code::Ok))
            .await
            .unwrap()
            .into_inner()
            .message,
        "hi"
    );
    for _ in 0..3 {
        assert_eq!(
            client.say(say(Code::Unavailable)).await.unwrap_err().code(),
            Code::Unavailable
        );
    }
    assert_eq!(breaker.state(), State::Open);
    let rejected = client.say(say(Code::Ok)).await.unwrap_err();
    assert_eq!(rejected.code(), Code::Unavailable);
    assert_eq!(rejected.message(), "circuit breaker is open");
    let stats = breaker.stats();
    assert_eq!((stats.successes, stats.failures, stats.rejects), (1, 3, 1));
    assert_accounting(&stats);
}

#[tokio::test]
async fn codes_that_say_the_service_answered_are_not_failures() {
    let breaker = breaker(1);
    let mut client = guarded_client(&breaker).await;
    for code in [
        Code::NotFound,
        Code::InvalidArgument,
        Code::PermissionDenied,
    ] {
        assert_eq!(client.say(say(code)).await.unwrap_err().code(), code);
    }
    assert_eq!(
        client.say(say(Code::Cancelled)).await.unwrap_err().code(),
        Code::Cancelled
    );
    let stats = breaker.stats();
    assert_eq!((stats.successes, stats.ignored, stats.failures), (3, 1, 0));
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test]
async fn a_status_in_the_trailers_is_classified_at_the_end_of_the_stream() {
    let breaker = breaker(2);
    let mut client = guarded_client(&breaker).await;
    let request = StreamRequest {
        count: 2,
        fail_with: Code::Internal as i32,
        interval_ms: 0,
    };
    let mut stream = client.stream(request).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().message, "0");
    assert_eq!(
        breaker.stats().failures,
        0,
        "nothing is known until the trailers arrive"
    );
    assert_eq!(stream.message().await.unwrap().unwrap().message, "1");
    assert_eq!(stream.message().await.unwrap_err().code(), Code::Internal);
    assert_eq!(breaker.stats().failures, 1);

    let ok = StreamRequest {
        count: 3,
        fail_with: 0,
        interval_ms: 0,
    };
    let mut stream = client.stream(ok).await.unwrap().into_inner();
    let mut received = 0;
    while stream.message().await.unwrap().is_some() {
        received += 1;
    }
    assert_eq!(received, 3);
    let stats = breaker.stats();
    assert_eq!((stats.successes, stats.failures), (1, 1));
    assert_eq!(stats.consecutive_failures, 0);
    assert_accounting(&stats);
}

#[tokio::test]
async fn a_stream_dropped_mid_way_is_counted_as_cancelled_not_as_a_failure() {
    let breaker = breaker(1);
    let mut client = guarded_client(&breaker).await;
    let request = StreamRequest {
        count: 50,
        fail_with: Code::Unavailable as i32,
        interval_ms: 20,
    };
    let mut stream = client.stream(request).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().message, "0");
    drop(stream);
    let stats = breaker.stats();
    assert_eq!((stats.cancelled, stats.ignored, stats.failures), (1, 1, 0));
    assert_eq!(breaker.state(), State::Closed);
    assert_accounting(&stats);
}

#[tokio::test]
async fn on_a_tonic_server_an_open_breaker_answers_with_a_trailers_only_unavailable() {
    let breaker = breaker(1);
    let server = EchoServer::new();
    let (address, _task) =
        grpc_echo::serve_with_layer(BreakerLayer::new(breaker.clone()), server.clone()).await;
    let mut client = EchoClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    assert_eq!(
        client.say(say(Code::Unavailable)).await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(breaker.state(), State::Open);
    let rejected = client.say(say(Code::Ok)).await.unwrap_err();
    assert_eq!(rejected.code(), Code::Unavailable);
    assert_eq!(rejected.message(), "circuit breaker is open");
    assert_eq!(
        server.calls(),
        1,
        "the rejected call never reached the service"
    );
}
