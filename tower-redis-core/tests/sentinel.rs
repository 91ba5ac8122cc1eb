//! `SentinelConnection` against a real primary, replica and sentinel: it follows a failover by itself.
#![cfg(feature = "sentinel")]

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis_fixtures::RedisSentinel;
use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_promoted_replica_after_the_primary_is_killed() {
    let mut set = RedisSentinel::start();
    let replica_port = set.replica_port();
    let mut con = SentinelConnection::connect(
        &set.sentinel_urls(),
        set.master_name(),
        SentinelConfig::default(),
    )
    .await
    .expect("the sentinel names a reachable primary");
    let () = con
        .set("before", "1")
        .await
        .expect("SET on the first primary");
    assert_eq!(con.reconnects(), 1);

    set.kill_primary();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failures = 0_u32;
    loop {
        let written: redis::RedisResult<()> = con.set("after", "2").await;
        match written {
            Ok(()) => break,
            Err(error) => {
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "no write succeeded within 30 s of the kill; last error: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(failures > 0, "the kill must have been noticed");
    assert_eq!(
        con.reconnects(),
        2,
        "one reconnect, to the promoted replica"
    );

    // The write landed on the server that started as the replica, and it kept the data replicated before.
    let promoted = redis::Client::open(format!("redis://127.0.0.1:{replica_port}").as_str())
        .expect("a valid URL");
    let mut direct = promoted
        .get_multiplexed_async_connection()
        .await
        .expect("the promoted replica accepts connections");
    let after: String = direct.get("after").await.expect("GET after");
    let before: String = direct.get("before").await.expect("GET before");
    assert_eq!((before.as_str(), after.as_str()), ("1", "2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_moves_the_connection_to_the_new_primary() {
    let set = RedisSentinel::start();
    let mut con = SentinelConnection::connect(
        &set.sentinel_urls(),
        set.master_name(),
        SentinelConfig::default(),
    )
    .await
    .expect("the sentinel names a reachable primary");
    let () = con.set("k", "v").await.expect("SET on the first primary");
    // A manual failover: the old primary stays up and becomes a replica (the sentinel closes its clients' connections
    // as it reconfigures it).
    let sentinel = redis::Client::open(set.sentinel_urls()[0].as_str()).expect("a valid URL");
    let mut sentinel = sentinel
        .get_multiplexed_async_connection()
        .await
        .expect("the sentinel accepts connections");
    let () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(set.master_name())
        .query_async(&mut sentinel)
        .await
        .expect("SENTINEL FAILOVER");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let written: redis::RedisResult<()> = con.set("k", "w").await;
        if written.is_ok() && con.reconnects() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the connection did not move to the new primary within 30 s: {written:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let value: String = con.get("k").await.expect("GET on the new primary");
    assert_eq!(value, "w");
}
