//! A registry that loses its data (FLUSHALL, a restart without persistence), against a real redis-server:
//! discovery keeps the instances that were serving (self-preservation), and registrations re-create their entries
//! within one heartbeat period.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis_fixtures::RedisServer;
use test_support::wait_until;
use tower::discover::Change;
use tower_redis_discovery::{Discovery, Instance, RedisRegistry, Registration, Registry};

async fn flushall(server: &RedisServer) {
    let mut con = server.multiplexed().await;
    let () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
}

/// Every change the stream has ready within `wait`, as `+port` / `-port`.
async fn changes(discovery: &mut Discovery, wait: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(Some(change)) = tokio::time::timeout(wait, discovery.next()).await {
        seen.push(match change.unwrap() {
            Change::Insert(_, instance) => format!("+{}", instance.port),
            Change::Remove(id) => format!("-{}", id.split(':').nth(2).unwrap_or_default()),
        });
    }
    seen
}

#[tokio::test]
async fn a_flushall_removes_nothing_from_discovery_and_the_heartbeats_restore_the_registry() {
    let server = RedisServer::start();
    // TTL 3 s: heartbeats every ~1 s; discovery polls every 50 ms, so it reads the flushed registry before most
    // heartbeats come back.
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    let registrations: Vec<_> = (4101..=4103)
        .map(|port| {
            let registration =
                Registration::start(registry.clone(), Instance::new("users", "127.0.0.1", port))
                    .unwrap();
            registration.ready();
            registration
        })
        .collect();
    let options = Discovery::builder().interval(Duration::from_millis(50));
    let mut discovery = options
        .registry(registry.clone())
        .service("users")
        .build()
        .unwrap();
    let watch = discovery.handle();
    wait_until("all three are discovered", Duration::from_secs(10), || {
        let instances = watch.stats().instances;
        async move { instances == 3 }
    })
    .await;
    let mut inserted = changes(&mut discovery, Duration::from_millis(100)).await;
    inserted.sort();
    assert_eq!(inserted, ["+4101", "+4102", "+4103"]);

    flushall(&server).await;
    wait_until(
        "discovery enters self-preservation",
        Duration::from_secs(5),
        || {
            let preservations = watch.stats().preservations;
            async move { preservations == 1 }
        },
    )
    .await;
    wait_until(
        "the heartbeats re-create every entry",
        Duration::from_secs(10),
        || {
            let registry = registry.clone();
            async move { registry.instances("users").await.unwrap().len() == 3 }
        },
    )
    .await;
    wait_until("self-preservation ends", Duration::from_secs(5), || {
        let preserved = watch.stats().preserved;
        async move { preserved == 0 }
    })
    .await;

    assert_eq!(
        changes(&mut discovery, Duration::from_millis(200)).await,
        Vec::<String>::new(),
        "no Remove (and no re-Insert) through the loss"
    );
    let stats = watch.stats();
    assert_eq!(
        (stats.instances, stats.removes, stats.preservations),
        (3, 0, 1)
    );
    drop(registrations);
}

#[tokio::test]
async fn after_a_flushall_a_registration_is_back_in_the_registry_within_one_heartbeat_period() {
    let server = RedisServer::start();
    // TTL 3 s: a heartbeat every 1 s ± 10 %.
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    let registration =
        Registration::start(registry.clone(), Instance::new("orders", "127.0.0.1", 4201)).unwrap();
    registration.ready();
    let id = registration.instance().id.clone();
    let listed = |registry: RedisRegistry<_>, id: String| async move {
        registry
            .instances("orders")
            .await
            .unwrap()
            .iter()
            .any(|instance| {
                instance.id == id && instance.status == tower_redis_discovery::Status::Up
            })
    };
    wait_until("registered and UP", Duration::from_secs(10), || {
        listed(registry.clone(), id.clone())
    })
    .await;

    flushall(&server).await;
    let flushed = Instant::now();
    assert!(!listed(registry.clone(), id.clone()).await);
    // One period is 1.1 s at most; the deadline is generous for a loaded machine.
    wait_until("the entry is re-created", Duration::from_secs(5), || {
        listed(registry.clone(), id.clone())
    })
    .await;
    let back = flushed.elapsed();
    println!("re-created {back:?} after FLUSHALL");
    assert!(
        back < Duration::from_millis(2_100),
        "back after {back:?}: more than one heartbeat period (1.1 s) plus slack"
    );
    assert_eq!(registration.stats().recreations, 1);
}
