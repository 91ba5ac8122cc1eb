//! The demo end to end: `user-service`, `order-service`, `gateway` and the `demo` launcher run as real processes
//! against a real `redis-server`, driven over HTTP as the README's walkthrough does.
//!
//! The binaries are built once per test run (`cargo build -p examples --bins`). Every test starts its own Redis
//! and its own processes on free ports (`PORT=0`: each process prints the address it listens on) with a key prefix
//! of its own, and kills every process it started when it ends, even on a panic.
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture or a process that misbehaves

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis_fixtures::RedisServer;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------------------------
// Building and running the binaries.

/// The variable through which the dynamic loader finds libraries.
#[cfg(target_os = "macos")]
const LIBRARY_PATH: &str = "DYLD_FALLBACK_LIBRARY_PATH";
#[cfg(windows)]
const LIBRARY_PATH: &str = "PATH";
#[cfg(not(any(target_os = "macos", windows)))]
const LIBRARY_PATH: &str = "LD_LIBRARY_PATH";

/// The directory holding the freshly built example binaries.
fn binaries() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the tests package sits in the workspace")
            .to_path_buf();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map_or_else(|| root.join("target"), |dir| root.join(dir));
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "-p", "examples", "--bins", "--manifest-path"])
            .arg(root.join("Cargo.toml"));
        // `cargo test` gives the tests variables of their own package (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...) and
        // puts the target directory and the toolchain's libraries on the library path. Build scripts that watch
        // such variables (ring's, rustls') would see them change and rebuild, here and in every later plain build:
        // hand the inner cargo the environment the outer one was given.
        for (name, _) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&name)
            {
                cargo.env_remove(name);
            }
        }
        if let Some(paths) = std::env::var_os(LIBRARY_PATH) {
            let toolchain = Path::new(env!("CARGO")).parent().and_then(Path::parent);
            let kept: Vec<PathBuf> = std::env::split_paths(&paths)
                .filter(|path| {
                    !path.starts_with(&target)
                        && !toolchain.is_some_and(|toolchain| path.starts_with(toolchain))
                })
                .collect();
            if kept.is_empty() {
                cargo.env_remove(LIBRARY_PATH);
            } else if let Ok(joined) = std::env::join_paths(kept) {
                cargo.env(LIBRARY_PATH, joined);
            }
        }
        let status = cargo.status().expect("cannot run cargo");
        assert!(status.success(), "cargo build -p examples --bins failed");
        target.join("debug")
    })
}

/// A process started by a test; killed (and waited for) when dropped.
struct Proc {
    name: String,
    child: Child,
    output: Arc<Mutex<Output>>,
}

#[derive(Default)]
struct Output {
    lines: Vec<String>,
    /// `(service, address)` for every "<service> listening on http://<address>" line on standard output.
    listening: Vec<(String, SocketAddr)>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- output of {} ----\n{}", self.name, self.log());
        }
    }
}

fn read_lines(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<Output>>,
    stdout: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut output = output.lock().unwrap();
            if stdout && let Some(at) = line.find(" listening on http://") {
                let service = line[..at].rsplit(' ').next().unwrap_or("").to_owned();
                let address = line[at + " listening on http://".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("");
                if let Ok(address) = address.parse() {
                    output.listening.push((service, address));
                }
            }
            output.lines.push(line);
        }
    })
}

/// Starts the example binary `binary` with `env` on top of a clean environment (no REDIS_* or PORT from outside).
fn start(binary: &str, env: &[(&str, String)]) -> Proc {
    let path = binaries().join(format!("{binary}{}", std::env::consts::EXE_SUFFIX));
    let mut command = Command::new(&path);
    for (name, _) in std::env::vars() {
        if name.starts_with("REDIS_")
            || name.ends_with("_PORT")
            || ["PORT", "HOST", "ADVERTISE_HOST", "RATE_LIMIT_WRITES"].contains(&name.as_str())
        {
            command.env_remove(name);
        }
    }
    command
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", path.display()));
    let output = Arc::new(Mutex::new(Output::default()));
    read_lines(child.stdout.take().unwrap(), output.clone(), true);
    read_lines(child.stderr.take().unwrap(), output.clone(), false);
    Proc {
        name: binary.to_owned(),
        child,
        output,
    }
}

impl Proc {
    fn log(&self) -> String {
        self.output.lock().unwrap().lines.join("\n")
    }

    /// The address `service` printed it listens on.
    fn address_of(&self, service: &str) -> SocketAddr {
        let found = poll(Duration::from_secs(30), || {
            self.output
                .lock()
                .unwrap()
                .listening
                .iter()
                .find(|(name, _)| name == service)
                .map(|(_, address)| *address)
        });
        found.unwrap_or_else(|| panic!("{service} never said it listens; output:\n{}", self.log()))
    }

    /// The address of the binary's own service.
    fn address(&self) -> SocketAddr {
        self.address_of(&self.name.clone())
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}; output:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Polls `check` every 50 ms until it gives a value or `within` runs out.
fn poll<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A key prefix no other test uses.
fn prefix(test: &str) -> String {
    format!("e2e-{test}-{}:", std::process::id())
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

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

// ---------------------------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (one request per connection), so the tests read like the curl walkthrough.

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .unwrap_or_else(|error| panic!("cannot connect to {address}: {error}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("content-type: application/json\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|error| panic!("{method} {path}: cannot read the answer: {error}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line: {head:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn get(address: SocketAddr, path: &str) -> Reply {
    request(address, "GET", path, None, &[])
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

fn all_three_up(services: &HashMap<String, u64>) -> bool {
    ["user-service", "order-service", "gateway"]
        .iter()
        .all(|name| services.get(*name).copied().unwrap_or(0) >= 1)
}

/// The three services on `redis`, and the gateway's address once `/services` lists all three.
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
    services_when(gateway, all_three_up);
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
    let services = services_when(gateway, all_three_up);
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
        "tower_ratelimit_decisions_total",
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
    services_when(gateway, all_three_up);
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
    demo.address_of("order-service");
    services_when(gateway, all_three_up);
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
    services_when(gateway, all_three_up);

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
    let _orders = start("order-service", &env);
    let gateway_proc = start("gateway", &env);
    let gateway = gateway_proc.address();
    services_when(gateway, all_three_up);

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
