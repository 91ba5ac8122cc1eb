//! Soft purge through the layer on real axum servers, with a real redis-server as the shared tier: invalidation by
//! key, prefix or tag with `Purge::Soft` marks entries stale in both tiers and on every instance instead of deleting
//! them; the next request revalidates (stale while one refetch runs where stale-while-revalidate allows, otherwise
//! waiting for that one refetch); a hard purge still deletes. Across instances: once the purge call returns, no
//! instance serves a fresh hit for a purged key, bounded by pub/sub delivery.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Response;
use axum::routing::get as get_route;
use redis::AsyncCommands;
use redis_fixtures::RedisServer;
use support::{Calls, get, serve, subscribed, wait_for};
use test_support::{Reply, send};
use tower_breaker::ManualClock;
use tower_redis_cache::{CacheLayer, HttpCache, Purge};

/// An origin at `/items/{n}` whose answers carry `cache_control`, the tag `items` and an ETag, name their call,
/// and take `delay` to come.
fn origin(calls: &Calls, cache_control: &'static str, delay: Duration) -> Router {
    let calls = calls.clone();
    Router::new().route(
        "/items/{n}",
        get_route(move || {
            let calls = calls.clone();
            async move {
                tokio::time::sleep(delay).await;
                let call = calls.bump();
                Response::builder()
                    .header("cache-control", cache_control)
                    .header("surrogate-key", "items")
                    .header("etag", format!("\"{call}\""))
                    .body(Body::from(format!("call {call}")))
                    .unwrap()
            }
        }),
    )
}

const KEY: &str = "http://test/items/1";

/// A fresh hit: `hit` with a positive ttl and no detail (a stale answer says why it was served).
fn fresh_hit(reply: &Reply) -> bool {
    let status = reply.cache_status();
    reply.is_hit() && !status.contains("ttl=-") && !status.contains("detail=")
}

async fn primed(
    cache: &HttpCache,
    cache_control: &'static str,
    delay: Duration,
) -> (SocketAddr, Calls) {
    primed_in(cache, cache_control, delay, None).await
}

/// Serves the origin through `cache` and stores `/items/1`; with `redis`, waits for the background write to land
/// under `entry` before checking the hit.
async fn primed_in(
    cache: &HttpCache,
    cache_control: &'static str,
    delay: Duration,
    redis: Option<(&redis::aio::ConnectionManager, &str)>,
) -> (SocketAddr, Calls) {
    let calls = Calls::default();
    let address =
        serve(origin(&calls, cache_control, delay).layer(CacheLayer::new(cache.clone()))).await;
    assert_eq!(get(address, "/items/1").await.body, "call 1");
    if let Some((connection, entry)) = redis {
        assert!(support::stored_in_redis(connection, entry).await);
    }
    assert!(fresh_hit(&get(address, "/items/1").await));
    (address, calls)
}

#[tokio::test]
async fn with_stale_while_revalidate_the_next_requests_get_the_stale_entry_while_one_refetch_runs()
{
    let clock = ManualClock::new();
    let cache = HttpCache::builder().clock(clock.clone()).build().unwrap();
    let (address, calls) = primed(
        &cache,
        "max-age=60, stale-while-revalidate=30",
        Duration::ZERO,
    )
    .await;

    assert_eq!(
        cache
            .invalidate_with(&[KEY.to_owned()], Purge::Soft)
            .await
            .unwrap(),
        1
    );
    // A fill sent in the purge's own millisecond is not stored (it may predate the change): let one pass.
    clock.advance(Duration::from_millis(1));
    assert_eq!(cache.stats().memory_entries, 1, "kept, not deleted");
    let stale = futures_util::future::join_all((0..5).map(|_| get(address, "/items/1"))).await;
    for reply in &stale {
        assert_eq!(reply.body, "call 1", "the stale entry, at once");
        assert!(
            reply.cache_status().contains("ttl=-")
                && reply
                    .cache_status()
                    .ends_with("detail=stale-while-revalidate"),
            "{}",
            reply.cache_status()
        );
    }
    wait_for("the one background refetch", Duration::from_secs(5), || {
        calls.get() == 2
    })
    .await;
    let refreshed = get(address, "/items/1").await;
    assert_eq!(refreshed.body, "call 2");
    assert!(fresh_hit(&refreshed), "{}", refreshed.cache_status());
    assert_eq!(calls.get(), 2, "exactly one refetch");
}

#[tokio::test]
async fn without_stale_while_revalidate_the_next_requests_wait_for_one_refetch() {
    let cache = HttpCache::builder().build().unwrap();
    // The origin takes a moment, so the requests after the purge are all waiting while it answers.
    let (address, calls) = primed(&cache, "max-age=60", Duration::from_millis(200)).await;

    cache
        .invalidate_prefix_with("http://test/items/", Purge::Soft)
        .await
        .unwrap();
    let replies = futures_util::future::join_all((0..5).map(|_| get(address, "/items/1"))).await;
    for reply in &replies {
        assert_eq!(reply.body, "call 2", "{}", reply.cache_status());
    }
    assert!(
        replies[0].cache_status().contains("fwd=stale"),
        "revalidated a stored, stale entry: {}",
        replies[0].cache_status()
    );
    assert_eq!(calls.get(), 2, "one refetch for all five");
}

#[tokio::test]
async fn a_hard_purge_still_deletes() {
    let cache = HttpCache::builder().build().unwrap();
    let (address, calls) = primed(
        &cache,
        "max-age=60, stale-while-revalidate=30",
        Duration::ZERO,
    )
    .await;
    cache
        .invalidate_tag_with("items", Purge::Hard)
        .await
        .unwrap();
    assert_eq!(cache.stats().memory_entries, 0);
    let after = get(address, "/items/1").await;
    assert_eq!(after.body, "call 2", "no stale copy left to serve");
    assert!(
        after.cache_status().contains("fwd=uri-miss"),
        "{}",
        after.cache_status()
    );
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn in_redis_the_entry_stays_and_is_read_back_stale() {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let connection = server.connection_manager().await;
    // No memory tier: every answer is read from Redis.
    let cache = HttpCache::builder()
        .memory_capacity(0)
        .redis(connection.clone())
        .prefix("soft:")
        .clock(clock.clone())
        .build()
        .unwrap();
    let entry = "soft:e:{http://test/items/1}";
    let (address, calls) = primed_in(
        &cache,
        "max-age=60",
        Duration::ZERO,
        Some((&connection, entry)),
    )
    .await;

    assert_eq!(
        cache
            .invalidate_tag_with("items", Purge::Soft)
            .await
            .unwrap(),
        1
    );
    clock.advance(Duration::from_millis(1));
    let mut redis = connection.clone();
    let (exists, purged): (bool, Option<u64>) = redis::pipe()
        .exists(entry)
        .hget(entry, "~purged")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(exists && purged.is_some(), "kept and marked");

    let after = get(address, "/items/1").await;
    assert_eq!(after.body, "call 2");
    assert!(
        after.cache_status().contains("fwd=stale"),
        "{}",
        after.cache_status()
    );
    // The refetched entry is newer than the mark: fresh again, once its background write has landed.
    let written = support::holds_within(Duration::from_secs(5), || {
        let mut redis = connection.clone();
        async move {
            let stored: Vec<u8> = redis.hget(entry, "~").await.unwrap_or_default();
            String::from_utf8_lossy(&stored).contains("call 2")
        }
    })
    .await;
    assert!(written, "the refetched entry reached Redis");
    let again = get(address, "/items/1").await;
    assert!(fresh_hit(&again), "{}", again.cache_status());
    assert_eq!(again.body, "call 2");
    assert_eq!(calls.get(), 2);

    // A hard purge deletes it from Redis.
    cache.invalidate(&[KEY.to_owned()]).await.unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(entry)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn across_instances_no_fresh_hit_once_the_purge_returns_bounded_by_pub_sub() {
    let server = RedisServer::start();
    let instance = |memory: u64| {
        let server = &server;
        async move {
            HttpCache::builder()
                .memory_capacity(memory)
                .redis(server.connection_manager().await)
                .subscribe(server.client())
                .prefix("fleet:")
                .build()
                .unwrap()
        }
    };
    let (a, b, redis_only) = (
        instance(1 << 20).await,
        instance(1 << 20).await,
        instance(0).await,
    );
    subscribed(&[&a, &b]).await;
    let calls = Calls::default();
    let serve_with = |cache: &HttpCache| {
        serve(origin(&calls, "max-age=600", Duration::ZERO).layer(CacheLayer::new(cache.clone())))
    };
    let (at_a, at_b, at_redis) = (
        serve_with(&a).await,
        serve_with(&b).await,
        serve_with(&redis_only).await,
    );

    get(at_a, "/items/1").await;
    support::stored_in_redis(
        &server.connection_manager().await,
        "fleet:e:{http://test/items/1}",
    )
    .await;
    // B holds it in memory too, promoted from Redis.
    assert!(get(at_b, "/items/1").await.is_hit());
    assert!(fresh_hit(&get(at_b, "/items/1").await));
    assert_eq!(b.stats().memory_entries, 1);
    assert_eq!(calls.get(), 1);

    a.invalidate_tag_with("items", Purge::Soft).await.unwrap();
    // At once where the purge ran and where Redis is read; on B once the message has arrived.
    let no_fresh = |address: SocketAddr| async move {
        !fresh_hit(
            &send(
                address,
                "GET",
                "/items/1",
                &[("cache-control", "only-if-cached, max-stale")],
            )
            .await,
        )
    };
    assert!(no_fresh(at_a).await, "the purging instance");
    assert!(no_fresh(at_redis).await, "an instance reading Redis");
    assert!(
        support::holds_within(Duration::from_secs(2), || no_fresh(at_b)).await,
        "B still served a fresh hit 2 s after the purge returned"
    );
    // And B's stale copy is still there (soft), served where the request allows staleness.
    let allowed = send(at_b, "GET", "/items/1", &[("cache-control", "max-stale")]).await;
    assert_eq!(allowed.body, "call 1");
    assert!(
        allowed.cache_status().ends_with("detail=max-stale"),
        "{}",
        allowed.cache_status()
    );
}

#[tokio::test]
async fn a_purge_request_with_soft_purge_marks_stale_and_without_it_deletes() {
    let cache = HttpCache::builder().build().unwrap();
    let calls = Calls::default();
    let layer = CacheLayer::new(cache.clone()).purge(|_| true);
    let address = serve(
        origin(
            &calls,
            "max-age=60, stale-while-revalidate=30",
            Duration::ZERO,
        )
        .layer(layer),
    )
    .await;
    get(address, "/items/1").await;

    let soft = send(address, "PURGE", "/items/1", &[("soft-purge", "1")]).await;
    assert!(
        soft.cache_status().ends_with("detail=soft-purged"),
        "{}",
        soft.cache_status()
    );
    assert_eq!(cache.stats().memory_entries, 1);
    let stale = get(address, "/items/1").await;
    assert!(
        stale
            .cache_status()
            .ends_with("detail=stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    wait_for("the refetch", Duration::from_secs(5), || calls.get() == 2).await;

    let hard = send(address, "PURGE", "/items/1", &[]).await;
    assert!(
        hard.cache_status().ends_with("detail=purged"),
        "{}",
        hard.cache_status()
    );
    assert_eq!(cache.stats().memory_entries, 0);
}

#[tokio::test]
async fn a_replica_that_has_not_seen_the_mark_serves_no_fresh_hit_either() {
    let primary = RedisServer::start();
    // A server that never receives the writes: it keeps the entry as it was before the purge.
    let lagging = RedisServer::start();
    let cache = HttpCache::builder()
        .memory_capacity(0)
        .redis(primary.connection_manager().await)
        .read_replica(lagging.connection_manager().await)
        .prefix("lag:")
        .build()
        .unwrap();
    let entry = "lag:e:{http://test/items/1}";
    let mut from = primary.connection_manager().await;
    let calls = Calls::default();
    let address =
        serve(origin(&calls, "max-age=600", Duration::ZERO).layer(CacheLayer::new(cache.clone())))
            .await;
    get(address, "/items/1").await;
    assert!(support::stored_in_redis(&from, entry).await);
    // Copy the entry to the lagging server, as a replica would have had it.
    let dump: Vec<u8> = redis::cmd("DUMP")
        .arg(entry)
        .query_async(&mut from)
        .await
        .unwrap();
    let mut to = lagging.connection_manager().await;
    let () = redis::cmd("RESTORE")
        .arg(entry)
        .arg(0)
        .arg(dump)
        .query_async(&mut to)
        .await
        .unwrap();
    let before = get(address, "/items/1").await;
    assert!(fresh_hit(&before), "{}", before.cache_status());
    assert_eq!(
        cache.stats().replica_hits,
        1,
        "answered by the lagging server"
    );

    cache
        .invalidate_with(&[KEY.to_owned()], Purge::Soft)
        .await
        .unwrap();
    // The lagging server still holds the unmarked entry; this instance knows of the purge.
    let after = send(
        address,
        "GET",
        "/items/1",
        &[("cache-control", "only-if-cached, max-stale")],
    )
    .await;
    assert!(!fresh_hit(&after), "{}", after.cache_status());
    assert_eq!(after.body, "call 1");
    assert_eq!(calls.get(), 1);
}
