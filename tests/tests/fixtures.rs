//! Each fixture shape works against a real `redis-server`: plain, password and ACL, TLS, a 3-master cluster, and
//! a Sentinel-managed primary with its replica, and the fault proxy in front of a server.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, AsyncConnectionConfig};
use redis_fixtures::{AclUser, Fault, FaultProxy, RedisCluster, RedisServer};

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

// The fault proxy, in front of a real server. Raw-socket tests read what the client's socket really sees (bytes,
// a FIN as `Ok(0)`, an RST as `ConnectionReset`, silence as a read timeout); redis-rs tests show what a client sees.

/// A command in RESP, as a client sends it.
fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

/// A raw connection to the proxy.
fn raw_connect(proxy: &FaultProxy) -> std::net::TcpStream {
    std::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .expect("the proxy accepts a TCP connection")
}

/// Reads exactly `expected.len()` bytes within 5 s and checks them.
fn expect_bytes(stream: &mut std::net::TcpStream, expected: &[u8]) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout can be set");
    let mut got = vec![0; expected.len()];
    stream
        .read_exact(&mut got)
        .expect("the reply arrives within 5 s");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
}

/// Asserts that nothing at all (no byte, no FIN, no RST) arrives on `stream` within `wait`.
fn expect_silence(stream: &mut std::net::TcpStream, wait: Duration) {
    stream
        .set_read_timeout(Some(wait))
        .expect("a read timeout can be set");
    let mut buffer = [0; 64];
    match stream.read(&mut buffer) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Ok(0) => panic!("the client's socket got a FIN"),
        Ok(n) => panic!(
            "the client's socket got {:?}",
            String::from_utf8_lossy(&buffer[..n])
        ),
        Err(e) => panic!("the client's socket failed: {e}"),
    }
}

/// Asserts that `stream` is reset (RST, not FIN) within 5 s.
fn expect_reset(stream: &mut std::net::TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout can be set");
    let mut buffer = [0; 64];
    match stream.read(&mut buffer) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(0) => panic!("the client's socket got a FIN instead of an RST"),
        Ok(n) => panic!(
            "the client's socket got {:?}",
            String::from_utf8_lossy(&buffer[..n])
        ),
    }
}

/// A multiplexed connection through the proxy whose commands time out after 300 ms.
async fn short_timeout_connection(
    proxy: &FaultProxy,
    server: &RedisServer,
) -> MultiplexedConnection {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_millis(300)));
    proxy
        .client_for(server)
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("a connection through the proxy")
}

#[test]
fn fault_proxy_url_for_replaces_only_the_port() {
    let proxy = FaultProxy::start("127.0.0.1:1");
    let port = proxy.port();
    assert_eq!(proxy.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(
        proxy.url_for("rediss://app:secret@127.0.0.1:6380/2?protocol=resp3"),
        format!("rediss://app:secret@127.0.0.1:{port}/2?protocol=resp3")
    );
    assert_eq!(
        proxy.url_for("redis://:pw@127.0.0.1:7000"),
        format!("redis://:pw@127.0.0.1:{port}")
    );
    assert_eq!(proxy.fault(), Fault::Pass);
}

#[tokio::test]
async fn fault_proxy_passes_ping_set_and_get() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut con = proxy
        .client_for(&server)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let () = con.set("proxy:pass", "through").await.unwrap();
    let value: String = con.get("proxy:pass").await.unwrap();
    assert_eq!(value, "through");
    assert_eq!(proxy.connections(), 1);
    // The write really reached the server behind the proxy.
    let value: String = server.multiplexed().await.get("proxy:pass").await.unwrap();
    assert_eq!(value, "through");
}

#[tokio::test]
async fn fault_proxy_forwards_tls_with_the_fixture_url_rewritten() {
    let server = RedisServer::builder().tls().start();
    let proxy = FaultProxy::in_front_of(&server);
    assert!(
        proxy
            .url_for(&server.url())
            .starts_with("rediss://127.0.0.1:")
    );
    let mut con = proxy
        .client_for(&server)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = con.set("proxy:tls", "secret").await.unwrap();
    let value: String = con.get("proxy:tls").await.unwrap();
    assert_eq!(value, "secret");
}

#[tokio::test]
async fn fault_proxy_delay_makes_every_reply_at_least_that_late() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut con = proxy
        .client_for(&server)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = con.set("proxy:delay", "late").await.unwrap();
    let delay = Duration::from_millis(300);
    proxy.delay(delay);
    assert_eq!(proxy.fault(), Fault::Delay(delay));
    for _ in 0..3 {
        let started = Instant::now();
        let value: String = con.get("proxy:delay").await.unwrap();
        assert_eq!(value, "late");
        assert!(
            started.elapsed() >= delay,
            "a GET took {:?}",
            started.elapsed()
        );
    }
    proxy.pass();
    let value: String = con.get("proxy:delay").await.unwrap();
    assert_eq!(value, "late");
}

#[test]
fn fault_proxy_stall_holds_every_byte_and_pass_releases_them_in_order() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut raw = raw_connect(&proxy);
    raw.write_all(&resp(&["SET", "proxy:stall", "kept"]))
        .unwrap();
    expect_bytes(&mut raw, b"+OK\r\n");

    proxy.stall();
    raw.write_all(&resp(&["GET", "proxy:stall"])).unwrap();
    raw.write_all(&resp(&["INCR", "proxy:stall:count"]))
        .unwrap();
    raw.write_all(&resp(&["GET", "proxy:stall"])).unwrap();
    // A GET with a 300 ms timeout times out: no byte of any reply comes through.
    expect_silence(&mut raw, Duration::from_millis(300));

    proxy.pass();
    // Every command was held, none lost, and the replies come in order.
    expect_bytes(&mut raw, b"$4\r\nkept\r\n:1\r\n$4\r\nkept\r\n");
    expect_silence(&mut raw, Duration::from_millis(200));
    raw.write_all(&resp(&["INCR", "proxy:stall:count"]))
        .unwrap();
    expect_bytes(&mut raw, b":2\r\n");
}

#[tokio::test]
async fn fault_proxy_stall_times_a_redis_client_out_and_pass_answers_it_again() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut con = short_timeout_connection(&proxy, &server).await;
    let () = con.set("proxy:stall", "value").await.unwrap();
    proxy.stall();
    let error = con.get::<_, String>("proxy:stall").await.unwrap_err();
    assert!(error.is_timeout(), "{error}");
    proxy.pass();
    let value: String = con.get("proxy:stall").await.unwrap();
    assert_eq!(value, "value");
    assert_eq!(proxy.connections(), 1, "the client kept its connection");
}

#[test]
fn fault_proxy_half_open_silences_existing_connections_without_fin_or_rst() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut hung = raw_connect(&proxy);
    hung.write_all(&resp(&["PING"])).unwrap();
    expect_bytes(&mut hung, b"+PONG\r\n");

    proxy.half_open();
    assert_eq!(proxy.fault(), Fault::Pass);
    for _ in 0..3 {
        hung.write_all(&resp(&["PING"]))
            .expect("writing to a half-open connection does not fail");
        expect_silence(&mut hung, Duration::from_millis(500));
    }
    let mut fresh = raw_connect(&proxy);
    fresh.write_all(&resp(&["PING"])).unwrap();
    expect_bytes(&mut fresh, b"+PONG\r\n");
    assert_eq!(proxy.connections(), 2);
    // Still nothing on the hung one.
    expect_silence(&mut hung, Duration::from_millis(300));
}

#[tokio::test]
async fn fault_proxy_half_open_times_out_existing_redis_connections_while_new_ones_work() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut hung = short_timeout_connection(&proxy, &server).await;
    let () = hung.set("proxy:half-open", "there").await.unwrap();
    proxy.half_open();
    for attempt in 0..3 {
        let error = hung.get::<_, String>("proxy:half-open").await.unwrap_err();
        assert!(error.is_timeout(), "attempt {attempt}: {error}");
    }
    let mut fresh = short_timeout_connection(&proxy, &server).await;
    let value: String = fresh.get("proxy:half-open").await.unwrap();
    assert_eq!(value, "there");
    assert_eq!(proxy.connections(), 2);
    let error = hung.get::<_, String>("proxy:half-open").await.unwrap_err();
    assert!(error.is_timeout(), "the old connection recovered: {error}");
}

#[test]
fn fault_proxy_reset_all_sends_rst_to_every_existing_connection() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut hung = raw_connect(&proxy);
    hung.write_all(&resp(&["PING"])).unwrap();
    expect_bytes(&mut hung, b"+PONG\r\n");
    proxy.half_open();
    let mut open = raw_connect(&proxy);
    open.write_all(&resp(&["PING"])).unwrap();
    expect_bytes(&mut open, b"+PONG\r\n");

    proxy.reset_all();
    // The live connection and the half-open one are both reset.
    expect_reset(&mut open);
    expect_reset(&mut hung);
    let mut fresh = raw_connect(&proxy);
    fresh.write_all(&resp(&["PING"])).unwrap();
    expect_bytes(&mut fresh, b"+PONG\r\n");
    assert_eq!(proxy.connections(), 3);
}

#[tokio::test]
async fn fault_proxy_reset_all_fails_the_next_command_and_new_connections_work() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let config = AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
    let client = proxy.client_for(&server);
    let mut con = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let () = con.set("proxy:reset", "kept").await.unwrap();
    proxy.reset_all();
    let error = con.get::<_, String>("proxy:reset").await.unwrap_err();
    assert!(error.is_connection_dropped(), "{error}");
    let mut fresh = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let value: String = fresh.get("proxy:reset").await.unwrap();
    assert_eq!(value, "kept");
    assert_eq!(proxy.connections(), 2);
}

#[test]
fn fault_proxy_refuse_resets_new_connections_until_pass() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let client = proxy.client_for(&server);
    let mut existing = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let () = redis::cmd("SET")
        .arg("proxy:refuse")
        .arg("v")
        .query(&mut existing)
        .unwrap();

    proxy.refuse();
    let mut raw = raw_connect(&proxy);
    expect_reset(&mut raw);
    let refused = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .and_then(|mut con| redis::cmd("PING").query::<String>(&mut con));
    assert!(
        refused.is_err(),
        "a new connection worked while refusing: {refused:?}"
    );
    // The existing connection carries on.
    let value: String = redis::cmd("GET")
        .arg("proxy:refuse")
        .query(&mut existing)
        .unwrap();
    assert_eq!(value, "v");
    assert_eq!(
        proxy.connections(),
        1,
        "refused connections are not counted"
    );

    proxy.pass();
    let mut fresh = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let value: String = redis::cmd("GET")
        .arg("proxy:refuse")
        .query(&mut fresh)
        .unwrap();
    assert_eq!(value, "v");
    assert_eq!(proxy.connections(), 2);
}

#[test]
fn dropping_the_fault_proxy_closes_its_connections_and_its_port() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let port = proxy.port();
    let mut raw = raw_connect(&proxy);
    raw.write_all(&resp(&["PING"])).unwrap();
    expect_bytes(&mut raw, b"+PONG\r\n");
    drop(proxy);
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buffer = [0; 16];
    let read = raw.read(&mut buffer);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
        "the connection stayed open: {read:?}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the port still accepts"
    );
}
