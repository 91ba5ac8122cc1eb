//! The TCP settings reach the socket: a connection made by `tcp::client` has a keepalive timer (read with `ss`),
//! one made by a plain `redis::Client` has none.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use redis_fixtures::{FaultProxy, RedisServer};

/// The `ss -o` line of the established connection to `port`.
fn socket_line(port: u16) -> String {
    let output = std::process::Command::new("ss")
        .args([
            "-tnoH",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("`ss` (iproute2) runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn our_connections_have_keepalive_and_plain_ones_do_not() {
    let server = RedisServer::start();
    // A proxy per connection gives each its own destination port to find it by.
    let ours = FaultProxy::in_front_of(&server);
    let plain = FaultProxy::in_front_of(&server);
    let client = tower_redis_core::tcp::client(ours.url_for(&server.url())).unwrap();
    let mut with = client.get_multiplexed_async_connection().await.unwrap();
    let mut without = plain
        .client_for(&server)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for connection in [&mut with, &mut without] {
        let pong: String = redis::cmd("PING").query_async(connection).await.unwrap();
        assert_eq!(pong, "PONG");
    }

    let line = socket_line(ours.port());
    assert!(
        line.contains("timer:(keepalive"),
        "no keepalive timer: {line:?}"
    );
    let line = socket_line(plain.port());
    assert!(!line.is_empty(), "the plain connection is listed");
    assert!(!line.contains("keepalive"), "{line:?}");
}
