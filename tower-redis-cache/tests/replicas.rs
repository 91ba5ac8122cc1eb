//! Read replicas: reads spread to a real replica (`replicaof`), misses and failures fall back to the primary.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use redis_fixtures::RedisServer;
use support::scenarios::slow_origin;
use support::{Calls, get, holds_within, serve, stored_in_redis};
use tower_redis_cache::{CacheLayer, HttpCache};

/// A replica of `primary`, once its replication link is up.
async fn replica_of(primary: &RedisServer) -> RedisServer {
    let port = primary.port().to_string();
    let replica = RedisServer::builder()
        .args(&["--replicaof", "127.0.0.1", &port])
        .start();
    let mut connection = replica.connection_manager().await;
    assert!(
        holds_within(Duration::from_secs(10), || {
            let mut connection = connection.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                info.contains("master_link_status:up")
            }
        })
        .await,
        "the replica syncs"
    );
    let _: () = redis::cmd("PING")
        .query_async(&mut connection)
        .await
        .unwrap();
    replica
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_read_from_the_replica_and_writes_go_to_the_primary() {
    let primary = RedisServer::start();
    let replica = replica_of(&primary).await;
    let calls = Calls::default();
    let cache = HttpCache::builder()
        .redis(primary.connection_manager().await)
        .read_replica(replica.connection_manager().await)
        .memory_capacity(0)
        .build()
        .unwrap();
    let address = serve(
        slow_origin(&calls, Duration::ZERO, "max-age=60").layer(CacheLayer::new(cache.clone())),
    )
    .await;
    get(address, "/slow/a").await;
    let key = cache.redis_key("http://test/slow/a").unwrap();
    assert!(
        stored_in_redis(&replica.connection_manager().await, &key).await,
        "replicated"
    );

    replica.reset_stats();
    primary.reset_stats();
    for _ in 0..20 {
        assert!(get(address, "/slow/a").await.is_hit());
    }
    assert_eq!(calls.get(), 1);
    assert_eq!(cache.stats().replica_hits, 20);
    assert_eq!(replica.command_calls("hmget"), 20);
    assert_eq!(
        primary.command_calls("hmget"),
        0,
        "the primary serves no hit"
    );
}

#[tokio::test]
async fn a_replica_that_lags_is_a_miss_there_and_a_hit_on_the_primary() {
    let primary = RedisServer::start();
    // A server that never receives the writes: the worst lag there is.
    let lagging = RedisServer::start();
    let calls = Calls::default();
    let cache = HttpCache::builder()
        .redis(primary.connection_manager().await)
        .read_replica(lagging.connection_manager().await)
        .memory_capacity(0)
        .build()
        .unwrap();
    let address = serve(
        slow_origin(&calls, Duration::ZERO, "max-age=60").layer(CacheLayer::new(cache.clone())),
    )
    .await;
    get(address, "/slow/b").await;
    let key = cache.redis_key("http://test/slow/b").unwrap();
    assert!(stored_in_redis(&primary.connection_manager().await, &key).await);
    for _ in 0..10 {
        let reply = get(address, "/slow/b").await;
        assert!(reply.is_hit());
        assert_eq!(reply.body, "b call 1");
    }
    assert_eq!(calls.get(), 1);
    let stats = cache.stats();
    // Eleven fallbacks: the ten hits and the first, cold, miss.
    let counts = (
        stats.replica_hits,
        stats.replica_fallbacks,
        stats.redis_hits,
    );
    assert_eq!(counts, (0, 11, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_fails_no_request() {
    let primary = RedisServer::start();
    let mut replica = replica_of(&primary).await;
    let calls = Calls::default();
    let cache = HttpCache::builder()
        .redis(primary.connection_manager().await)
        .read_replica(replica.connection_manager().await)
        .memory_capacity(0)
        .redis_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let address = serve(
        slow_origin(&calls, Duration::ZERO, "max-age=60").layer(CacheLayer::new(cache.clone())),
    )
    .await;
    for n in 0..10 {
        get(address, &format!("/slow/{n}")).await;
    }
    let load = tokio::spawn(async move {
        let mut replies = Vec::new();
        for _ in 0..30 {
            for n in 0..10 {
                replies.push(get(address, &format!("/slow/{n}")).await);
            }
        }
        replies
    });
    // The load is on the replica before it dies.
    let baseline = cache.stats().replica_hits;
    support::wait_for(
        "hits from the replica under load",
        Duration::from_secs(5),
        || cache.stats().replica_hits >= baseline + 10,
    )
    .await;
    assert!(!load.is_finished(), "the kill comes mid-load");
    replica.kill();
    let replies = load.await.unwrap();
    assert!(replies.iter().all(|reply| reply.status == StatusCode::OK));
    let after_kill: Vec<_> = replies.iter().rev().take(50).collect();
    assert!(
        after_kill.iter().all(|reply| reply.is_hit()),
        "hits go on from the primary"
    );
    assert_eq!(calls.get(), 10);
    let stats = cache.stats();
    assert!(stats.replica_fallbacks > 0);
    assert!(
        stats.redis_errors + stats.redis_timeouts + stats.redis_skipped > 0,
        "the replica died under load"
    );
}
