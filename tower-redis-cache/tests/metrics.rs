//! Export through the `metrics` facade (feature `metrics`).
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use axum::Router;
use axum::routing::get as get_route;
use metrics_util::debugging::DebuggingRecorder;
use support::{get, serve};
use tower_redis_cache::{CacheLayer, HttpCache};

#[tokio::test]
async fn hits_misses_and_stores_are_counted_per_cache() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let cache = metrics::with_local_recorder(&recorder, || {
        HttpCache::builder().name("edge").build().unwrap()
    });
    let app = Router::new().route(
        "/",
        get_route(|| async { ([("cache-control", "max-age=60")], "x") }),
    );
    let address = serve(app.layer(CacheLayer::new(cache.clone()))).await;
    for _ in 0..3 {
        get(address, "/").await;
    }
    let snapshot = snapshotter.snapshot().into_vec();
    let count = |event: &str| -> Option<String> {
        snapshot.iter().find_map(|(key, _, _, value)| {
            let key = key.key();
            let matches = key.name() == "tower_redis_cache_events_total"
                && key
                    .labels()
                    .any(|label| label.key() == "cache" && label.value() == "edge")
                && key
                    .labels()
                    .any(|label| label.key() == "event" && label.value() == event);
            matches.then(|| format!("{value:?}"))
        })
    };
    assert_eq!(count("misses").as_deref(), Some("Counter(1)"));
    assert_eq!(count("stores").as_deref(), Some("Counter(1)"));
    assert_eq!(count("memory_hits").as_deref(), Some("Counter(2)"));
    assert_eq!(count("memory_lookups").as_deref(), Some("Counter(3)"));
    assert_eq!(count("redis_hits").as_deref(), Some("Counter(0)"));
}
