//! The `rate-limited-api` and tonic examples end to end: the binaries run as real processes against a real
//! `redis-server` (or none), driven over HTTP and through `tonic-client`, whose per-call lines and summary are read
//! from its output.
//!
//! Cargo builds the package's binaries before these tests (`CARGO_BIN_EXE_*`). Every test starts
//! its own Redis and its own processes on free ports with a key prefix of its own, and kills every process it
//! started when it ends, even on a panic. Limits use one-minute windows, so no test depends on timing.
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture or a process that misbehaves

use std::net::SocketAddr;
use std::time::Duration;

use redis_fixtures::RedisServer;
use serde_json::Value;

mod support;

use support::{Proc, Reply, closed_port, get, poll, prefix, request, start, start_with_args};

// ---------------------------------------------------------------------------------------------------------------
// rate-limited-api

/// The API on `redis` (or on a closed port when `None`) with `limits` on top of the defaults.
fn start_api(redis: Option<&RedisServer>, prefix: &str, limits: &[(&'static str, &str)]) -> Proc {
    let url = redis.map_or_else(
        || format!("redis://127.0.0.1:{}", closed_port()),
        RedisServer::url,
    );
    let mut env = vec![
        ("REDIS_URL", url),
        ("REDIS_PREFIX", prefix.to_owned()),
        ("REDIS_CONNECT_TIMEOUT_MS", "500".to_owned()),
        ("PORT", "0".to_owned()),
    ];
    env.extend(
        limits
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned())),
    );
    start("rate-limited-api", &env)
}

fn items(api: SocketAddr, key: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = key.map(|key| ("x-api-key", key)).into_iter().collect();
    request(api, "GET", "/items", None, &headers)
}

fn create_item(api: SocketAddr, key: &str) -> Reply {
    request(
        api,
        "POST",
        "/items",
        Some(&serde_json::json!({"name": "tea"})),
        &[("x-api-key", key)],
    )
}

/// The statuses of `count` `GET /items` with `key`.
fn statuses(api: SocketAddr, key: Option<&str>, count: usize) -> Vec<u16> {
    (0..count).map(|_| items(api, key).status).collect()
}

#[test]
fn past_the_limit_the_api_answers_429_with_retry_after_and_the_ratelimit_fields() {
    let redis = RedisServer::start();
    let api = start_api(
        Some(&redis),
        &prefix("api-429"),
        &[("RATE_LIMIT_FREE", "3/1m")],
    );
    let address = api.address();

    let first = items(address, Some("free_ada"));
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("ratelimit-policy"), "\"free-1m\";q=3;w=60");
    assert!(
        first.header("ratelimit").starts_with("\"free-1m\";r=2;t="),
        "{first:?}"
    );
    assert_eq!(statuses(address, Some("free_ada"), 2), [200, 200]);

    let denied = items(address, Some("free_ada"));
    assert_eq!(denied.status, 429, "{denied:?}");
    // The sliding window frees room in steps of 1/8 window, so a minute's policy may ask for up to 67.5 s.
    let retry_after: u64 = denied.header("retry-after").parse().unwrap();
    assert!((1..=68).contains(&retry_after), "{denied:?}");
    assert_eq!(denied.header("ratelimit-policy"), "\"free-1m\";q=3;w=60");
    assert_eq!(
        denied.header("ratelimit"),
        format!("\"free-1m\";r=0;t={retry_after}")
    );
    let body = denied.json();
    assert_eq!(body["error"], "rate limit exceeded");
    assert_eq!(body["exhausted"], serde_json::json!(["free-1m"]));
    assert_eq!(body["decided_by"], "redis");

    // Every denial is Redis's, with the fields (the example turns the deny cache off).
    let again = items(address, Some("free_ada"));
    assert_eq!(again.status, 429);
    assert!(
        again.header("ratelimit").starts_with("\"free-1m\";r=0;t="),
        "{again:?}"
    );
    assert_eq!(again.json()["decided_by"], "redis");

    // Another key has its own budget; /health is never limited.
    assert_eq!(items(address, Some("free_bob")).status, 200);
    assert!((0..5).all(|_| get(address, "/health").status == 200));
    assert_eq!(get(address, "/health").json()["mode"], "redis");
}

#[test]
fn pro_keys_get_more_than_free_keys_and_callers_without_a_key_least() {
    let redis = RedisServer::start();
    let api = start_api(
        Some(&redis),
        &prefix("api-tiers"),
        &[
            ("RATE_LIMIT_ANONYMOUS", "1/1m"),
            ("RATE_LIMIT_FREE", "2/1m"),
            ("RATE_LIMIT_PRO", "100/1s,4/1m"),
        ],
    );
    let address = api.address();
    let anonymous = items(address, None);
    assert_eq!(anonymous.status, 200);
    assert_eq!(
        anonymous.header("ratelimit-policy"),
        "\"anonymous-1m\";q=1;w=60"
    );
    assert_eq!(items(address, None).status, 429);
    assert_eq!(statuses(address, Some("free_ada"), 3), [200, 200, 429]);
    assert_eq!(
        statuses(address, Some("pro_ada"), 5),
        [200, 200, 200, 200, 429]
    );
    let pro = items(address, Some("pro_grace"));
    assert_eq!(
        pro.header("ratelimit-policy"),
        "\"pro-1s\";q=100;w=1, \"pro-1m\";q=4;w=60"
    );
    assert!(
        pro.header("ratelimit")
            .starts_with("\"pro-1s\";r=99;t=1, \"pro-1m\";r=3;t="),
        "{pro:?}"
    );
}

#[test]
fn writes_have_a_stricter_policy_and_a_denied_write_costs_nothing_of_the_tier() {
    let redis = RedisServer::start();
    let api = start_api(
        Some(&redis),
        &prefix("api-writes"),
        &[("RATE_LIMIT_PRO", "5/1m"), ("RATE_LIMIT_WRITES", "2/1m")],
    );
    let address = api.address();
    let created = create_item(address, "pro_ada");
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.json()["name"], "tea");
    // An allowed write shows the tier's fields: 5 - 1 left.
    assert!(
        created.header("ratelimit").starts_with("\"pro-1m\";r=4;"),
        "{created:?}"
    );
    assert_eq!(create_item(address, "pro_ada").status, 201);
    let denied = create_item(address, "pro_ada");
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(denied.header("ratelimit-policy"), "\"writes-1m\";q=2;w=60");
    assert_eq!(denied.json()["exhausted"], serde_json::json!(["writes-1m"]));
    // Two writes and no more counted against the tier: three reads are left, then 429.
    assert_eq!(statuses(address, Some("pro_ada"), 4), [200, 200, 200, 429]);
    let listed = items(address, Some("pro_other"));
    assert_eq!(listed.json().as_array().map(Vec::len), Some(2));
}

#[test]
fn behind_a_trusted_proxy_callers_without_a_key_are_told_apart_by_x_forwarded_for() {
    let redis = RedisServer::start();
    let api = start_api(
        Some(&redis),
        &prefix("api-proxy"),
        &[("RATE_LIMIT_ANONYMOUS", "2/1m"), ("TRUSTED_PROXIES", "1")],
    );
    let address = api.address();
    let from = |client: &str| {
        (0..3)
            .map(|_| {
                request(
                    address,
                    "GET",
                    "/items",
                    None,
                    &[("x-forwarded-for", client)],
                )
                .status
            })
            .collect::<Vec<u16>>()
    };
    assert_eq!(from("203.0.113.7"), [200, 200, 429]);
    assert_eq!(from("203.0.113.8"), [200, 200, 429]);
    // A client cannot pick its key by prepending to the list: the proxy's entry (the right-most) counts.
    assert_eq!(from("198.51.100.1, 203.0.113.7"), [429, 429, 429]);
}

#[test]
fn two_instances_share_one_limit_through_redis() {
    let redis = RedisServer::start();
    let prefix = prefix("api-shared");
    let limits = [("RATE_LIMIT_FREE", "4/1m")];
    let one = start_api(Some(&redis), &prefix, &limits);
    let two = start_api(Some(&redis), &prefix, &limits);
    let (one, two) = (one.address(), two.address());
    let alternating: Vec<u16> = (0..6)
        .map(|i| items(if i % 2 == 0 { one } else { two }, Some("free_ada")).status)
        .collect();
    assert_eq!(alternating, [200, 200, 200, 200, 429, 429]);
}

#[test]
fn with_redis_unreachable_the_api_runs_on_a_local_only_limiter() {
    let api = start_api(
        None,
        &prefix("api-local"),
        &[("RATE_LIMIT_FREE", "2/1m"), ("RATE_LIMIT_WRITES", "1/1m")],
    );
    let address = api.address();
    assert!(api.log().contains("SINGLE-INSTANCE MODE"), "{}", api.log());
    assert_eq!(get(address, "/health").json()["mode"], "single-instance");

    assert_eq!(statuses(address, Some("free_ada"), 2), [200, 200]);
    let denied = items(address, Some("free_ada"));
    assert_eq!(denied.status, 429, "{denied:?}");
    let retry_after: u64 = denied.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{denied:?}");
    assert_eq!(denied.json()["decided_by"], "local");
    assert_eq!(create_item(address, "pro_ada").status, 201);
    assert_eq!(create_item(address, "pro_ada").status, 429);
}

#[test]
fn a_bad_limit_stops_start_up_with_a_message_naming_the_variable() {
    let cases = [
        ("rate-limited-api", "RATE_LIMIT_PRO", "fast"),
        ("rate-limited-api", "TRUSTED_PROXIES", "the usual ones"),
        ("rate-limited-api", "RATE_LIMIT_WRITES", "1/1s,10/1m"),
        (
            "rate-limited-api",
            "RATE_LIMIT_FREE",
            "18446744073709551615/1m",
        ),
        ("tonic-server", "RATE_LIMIT_CALLS", "0/1s"),
    ];
    for (binary, variable, value) in cases {
        let mut process = start(binary, &[(variable, value.to_owned())]);
        let status = process.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(2), "{binary} with {variable}={value}");
        let log = process.log();
        assert!(log.contains(variable), "{binary}: {log}");
        assert!(
            !log.contains("listening on"),
            "{binary} started anyway:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// tonic-server and tonic-client

/// A `tonic-server` on `redis` with `RATE_LIMIT_CALLS=limit`.
fn start_server(redis: &RedisServer, prefix: &str, limit: &str) -> Proc {
    start(
        "tonic-server",
        &[
            ("REDIS_URL", redis.url()),
            ("REDIS_PREFIX", prefix.to_owned()),
            ("PORT", "0".to_owned()),
            ("RATE_LIMIT_CALLS", limit.to_owned()),
        ],
    )
}

/// Waits until the registry holds `count` `UP` instances of `echo` under `prefix`.
fn wait_until_up(redis: &RedisServer, prefix: &str, count: usize) {
    let mut connection = redis.client().get_connection().unwrap();
    let up = poll(Duration::from_secs(15), || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}discovery:instance:echo:*"))
            .query(&mut connection)
            .unwrap();
        let up = keys
            .iter()
            .filter_map(|key| {
                redis::cmd("GET")
                    .arg(key)
                    .query::<Option<String>>(&mut connection)
                    .ok()
                    .flatten()
            })
            .filter_map(|json| serde_json::from_str::<Value>(&json).ok())
            .filter(|instance| instance["status"] == "UP")
            .count();
        (up == count).then_some(())
    });
    assert!(up.is_some(), "{count} echo instances never were UP");
}

/// One line of `tonic-client` output: `call N: CODE [from ID] in T ms: detail`.
#[derive(Debug)]
struct Call {
    code: String,
    served_by: Option<String>,
    millis: u64,
    detail: String,
}

fn parse_call(line: &str) -> Option<Call> {
    let rest = line.strip_prefix("call ")?;
    let (_, rest) = rest.split_once(": ")?;
    let (head, detail) = rest.split_once(" ms: ")?;
    let (head, millis) = head.rsplit_once(" in ")?;
    let (code, served_by) = match head.split_once(" from ") {
        Some((code, id)) => (code, Some(id.to_owned())),
        None => (head, None),
    };
    Some(Call {
        code: code.to_owned(),
        served_by,
        millis: millis.parse().ok()?,
        detail: detail.to_owned(),
    })
}

fn calls(client: &Proc) -> Vec<Call> {
    client
        .lines()
        .iter()
        .filter_map(|line| parse_call(line))
        .collect()
}

fn summary(client: &Proc) -> Value {
    let lines = client.lines();
    let line = lines
        .iter()
        .find_map(|line| line.strip_prefix("summary "))
        .unwrap_or_else(|| panic!("no summary:\n{}", client.log()));
    serde_json::from_str(line).unwrap()
}

/// Runs `tonic-client` with `args` against `redis` and `prefix` until it exits by itself.
fn run_client(redis: &RedisServer, prefix: &str, args: &[&str]) -> Proc {
    let mut client = start_client(redis, prefix, args);
    let status = client.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "tonic-client failed:\n{}", client.log());
    client
}

fn start_client(redis: &RedisServer, prefix: &str, args: &[&str]) -> Proc {
    start_with_args(
        "tonic-client",
        args,
        &[
            ("REDIS_URL", redis.url()),
            ("REDIS_PREFIX", prefix.to_owned()),
        ],
    )
}

#[test]
fn the_tonic_client_balances_over_two_servers_found_through_the_registry() {
    let redis = RedisServer::start();
    let prefix = prefix("grpc-balance");
    let _one = start_server(&redis, &prefix, "1000/1m");
    let _two = start_server(&redis, &prefix, "1000/1m");
    wait_until_up(&redis, &prefix, 2);

    let client = run_client(&redis, &prefix, &["--count", "30", "--interval-ms", "10"]);
    let summary = summary(&client);
    assert_eq!(summary["calls"], 30, "{}", client.log());
    assert_eq!(
        summary["codes"],
        serde_json::json!({"OK": 30}),
        "{}",
        client.log()
    );
    let by_instance = summary["by_instance"].as_object().unwrap();
    assert_eq!(by_instance.len(), 2, "{summary}");
    assert!(
        by_instance
            .values()
            .all(|calls| calls.as_u64().unwrap() >= 1),
        "{summary}"
    );
    assert!(
        by_instance
            .keys()
            .all(|id| id.starts_with("echo:127.0.0.1:"))
    );
    assert_eq!(summary["breaker"], "closed");
    assert!(calls(&client).iter().all(|call| call.detail == "\"hello\""));
}

#[test]
fn past_the_shared_limit_tonic_calls_get_resource_exhausted_and_the_breaker_stays_closed() {
    let redis = RedisServer::start();
    let prefix = prefix("grpc-limit");
    let _one = start_server(&redis, &prefix, "5/1m");
    let _two = start_server(&redis, &prefix, "5/1m");
    wait_until_up(&redis, &prefix, 2);

    let client = run_client(
        &redis,
        &prefix,
        &["--count", "12", "--interval-ms", "0", "--api-key", "team-a"],
    );
    let calls = calls(&client);
    let codes: Vec<&str> = calls.iter().map(|call| call.code.as_str()).collect();
    // Five per minute for the key, whichever instance answers: the limit lives in Redis.
    assert_eq!(codes[..5], ["OK"; 5], "{}", client.log());
    assert_eq!(codes[5..], ["RESOURCE_EXHAUSTED"; 7], "{}", client.log());
    for denied in &calls[5..] {
        assert!(
            denied
                .detail
                .starts_with("rate limit exceeded (retry after "),
            "{denied:?}"
        );
        assert!(denied.served_by.is_some(), "{denied:?}");
    }
    // A server that rate-limits is healthy: the client's breaker does not count RESOURCE_EXHAUSTED.
    assert_eq!(summary(&client)["breaker"], "closed");
    // Another key still gets through.
    let other = run_client(&redis, &prefix, &["--count", "1", "--api-key", "team-b"]);
    assert_eq!(summary(&other)["codes"], serde_json::json!({"OK": 1}));
}

#[test]
fn with_every_server_killed_the_client_gets_unavailable_at_once_instead_of_hanging() {
    let redis = RedisServer::start();
    let prefix = prefix("grpc-killed");
    let mut one = start_server(&redis, &prefix, "1000/1m");
    let mut two = start_server(&redis, &prefix, "1000/1m");
    wait_until_up(&redis, &prefix, 2);

    let mut client = start_client(&redis, &prefix, &["--count", "40", "--interval-ms", "100"]);
    let answered = poll(Duration::from_secs(20), || {
        (calls(&client)
            .iter()
            .filter(|call| call.code == "OK")
            .count()
            >= 4)
            .then_some(())
    });
    assert!(answered.is_some(), "no answers:\n{}", client.log());
    // SIGKILL: the registrations stay in Redis until their TTL, so the client still "finds" both instances.
    one.child.kill().unwrap();
    two.child.kill().unwrap();

    let status = client.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{}", client.log());
    let calls = calls(&client);
    assert_eq!(calls.len(), 40, "{}", client.log());
    let first_failure = calls
        .iter()
        .position(|call| call.code != "OK")
        .unwrap_or_else(|| panic!("no call failed:\n{}", client.log()));
    // The call in flight when the servers died may fail any way; every later one is UNAVAILABLE, and quick: the
    // balancer's fail-fast and then the open breaker answer without waiting for a server.
    let later = &calls[first_failure + 1..];
    assert!(later.len() >= 20, "{}", client.log());
    for call in later {
        assert_eq!(call.code, "UNAVAILABLE", "{call:?}\n{}", client.log());
        assert!(call.millis < 2500, "{call:?}");
    }
    let rejected = later
        .iter()
        .filter(|call| call.detail.starts_with("circuit breaker is open"))
        .count();
    assert!(rejected >= 20, "{}", client.log());
    assert!(
        later
            .iter()
            .filter(|call| call.detail.starts_with("circuit breaker is open"))
            .all(|call| call.millis < 100),
        "{}",
        client.log()
    );
    assert_eq!(summary(&client)["breaker"], "open");
}

#[test]
fn without_redis_the_server_runs_alone_and_the_client_calls_it_by_address() {
    let server = start(
        "tonic-server",
        &[
            ("REDIS_URL", format!("redis://127.0.0.1:{}", closed_port())),
            ("REDIS_CONNECT_TIMEOUT_MS", "300".to_owned()),
            ("PORT", "0".to_owned()),
            ("RATE_LIMIT_CALLS", "2/1m".to_owned()),
        ],
    );
    let address = server.address();
    assert!(
        server.log().contains("SINGLE-INSTANCE MODE"),
        "{}",
        server.log()
    );
    let url = format!("http://{address}");
    let mut client = start_with_args(
        "tonic-client",
        &["--server", &url, "--count", "3", "--interval-ms", "0"],
        &[],
    );
    assert!(client.wait_exit(Duration::from_secs(30)).success());
    let codes: Vec<String> = calls(&client).into_iter().map(|call| call.code).collect();
    assert_eq!(
        codes,
        ["OK", "OK", "RESOURCE_EXHAUSTED"],
        "{}",
        client.log()
    );
}
