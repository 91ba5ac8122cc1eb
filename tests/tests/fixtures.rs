//! Each fixture shape works against a real `redis-server`: plain, password and ACL, TLS, a 3-master cluster, and
//! a Sentinel-managed primary with its replica.

use redis::AsyncCommands;
use redis_fixtures::{AclUser, RedisCluster, RedisServer};

#[tokio::test]
async fn plain_server_serves_set_and_get_through_a_connection_manager() {
    let server = RedisServer::start();
    let mut con = server.connection_manager().await;
    let () = con.set("fixture:plain", "hello").await.unwrap();
    let value: String = con.get("fixture:plain").await.unwrap();
    assert_eq!(value, "hello");
}

#[tokio::test]
async fn killed_server_comes_back_empty_on_the_same_port() {
    let mut server = RedisServer::start();
    let port = server.port();
    let mut con = server.multiplexed().await;
    let () = con.set("fixture:restart", "before").await.unwrap();
    server.kill();
    assert!(!server.is_running());
    server.restart();
    assert_eq!(server.port(), port);
    let mut con = server.multiplexed().await;
    let value: Option<String> = con.get("fixture:restart").await.unwrap();
    assert_eq!(value, None, "a restarted fixture keeps nothing");
}

#[tokio::test]
async fn dropping_a_fixture_stops_its_process() {
    let server = RedisServer::start();
    let client = server.client();
    drop(server);
    let error = client
        .get_connection_with_timeout(std::time::Duration::from_millis(500))
        .err();
    assert!(
        error.is_some(),
        "the server still accepts connections after drop"
    );
}

#[tokio::test]
async fn acl_user_reads_and_writes_its_keys_and_is_refused_the_rest() {
    let server = RedisServer::builder()
        .password("admin-secret")
        .acl_user(AclUser::new(
            "app",
            "app-secret",
            &["~app:*", "&app:*", "+@all", "-flushall"],
        ))
        .start();

    let app = server.client_for(&server.url_as("app", "app-secret"));
    let mut con = app.get_connection_manager().await.unwrap();
    let () = con.set("app:key", "allowed").await.unwrap();
    let value: String = con.get("app:key").await.unwrap();
    assert_eq!(value, "allowed");

    let refused = con.set::<_, _, ()>("other:key", "x").await.unwrap_err();
    assert_eq!(refused.code(), Some("NOPERM"), "{refused}");
    let refused: redis::RedisError = redis::cmd("FLUSHALL")
        .query_async::<()>(&mut con)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("NOPERM"), "{refused}");
    // The connection stays usable after a refusal.
    let value: String = con.get("app:key").await.unwrap();
    assert_eq!(value, "allowed");

    // The default user needs the password; with it, it sees the app's key.
    let mut admin = server.connection_manager().await;
    let value: String = admin.get("app:key").await.unwrap();
    assert_eq!(value, "allowed");

    let wrong = server
        .client_for(&server.url_as("app", "wrong"))
        .get_multiplexed_async_connection()
        .await;
    assert_eq!(
        wrong.err().map(|e| e.kind()),
        Some(redis::ErrorKind::AuthenticationFailed)
    );
}

#[tokio::test]
async fn tls_server_serves_rediss_with_the_generated_ca() {
    let server = RedisServer::builder().tls().start();
    let url = server.url();
    assert!(url.starts_with("rediss://127.0.0.1:"), "{url}");
    let mut con = server.connection_manager().await;
    let () = con.set("fixture:tls", "secret").await.unwrap();
    let value: String = con.get("fixture:tls").await.unwrap();
    assert_eq!(value, "secret");

    // Without the generated CA the certificate is not trusted.
    redis_fixtures::install_crypto_provider();
    let untrusted = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    let error = untrusted.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        error.contains("UnknownIssuer") || error.contains("certificate"),
        "{error}"
    );
}

#[tokio::test]
async fn cluster_serves_keys_in_every_slot_range() {
    let cluster = RedisCluster::start();
    let mut con = cluster.connection().await;
    // These keys hash to slots 15495, 3300 and 7365: three different masters (0-5460, 5461-10922, 10923-16383).
    let keys = ["a", "b", "c"];
    let slots: Vec<u16> = keys.iter().map(|key| slot_of(key)).collect();
    assert_eq!(slots, vec![15495, 3300, 7365]);
    for key in keys {
        let () = con.set(key, format!("value-{key}")).await.unwrap();
    }
    for key in keys {
        let value: String = con.get(key).await.unwrap();
        assert_eq!(value, format!("value-{key}"));
    }
    // Each key really lives on a different node: every node holds exactly one of them.
    for index in 0..3 {
        let mut node = cluster
            .node_client(index)
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let size: u64 = redis::cmd("DBSIZE").query_async(&mut node).await.unwrap();
        assert_eq!(size, 1, "node {index} should hold exactly one key");
    }
    // A multi-key command across slots is split by the client and reassembled.
    let values: Vec<String> = con.mget(&keys).await.unwrap();
    assert_eq!(values, vec!["value-a", "value-b", "value-c"]);
}

/// The Redis Cluster hash slot of a key without hash tags (CRC16/XMODEM mod 16384).
fn slot_of(key: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in key.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[test]
#[should_panic(expected = "install it with `sudo apt-get install redis-server`")]
fn a_missing_redis_server_binary_fails_with_install_instructions() {
    let _server = RedisServer::builder()
        .binary("/nonexistent/redis-server")
        .start();
}

#[test]
fn sentinel_promotes_the_replica_when_the_primary_is_killed() {
    let mut sentinel = redis_fixtures::RedisSentinel::start();
    let (old, replica) = (sentinel.primary_port(), sentinel.replica_port());
    assert_eq!(
        sentinel.reported_primary(),
        Some(("127.0.0.1".to_owned(), old))
    );
    sentinel.kill_primary();
    let new = sentinel.wait_for_new_primary(std::time::Duration::from_secs(30));
    assert_eq!(new, replica);
    assert_eq!(sentinel.primary_port(), replica);
    let mut con = sentinel
        .primary()
        .client()
        .get_connection_with_timeout(std::time::Duration::from_secs(2))
        .expect("the promoted primary accepts connections");
    let () = redis::cmd("SET")
        .arg("after-failover")
        .arg("written")
        .query(&mut con)
        .expect("the promoted primary accepts writes");
}

#[test]
fn three_sentinels_agree_on_the_promoted_replica() {
    let mut sentinel = redis_fixtures::RedisSentinel::start_with_sentinels(3);
    assert_eq!(sentinel.sentinel_urls().len(), 3);
    let replica = sentinel.replica_port();
    sentinel.kill_primary();
    assert_eq!(
        sentinel.wait_for_new_primary(std::time::Duration::from_secs(40)),
        replica
    );
}
