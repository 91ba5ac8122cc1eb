//! A password-protected Sentinel set: the primary's credentials and database given through `SentinelConfig`
//! (`primary_auth`, `primary_db`), the sentinels' own password in their URLs. The connection works, reaches the
//! promoted replica with the same credentials after a failover, and the limiter decides through it.
#![cfg(feature = "sentinel")]
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis_fixtures::RedisSentinel;
use tower_redis_ratelimit::sentinel::{SentinelConfig, SentinelConnection};
use tower_redis_ratelimit::{DecisionSource, Policy, RateLimiter};

const PASSWORD: &str = "primary-pw";
const SENTINEL_PASSWORD: &str = "sentinel-pw";

/// The value of `key` in database `db` of the server at `port`, read directly with the password.
fn read_direct(port: u16, db: i64, key: &str) -> Option<String> {
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}/{db}");
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    redis::cmd("GET").arg(key).query(&mut con).unwrap()
}

async fn set_get(
    con: &mut SentinelConnection,
    key: &str,
    value: &str,
) -> redis::RedisResult<String> {
    let () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(con)
        .await?;
    redis::cmd("GET").arg(key).query_async(con).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_and_the_promoted_replica_are_reached_with_the_configured_password_and_database()
 {
    let mut set = RedisSentinel::start_with_passwords(PASSWORD, SENTINEL_PASSWORD);
    let urls = set.sentinel_urls();
    assert!(
        urls.iter().all(|url| url.contains(SENTINEL_PASSWORD)),
        "{urls:?}"
    );
    let config = SentinelConfig::default()
        .primary_auth(None, PASSWORD)
        .primary_db(2);
    let connection = SentinelConnection::connect(&urls, set.master_name(), config)
        .await
        .unwrap();
    assert_eq!(connection.get_db(), 2);
    let mut con = connection.clone();
    assert_eq!(set_get(&mut con, "before", "1").await.unwrap(), "1");
    // Written in database 2 of the primary, not in 0.
    assert_eq!(
        read_direct(set.primary_port(), 2, "before").as_deref(),
        Some("1")
    );
    assert_eq!(read_direct(set.primary_port(), 0, "before"), None);

    // The limiter works through it too.
    let limiter = RateLimiter::builder()
        .redis(connection.clone())
        .prefix("auth-test:")
        .policy(Policy::new("api", 100, Duration::from_secs(60)).unwrap())
        .build()
        .unwrap();
    let decision = limiter.check("client").await;
    assert!(decision.allowed);
    assert_eq!(decision.source, DecisionSource::Redis);

    // Replication is asynchronous: make sure the replica has what the last assertion expects before the kill. Each
    // WAIT blocks for less than the connection's response timeout (a busy CI machine once took longer than that).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let acknowledged: Result<i64, _> = redis::cmd("WAIT")
            .arg(1)
            .arg(100)
            .query_async(&mut con)
            .await;
        if acknowledged == Ok(1) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the replica never acknowledged the writes: {acknowledged:?}"
        );
    }
    set.kill_primary();
    let promoted = set.wait_for_new_primary(Duration::from_secs(20));
    let until = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        match set_get(&mut con, "after", "2").await {
            Ok(reply) => break reply,
            Err(error) => {
                assert!(
                    Instant::now() < until,
                    "the promoted replica was not reached within 10 s: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(reply, "2");
    assert_eq!(read_direct(promoted, 2, "after").as_deref(), Some("2"));
    // The key written before the failover was replicated, in the same database.
    assert_eq!(read_direct(promoted, 2, "before").as_deref(), Some("1"));
    assert!(connection.reconnects() >= 2, "{connection:?}");
    assert_eq!(connection.get_db(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_primary_password_or_with_a_wrong_one_nothing_reaches_the_primary() {
    let set = RedisSentinel::start_with_password(PASSWORD);
    let urls = set.sentinel_urls();
    // No password: redis-rs checks the primary's role when it connects, which the primary refuses.
    let refused = SentinelConnection::connect(&urls, set.master_name(), SentinelConfig::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("NOAUTH"), "{refused}");
    // A wrong password, or an unknown user: the connection itself fails.
    for config in [
        SentinelConfig::default().primary_auth(None, "wrong"),
        SentinelConfig::default().primary_auth(Some("nobody"), PASSWORD),
    ] {
        let described = format!("{config:?}");
        let error = SentinelConnection::connect(&urls, set.master_name(), config)
            .await
            .expect_err(&described);
        assert_eq!(
            error.kind(),
            redis::ErrorKind::AuthenticationFailed,
            "{described}: {error}"
        );
    }
    // And the right password works on the same set.
    let mut con = SentinelConnection::connect(
        &urls,
        set.master_name(),
        SentinelConfig::default().primary_auth(None, PASSWORD),
    )
    .await
    .unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
}
