//! Openings shared through a Sentinel-managed primary (features `redis` and `sentinel`): after the primary is killed
//! and its replica promoted, both the publishing connection (a `SentinelConnection`) and the subscription (a
//! `Subscriber` made from it) reach the new primary, so an opening still reaches the peer.
#![cfg(feature = "sentinel")]
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::Duration;

use redis_fixtures::RedisSentinel;
use test_support::holds_within;
use tower_breaker::{CircuitBreaker, State};
use tower_redis_core::sharing::RedisSharing;

fn breaker() -> CircuitBreaker {
    CircuitBreaker::builder()
        .name("payments")
        .consecutive_failures(1)
        .open_for(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn share(set: &RedisSentinel, breaker: &CircuitBreaker) -> RedisSharing {
    let connection = test_support::sentinel_connection(set).await;
    RedisSharing::builder()
        .breaker(breaker)
        .redis(connection.clone())
        .subscribe(&connection)
        .prefix("sentinel-test:")
        .max_reconnect_delay(Duration::from_millis(200))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openings_reach_the_peer_through_the_promoted_replica_after_a_failover() {
    let mut set = RedisSentinel::start();
    let promoted = set.replica_port();
    let (one, two) = (breaker(), breaker());
    let sharing_one = share(&set, &one).await;
    let sharing_two = share(&set, &two).await;
    assert!(
        holds_within(Duration::from_secs(10), async || {
            sharing_one.stats().connected && sharing_two.stats().connected
        })
        .await
    );
    // Before: an opening on one reaches two.
    one.try_acquire().unwrap().failure();
    assert!(holds_within(Duration::from_secs(5), async || two.state() == State::Open).await);
    one.reset();
    two.reset();

    set.kill_primary();
    assert_eq!(
        tokio::task::block_in_place(|| set.wait_for_new_primary(Duration::from_secs(40))),
        promoted
    );
    // After: the subscription comes back on the promoted replica and publishing goes there. The first opening may
    // meet the broken connection (it is not replayed), so each attempt opens and resets again until one arrives.
    let reached = holds_within(Duration::from_secs(20), async || {
        if two.state() == State::Open {
            return true;
        }
        one.reset();
        one.try_acquire().unwrap().failure();
        false
    })
    .await;
    assert!(
        reached,
        "no opening reached the peer after the failover: {:?} / {:?}",
        sharing_one.stats(),
        sharing_two.stats()
    );
    assert!(
        sharing_two.stats().received >= 2,
        "{:?}",
        sharing_two.stats()
    );
}
