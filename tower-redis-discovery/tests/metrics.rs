//! Export through the `metrics` facade (feature `metrics`).
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower_redis_discovery::{Discovery, Instance, MemoryRegistry, Registration};

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
}
