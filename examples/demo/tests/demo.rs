//! The demo end to end: `user-service`, `order-service`, `gateway` and the `demo` launcher run as real processes
//! against a real `redis-server`, driven over HTTP as the README's walkthrough does.
//!
//! Cargo builds the package's binaries before these tests (`CARGO_BIN_EXE_*`). Every test starts its own Redis
//! and its own processes on free ports (`PORT=0`: each process prints the address it listens on) with a key prefix
//! of its own, and kills every process it started when it ends, even on a panic.
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture or a process that misbehaves

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use redis_fixtures::RedisServer;
use serde_json::{Value, json};

mod support;

use support::{
    Proc, Reply, closed_port, get, poll, prefix, request, start, wait_for_discovery,
    wait_for_orders_discovery,
};

/// The environment of a service of the shared demo: the test's Redis and prefix, any free port.
fn shared_env(
    redis: &RedisServer,
    prefix: &str,
    extra: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("REDIS_URL", redis.url()),
        ("REDIS_PREFIX", prefix.to_owned()),
        ("PORT", "0".to_owned()),
        ("RATE_LIMIT_WRITES", "1000/1m".to_owned()),
    ];
    for (name, value) in extra {
        env.retain(|(existing, _)| existing != name);
        env.push((name, (*value).to_owned()));
    }
    env
}

fn send(address: SocketAddr, method: &str, path: &str, body: &Value) -> Reply {
    request(address, method, path, Some(body), &[])
}

fn send_as(address: SocketAddr, method: &str, path: &str, body: &Value, api_key: &str) -> Reply {
    request(address, method, path, Some(body), &[("x-api-key", api_key)])
}

/// `/services` as `{name: number of UP instances}`, once it satisfies `ready` (polled with a deadline).
fn services_when(
    gateway: SocketAddr,
    ready: impl Fn(&HashMap<String, u64>) -> bool,
) -> HashMap<String, u64> {
    let mut last = HashMap::new();
    let found = poll(Duration::from_secs(20), || {
        let reply = get(gateway, "/services");
        if reply.status != 200 {
            return None;
        }
        last = reply.json()["services"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|entry| {
                (
                    entry["name"].as_str().unwrap_or("").to_owned(),
                    entry["up"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        ready(&last).then(|| last.clone())
    });
    found.unwrap_or_else(|| panic!("/services never got ready; last: {last:?}"))
}

/// `/services` lists the three services, and the gateway's own discovery knows both downstreams: requests through
/// it can be made.
fn gateway_ready(gateway: SocketAddr) -> HashMap<String, u64> {
    let services = services_when(gateway, all_three_up);
    wait_for_discovery(gateway);
    services
}

fn all_three_up(services: &HashMap<String, u64>) -> bool {
    ["user-service", "order-service", "gateway"]
        .iter()
        .all(|name| services.get(*name).copied().unwrap_or(0) >= 1)
}

/// The three services on `redis`, and the gateway's address once `/services` lists all three and the order service
/// has discovered the user service.
fn start_shared(
    redis: &RedisServer,
    prefix: &str,
    extra: &[(&'static str, &str)],
) -> (Vec<Proc>, SocketAddr) {
    let env = shared_env(redis, prefix, extra);
    let procs = vec![
        start("user-service", &env),
        start("order-service", &env),
        start("gateway", &env),
    ];
    let gateway = procs[2].address();
    gateway_ready(gateway);
    wait_for_orders_discovery(procs[1].address());
    (procs, gateway)
}

fn create_user(gateway: SocketAddr, name: &str) -> String {
    let reply = send(
        gateway,
        "POST",
        "/users",
        &json!({"name": name, "email": format!("{}@example.com", name.to_lowercase())}),
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    reply.json()["id"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------------------------------
// The walkthrough.

#[test]
fn the_walkthrough_works_over_three_processes_sharing_one_redis() {
    let redis = RedisServer::start();
    let prefix = prefix("walkthrough");
    let (_procs, gateway) = start_shared(&redis, &prefix, &[]);

    // Create a user, fetch it twice: the second answer is a cache hit.
    let user = create_user(gateway, "Ada");
    let first = get(gateway, &format!("/users/{user}"));
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json()["name"], "Ada");
    assert!(
        first.header("cache-status").contains("fwd=uri-miss"),
        "{first:?}"
    );
    let second = get(gateway, &format!("/users/{user}"));
    assert_eq!(second.status, 200);
    assert!(second.header("cache-status").contains("hit"), "{second:?}");
    assert!(
        second
            .header("x-upstream-instance")
            .starts_with("user-service:")
    );

    // An order for the user (the order service checks the user with the user service through discovery).
    let order = send(
        gateway,
        "POST",
        "/orders",
        &json!({"user_id": user, "item": "Analytical Engine", "quantity": 2}),
    );
    assert_eq!(order.status, 201, "{order:?}");
    let order = order.json();
    assert_eq!(order["status"], "created");
    let order_id = order["id"].as_str().unwrap().to_owned();
    let unknown = send(
        gateway,
        "POST",
        "/orders",
        &json!({"user_id": "999999", "item": "x"}),
    );
    assert_eq!(unknown.status, 422, "{unknown:?}");
    assert_eq!(unknown.json()["error"], "user 999999 does not exist");

    // The order with its user; cached; a change of the user invalidates both.
    let with_user = get(gateway, &format!("/orders/{order_id}"));
    assert_eq!(with_user.status, 200, "{with_user:?}");
    let body = with_user.json();
    assert_eq!(body["item"], "Analytical Engine");
    assert_eq!(body["quantity"], 2);
    assert_eq!(body["user"]["name"], "Ada");
    assert!(
        get(gateway, &format!("/orders/{order_id}"))
            .header("cache-status")
            .contains("hit")
    );
    let renamed = send(
        gateway,
        "PUT",
        &format!("/users/{user}"),
        &json!({"name": "Ada Lovelace"}),
    );
    assert_eq!(renamed.status, 200, "{renamed:?}");
    let user_after = get(gateway, &format!("/users/{user}"));
    assert_eq!(user_after.json()["name"], "Ada Lovelace");
    assert!(
        !user_after.header("cache-status").contains("hit"),
        "{user_after:?}"
    );
    let order_after = get(gateway, &format!("/orders/{order_id}"));
    assert_eq!(
        order_after.json()["user"]["name"],
        "Ada Lovelace",
        "{order_after:?}"
    );
    let paid = send(
        gateway,
        "PATCH",
        &format!("/orders/{order_id}"),
        &json!({"status": "paid"}),
    );
    assert_eq!(paid.status, 200, "{paid:?}");
    assert_eq!(
        get(gateway, &format!("/orders/{order_id}")).json()["status"],
        "paid"
    );

    // The registry, health, Redis health and metrics.
    let services = gateway_ready(gateway);
    assert_eq!(services.len(), 3, "{services:?}");
    let health = get(gateway, "/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["mode"], "redis");
    let redis_health = get(gateway, "/health/redis");
    assert_eq!(redis_health.status, 200, "{redis_health:?}");
    assert_eq!(redis_health.json()["status"], "up");
    assert!(redis_health.json()["latency_ms"].as_f64().is_some());
    let metrics = get(gateway, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics.header("content-type").starts_with("text/plain"));
    for name in [
        "tower_breaker_requests_total",
        "tower_redis_ratelimit_decisions_total",
        "tower_redis_cache_events_total",
        "demo_gateway_requests_total",
    ] {
        assert!(
            metrics.body.contains(name),
            "{name} is missing from /metrics"
        );
    }

    // Every key the demo wrote is in its namespace and expires.
    assert_eq!(redis.keys_without_ttl(), Vec::<String>::new());
}

#[test]
fn writes_beyond_the_burst_get_429_and_reads_are_not_limited() {
    let redis = RedisServer::start();
    let prefix = prefix("ratelimit");
    let env = shared_env(&redis, &prefix, &[("RATE_LIMIT_WRITES", "5/1m")]);
    let _users = start("user-service", &env);
    let gateway_proc = start("gateway", &env);
    let gateway = gateway_proc.address();
    services_when(gateway, |services| services.get("user-service") == Some(&1));

    let body = json!({"name": "Bob", "email": "bob@example.com"});
    let statuses: Vec<u16> = (0..7)
        .map(|_| send_as(gateway, "POST", "/users", &body, "burst-key").status)
        .collect();
    assert_eq!(statuses, [201, 201, 201, 201, 201, 429, 429]);
    let denied = send_as(gateway, "POST", "/users", &body, "burst-key");
    assert_eq!(denied.status, 429);
    assert!(
        denied
            .header("retry-after")
            .parse::<u64>()
            .is_ok_and(|after| after >= 1),
        "{denied:?}"
    );
    assert_eq!(denied.json()["error"], "rate limit exceeded");

    // Another API key has its own budget, and reads are never limited.
    let other = send_as(gateway, "POST", "/users", &body, "another-key");
    assert_eq!(other.status, 201);
    let id = other.json()["id"].as_str().unwrap().to_owned();
    for _ in 0..20 {
        assert_eq!(get(gateway, &format!("/users/{id}")).status, 200);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Scaling and failures.

fn orders_held(instance: SocketAddr) -> u64 {
    let health = get(instance, "/health");
    assert_eq!(health.status, 200, "{health:?}");
    health.json()["orders"].as_u64().unwrap()
}

#[test]
fn a_second_order_service_gets_traffic_and_killing_one_fails_no_request() {
    let redis = RedisServer::start();
    let prefix = prefix("scale");
    let (procs, gateway) = start_shared(&redis, &prefix, &[]);
    let first = procs[1].address();
    let user = create_user(gateway, "Grace");

    let env = shared_env(&redis, &prefix, &[]);
    let mut second = start("order-service", &env);
    let second_address = second.address();
    wait_for_orders_discovery(second_address);
    services_when(gateway, |services| {
        services.get("order-service") == Some(&2)
    });

    let mut created = Vec::new();
    for i in 0..20 {
        let reply = send(
            gateway,
            "POST",
            "/orders",
            &json!({"user_id": user, "item": format!("part {i}")}),
        );
        assert_eq!(reply.status, 201, "order {i}: {reply:?}");
        created.push(reply.json()["id"].as_str().unwrap().to_owned());
    }
    let (on_first, on_second) = (orders_held(first), orders_held(second_address));
    assert_eq!(on_first + on_second, 20);
    assert!(
        on_first > 0 && on_second > 0,
        "both instances get traffic: {on_first} and {on_second}"
    );
    // Every order can be read through the gateway, whichever instance holds it (peers ask each other).
    for id in &created {
        assert_eq!(
            get(gateway, &format!("/orders/{id}")).status,
            200,
            "order {id}"
        );
    }

    // Kill the second one (no deregistration: its registry entry stays until its TTL): nothing fails.
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    for i in 0..20 {
        let reply = send(
            gateway,
            "POST",
            "/orders",
            &json!({"user_id": user, "item": format!("after {i}")}),
        );
        assert_eq!(reply.status, 201, "order {i} after the kill: {reply:?}");
        let id = reply.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(get(gateway, &format!("/orders/{id}")).status, 200);
    }
    assert_eq!(orders_held(first), on_first + 20);
}

#[test]
fn killing_redis_mid_run_leaves_the_demo_answering() {
    let mut redis = RedisServer::start();
    let prefix = prefix("outage");
    let (_procs, gateway) = start_shared(&redis, &prefix, &[]);
    let user = create_user(gateway, "Edsger");
    assert_eq!(get(gateway, &format!("/users/{user}")).status, 200);
    let order = send(
        gateway,
        "POST",
        "/orders",
        &json!({"user_id": user, "item": "goto"}),
    );
    assert_eq!(order.status, 201);

    redis.kill();

    // The cache answers from memory, discovery keeps the instances it knew, the limiter decides locally.
    let cached = get(gateway, &format!("/users/{user}"));
    assert_eq!(cached.status, 200, "{cached:?}");
    assert!(cached.header("cache-status").contains("hit"), "{cached:?}");
    for i in 0..5 {
        let reply = send(
            gateway,
            "POST",
            "/orders",
            &json!({"user_id": user, "item": format!("no redis {i}")}),
        );
        assert_eq!(reply.status, 201, "{reply:?}");
        let id = reply.json()["id"].as_str().unwrap().to_owned();
        let read = get(gateway, &format!("/orders/{id}"));
        assert_eq!(read.status, 200, "{read:?}");
        assert_eq!(read.json()["user"]["name"], "Edsger");
    }
    let health = get(gateway, "/health/redis");
    assert_eq!(health.status, 503, "{health:?}");
    assert_eq!(health.json()["status"], "down");
    assert_eq!(get(gateway, "/health").status, 200);

    // Redis comes back (empty): the demo is back on it.
    redis.restart();
    let back = poll(Duration::from_secs(20), || {
        (get(gateway, "/health/redis").status == 200).then_some(())
    });
    assert!(back.is_some(), "the gateway never saw Redis again");
    gateway_ready(gateway);
}

// ---------------------------------------------------------------------------------------------------------------
// The launcher, single-instance mode, configuration.

#[test]
fn the_demo_launcher_starts_three_processes_and_an_interrupt_deregisters_them() {
    let redis = RedisServer::start();
    let prefix = prefix("launcher");
    let mut demo = start(
        "demo",
        &[
            ("REDIS_URL", redis.url()),
            ("REDIS_PREFIX", prefix.clone()),
            ("USER_SERVICE_PORT", "0".to_owned()),
            ("ORDER_SERVICE_PORT", "0".to_owned()),
            ("GATEWAY_PORT", "0".to_owned()),
        ],
    );
    let gateway = demo.address_of("gateway");
    demo.address_of("user-service");
    let orders = demo.address_of("order-service");
    gateway_ready(gateway);
    wait_for_orders_discovery(orders);
    let user = create_user(gateway, "Barbara");
    assert_eq!(get(gateway, &format!("/users/{user}")).status, 200);

    // Ctrl-C (SIGINT to the launcher alone): every child drains, deregisters and exits; so does the launcher.
    let status = Command::new("kill")
        .args(["-INT", &demo.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = demo.wait_exit(Duration::from_secs(20));
    assert!(
        exit.success(),
        "the launcher exited with {exit}; output:\n{}",
        demo.log()
    );
    let log = demo.log();
    for service in ["user-service", "order-service", "gateway"] {
        assert!(
            log.contains(&format!("{service}: deregistered")),
            "{service} did not deregister:\n{log}"
        );
    }
    let mut connection = redis.client().get_connection().unwrap();
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}discovery:instance:*"))
        .query(&mut connection)
        .unwrap();
    assert_eq!(left, Vec::<String>::new(), "registrations left behind");
}

#[test]
fn without_redis_the_demo_runs_in_one_process_in_single_instance_mode() {
    let demo = start(
        "demo",
        &[
            ("REDIS_URL", format!("redis://127.0.0.1:{}", closed_port())),
            ("REDIS_CONNECT_TIMEOUT_MS", "300".to_owned()),
            ("USER_SERVICE_PORT", "0".to_owned()),
            ("ORDER_SERVICE_PORT", "0".to_owned()),
            ("GATEWAY_PORT", "0".to_owned()),
            ("RATE_LIMIT_WRITES", "4/1m".to_owned()),
        ],
    );
    let gateway = demo.address_of("gateway");
    assert!(
        demo.log().contains("SINGLE-INSTANCE MODE"),
        "{}",
        demo.log()
    );
    gateway_ready(gateway);

    let user = create_user(gateway, "Alan");
    let order = send(
        gateway,
        "POST",
        "/orders",
        &json!({"user_id": user, "item": "tape"}),
    );
    assert_eq!(order.status, 201, "{order:?}");
    let order_id = order.json()["id"].as_str().unwrap().to_owned();
    let with_user = get(gateway, &format!("/orders/{order_id}"));
    assert_eq!(with_user.json()["user"]["name"], "Alan");
    assert!(
        get(gateway, &format!("/orders/{order_id}"))
            .header("cache-status")
            .contains("hit")
    );
    let redis_health = get(gateway, "/health/redis");
    assert_eq!(redis_health.status, 200);
    assert_eq!(redis_health.json()["status"], "single-instance");
    assert_eq!(get(gateway, "/health").json()["mode"], "single-instance");

    // Two writes so far; the local limiter allows two more in the minute.
    let statuses: Vec<u16> = (0..3)
        .map(|_| {
            send(
                gateway,
                "POST",
                "/users",
                &json!({"name": "X", "email": "x@example.com"}),
            )
            .status
        })
        .collect();
    assert_eq!(statuses, [201, 201, 429]);
    let denied = send(
        gateway,
        "POST",
        "/users",
        &json!({"name": "X", "email": "x@example.com"}),
    );
    assert_eq!(denied.json()["decided_by"], "local");
}

#[test]
fn a_bad_environment_value_stops_start_up_with_a_message_naming_the_variable() {
    let cases: [(&str, &str, &str); 3] = [
        ("gateway", "REDIS_COMMAND_TIMEOUT_MS", "soon"),
        ("user-service", "REDIS_URL", "http://127.0.0.1:6379"),
        ("demo", "GATEWAY_PORT", "gateway"),
    ];
    for (binary, variable, value) in cases {
        let mut process = start(binary, &[(variable, value.to_owned())]);
        let status = process.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(2), "{binary} with {variable}={value}");
        let log = process.log();
        assert!(
            log.contains(variable),
            "{binary}: the message does not name {variable}:\n{log}"
        );
        assert!(
            !log.contains("listening on"),
            "{binary} started anyway:\n{log}"
        );
    }
}

#[test]
fn rediss_with_a_password_and_a_private_ca_is_shared_mode() {
    let redis = RedisServer::builder().tls().password("e2e-secret").start();
    let ca = redis.tls_material().unwrap().ca_file.display().to_string();
    let users = start(
        "user-service",
        &[
            ("REDIS_URL", redis.url()),
            ("REDIS_CA_FILE", ca),
            ("REDIS_PREFIX", prefix("tls")),
            ("PORT", "0".to_owned()),
        ],
    );
    let health = get(users.address(), "/health");
    assert_eq!(health.json()["mode"], "redis", "{}", users.log());
    let mut connection = redis.client().get_connection().unwrap();
    let registered = poll(Duration::from_secs(10), || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}discovery:instance:*", prefix("tls")))
            .query(&mut connection)
            .unwrap();
        (keys.len() == 1).then_some(keys)
    });
    assert!(
        registered.is_some(),
        "the user service never registered over TLS"
    );
}

#[test]
fn on_a_redis_cluster_the_services_find_each_other_and_share_limits() {
    let cluster = redis_fixtures::RedisCluster::start();
    let prefix = prefix("cluster");
    let env = vec![
        ("REDIS_CLUSTER_NODES", cluster.urls().join(",")),
        ("REDIS_PREFIX", prefix),
        ("PORT", "0".to_owned()),
        ("RATE_LIMIT_WRITES", "3/1m".to_owned()),
    ];
    let _users = start("user-service", &env);
    let orders = start("order-service", &env);
    let gateway_proc = start("gateway", &env);
    let gateway = gateway_proc.address();
    gateway_ready(gateway);
    // Orders call the user service through their own discovery, one poll behind the gateway's at worst.
    wait_for_orders_discovery(orders.address());

    let user = create_user(gateway, "Leslie");
    let order = send(
        gateway,
        "POST",
        "/orders",
        &json!({"user_id": user, "item": "clock"}),
    );
    assert_eq!(order.status, 201, "{order:?}");
    let order_id = order.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        get(gateway, &format!("/orders/{order_id}")).json()["user"]["name"],
        "Leslie"
    );
    assert!(
        get(gateway, &format!("/orders/{order_id}"))
            .header("cache-status")
            .contains("hit")
    );
    let third = send(
        gateway,
        "POST",
        "/users",
        &json!({"name": "X", "email": "x@example.com"}),
    );
    assert_eq!(third.status, 201);
    let fourth = send(
        gateway,
        "POST",
        "/users",
        &json!({"name": "X", "email": "x@example.com"}),
    );
    assert_eq!(fourth.status, 429, "{fourth:?}");
    assert_eq!(fourth.json()["decided_by"], "redis");
}
