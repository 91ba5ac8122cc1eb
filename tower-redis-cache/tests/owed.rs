//! An invalidation that cannot reach Redis is owed, never lost: while it is owed the cache reads nothing from Redis,
//! and it is replayed once Redis answers, so a Redis restarted from a snapshot that still holds the deleted entries
//! serves none of them.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::Response;
use axum::routing::get as get_route;
use redis_fixtures::RedisServer;
use support::{get, holds_within, serve, stored_in_redis};
use tower_redis_cache::{CacheLayer, HttpCache};

/// `/u/{n}`: the record's current version, fresh for a minute and tagged `user-{n}`.
fn origin(version: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route(
            "/u/{n}",
            get_route(
                |Path(n): Path<String>, State(version): State<Arc<AtomicUsize>>| async move {
                    Response::builder()
                        .header("cache-control", "max-age=60")
                        .header("surrogate-key", format!("user-{n}"))
                        .body(Body::from(format!(
                            "user {n} v{}",
                            version.load(Ordering::SeqCst)
                        )))
                        .unwrap()
                },
            ),
        )
        .with_state(version)
}

#[derive(Clone, Copy, Debug)]
enum How {
    Key,
    Tag,
    Prefix,
}

async fn an_invalidation_made_while_redis_was_down_holds_after_it_returns_from_its_snapshot(
    how: How,
) {
    let mut server = RedisServer::start();
    let connection = server.connection_manager().await;
    // No memory tier: every read goes to Redis, so nothing hides what Redis serves.
    let cache = HttpCache::builder()
        .redis(connection.clone())
        .prefix("owed:")
        .memory_capacity(0)
        .build()
        .unwrap();
    let version = Arc::new(AtomicUsize::new(1));
    let address = serve(origin(version.clone()).layer(CacheLayer::new(cache.clone()))).await;

    assert_eq!(get(address, "/u/7").await.body, "user 7 v1");
    let url = "http://test/u/7".to_owned();
    let redis_key = cache.redis_key(&url).unwrap();
    assert!(stored_in_redis(&connection, &redis_key).await);
    let hit = get(address, "/u/7").await;
    assert!(hit.is_hit(), "{}", hit.cache_status());

    // The snapshot holds v1; then Redis goes away and the record changes.
    redis::cmd("SAVE")
        .query_async::<()>(&mut connection.clone())
        .await
        .unwrap();
    server.kill();
    version.store(2, Ordering::SeqCst);
    let invalidated = match how {
        How::Key => cache.invalidate(std::slice::from_ref(&url)).await,
        How::Tag => cache.invalidate_tag("user-7").await,
        How::Prefix => cache.invalidate_prefix("http://test/u/").await,
    };
    assert!(invalidated.is_err(), "Redis is down: {invalidated:?}");
    let stats = cache.stats();
    assert_eq!((stats.invalidations_owed, stats.owed_now), (1, 1));
    assert_eq!(get(address, "/u/7").await.body, "user 7 v2");

    // Back from the snapshot, with v1 in it.
    server.restart();
    let mut probe = server.connection_manager().await;
    let exists: u64 = redis::cmd("EXISTS")
        .arg(&redis_key)
        .query_async(&mut probe)
        .await
        .unwrap();
    assert_eq!(exists, 1, "the snapshot brought the stale entry back");
    // Whether the replay has run yet or not, nothing stale is served.
    for _ in 0..20 {
        let reply = get(address, "/u/7").await;
        assert_eq!(reply.body, "user 7 v2", "{how:?}: {}", reply.cache_status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let paid = holds_within(Duration::from_secs(10), || {
        let cache = cache.clone();
        async move { cache.stats().owed_now == 0 }
    })
    .await;
    assert!(paid, "{how:?}: still owed: {:?}", cache.stats());
    assert_eq!(cache.stats().invalidations_replayed, 1);
    assert!(cache.stats().owed_bypasses > 0);

    // Reading from Redis again: the fresh version is stored and served from there.
    assert_eq!(get(address, "/u/7").await.body, "user 7 v2");
    let served_from_redis = holds_within(Duration::from_secs(5), || async {
        let reply = get(address, "/u/7").await;
        assert_eq!(reply.body, "user 7 v2");
        reply.is_hit()
    })
    .await;
    assert!(served_from_redis, "{how:?}: {:?}", cache.stats());
}

#[tokio::test]
async fn an_invalidation_by_key_is_owed_and_replayed() {
    an_invalidation_made_while_redis_was_down_holds_after_it_returns_from_its_snapshot(How::Key)
        .await;
}

#[tokio::test]
async fn an_invalidation_by_tag_is_owed_and_replayed() {
    an_invalidation_made_while_redis_was_down_holds_after_it_returns_from_its_snapshot(How::Tag)
        .await;
}

#[tokio::test]
async fn an_invalidation_by_prefix_is_owed_and_replayed() {
    an_invalidation_made_while_redis_was_down_holds_after_it_returns_from_its_snapshot(How::Prefix)
        .await;
}

#[tokio::test]
async fn an_invalidation_through_a_stalled_redis_is_owed_and_replayed_when_it_flows_again() {
    let server = RedisServer::start();
    let proxy = redis_fixtures::FaultProxy::in_front_of(&server);
    let connection = proxy
        .client_for(&server)
        .get_connection_manager()
        .await
        .unwrap();
    let cache = HttpCache::builder()
        .redis(connection.clone())
        .prefix("owed-stall:")
        .memory_capacity(0)
        .build()
        .unwrap();
    let version = Arc::new(AtomicUsize::new(1));
    let address = serve(origin(version.clone()).layer(CacheLayer::new(cache.clone()))).await;
    assert_eq!(get(address, "/u/3").await.body, "user 3 v1");
    let redis_key = cache.redis_key("http://test/u/3").unwrap();
    assert!(stored_in_redis(&server.connection_manager().await, &redis_key).await);

    proxy.stall();
    version.store(2, Ordering::SeqCst);
    assert!(cache.invalidate_tag("user-3").await.is_err());
    assert_eq!(cache.stats().owed_now, 1);
    assert_eq!(get(address, "/u/3").await.body, "user 3 v2");
    proxy.pass();
    for _ in 0..20 {
        assert_eq!(get(address, "/u/3").await.body, "user 3 v2");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let paid = holds_within(Duration::from_secs(10), || {
        let cache = cache.clone();
        async move { cache.stats().owed_now == 0 }
    })
    .await;
    assert!(paid, "still owed: {:?}", cache.stats());
}

#[tokio::test]
async fn a_tag_invalidation_that_cannot_reach_redis_drops_what_memory_promoted_from_redis() {
    let mut server = RedisServer::start();
    let connection = server.connection_manager().await;
    let build = |memory: bool| {
        let builder = HttpCache::builder()
            .redis(connection.clone())
            .prefix("owed-promoted:");
        if memory {
            builder
        } else {
            builder.memory_capacity(0)
        }
        .build()
        .unwrap()
    };
    let (filler, reader) = (build(false), build(true));
    let version = Arc::new(AtomicUsize::new(1));
    let filling = serve(origin(version.clone()).layer(CacheLayer::new(filler.clone()))).await;
    let reading = serve(origin(version.clone()).layer(CacheLayer::new(reader.clone()))).await;

    // The reader never fills /u/5 itself: it finds it in Redis and keeps a copy in memory, without its tags.
    assert_eq!(get(filling, "/u/5").await.body, "user 5 v1");
    let redis_key = filler.redis_key("http://test/u/5").unwrap();
    assert!(stored_in_redis(&connection, &redis_key).await);
    assert_eq!(get(reading, "/u/5").await.body, "user 5 v1");
    assert_eq!(reader.stats().redis_hits, 1);
    let from_memory = get(reading, "/u/5").await;
    assert!(from_memory.is_hit());
    assert_eq!(reader.stats().memory_hits, 1);

    server.kill();
    version.store(2, Ordering::SeqCst);
    assert!(reader.invalidate_tag("user-5").await.is_err());
    let reply = get(reading, "/u/5").await;
    assert_eq!(reply.body, "user 5 v2", "{}", reply.cache_status());
    assert_eq!(reader.stats().memory_hits, 1);
}

#[tokio::test]
async fn a_soft_purge_through_a_stalled_redis_is_owed_as_a_hard_one_and_replayed() {
    let server = RedisServer::start();
    let proxy = redis_fixtures::FaultProxy::in_front_of(&server);
    let connection = proxy
        .client_for(&server)
        .get_connection_manager()
        .await
        .unwrap();
    let cache = HttpCache::builder()
        .redis(connection.clone())
        .prefix("owed-soft:")
        .memory_capacity(0)
        .build()
        .unwrap();
    let version = Arc::new(AtomicUsize::new(1));
    let address = serve(origin(version.clone()).layer(CacheLayer::new(cache.clone()))).await;
    assert_eq!(get(address, "/u/4").await.body, "user 4 v1");
    let redis_key = cache.redis_key("http://test/u/4").unwrap();
    let direct = server.connection_manager().await;
    assert!(stored_in_redis(&direct, &redis_key).await);

    proxy.stall();
    version.store(2, Ordering::SeqCst);
    let purged = cache
        .invalidate_tag_with("user-4", tower_redis_cache::Purge::Soft)
        .await;
    assert!(purged.is_err(), "Redis is stalled: {purged:?}");
    assert_eq!(cache.stats().owed_now, 1);
    // While owed, Redis is not read: the origin answers.
    assert_eq!(get(address, "/u/4").await.body, "user 4 v2");
    proxy.pass();
    let paid = holds_within(Duration::from_secs(10), || {
        let cache = cache.clone();
        async move { cache.stats().owed_now == 0 }
    })
    .await;
    assert!(paid, "still owed: {:?}", cache.stats());
    // Replayed as a hard purge: the old entry is gone from Redis, never served again.
    let reply = get(address, "/u/4").await;
    assert_eq!(reply.body, "user 4 v2", "{}", reply.cache_status());
}
