//! Export through the `metrics` facade (feature `metrics`).
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::Service;
use tower_redis_discovery::{
    Discovery, Ejecting, EjectionOptions, Instance, MemoryRegistry, RedisRegistry, Registration,
    Registry,
};

#[tokio::test]
async fn watches_and_heartbeats_are_exported() {
    // The background tasks record through the global recorder: this test binary installs it once.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let registry = MemoryRegistry::new(Duration::from_secs(3));
    let registration = Registration::start(
        registry.clone(),
        Instance::new("metered", "127.0.0.1", 4000),
    )
    .unwrap();
    registration.ready();
    let discovery = Discovery::builder()
        .interval(Duration::from_millis(20))
        .registry(registry)
        .service("metered")
        .build()
        .unwrap();
    let watch = discovery.handle();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while watch.stats().instances < 1 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let snapshot = snapshotter.snapshot().into_vec();
    let value = |name: &str, label: Option<(&str, &str)>| {
        snapshot.iter().find_map(|(key, _, _, value)| {
            let key = key.key();
            let matches = key.name() == name
                && key
                    .labels()
                    .any(|l| l.key() == "service" && l.value() == "metered")
                && label.is_none_or(|(k, v)| key.labels().any(|l| l.key() == k && l.value() == v));
            matches.then_some(value)
        })
    };
    assert!(
        matches!(value("tower_redis_discovery_polls_total", Some(("outcome", "ok"))), Some(DebugValue::Counter(n)) if *n >= 1)
    );
    assert!(matches!(
        value(
            "tower_redis_discovery_changes_total",
            Some(("kind", "insert"))
        ),
        Some(DebugValue::Counter(1))
    ));
    assert!(
        matches!(value("tower_redis_discovery_instances", None), Some(DebugValue::Gauge(g)) if g.into_inner() == 1.0)
    );
    assert!(
        matches!(value("tower_redis_discovery_heartbeats_total", Some(("outcome", "ok"))), Some(DebugValue::Counter(n)) if *n >= 1)
    );
    assert!(registration.stats().heartbeats >= 1);
    // Registered once when the watch was built, so even the outcome that never happened is there (at 0): nothing
    // is registered, or its labels built, on a poll.
    assert!(matches!(
        value(
            "tower_redis_discovery_polls_total",
            Some(("outcome", "error"))
        ),
        Some(DebugValue::Counter(0))
    ));

    // The Redis registry's calls, reported as every crate reports its Redis calls.
    let server = redis_fixtures::RedisServer::start();
    let redis = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .prefix("metered:")
        .build()
        .unwrap();
    redis
        .register(&Instance::new("metered", "127.0.0.1", 4001))
        .await
        .unwrap();
    assert_eq!(redis.instances("metered").await.unwrap().len(), 1);
    let stats = redis.redis_stats();
    assert!(stats.calls >= 3, "{stats:?}"); // INFO, the write, the reads
    assert_eq!((stats.errors, stats.timeouts), (0, 0), "{stats:?}");
    let snapshot = snapshotter.snapshot().into_vec();
    let calls = snapshot.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        (key.name() == "tower_redis_calls_total"
            && key
                .labels()
                .any(|l| l.key() == "client" && l.value() == "registry:metered:")
            && key
                .labels()
                .any(|l| l.key() == "outcome" && l.value() == "ok"))
        .then_some(value)
    });
    assert!(
        matches!(calls, Some(DebugValue::Counter(n)) if *n >= 3),
        "{calls:?}"
    );
    assert!(snapshot.iter().any(|(key, _, _, value)| {
        key.key().name() == "tower_redis_call_duration_seconds"
            && matches!(value, DebugValue::Histogram(samples) if !samples.is_empty())
    }));

    // Passive health: per-instance breakers export nothing under their instance id (unbounded labels); the
    // ejection is counted per service.
    let failing = Instance::new("ejectable", "127.0.0.1", 4002);
    let options = EjectionOptions::builder()
        .consecutive_failures(2)
        .build()
        .unwrap();
    let mut endpoint = Ejecting::new(
        tower::service_fn(|_: ()| async {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder().status(503).body(()).unwrap(),
            )
        }),
        &failing,
        options,
    );
    for _ in 0..2 {
        let response = tower::ServiceExt::ready(&mut endpoint)
            .await
            .unwrap()
            .call(())
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
    }
    assert_eq!(endpoint.breaker().state(), tower_breaker::State::Open);
    let snapshot = snapshotter.snapshot().into_vec();
    assert!(
        !snapshot
            .iter()
            .any(|(key, _, _, _)| key.key().labels().any(|l| l.value() == failing.id)),
        "no metric is labelled with an instance id"
    );
    let ejections = snapshot.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        (key.name() == "tower_redis_discovery_ejections_total"
            && key
                .labels()
                .any(|l| l.key() == "service" && l.value() == "ejectable"))
        .then_some(value)
    });
    assert!(
        matches!(ejections, Some(DebugValue::Counter(1))),
        "{ejections:?}"
    );
}
