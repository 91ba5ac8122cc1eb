//! Behaviour under concurrency and failure: coalescing, stale-while-revalidate, a Redis outage, the memory bound,
//! large bodies. Real axum servers on loopback and real redis-servers.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::collections::HashSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get as get_route;
use redis_fixtures::RedisServer;
use support::scenarios::{self, Backend, slow_origin};
use support::{Calls, get, holds_within, serve};
use tower_redis_cache::{CacheLayer, HttpCache};

async fn backend(server: &RedisServer) -> Backend<redis::aio::ConnectionManager> {
    Backend {
        connection: server.connection_manager().await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_requests_for_a_cold_key_make_one_origin_call() {
    let server = RedisServer::start();
    scenarios::cold_herd(&backend(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_a_hundred_stale_responses_and_refreshes_once() {
    let server = RedisServer::start();
    scenarios::stale_while_revalidate(&backend(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_mid_load_no_request_fails_and_redis_is_used_again_after_it_returns() {
    let mut server = RedisServer::start();
    let calls = Calls::default();
    let cache = HttpCache::builder()
        .redis(server.connection_manager().await)
        .prefix("outage:")
        .memory_capacity(0) // every lookup needs Redis
        .redis_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let address = serve(
        slow_origin(&calls, Duration::ZERO, "max-age=60").layer(CacheLayer::new(cache.clone())),
    )
    .await;

    let load = move |round: usize| async move {
        let mut statuses = Vec::new();
        for i in 0..40 {
            statuses.push(
                get(address, &format!("/slow/{}", (i + round) % 10))
                    .await
                    .status,
            );
        }
        statuses
    };
    let before = load(0).await;
    let during = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for round in 0..10 {
            statuses.extend(load(round).await);
        }
        statuses
    });
    // The load is on Redis before it dies.
    let baseline = cache.stats().redis_hits;
    support::wait_for("hits from Redis under load", Duration::from_secs(5), || {
        cache.stats().redis_hits >= baseline + 10
    })
    .await;
    assert!(!during.is_finished(), "the kill comes mid-load");
    server.kill();
    let during = during.await.unwrap();
    let down = load(3).await;
    assert!(
        before
            .iter()
            .chain(&during)
            .chain(&down)
            .all(|status| *status == StatusCode::OK),
        "every request answered 200 while Redis was gone"
    );
    assert!(cache.stats().redis_errors + cache.stats().redis_timeouts > 0);

    server.restart();
    let hits_before = cache.stats().redis_hits;
    assert!(
        holds_within(Duration::from_secs(10), || async {
            get(address, "/slow/back").await;
            cache.stats().redis_hits > hits_before
        })
        .await,
        "the cache returned to Redis on its own"
    );
}

#[tokio::test]
async fn the_memory_tier_stays_within_its_bound() {
    let calls = Calls::default();
    let capacity = 64 * 1024;
    let cache = HttpCache::builder()
        .memory_capacity(capacity)
        .build()
        .unwrap();
    let calls_in = calls.clone();
    let app = Router::new().route(
        "/blob/{n}",
        get_route(move |Path(n): Path<u32>| {
            let calls = calls_in.clone();
            async move {
                calls.bump();
                (
                    [("cache-control", "max-age=60")],
                    format!("{n:04}").repeat(1024),
                )
            }
        }),
    );
    let address = serve(app.layer(CacheLayer::new(cache.clone()))).await;
    for n in 0..100 {
        assert_eq!(get(address, &format!("/blob/{n}")).await.body.len(), 4096);
    }
    let stats = cache.stats();
    assert!(
        stats.memory_bytes <= capacity,
        "{} bytes held",
        stats.memory_bytes
    );
    assert!(
        stats.memory_bytes > capacity / 2,
        "the tier is used: {} bytes",
        stats.memory_bytes
    );
    assert!(stats.memory_entries < 100);
}

#[tokio::test]
async fn bodies_over_the_limit_stream_through_uncached_and_smaller_streams_are_stored() {
    let calls = Calls::default();
    let cache = HttpCache::builder().build().unwrap();
    let (sized, streamed) = (calls.clone(), calls.clone());
    let app = Router::new()
        .route(
            "/sized/{n}",
            get_route(move |Path(n): Path<usize>| {
                let calls = sized.clone();
                async move {
                    calls.bump();
                    ([("cache-control", "max-age=60")], "x".repeat(n))
                }
            }),
        )
        .route(
            "/streamed/{n}",
            get_route(move |Path(n): Path<usize>| {
                let calls = streamed.clone();
                async move {
                    calls.bump();
                    let chunks = (0..n / 100)
                        .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from("y".repeat(100))));
                    let body = Body::from_stream(futures_util::stream::iter(chunks));
                    ([("cache-control", "max-age=60")], body).into_response()
                }
            }),
        );
    let address = serve(app.layer(CacheLayer::new(cache.clone()).max_body_size(1000))).await;

    let big = get(address, "/sized/5000").await;
    assert_eq!(big.body.len(), 5000);
    assert!(
        big.cache_status().contains("detail=too-large"),
        "{}",
        big.cache_status()
    );
    assert!(!get(address, "/sized/5000").await.is_hit());

    let big_stream = get(address, "/streamed/5000").await;
    assert_eq!(big_stream.body.len(), 5000, "the client gets every byte");
    assert!(
        !get(address, "/streamed/5000").await.is_hit(),
        "a stream past the limit is not stored"
    );

    assert_eq!(get(address, "/streamed/800").await.body.len(), 800);
    let small = get(address, "/streamed/800").await;
    assert!(small.is_hit());
    assert_eq!(small.body, "y".repeat(800));
    assert_eq!(calls.get(), 5);
}

#[derive(Clone)]
struct Tenant(&'static str);

#[tokio::test]
async fn request_extensions_and_path_parameters_survive_the_layer() {
    let cache = HttpCache::builder().build().unwrap();
    let app = Router::new()
        .route(
            "/tenants/{id}",
            get_route(
                |Path(id): Path<u32>, Extension(tenant): Extension<Tenant>| async move {
                    (
                        [("cache-control", "max-age=60")],
                        format!("{} {id}", tenant.0),
                    )
                },
            )
            .layer(CacheLayer::new(cache.clone())),
        )
        .layer(axum::Extension(Tenant("acme")));
    let address = serve(app).await;
    assert_eq!(get(address, "/tenants/7").await.body, "acme 7");
    let hit = get(address, "/tenants/7").await;
    assert!(hit.is_hit());
    assert_eq!(hit.body, "acme 7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fill_lock_makes_one_origin_call_across_two_instances() {
    let server = RedisServer::start();
    for (locked, most) in [(true, 1), (false, 2)] {
        let calls = Calls::default();
        let mut addresses = Vec::new();
        let prefix = format!("lock-{locked}:");
        for _ in 0..2 {
            let mut builder = HttpCache::builder()
                .redis(server.connection_manager().await)
                .prefix(prefix.clone());
            if locked {
                builder = builder.fill_lock(Duration::from_secs(3));
            }
            let cache = builder.build().unwrap();
            addresses.push(
                serve(
                    slow_origin(&calls, Duration::from_millis(300), "max-age=60")
                        .layer(CacheLayer::new(cache.clone())),
                )
                .await,
            );
        }
        let replies =
            futures_util::future::join_all((0..40).map(|i| get(addresses[i % 2], "/slow/shared")))
                .await;
        assert!(replies.iter().all(|reply| reply.status == StatusCode::OK));
        // Unlocked, each instance fills once (the contrast that shows the lock at work).
        assert_eq!(calls.get(), most, "locked={locked}");
        let bodies: HashSet<_> = replies.iter().map(|reply| reply.body.clone()).collect();
        assert_eq!(bodies.len(), calls.get(), "locked={locked}");
    }
}
