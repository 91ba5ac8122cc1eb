//! The registries against a real redis-server (and a 3-master cluster): HazelJS's wire format, TTLs, heartbeats
//! that keep others' fields and re-create expired entries, readiness, draining, and surviving an outage.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::Duration;

use redis::AsyncCommands;
use redis_fixtures::{RedisCluster, RedisServer};
use test_support::wait_until;
use tower_redis_discovery::{
    Heartbeat, Instance, MemoryRegistry, RedisRegistry, Registration, Registry, Status,
};

fn instance(name: &str, port: u16) -> Instance {
    let mut instance = Instance::new(name, "127.0.0.1", port);
    instance
        .metadata
        .insert("version".to_owned(), "1.0.0".into());
    instance.tags = vec!["api".to_owned()];
    instance
}

#[tokio::test]
async fn a_registration_is_stored_exactly_as_hazeljs_stores_it() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .build()
        .unwrap();
    let user = instance("user-service", 3101);
    registry.register(&user).await.unwrap();

    let mut con = server.multiplexed().await;
    let key = format!("hazeljs:discovery:instance:{}", user.id);
    let json: String = con.get(&key).await.unwrap();
    assert_eq!(json, serde_json::to_string(&user).unwrap());
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let fields: Vec<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        [
            "healthCheckInterval",
            "healthCheckPath",
            "host",
            "id",
            "lastHeartbeat",
            "metadata",
            "name",
            "port",
            "protocol",
            "registeredAt",
            "status",
            "tags"
        ],
        "every HazelJS field, and no `zone` when unset (serde_json sorts keys here)"
    );
    assert_eq!(value["port"], 3101);
    assert_eq!(value["status"], "STARTING");
    assert_eq!(value["healthCheckInterval"], 30_000);
    let ttl: i64 = con.ttl(&key).await.unwrap();
    assert!((85..=90).contains(&ttl), "instance TTL {ttl}");
    let set_ttl: i64 = con
        .ttl("hazeljs:discovery:service:user-service")
        .await
        .unwrap();
    assert!((175..=180).contains(&set_ttl), "service set TTL {set_ttl}");
    let members: Vec<String> = con
        .smembers("hazeljs:discovery:service:user-service")
        .await
        .unwrap();
    assert_eq!(members, vec![user.id.clone()]);
    assert_eq!(
        registry.instances("user-service").await.unwrap(),
        vec![user]
    );
    assert_eq!(
        registry.services().await.unwrap(),
        vec!["user-service".to_owned()]
    );
}

#[tokio::test]
async fn a_heartbeat_keeps_fields_written_by_others_and_re_creates_an_expired_entry() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .prefix("shop:")
        .build()
        .unwrap();
    let order = instance("order-service", 3102);
    registry.register(&order).await.unwrap();
    let mut con = server.multiplexed().await;
    let key = format!("shop:instance:{}", order.id);

    // Another writer (HazelJS, an operator) adds a field we do not know.
    let mut stored: serde_json::Value =
        serde_json::from_str(&con.get::<_, String>(&key).await.unwrap()).unwrap();
    stored["owner"] = "team-a".into();
    let () = con.set(&key, stored.to_string()).await.unwrap();
    assert_eq!(
        registry.heartbeat(&order, Status::Up).await.unwrap(),
        Heartbeat::Refreshed
    );
    let after: serde_json::Value =
        serde_json::from_str(&con.get::<_, String>(&key).await.unwrap()).unwrap();
    assert_eq!(after["owner"], "team-a");
    assert_eq!(after["status"], "UP");
    assert_eq!(after["registeredAt"], stored["registeredAt"]);

    // The entry expired (or was deleted): the next heartbeat brings it back.
    let () = con.del(&key).await.unwrap();
    assert_eq!(
        registry.heartbeat(&order, Status::Up).await.unwrap(),
        Heartbeat::Recreated
    );
    let back = registry.instances("order-service").await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].status, Status::Up);
}

#[tokio::test]
async fn reading_instances_skips_and_prunes_expired_and_skips_undecodable_entries_and_cleanup_matches_hazeljs()
 {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .build()
        .unwrap();
    let live = instance("catalog", 1);
    registry.register(&live).await.unwrap();
    let mut con = server.multiplexed().await;
    let set = "hazeljs:discovery:service:catalog";
    let () = con.sadd(set, "catalog:gone:2:3").await.unwrap();
    let () = con.sadd(set, "catalog:broken:4:5").await.unwrap();
    let () = con
        .set_ex(
            "hazeljs:discovery:instance:catalog:broken:4:5",
            "{not json",
            90,
        )
        .await
        .unwrap();
    assert_eq!(
        registry.instances("catalog").await.unwrap(),
        vec![live.clone()]
    );

    // The read already removed the member whose key is gone (bounded work per read); the broken one stays.
    let members: Vec<String> = con.smembers(set).await.unwrap();
    assert_eq!(members.len(), 2);
    let () = con.sadd(set, "catalog:gone:6:7").await.unwrap();
    assert_eq!(
        registry.cleanup("catalog").await.unwrap(),
        1,
        "only the member whose key is gone"
    );
    let members: Vec<String> = con.smembers(set).await.unwrap();
    assert_eq!(members.len(), 2);
    registry.deregister(&live).await.unwrap();
    let () = con
        .del("hazeljs:discovery:instance:catalog:broken:4:5")
        .await
        .unwrap();
    registry.cleanup("catalog").await.unwrap();
    let exists: bool = con.exists(set).await.unwrap();
    assert!(!exists, "an empty set is deleted");
}

#[tokio::test]
async fn a_registration_reports_up_only_once_ready_and_drains_before_leaving() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    let registration =
        Registration::start(registry.clone(), instance("user-service", 3101)).unwrap();
    let status = || async {
        registry
            .instances("user-service")
            .await
            .unwrap()
            .first()
            .map(|i| i.status)
    };
    wait_until("registered", Duration::from_secs(10), || async {
        status().await == Some(Status::Starting)
    })
    .await;
    registration.ready();
    wait_until("up", Duration::from_secs(10), || async {
        status().await == Some(Status::Up)
    })
    .await;

    let registry_view = registry.clone();
    let leaving = tokio::spawn(registration.deregister(Some(Duration::from_millis(500))));
    wait_until(
        "out of service while draining",
        Duration::from_secs(10),
        || async {
            registry_view
                .instances("user-service")
                .await
                .unwrap()
                .first()
                .map(|i| i.status)
                == Some(Status::OutOfService)
        },
    )
    .await;
    leaving.await.unwrap().unwrap();
    assert!(registry.instances("user-service").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_registration_survives_a_redis_outage_and_comes_back_by_itself() {
    let mut server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(3))
        .redis_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let registration = Registration::start(registry.clone(), instance("search", 4000)).unwrap();
    registration.ready();
    wait_until("up", Duration::from_secs(10), || async {
        registry
            .instances("search")
            .await
            .map(|found| found.len())
            .unwrap_or(0)
            == 1
    })
    .await;
    server.kill();
    wait_until(
        "the registry feels Redis gone",
        Duration::from_secs(10),
        || async { registry.instances("search").await.is_err() },
    )
    .await;
    // Redis comes back empty: the next heartbeat re-creates the entry (HazelJS's never would).
    server.restart();
    wait_until(
        "re-registered after the outage",
        Duration::from_secs(10),
        || async {
            registry
                .instances("search")
                .await
                .map(|found| found.len())
                .unwrap_or(0)
                == 1
        },
    )
    .await;
    assert_eq!(
        registry.instances("search").await.unwrap()[0].status,
        Status::Up
    );
    drop(registration);
}

#[tokio::test]
async fn on_a_cluster_writes_and_reads_span_slots() {
    let cluster = RedisCluster::start();
    let registry = RedisRegistry::builder()
        .redis(cluster.connection().await)
        .build()
        .unwrap();
    let mut expected = Vec::new();
    for port in 1..=5 {
        let one = instance("payments", port);
        registry.register(&one).await.unwrap();
        expected.push(one);
    }
    let stats = registry.redis_stats();
    assert_eq!(
        stats.errors, 0,
        "the Cluster is recognised by INFO, before any command meets CROSSSLOT: {stats:?}"
    );
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(registry.instances("payments").await.unwrap(), expected);
    registry.heartbeat(&expected[0], Status::Up).await.unwrap();
    registry.deregister(&expected[1]).await.unwrap();
    assert_eq!(registry.instances("payments").await.unwrap().len(), 4);
    // Service sets land on different nodes; the listing sees every one.
    let names: Vec<String> = (0..12).map(|n| format!("svc-{n:02}")).collect();
    for (port, name) in (10..).zip(&names) {
        registry.register(&instance(name, port)).await.unwrap();
    }
    let mut listed = registry.services().await.unwrap();
    listed.retain(|name| name.starts_with("svc-"));
    assert_eq!(listed, names);
}

#[tokio::test]
async fn the_memory_registry_behaves_like_the_redis_one_and_expires_entries() {
    let registry = MemoryRegistry::new(Duration::from_millis(300));
    let one = instance("a", 1);
    registry.register(&one).await.unwrap();
    registry.heartbeat(&one, Status::Up).await.unwrap();
    assert_eq!(registry.instances("a").await.unwrap()[0].status, Status::Up);
    assert_eq!(registry.services().await.unwrap(), vec!["a".to_owned()]);
    wait_until("expired after its TTL", Duration::from_secs(5), || async {
        registry.instances("a").await.unwrap().is_empty()
    })
    .await;
    registry.heartbeat(&one, Status::Up).await.unwrap();
    assert_eq!(
        registry.instances("a").await.unwrap().len(),
        1,
        "a heartbeat re-creates it"
    );
    registry.deregister(&one).await.unwrap();
    assert!(registry.instances("a").await.unwrap().is_empty());
}

#[tokio::test]
async fn heartbeats_lengthen_the_service_set_ttl_but_never_shorten_it() {
    let server = RedisServer::start();
    let mut con = server.multiplexed().await;
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    // Our own service: the set gets 2 x ttl, refreshed by each heartbeat.
    let ours = instance("ours", 3001);
    registry.register(&ours).await.unwrap();
    registry.heartbeat(&ours, Status::Up).await.unwrap();
    let pttl: i64 = con.pttl("hazeljs:discovery:service:ours").await.unwrap();
    assert!((1_500..=2_000).contains(&pttl), "{pttl}");
    // A service whose set a HazelJS instance keeps for 180 s (ttl 90): our short-TTL writes leave that alone.
    con.sadd::<_, _, ()>("hazeljs:discovery:service:shared", "hazel-id")
        .await
        .unwrap();
    con.expire::<_, ()>("hazeljs:discovery:service:shared", 180)
        .await
        .unwrap();
    let shared = instance("shared", 3002);
    registry.register(&shared).await.unwrap();
    registry.heartbeat(&shared, Status::Up).await.unwrap();
    let ttl: i64 = con.ttl("hazeljs:discovery:service:shared").await.unwrap();
    assert!(ttl > 170, "the set's TTL was shortened to {ttl} s");
}

#[tokio::test]
async fn invalid_registry_settings_are_errors_that_name_the_setting_never_clamped() {
    let server = RedisServer::start();
    let connection = server.connection_manager().await;
    let build = |builder: tower_redis_discovery::RedisRegistryBuilder<_>| {
        builder.build().map(|_| ()).unwrap_err()
    };
    let base = || RedisRegistry::builder().redis(connection.clone());
    for (error, field) in [
        (build(base().ttl(Duration::from_millis(500))), "ttl"),
        (build(base().ttl(Duration::from_millis(1_500))), "ttl"),
        (build(base().redis_timeout(Duration::ZERO)), "redis_timeout"),
        (build(base().max_entry_size(0)), "max_entry_size"),
    ] {
        assert_eq!(error.field(), field, "{error}");
        assert_eq!(error.component(), "registry", "{error}");
    }
    let ok = base().ttl(Duration::from_secs(1)).build().unwrap();
    assert_eq!(ok.instance_ttl(), Duration::from_secs(1));
}
