//! Discovery against a real redis-server: changes arrive within a poll, only UP instances count by default, and a
//! Redis outage keeps the last good set without ever yielding an error.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::Duration;

use futures_util::StreamExt;
use redis_fixtures::RedisServer;
use tower::discover::Change;
use tower_redis_discovery::{
    Discovery, DiscoveryBuilder, Instance, RedisRegistry, Registration, Registry, Status,
};

fn options() -> DiscoveryBuilder<()> {
    Discovery::builder().interval(Duration::from_millis(50))
}

/// The next change as `+id` or `-id`, or `None` if none comes within `wait`.
async fn next(discovery: &mut Discovery, wait: Duration) -> Option<String> {
    let change = tokio::time::timeout(wait, discovery.next()).await.ok()??;
    Some(match change.unwrap() {
        Change::Insert(_, instance) => format!("+{}", instance.port),
        Change::Remove(id) => format!("-{}", id.split(':').nth(2).unwrap_or_default()),
    })
}

#[tokio::test]
async fn instances_appear_when_ready_and_disappear_when_they_leave() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    let mut discovery = options()
        .registry(registry.clone())
        .service("user-service")
        .build()
        .unwrap();
    let first = Registration::start(
        registry.clone(),
        Instance::new("user-service", "127.0.0.1", 3001),
    )
    .unwrap();
    let second = Registration::start(
        registry.clone(),
        Instance::new("user-service", "127.0.0.1", 3002),
    )
    .unwrap();
    assert_eq!(
        next(&mut discovery, Duration::from_millis(400)).await,
        None,
        "STARTING instances get no traffic"
    );
    first.ready();
    assert_eq!(
        next(&mut discovery, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("+3001")
    );
    second.ready();
    assert_eq!(
        next(&mut discovery, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("+3002")
    );
    first.deregister(None).await.unwrap();
    assert_eq!(
        next(&mut discovery, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("-3001")
    );
    second.set_status(Status::Down);
    assert_eq!(
        next(&mut discovery, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("-3002")
    );
}

#[tokio::test]
async fn a_redis_outage_keeps_the_last_good_set_and_never_yields_an_error() {
    let mut server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(30))
        .redis_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let mut up = Instance::new("orders", "127.0.0.1", 4001);
    up.status = Status::Up;
    registry.register(&up).await.unwrap();
    let mut discovery = options()
        .registry(registry.clone())
        .service("orders")
        .build()
        .unwrap();
    assert_eq!(
        next(&mut discovery, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("+4001")
    );

    server.kill();
    // A second of polling against a dead Redis: no change at all (in particular no Remove, and no error).
    assert_eq!(next(&mut discovery, Duration::from_secs(1)).await, None);

    server.restart(); // empty: the instance is gone from the registry, another one registers
    let mut other = Instance::new("orders", "127.0.0.1", 4002);
    other.status = Status::Up;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while registry.register(&other).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        next(&mut discovery, Duration::from_secs(3))
            .await
            .as_deref(),
        Some("+4002")
    );
    // The registry lost 4001 along with its data: self-preservation keeps it (for 2 x TTL) rather than removing it.
    assert_eq!(next(&mut discovery, Duration::from_secs(1)).await, None);
    let stats = discovery.handle().stats();
    assert_eq!((stats.instances, stats.preserved), (2, 1));
}

#[tokio::test]
async fn with_pub_sub_hints_a_change_arrives_in_milliseconds_not_at_the_next_poll() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let slow_polling = Discovery::builder().interval(Duration::from_secs(30));
    let mut discovery = slow_polling
        .registry(registry.clone())
        .service("billing")
        .hints(server.client(), registry.events_channel())
        .build()
        .unwrap();
    // Let the first (empty) poll and the subscription happen.
    assert_eq!(next(&mut discovery, Duration::from_millis(300)).await, None);
    let started = std::time::Instant::now();
    let registration = Registration::start(
        registry.clone(),
        Instance::new("billing", "127.0.0.1", 5001),
    )
    .unwrap();
    registration.ready();
    assert_eq!(
        next(&mut discovery, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("+5001")
    );
    let elapsed = started.elapsed();
    println!("registration to discovery with a hint: {elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(500),
        "took {elapsed:?}; polling alone would take 30 s"
    );
    // Draining reports OUT_OF_SERVICE first, which the hint brings at once: the instance's own news, not a
    // registry that lost it (a bare deletion of a service's last instance is held by self-preservation).
    registration
        .deregister(Some(Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!(
        next(&mut discovery, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("-5001")
    );
}
