//! The Redis registry through a `SentinelConnection`: registrations made before a failover are still listed after
//! it (they were replicated), and heartbeats and new registrations reach the promoted replica.
#![cfg(feature = "sentinel")]
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::{Duration, Instant};

use redis_fixtures::RedisSentinel;
use tower_discovery::sentinel::{SentinelConfig, SentinelConnection};
use tower_discovery::{Instance, RedisRegistry, Registry, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_survive_a_failover_and_new_ones_reach_the_promoted_replica() {
    let mut set = RedisSentinel::start();
    let promoted = set.replica_port();
    let connection = SentinelConnection::connect(
        &set.sentinel_urls(),
        set.master_name(),
        SentinelConfig::default(),
    )
    .await
    .unwrap();
    let registry = RedisRegistry::new(connection).prefix("sentinel-test:");
    let before = Instance::new("user-service", "127.0.0.1", 3101);
    registry.register(&before).await.unwrap();
    // Replication is asynchronous: wait until the replica has the entry before killing the primary.
    let replica = redis::Client::open(format!("redis://127.0.0.1:{promoted}").as_str()).unwrap();
    let mut replica = replica.get_multiplexed_async_connection().await.unwrap();
    let key = registry.instance_key(&before.id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis::cmd("EXISTS")
        .arg(&key)
        .query_async::<bool>(&mut replica)
        .await
        .unwrap()
    {
        assert!(
            Instant::now() < deadline,
            "the registration never replicated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    set.kill_primary();
    let after = Instance::new("user-service", "127.0.0.1", 3102);
    let deadline = Instant::now() + Duration::from_secs(40);
    while registry.register(&after).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no registration succeeded after the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    registry.heartbeat(&before, Status::Up).await.unwrap();
    let mut ports: Vec<u16> = registry
        .instances("user-service")
        .await
        .unwrap()
        .iter()
        .map(|instance| instance.port)
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, [3101, 3102]);
    assert_eq!(set.wait_for_new_primary(Duration::from_secs(5)), promoted);
}
