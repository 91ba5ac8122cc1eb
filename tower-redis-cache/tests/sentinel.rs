//! A Sentinel failover under load: the primary is killed while two cache instances serve requests through
//! `SentinelConnection`s; every response stays correct, and the shared tier works again on the promoted replica.
#![cfg(feature = "sentinel")]
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use redis_fixtures::RedisSentinel;
use support::scenarios::slow_origin;
use support::{Calls, get, holds_within, serve};
use tower_redis_cache::sentinel::SentinelConnection;
use tower_redis_cache::{CacheLayer, HttpCache};

async fn sentinel_connection(set: &RedisSentinel) -> SentinelConnection {
    test_support::sentinel_connection(set).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_load_fails_no_request_and_the_shared_tier_works_again_after_it() {
    let mut set = RedisSentinel::start();
    let promoted = set.replica_port();
    let calls = Calls::default();
    // Two instances, each with its own connection and no memory tier: a hit on one for what the other stored comes
    // from Redis.
    let first = HttpCache::builder()
        .redis(sentinel_connection(&set).await)
        .memory_capacity(0)
        .build()
        .unwrap();
    let second = HttpCache::builder()
        .redis(sentinel_connection(&set).await)
        .memory_capacity(0)
        .build()
        .unwrap();
    let origin = slow_origin(&calls, Duration::ZERO, "max-age=60");
    let first_address = serve(origin.clone().layer(CacheLayer::new(first.clone()))).await;
    let second_address = serve(origin.layer(CacheLayer::new(second.clone()))).await;

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = [first_address, second_address]
        .into_iter()
        .flat_map(|address| [address, address])
        .enumerate()
        .map(|(worker, address)| {
            let (stop, served) = (stop.clone(), served.clone());
            tokio::spawn(async move {
                let mut n = 0_usize;
                while !stop.load(Ordering::Relaxed) {
                    let key = (worker + n) % 16;
                    let reply = get(address, &format!("/slow/{key}")).await;
                    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
                    assert!(reply.body.starts_with(&format!("{key} call ")), "{reply:?}");
                    served.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    assert!(
        holds_within(Duration::from_secs(10), || {
            let served = served.clone();
            async move { served.load(Ordering::Relaxed) >= 50 }
        })
        .await
    );
    set.kill_primary();
    let before_failover = first.stats().redis_hits + second.stats().redis_hits;

    // The shared tier works again: what the first instance stores after the kill, the second reads from Redis.
    let attempt = AtomicUsize::new(0);
    let shared_again = holds_within(Duration::from_secs(40), || {
        let path = format!("/slow/after-{}", attempt.fetch_add(1, Ordering::Relaxed));
        async move {
            let stored = get(first_address, &path).await;
            assert_eq!(stored.status, StatusCode::OK);
            // The store may land just after the reply.
            for _ in 0..10 {
                if get(second_address, &path).await.is_hit() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
    })
    .await;
    let served_during = served.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.expect("no request failed during the failover");
    }
    assert!(
        shared_again,
        "the shared tier never worked again after the failover"
    );
    assert!(served_during > 50, "load ran through the failover");
    assert!(first.stats().redis_hits + second.stats().redis_hits > before_failover);
    assert_eq!(set.wait_for_new_primary(Duration::from_secs(5)), promoted);
}

/// How many clients are subscribed to `channel` on the server at `port`.
async fn subscribers(port: u16, channel: &str) -> i64 {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return 0;
    };
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
        return 0;
    };
    redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async::<(String, i64)>(&mut connection)
        .await
        .map_or(0, |(_, count)| count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_subscriptions_follow_a_failover_to_the_promoted_replica() {
    let mut set = RedisSentinel::start();
    let (primary, promoted) = (set.primary_port(), set.replica_port());
    let calls = Calls::default();
    let build = || async {
        let connection = sentinel_connection(&set).await;
        HttpCache::builder()
            .redis(connection.clone())
            .subscribe(&connection)
            .prefix("fo:")
            .build()
            .unwrap()
    };
    let one = build().await;
    let two = build().await;
    let origin = slow_origin(&calls, Duration::ZERO, "max-age=60");
    let a = serve(origin.clone().layer(CacheLayer::new(one.clone()))).await;
    let b = serve(origin.layer(CacheLayer::new(two.clone()))).await;
    assert!(
        holds_within(Duration::from_secs(5), || async {
            subscribers(primary, "fo:invalidate").await == 2
        })
        .await,
        "both instances subscribe on the first primary"
    );

    set.kill_primary();
    assert_eq!(set.wait_for_new_primary(Duration::from_secs(40)), promoted);
    // Both subscriptions come back on the promoted replica (a subscription kept on the dead primary's address never
    // would).
    assert!(
        holds_within(Duration::from_secs(20), || async {
            subscribers(promoted, "fo:invalidate").await == 2
        })
        .await,
        "the subscriptions moved to the promoted replica"
    );

    // An invalidation made through one instance now clears the other's memory tier: b serves a path from memory,
    // a invalidates it, and b's next answer is a fresh origin call. b's copy must be in Redis before a invalidates,
    // or b's background write could land after a's delete (the cross-instance window the README's Limits name) and
    // this would test that race instead; b's first write after the failover may also meet its broken connection, so
    // each attempt takes a new path until one is stored.
    let promoted_client = redis::Client::open(format!("redis://127.0.0.1:{promoted}")).unwrap();
    let promoted_connection = promoted_client
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut stored = None;
    for attempt in 0..10 {
        let path = format!("/slow/k{attempt}");
        let first = get(b, &path).await;
        assert_eq!(first.status, StatusCode::OK);
        let key = format!("http://test{path}");
        if support::stored_in_redis(&promoted_connection, &two.redis_key(&key).unwrap()).await {
            stored = Some((path, key, first));
            break;
        }
    }
    let (path, key, first) = stored.expect("b never stored a response in Redis after the failover");
    let cached = get(b, &path).await;
    assert!(cached.is_hit(), "{cached:?}");
    assert_eq!(cached.body, first.body);
    let deleted = one.invalidate(&[key]).await;
    assert!(deleted.is_ok(), "{deleted:?}");
    assert!(
        holds_within(Duration::from_secs(5), || async {
            get(b, &path).await.body != first.body
        })
        .await,
        "b's memory copy was invalidated through the promoted replica"
    );
    // a itself never lost its own copy's freshness rules: it answers too.
    assert_eq!(get(a, &path).await.status, StatusCode::OK);
}
