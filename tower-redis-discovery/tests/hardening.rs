//! The Redis registry against whatever is in Redis (issue 14, item 6), on a real redis-server: a broken entry skips
//! that instance only, expired ids leave the service set, a forged address heals within one heartbeat, and the
//! README's ACL recipe lets a service write its own entries and no one else's.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis_fixtures::{AclUser, RedisServer};
use test_support::wait_until;
use tower_redis_discovery::{Heartbeat, Instance, RedisRegistry, Registration, Registry, Status};

fn up(name: &str, port: u16) -> Instance {
    let mut instance = Instance::new(name, "127.0.0.1", port);
    instance.status = Status::Up;
    instance
}

fn ports(instances: &[Instance]) -> Vec<u16> {
    instances.iter().map(|instance| instance.port).collect()
}

#[tokio::test]
async fn a_wrong_typed_instance_key_skips_that_instance_only() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .build()
        .unwrap();
    let (good, broken) = (up("users", 4301), up("users", 4302));
    registry.register(&good).await.unwrap();
    registry.register(&broken).await.unwrap();
    let mut con = server.multiplexed().await;
    let key = registry.instance_key(&broken.id);
    let () = con.del(&key).await.unwrap();
    let () = con.hset(&key, "host", "203.0.113.9").await.unwrap();

    assert_eq!(ports(&registry.instances("users").await.unwrap()), [4301]);
}

#[tokio::test]
async fn an_entry_over_the_size_cap_skips_that_instance_only() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .max_entry_size(4_096)
        .build()
        .unwrap();
    let small = up("users", 4311);
    let mut large = up("users", 4312);
    large
        .metadata
        .insert("padding".to_owned(), "x".repeat(5_000).into());
    registry.register(&small).await.unwrap();
    registry.register(&large).await.unwrap();

    assert_eq!(ports(&registry.instances("users").await.unwrap()), [4311]);
    let default_cap = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .build()
        .unwrap();
    assert_eq!(
        ports(&default_cap.instances("users").await.unwrap()),
        [4311, 4312],
        "5 KB is under the default 64 KiB cap"
    );
}

#[tokio::test]
async fn a_read_removes_expired_ids_from_the_service_set_at_most_100_at_a_time() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .build()
        .unwrap();
    let alive = up("users", 4321);
    registry.register(&alive).await.unwrap();
    let mut con = server.multiplexed().await;
    let set = registry.service_key("users");
    // 150 ids whose instance keys have expired.
    let expired: Vec<String> = (0..150).map(|n| format!("users:10.0.0.1:80:{n}")).collect();
    let () = con.sadd(&set, &expired).await.unwrap();

    assert_eq!(ports(&registry.instances("users").await.unwrap()), [4321]);
    let left: u64 = con.scard(&set).await.unwrap();
    assert_eq!(left, 51, "100 expired ids removed by the first read");
    assert_eq!(ports(&registry.instances("users").await.unwrap()), [4321]);
    let members: Vec<String> = con.smembers(&set).await.unwrap();
    assert_eq!(members, std::slice::from_ref(&alive.id));
}

#[tokio::test]
async fn a_heartbeat_rewrites_an_entry_whose_address_was_overwritten() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    let registration =
        Registration::start(registry.clone(), Instance::new("users", "127.0.0.1", 4331)).unwrap();
    registration.ready();
    let id = registration.instance().id.clone();
    let host_of = |registry: RedisRegistry<_>| async move {
        registry
            .instances("users")
            .await
            .unwrap()
            .first()
            .map(|instance| (instance.host.clone(), instance.port, instance.status))
    };
    wait_until("registered and UP", Duration::from_secs(10), || {
        let registry = registry.clone();
        async move { host_of(registry).await == Some(("127.0.0.1".to_owned(), 4331, Status::Up)) }
    })
    .await;

    // Someone with write access points the entry elsewhere, keeping its TTL.
    let mut con = server.multiplexed().await;
    let key = registry.instance_key(&id);
    let mut forged: serde_json::Value =
        serde_json::from_str(&con.get::<_, String>(&key).await.unwrap()).unwrap();
    forged["host"] = "203.0.113.9".into();
    forged["port"] = 6666.into();
    let () = redis::cmd("SET")
        .arg(&key)
        .arg(forged.to_string())
        .arg("KEEPTTL")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        host_of(registry.clone()).await,
        Some(("203.0.113.9".to_owned(), 6666, Status::Up))
    );
    let forged_at = Instant::now();

    wait_until("the heartbeat restores the address", Duration::from_secs(10), || {
        let registry = registry.clone();
        async move { host_of(registry).await == Some(("127.0.0.1".to_owned(), 4331, Status::Up)) }
    })
    .await;
    let healed = forged_at.elapsed();
    assert!(
        healed < Duration::from_millis(2_100),
        "healed after {healed:?}: more than one heartbeat period (1.1 s) plus slack"
    );
    assert_eq!(registration.stats().heals, 1);
}

#[tokio::test]
async fn a_heartbeat_reports_a_rewritten_wrong_typed_entry_as_healed() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .build()
        .unwrap();
    let ours = up("users", 4341);
    registry.register(&ours).await.unwrap();
    let mut con = server.multiplexed().await;
    let key = registry.instance_key(&ours.id);
    let () = con.del(&key).await.unwrap();
    let () = con.rpush(&key, "junk").await.unwrap();

    assert_eq!(
        registry.heartbeat(&ours, Status::Up).await.unwrap(),
        Heartbeat::Healed
    );
    assert_eq!(ports(&registry.instances("users").await.unwrap()), [4341]);
}

/// The README's recipe for a service named `users` with the prefix `shop:`.
/// The README's recipe for the service `name`; `info: false` leaves out `+info` (what the registry asks once to
/// find out whether it talks to a Cluster).
fn service_user(name: &str, info: bool) -> AclUser {
    let own_instances = format!("~shop:instance:{name}:*");
    let own_set = format!("~shop:service:{name}");
    AclUser::new(
        name,
        "secret",
        &[
            "resetkeys",
            "resetchannels",
            "-@all",
            if info { "+info" } else { "-info" },
            "+ping",
            "+multi",
            "+exec",
            "+get",
            "+getrange",
            "+pttl",
            "+smembers",
            "+scan",
            "+set",
            "+sadd",
            "+expire",
            "+srem",
            "+del",
            "+evalsha",
            "+eval",
            "+exists",
            "+publish",
            "+subscribe",
            "+unsubscribe",
            &own_instances,
            &own_set,
            "%R~shop:*",
            "&shop:events",
        ],
    )
}

#[tokio::test]
async fn with_the_acl_recipe_a_service_writes_its_own_entries_and_no_one_elses() {
    let server = RedisServer::builder()
        .acl_user(service_user("users", true))
        .start();
    let admin = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .prefix("shop:")
        .build()
        .unwrap();
    let orders = up("orders", 4351);
    admin.register(&orders).await.unwrap();

    let client = server.client_for(&server.url_as("users", "secret"));
    let as_users = RedisRegistry::builder()
        .redis(client.get_multiplexed_async_connection().await.unwrap())
        .prefix("shop:")
        .build()
        .unwrap();
    let users = Instance::new("users", "127.0.0.1", 4352);
    as_users.register(&users).await.unwrap();
    assert_eq!(
        as_users.heartbeat(&users, Status::Up).await.unwrap(),
        Heartbeat::Refreshed
    );
    as_users.announce("users").await.unwrap();
    assert_eq!(ports(&admin.instances("users").await.unwrap()), [4352]);
    // It reads others' entries (to discover them) ...
    assert_eq!(ports(&as_users.instances("orders").await.unwrap()), [4351]);

    // ... but cannot overwrite them, neither through the registry nor with a bare SET.
    let mut forged = orders.clone();
    forged.host = "203.0.113.9".to_owned();
    assert!(as_users.register(&forged).await.is_err());
    assert!(as_users.heartbeat(&forged, Status::Up).await.is_err());
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let set: redis::RedisResult<()> = con.set(admin.instance_key(&orders.id), "{}").await;
    assert_eq!(set.unwrap_err().code(), Some("NOPERM"));
    let added: redis::RedisResult<()> = con
        .sadd(admin.service_key("orders"), "orders:203.0.113.9:80:1")
        .await;
    assert_eq!(added.unwrap_err().code(), Some("NOPERM"));
    assert_eq!(admin.instances("orders").await.unwrap(), [orders]);
}

#[tokio::test]
async fn a_user_that_may_not_run_info_is_taken_for_a_single_node_and_works() {
    let server = RedisServer::builder()
        .acl_user(service_user("users", false))
        .start();
    let client = server.client_for(&server.url_as("users", "secret"));
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let info: redis::RedisResult<String> = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut con)
        .await;
    assert_eq!(
        info.unwrap_err().code(),
        Some("NOPERM"),
        "the user must not be allowed INFO"
    );
    let as_users = RedisRegistry::builder()
        .redis(con)
        .prefix("shop:")
        .build()
        .unwrap();
    let users = Instance::new("users", "127.0.0.1", 4361);
    as_users.register(&users).await.unwrap();
    assert_eq!(
        as_users.heartbeat(&users, Status::Up).await.unwrap(),
        Heartbeat::Refreshed
    );
    assert_eq!(ports(&as_users.instances("users").await.unwrap()), [4361]);
    as_users.deregister(&users).await.unwrap();
    assert!(as_users.instances("users").await.unwrap().is_empty());
}
