//! Export through the `metrics` facade (feature `metrics`).
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::Duration;

use metrics_util::debugging::DebuggingRecorder;
use redis_fixtures::RedisServer;
use tower_redis_ratelimit::{Policy, RateLimiter};

#[tokio::test]
async fn decisions_are_counted_by_source_and_outcome() {
    let server = RedisServer::start();
    let connection = server.connection_manager().await;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let limiter = metrics::with_local_recorder(&recorder, || {
        RateLimiter::builder()
            .redis(connection)
            .name("api")
            .policy(Policy::new("p", 2, Duration::from_secs(60)).unwrap())
            .build()
            .unwrap()
    });
    for _ in 0..5 {
        limiter.check("k").await;
    }
    let snapshot = snapshotter.snapshot().into_vec();
    let count = |source: &str, outcome: &str| -> Option<String> {
        snapshot.iter().find_map(|(key, _, _, value)| {
            let key = key.key();
            let matches = key.name() == "tower_redis_ratelimit_decisions_total"
                && key
                    .labels()
                    .any(|label| label.key() == "limiter" && label.value() == "api")
                && key
                    .labels()
                    .any(|label| label.key() == "source" && label.value() == source)
                && key
                    .labels()
                    .any(|label| label.key() == "outcome" && label.value() == outcome);
            matches.then(|| format!("{value:?}"))
        })
    };
    assert_eq!(count("redis", "allowed").as_deref(), Some("Counter(2)"));
    assert_eq!(count("redis", "denied").as_deref(), Some("Counter(1)"));
    assert_eq!(count("deny_cache", "denied").as_deref(), Some("Counter(2)"));
}
