//! The examples on a password-protected Sentinel set (issue 8, item 2: "a managed Redis with a password"):
//! `rate-limited-api` with `REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`, `REDIS_PASSWORD` and `REDIS_DB` keeps its
//! limits on the primary, in that database, and on the promoted replica after a failover; with a wrong password it
//! runs on its local-only limiter, as it documents for an unusable Redis; `REDIS_PASSWORD` without
//! `REDIS_SENTINELS` stops start-up naming the variable.
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture or a process that misbehaves

use std::net::SocketAddr;
use std::time::Duration;

use redis_fixtures::RedisSentinel;

mod support;

use support::{Proc, Reply, get, poll, prefix, request, start};

const PASSWORD: &str = "primary-pw";
const SENTINEL_PASSWORD: &str = "sentinel-pw";

fn start_api(sentinels: &str, master: &str, extra: &[(&'static str, &str)]) -> Proc {
    let mut env = vec![
        ("REDIS_SENTINELS", sentinels.to_owned()),
        ("REDIS_SENTINEL_MASTER", master.to_owned()),
        ("REDIS_CONNECT_TIMEOUT_MS", "1000".to_owned()),
        ("PORT", "0".to_owned()),
        ("RATE_LIMIT_FREE", "3/1m".to_owned()),
    ];
    env.extend(
        extra
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned())),
    );
    start("rate-limited-api", &env)
}

fn items(api: SocketAddr, key: &str) -> Reply {
    request(api, "GET", "/items", None, &[("x-api-key", key)])
}

/// The keys matching `pattern` in database `db` of the server on `port`, read with the password.
fn keys(port: u16, db: i64, pattern: &str) -> Vec<String> {
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}/{db}");
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    redis::cmd("KEYS").arg(pattern).query(&mut con).unwrap()
}

#[test]
fn the_api_keeps_its_limits_on_the_password_protected_primary_and_after_a_failover() {
    let mut set = RedisSentinel::start_with_passwords(PASSWORD, SENTINEL_PASSWORD);
    let prefix = prefix("sentinel-auth");
    // The sentinels' own password travels in their URLs; the primary's in REDIS_PASSWORD.
    let api = start_api(
        &set.sentinel_urls().join(","),
        set.master_name(),
        &[
            ("REDIS_PASSWORD", PASSWORD),
            ("REDIS_DB", "1"),
            ("REDIS_PREFIX", &prefix),
        ],
    );
    let address = api.address();
    assert_eq!(
        get(address, "/health").json()["mode"],
        "redis",
        "{}",
        api.log()
    );
    assert!(
        !api.log().contains(PASSWORD) && !api.log().contains(SENTINEL_PASSWORD),
        "a password was logged:\n{}",
        api.log()
    );

    let statuses: Vec<u16> = (0..3).map(|_| items(address, "free_ada").status).collect();
    assert_eq!(statuses, [200, 200, 200]);
    let denied = items(address, "free_ada");
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(denied.json()["decided_by"], "redis");
    // The counters are on the primary, in database 1 (and none in 0).
    let pattern = format!("{prefix}api:rl:*");
    assert!(
        !keys(set.primary_port(), 1, &pattern).is_empty(),
        "no {pattern} key in database 1 of the primary"
    );
    assert!(keys(set.primary_port(), 0, &pattern).is_empty());

    set.kill_primary();
    let promoted = set.wait_for_new_primary(Duration::from_secs(20));
    // Decisions come from Redis again, now on the promoted replica (reached with the password, in database 1):
    // a key it had never seen before the failover gets a counter there.
    let bob = format!("{prefix}api:rl:{{hdr:x-api-key:free_bob}}:*");
    let counted = poll(Duration::from_secs(10), || {
        let reply = items(address, "free_bob");
        (reply.status == 200 && !keys(promoted, 1, &bob).is_empty()).then_some(())
    });
    assert!(
        counted.is_some(),
        "no counter for free_bob on the promoted replica; keys there: {:?}\n{}",
        keys(promoted, 1, &pattern),
        api.log()
    );
    assert!(keys(promoted, 0, &pattern).is_empty());
    assert_eq!(get(address, "/health").json()["mode"], "redis");
}

#[test]
fn a_wrong_password_leaves_the_api_on_its_local_limiter_and_host_port_sentinels_work() {
    let set = RedisSentinel::start_with_password(PASSWORD);
    // `host:port` entries (the sentinel needs no password of its own here).
    let sentinels = set.sentinel_addrs().join(",");

    let prefix_wrong = prefix("sentinel-wrong-pw");
    let wrong = start_api(
        &sentinels,
        set.master_name(),
        &[
            ("REDIS_PASSWORD", "not-it"),
            ("REDIS_PREFIX", &prefix_wrong),
        ],
    );
    let address = wrong.address();
    assert_eq!(get(address, "/health").json()["mode"], "single-instance");
    let allowed: Vec<u16> = (0..3).map(|_| items(address, "free_ada").status).collect();
    assert_eq!(allowed, [200, 200, 200]);
    let denied = items(address, "free_ada");
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(denied.json()["decided_by"], "local");
    let log = wrong.log();
    assert!(log.contains("SINGLE-INSTANCE MODE"), "{log}");
    assert!(log.contains("uthentication"), "{log}");
    assert!(!log.contains("not-it"), "the password was logged:\n{log}");
    assert!(keys(set.primary_port(), 0, &format!("{prefix_wrong}*")).is_empty());

    let prefix_right = prefix("sentinel-right-pw");
    let right = start_api(
        &sentinels,
        set.master_name(),
        &[
            ("REDIS_PASSWORD", PASSWORD),
            ("REDIS_PREFIX", &prefix_right),
        ],
    );
    let address = right.address();
    assert_eq!(
        get(address, "/health").json()["mode"],
        "redis",
        "{}",
        right.log()
    );
    assert_eq!(items(address, "free_ada").status, 200);
    assert!(!keys(set.primary_port(), 0, &format!("{prefix_right}api:rl:*")).is_empty());
}

#[test]
fn primary_credentials_without_sentinels_stop_start_up_naming_the_variable() {
    for (variable, value, elsewhere) in [
        ("REDIS_PASSWORD", "pw", ("REDIS_URL", "redis://127.0.0.1:1")),
        ("REDIS_DB", "2", ("REDIS_URL", "redis://127.0.0.1:1")),
        (
            "REDIS_USERNAME",
            "app",
            ("REDIS_CLUSTER_NODES", "redis://127.0.0.1:1"),
        ),
    ] {
        let mut process = start(
            "rate-limited-api",
            &[
                (variable, value.to_owned()),
                (elsewhere.0, elsewhere.1.to_owned()),
                ("PORT", "0".to_owned()),
            ],
        );
        let status = process.wait_exit(Duration::from_secs(10));
        let log = process.log();
        assert_eq!(status.code(), Some(2), "{variable}: {log}");
        assert!(
            log.contains(&format!("{variable}: is only used with REDIS_SENTINELS")),
            "{log}"
        );
        assert!(log.contains(elsewhere.0), "{log}");
        assert!(!log.contains("listening on"), "started anyway:\n{log}");
    }
}

#[test]
fn over_tls_the_sentinels_and_the_primary_are_trusted_through_redis_ca_file() {
    let mut set = RedisSentinel::start_tls_with_password(PASSWORD);
    let ca = set.tls_material().unwrap().ca_file.display().to_string();
    // The sentinels are reached on their TLS ports only, and they report the servers' TLS ports: a decision from
    // Redis means TLS to both.
    let sentinels = set.sentinel_tls_urls().join(",");
    assert!(sentinels.starts_with("rediss://"), "{sentinels}");
    let prefix = prefix("sentinel-tls");
    let api = start_api(
        &sentinels,
        set.master_name(),
        &[
            ("REDIS_PASSWORD", PASSWORD),
            ("REDIS_CA_FILE", &ca),
            ("REDIS_PREFIX", &prefix),
        ],
    );
    let address = api.address();
    assert_eq!(
        get(address, "/health").json()["mode"],
        "redis",
        "{}",
        api.log()
    );
    assert_eq!(items(address, "free_ada").status, 200);
    let pattern = format!("{prefix}api:rl:*");
    assert!(!keys(set.primary_port(), 0, &pattern).is_empty());

    set.kill_primary();
    let promoted = set.wait_for_new_primary(Duration::from_secs(20));
    let bob = format!("{prefix}api:rl:{{hdr:x-api-key:free_bob}}:*");
    let counted = poll(Duration::from_secs(10), || {
        let reply = items(address, "free_bob");
        (reply.status == 200 && !keys(promoted, 0, &bob).is_empty()).then_some(())
    });
    assert!(
        counted.is_some(),
        "no counter for free_bob on the promoted replica over TLS\n{}",
        api.log()
    );

    // Without the CA file the system's roots do not know the test CA: the API runs on its local limiter.
    let untrusted = start_api(
        &sentinels,
        set.master_name(),
        &[("REDIS_PASSWORD", PASSWORD), ("REDIS_PREFIX", &prefix)],
    );
    let address = untrusted.address();
    assert_eq!(
        get(address, "/health").json()["mode"],
        "single-instance",
        "{}",
        untrusted.log()
    );
    let log = untrusted.log();
    assert!(log.contains("UnknownIssuer"), "{log}");
}
