//! A Sentinel failover under load: the primary is killed while the layer serves requests through a
//! `SentinelConnection`; no request fails (the failure policy covers the gap), and decisions come from Redis again,
//! on the promoted replica, after it.
#![cfg(feature = "sentinel")]
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use redis_fixtures::RedisSentinel;
use test_support::serve;
use tower_redis_ratelimit::key::Header;
use tower_redis_ratelimit::sentinel::{SentinelConfig, SentinelConnection};
use tower_redis_ratelimit::{DecisionSource, FailurePolicy, Policy, RateLimitLayer, RateLimiter};

async fn send(address: SocketAddr, api_key: &str) -> (StatusCode, String) {
    let reply = test_support::send(address, "GET", "/", &[("x-api-key", api_key)]).await;
    (reply.status, reply.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_load_fails_no_request_and_decisions_come_from_redis_again() {
    let mut set = RedisSentinel::start();
    let promoted = set.replica_port();
    let connection = SentinelConnection::connect(
        &set.sentinel_urls(),
        set.master_name(),
        SentinelConfig::default(),
    )
    .await
    .unwrap();
    let limiter = RateLimiter::builder()
        .redis(connection)
        .prefix("sentinel-test:")
        .policy(Policy::new("api", 1_000_000, Duration::from_secs(60)).unwrap())
        .on_redis_failure(FailurePolicy::FailOpen)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(
            limiter.clone(),
            Header::try_new("x-api-key").unwrap(),
        ));
    let address = serve(app).await;

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|worker| {
            let (stop, served) = (stop.clone(), served.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let reply = send(address, &format!("client-{worker}")).await;
                    assert_eq!(reply, (StatusCode::OK, "ok".to_owned()));
                    served.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(40);
    while served.load(Ordering::Relaxed) < 50 {
        assert!(Instant::now() < deadline, "the load did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        limiter.stats().from_source(DecisionSource::FailOpen),
        (0, 0)
    );
    set.kill_primary();

    // The kill is felt (decisions fall back to the failure policy), then Redis decides again.
    while limiter.stats().from_source(DecisionSource::FailOpen).0 == 0 {
        assert!(Instant::now() < deadline, "the kill was never felt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        let decision = limiter.check("probe").await;
        if decision.source == DecisionSource::Redis {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "decisions never came from Redis again; last source {:?}",
            decision.source
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let served_during = served.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.expect("no request failed during the failover");
    }
    assert!(served_during > 50);
    assert_eq!(set.wait_for_new_primary(Duration::from_secs(5)), promoted);
    assert!(
        set.primary().command_calls("evalsha") > 0,
        "the promoted replica runs the limiter's script"
    );
}
