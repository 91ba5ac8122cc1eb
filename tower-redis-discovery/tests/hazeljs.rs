//! Interoperability with the real HazelJS discovery package (`@hazeljs/discovery` 2.0.2 from npm), both ways,
//! against a real `redis-server`:
//!
//! - Rust registers, HazelJS finds and calls: every field HazelJS reads has the type it expects, the status is UP
//!   only after `ready()`, HazelJS's filters match, its client reaches our axum server, and the entry stays UP for
//!   more than three TTLs of our heartbeats.
//! - HazelJS registers, Rust finds and calls: our registry decodes HazelJS's entry, `Discovery` + `balance` route to
//!   the Node server, and stop routing to it within TTL + poll interval after it is SIGKILLed.
//! - Unknown fields survive the other side's heartbeats, both ways.
//!
//! The Node side is `tests/hazeljs/` (`register.js`, `discover.js`, `annotate.js`); its dependencies are pinned by
//! `package-lock.json` and installed here with `npm ci` once per test binary. Without `node`, the tests are skipped
//! with a message, unless the `CI` environment variable is set: then a missing `node` or a failed `npm ci` fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on a broken fixture

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis::AsyncCommands;
use redis_fixtures::RedisServer;
use serde_json::{Value, json};
use test_support::eventually;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tower::{Service, ServiceExt};
use tower_redis_discovery::{
    BalanceOptions, Balanced, Discovery, HttpEndpoint, Instance, NoEndpoints, Protocol,
    RedisRegistry, Registration, Registry, Status, balance,
};

/// HazelJS's default key prefix (`RedisRegistryBackend`: `cfg.keyPrefix || "hazeljs:discovery:"`).
const HAZELJS_PREFIX: &str = "hazeljs:discovery:";
/// A short TTL so that "three TTLs" and "expired after a crash" fit in a few seconds.
const TTL: Duration = Duration::from_secs(2);

type Response = http::Response<hyper::body::Incoming>;
type Registry2s = RedisRegistry<redis::aio::ConnectionManager>;

// ---------------------------------------------------------------------------------------------------------------
// Node and npm
// ---------------------------------------------------------------------------------------------------------------

fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/hazeljs")
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|value| !value.is_empty())
}

/// Whether the Node side can run: `node` is installed and `tests/hazeljs/node_modules` matches the lockfile
/// (`npm ci` runs once per test binary otherwise). `false` only when `node` is missing outside CI.
fn node_available() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let version = std::process::Command::new("node").arg("--version").output();
        match version {
            Ok(output) if output.status.success() => {
                eprintln!(
                    "hazeljs interop: node {}",
                    String::from_utf8_lossy(&output.stdout).trim()
                );
            }
            other => {
                let why = match other {
                    Ok(output) => format!("`node --version` exited with {}", output.status),
                    Err(error) => format!("cannot run `node`: {error}"),
                };
                assert!(
                    !in_ci(),
                    "CI is set but Node.js is unavailable ({why}); install nodejs and npm (see .ci/run)"
                );
                // Straight to stderr: libtest captures `eprintln!` of passing tests, and a skip must be seen.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n\
                     ************************************************************************\n\
                     * SKIPPING the HazelJS interop tests: {why}.\n\
                     * Install Node.js 18+ and npm to run them (CI=1 makes this a failure).\n\
                     ************************************************************************\n"
                );
                return false;
            }
        }
        npm_ci();
        true
    })
}

/// Runs `npm ci` unless `node_modules` already holds exactly what `package-lock.json` pins (npm's hidden lockfile
/// `node_modules/.package-lock.json` lists the same packages).
fn npm_ci() {
    let dir = node_dir();
    let read = |path: PathBuf| -> Option<Value> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    };
    let wanted = read(dir.join("package-lock.json")).map(|mut lock| {
        if let Some(packages) = lock["packages"].as_object_mut() {
            packages.remove("");
        }
        lock["packages"].take()
    });
    let installed =
        read(dir.join("node_modules/.package-lock.json")).map(|mut lock| lock["packages"].take());
    if wanted.is_some() && wanted == installed {
        eprintln!("hazeljs interop: node_modules is up to date; skipping npm ci");
        return;
    }
    let started = Instant::now();
    let output = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|error| panic!("cannot run `npm ci` in {}: {error}", dir.display()));
    assert!(
        output.status.success(),
        "`npm ci` failed in {} ({}):\n{}\n{}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("hazeljs interop: npm ci took {:?}", started.elapsed());
}

/// Runs a one-shot script (`discover.js`, `annotate.js`) and returns its last stdout line as JSON.
async fn run_script(script: &str, args: &[String]) -> Value {
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("node")
            .arg(script)
            .args(args)
            .current_dir(node_dir())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("node {script} {args:?} did not finish in 20 s"))
    .unwrap_or_else(|error| panic!("cannot run node {script}: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node {script} {args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|error| panic!("node {script}: not JSON ({error}): {stdout}\n{stderr}"))
}

/// `discover.js`: what HazelJS's `DiscoveryClient` sees of `service` (and, with `request`, the answer of the
/// instance it chose).
async fn hazeljs_discover(redis_url: &str, service: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "--redis".to_owned(),
        redis_url.to_owned(),
        "--name".to_owned(),
        service.to_owned(),
    ];
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    run_script("discover.js", &args).await
}

/// A `register.js` process: a Node HTTP server registered through HazelJS's `ServiceRegistry`. Killed (SIGKILL)
/// when dropped.
struct HazelService {
    child: tokio::process::Child,
    id: String,
    port: u16,
    stderr: Arc<Mutex<String>>,
}

impl Drop for HazelService {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl HazelService {
    /// Starts `register.js` with `args` and waits for its `READY` line (it is registered and UP by then).
    async fn start(redis_url: &str, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new("node")
            .arg("register.js")
            .args(["--redis", redis_url])
            .args(args)
            .current_dir(node_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start node register.js: {error}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = [0_u8; 4096];
            while let Ok(read) = pipe.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("READY ") {
                    return Some(serde_json::from_str::<Value>(rest).unwrap());
                }
            }
            None
        })
        .await;
        let mut service = Self {
            child,
            id: String::new(),
            port: 0,
            stderr,
        };
        match ready {
            Ok(Some(ready)) => {
                service.id = ready["id"].as_str().unwrap().to_owned();
                service.port = u16::try_from(ready["port"].as_u64().unwrap()).unwrap();
                service
            }
            Ok(None) => panic!(
                "register.js exited before READY: {}",
                service.stderr.lock().unwrap()
            ),
            Err(_) => panic!(
                "register.js printed no READY within 20 s: {}",
                service.stderr.lock().unwrap()
            ),
        }
    }

    /// SIGKILL, as a crash: HazelJS does not deregister, its entry expires after the TTL.
    async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Rust side
// ---------------------------------------------------------------------------------------------------------------

/// An axum server on a free port: `/health` answers 200, every other path `rust:{port}`.
async fn serve() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .fallback(move || async move { format!("rust:{port}") });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

fn balanced(discovery: Discovery) -> Balanced<http::Request<Empty<bytes::Bytes>>, Response> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    balance(
        discovery,
        move |instance| HttpEndpoint::new(client.clone(), instance),
        BalanceOptions::default(),
    )
}

async fn whoami(
    service: &mut Balanced<http::Request<Empty<bytes::Bytes>>, Response>,
) -> Result<String, tower::BoxError> {
    let request = http::Request::get("/whoami").body(Empty::new()).unwrap();
    let response = service.ready().await?.call(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8(body.to_vec())?)
}

/// The stored JSON of an instance, parsed, or `None` when the key is missing.
async fn stored(server: &RedisServer, key: &str) -> Option<Value> {
    let mut connection = server.multiplexed().await;
    let json: Option<String> = connection.get(key).await.unwrap();
    json.map(|json| serde_json::from_str(&json).unwrap())
}

async fn key_ttl(server: &RedisServer, key: &str) -> i64 {
    let mut connection = server.multiplexed().await;
    connection.ttl(key).await.unwrap()
}

/// `YYYY-MM-DDTHH:MM:SS.sssZ`, what JavaScript's `Date.toISOString()` writes.
fn is_iso_millis(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 24
        && bytes.iter().enumerate().all(|(index, byte)| match index {
            4 | 7 => *byte == b'-',
            10 => *byte == b'T',
            13 | 16 => *byte == b':',
            19 => *byte == b'.',
            23 => *byte == b'Z',
            _ => byte.is_ascii_digit(),
        })
}

/// Asserts that HazelJS sees `entry` (one element of `discover.js`'s `instances`) as `expected`, with every field
/// of its `ServiceInstance` present with the type it declares, the dates parsed, and `zone` present only when set.
fn assert_hazeljs_sees(entry: &Value, expected: &Instance, status: &str) {
    let seen = &entry["seen"];
    let mut types = json!({
        "id": "string", "name": "string", "host": "string", "port": "number", "protocol": "string",
        "metadata": "object", "healthCheckPath": "string", "healthCheckInterval": "number",
        "tags": "string[]", "status": "string", "lastHeartbeat": "date", "registeredAt": "date",
    });
    if expected.zone.is_some() {
        types["zone"] = json!("string");
    }
    assert_eq!(
        entry["types"], types,
        "field types as HazelJS sees them: {entry}"
    );
    assert_eq!(seen["id"], json!(expected.id));
    assert_eq!(seen["name"], json!(expected.name));
    assert_eq!(seen["host"], json!(expected.host));
    assert_eq!(seen["port"], json!(expected.port));
    assert_eq!(seen["protocol"], json!("http"));
    assert_eq!(seen["metadata"], Value::Object(expected.metadata.clone()));
    assert_eq!(seen["healthCheckPath"], json!("/health"));
    assert_eq!(
        seen["healthCheckInterval"],
        json!(expected.health_check_interval)
    );
    assert_eq!(seen["tags"], json!(expected.tags));
    assert_eq!(seen["status"], json!(status));
    match &expected.zone {
        Some(zone) => assert_eq!(seen["zone"], json!(zone)),
        None => assert!(
            seen.get("zone").is_none(),
            "an unset zone is absent, as HazelJS leaves it: {seen}"
        ),
    }
    // `new Date(stored)` then `toISOString()` gives back exactly what we stored.
    assert_eq!(seen["registeredAt"], json!(expected.registered_at));
    assert_eq!(
        entry["rawDates"],
        json!({"lastHeartbeat": {"iso": true}, "registeredAt": {"iso": true}}),
        "timestamps are exactly Date.toISOString(): {entry}"
    );
    let raw: Value = serde_json::from_str(entry["raw"].as_str().unwrap()).unwrap();
    assert!(
        is_iso_millis(raw["lastHeartbeat"].as_str().unwrap()),
        "{raw}"
    );
    assert!(
        is_iso_millis(raw["registeredAt"].as_str().unwrap()),
        "{raw}"
    );
    // HazelJS's id shape: `{name}:{host}:{port}:{epoch_ms}`.
    let millis = expected
        .id
        .strip_prefix(&format!(
            "{}:{}:{}:",
            expected.name, expected.host, expected.port
        ))
        .unwrap();
    assert!(
        millis.len() == 13 && millis.bytes().all(|b| b.is_ascii_digit()),
        "{}",
        expected.id
    );
}

fn instances_of(found: &Value) -> &Vec<Value> {
    found["instances"].as_array().unwrap()
}

fn entry_for<'a>(found: &'a Value, id: &str) -> &'a Value {
    instances_of(found)
        .iter()
        .find(|entry| entry["seen"]["id"] == json!(id))
        .unwrap_or_else(|| panic!("HazelJS does not see {id}: {found}"))
}

async fn registry_2s(server: &RedisServer) -> Registry2s {
    RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(TTL)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// Rust registers, HazelJS discovers and calls
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hazeljs_finds_and_calls_a_rust_registered_service_across_three_ttls() {
    if !node_available() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    // No prefix set on either side: both defaults must be HazelJS's.
    let registry = registry_2s(&server).await;
    assert_eq!(
        registry.instance_key("x"),
        format!("{HAZELJS_PREFIX}instance:x")
    );
    assert_eq!(
        registry.service_key("rust-api"),
        format!("{HAZELJS_PREFIX}service:rust-api")
    );

    let port = serve().await;
    let mut instance = Instance::new("rust-api", "127.0.0.1", port);
    instance
        .metadata
        .insert("version".to_owned(), json!("1.2.3"));
    instance.metadata.insert("weight".to_owned(), json!(2));
    instance.tags = vec!["rust".to_owned(), "api".to_owned()];
    let started = Instant::now();
    let registration = Registration::start(registry.clone(), instance.clone()).unwrap();
    let key = registry.instance_key(&instance.id);
    eventually("our entry is written", Duration::from_secs(3), || {
        stored(&server, &key)
    })
    .await;

    // Before ready(): HazelJS lists it as STARTING, and its strategies (UP only) choose nothing.
    let found = hazeljs_discover(&url, "rust-api", &[]).await;
    assert_eq!(instances_of(&found).len(), 1, "{found}");
    assert_hazeljs_sees(entry_for(&found, &instance.id), &instance, "STARTING");
    assert_eq!(found["chosen"], Value::Null, "{found}");

    registration.ready();
    eventually("our entry turns UP", Duration::from_secs(3), || async {
        let value = stored(&server, &key).await?;
        (value["status"] == json!("UP")).then_some(())
    })
    .await;

    // The key shapes and TTLs HazelJS uses: a string with the TTL, a set with twice the TTL.
    let mut connection = server.multiplexed().await;
    let kind: String = redis::cmd("TYPE")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(kind, "string");
    let set_key = format!("{HAZELJS_PREFIX}service:rust-api");
    let members: Vec<String> = connection.smembers(&set_key).await.unwrap();
    assert_eq!(members, vec![instance.id.clone()]);
    let ttl = key_ttl(&server, &key).await;
    assert!((1..=2).contains(&ttl), "instance TTL {ttl}");
    let set_ttl = key_ttl(&server, &set_key).await;
    assert!((3..=4).contains(&set_ttl), "service set TTL {set_ttl}");

    // A second instance, in a zone and with other tags, to check HazelJS's filters against our fields.
    let zoned_port = serve().await;
    let mut zoned = Instance::new("rust-api", "127.0.0.1", zoned_port);
    zoned.zone = Some("eu-west-1".to_owned());
    zoned.tags = vec!["rust".to_owned()];
    let zoned_registration = Registration::start(registry.clone(), zoned.clone()).unwrap();
    zoned_registration.ready();
    let zoned_key = registry.instance_key(&zoned.id);
    eventually(
        "the zoned entry turns UP",
        Duration::from_secs(3),
        || async {
            let value = stored(&server, &zoned_key).await?;
            (value["status"] == json!("UP")).then_some(())
        },
    )
    .await;

    let found = hazeljs_discover(&url, "rust-api", &["--request", "/whoami"]).await;
    assert_eq!(instances_of(&found).len(), 2, "{found}");
    assert_hazeljs_sees(entry_for(&found, &instance.id), &instance, "UP");
    assert_hazeljs_sees(entry_for(&found, &zoned.id), &zoned, "UP");
    let chosen_port = found["chosen"]["port"].as_u64().unwrap();
    assert_eq!(
        found["response"],
        json!({"status": 200, "body": format!("rust:{chosen_port}")}),
        "HazelJS's request reaches the instance it chose: {found}"
    );

    let by_zone = hazeljs_discover(
        &url,
        "rust-api",
        &["--filter", r#"{"zone":"eu-west-1"}"#, "--request", "/zone"],
    )
    .await;
    assert_eq!(instances_of(&by_zone).len(), 1, "{by_zone}");
    assert_eq!(by_zone["chosen"]["id"], json!(zoned.id));
    assert_eq!(
        by_zone["response"]["body"],
        json!(format!("rust:{zoned_port}"))
    );
    let by_tags = hazeljs_discover(
        &url,
        "rust-api",
        &[
            "--filter",
            r#"{"tags":["rust","api"],"metadata":{"version":"1.2.3"}}"#,
            "--strategy",
            "weighted-round-robin",
            "--request",
            "/tags",
        ],
    )
    .await;
    assert_eq!(instances_of(&by_tags).len(), 1, "{by_tags}");
    assert_eq!(by_tags["chosen"]["id"], json!(instance.id));
    assert_eq!(by_tags["response"]["body"], json!(format!("rust:{port}")));

    // Keep going past three TTLs of our heartbeats: HazelJS sees it UP throughout and can call it every time.
    let mut heartbeats = std::collections::BTreeSet::new();
    let mut lookups = 0;
    while started.elapsed() < TTL * 3 + Duration::from_millis(500) {
        let found = hazeljs_discover(
            &url,
            "rust-api",
            &["--filter", r#"{"tags":["api"]}"#, "--request", "/whoami"],
        )
        .await;
        let entry = entry_for(&found, &instance.id);
        assert_hazeljs_sees(entry, &instance, "UP");
        heartbeats.insert(entry["seen"]["lastHeartbeat"].as_str().unwrap().to_owned());
        assert_eq!(found["chosen"]["id"], json!(instance.id), "{found}");
        assert_eq!(found["response"]["body"], json!(format!("rust:{port}")));
        lookups += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stats = registration.stats();
    println!(
        "HazelJS saw the Rust instance UP in {lookups} lookups over {:?}; {} distinct lastHeartbeat values; {} heartbeats written",
        started.elapsed(),
        heartbeats.len(),
        stats.heartbeats
    );
    assert!(
        heartbeats.len() >= 3,
        "lastHeartbeat advances: {heartbeats:?}"
    );
    assert!(
        stats.heartbeats >= 7,
        "about one heartbeat per ttl/3 (9 in three TTLs; slack for a loaded machine): {stats:?}"
    );
    assert_eq!(stats.failures, 0, "{stats:?}");

    // A graceful deregistration removes it for HazelJS too.
    registration.deregister(None).await.unwrap();
    let found = hazeljs_discover(&url, "rust-api", &[]).await;
    assert_eq!(instances_of(&found).len(), 1, "{found}");
    assert_eq!(instances_of(&found)[0]["seen"]["id"], json!(zoned.id));
    drop(zoned_registration);
}

// ---------------------------------------------------------------------------------------------------------------
// HazelJS registers, Rust discovers and calls
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_routes_to_a_hazeljs_registered_service_and_stops_after_it_dies() {
    if !node_available() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    // A custom prefix on both sides: HazelJS uses it exactly as given, and so do we.
    let prefix = "interop:hz:";
    let mut hazel = HazelService::start(
        &url,
        &[
            "--prefix",
            prefix,
            "--name",
            "hazel-api",
            "--ttl",
            "2",
            // HazelJS accepts (and writes) a fractional interval; we must still decode the entry.
            "--interval",
            "500.5",
            "--zone",
            "us-east-1",
            "--tags",
            "api,node",
            "--metadata",
            r#"{"version":"2.0.2","weight":3}"#,
        ],
    )
    .await;
    let ready = Instant::now();

    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .prefix(prefix)
        .build()
        .unwrap();
    assert!(
        stored(&server, &format!("{prefix}instance:{}", hazel.id))
            .await
            .is_some(),
        "HazelJS wrote {prefix}instance:{}",
        hazel.id
    );
    // Our registry decodes HazelJS's entry field by field.
    let found = registry.instances("hazel-api").await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let instance = &found[0];
    assert_eq!(instance.id, hazel.id);
    assert_eq!(instance.name, "hazel-api");
    assert_eq!(instance.host, "127.0.0.1");
    assert_eq!(instance.port, hazel.port);
    assert_eq!(instance.protocol, Protocol::Http);
    assert_eq!(instance.status, Status::Up);
    assert_eq!(instance.zone.as_deref(), Some("us-east-1"));
    assert_eq!(instance.tags, vec!["api", "node"]);
    assert_eq!(instance.metadata["version"], json!("2.0.2"));
    assert!((instance.weight() - 3.0).abs() < f64::EPSILON);
    assert_eq!(instance.health_check_path, "/health");
    assert_eq!(instance.health_check_interval, 501, "500.5 ms, rounded");
    assert!(
        is_iso_millis(&instance.last_heartbeat),
        "{}",
        instance.last_heartbeat
    );
    assert!(
        is_iso_millis(&instance.registered_at),
        "{}",
        instance.registered_at
    );
    assert!(
        instance.extra.is_empty(),
        "HazelJS writes no field we do not know: {:?}",
        instance.extra
    );
    assert_eq!(registry.services().await.unwrap(), vec!["hazel-api"]);

    let interval = Duration::from_millis(200);
    // The service's only instance expiring reads as an empty service, which self-preservation would hold for
    // 2 x TTL (a registry that lost its data reads the same); this test measures the TTL path itself.
    let options = Discovery::builder()
        .interval(interval)
        .without_self_preservation();
    let mut service = balanced(
        options
            .registry(registry.clone())
            .service("hazel-api")
            .build()
            .unwrap(),
    );
    let expected = format!("hazel:hazel-api:{}", hazel.port);
    let first = eventually(
        "a request reaches the HazelJS service",
        Duration::from_secs(3),
        || {
            let mut service = service.clone();
            async move {
                match whoami(&mut service).await {
                    Ok(body) => Some(body),
                    Err(error) if error.is::<NoEndpoints>() => None,
                    Err(error) => panic!("request failed: {error}"),
                }
            }
        },
    )
    .await;
    assert_eq!(first, expected);
    let discovered = ready.elapsed();
    println!("first request reached the HazelJS service {discovered:?} after READY");
    assert!(
        discovered < interval + Duration::from_millis(800),
        "found within one poll: {discovered:?}"
    );
    for _ in 0..20 {
        assert_eq!(whoami(&mut service).await.unwrap(), expected);
    }

    // A crash: HazelJS cannot deregister, so the entry expires after its TTL; we stop routing by TTL + poll.
    hazel.kill().await;
    let killed = Instant::now();
    let mut failed_requests = 0;
    loop {
        match whoami(&mut service).await {
            Err(error) if error.is::<NoEndpoints>() => break,
            Ok(body) => panic!("a killed process answered: {body}"),
            Err(_) => failed_requests += 1, // connection refused until the entry expires
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "still routing to the dead instance after {:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone = killed.elapsed();
    println!(
        "stopped routing to the killed HazelJS instance {gone:?} after SIGKILL ({failed_requests} requests refused meanwhile)"
    );
    let bound = TTL + interval.mul_f64(1.1) + Duration::from_millis(500);
    assert!(
        gone <= bound,
        "took {gone:?}, more than TTL + poll ({bound:?})"
    );
    assert!(registry.instances("hazel-api").await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------------------------
// Unknown fields survive the other side's heartbeats
// ---------------------------------------------------------------------------------------------------------------

/// Both sides rewrite an entry with GET then SET (HazelJS with separate commands); a write by the other side
/// landing between them is lost for that one beat (HazelJS's own race, quirk 8 in the reference). So each check
/// gets three attempts; a side that drops unknown fields fails all of them.
const ATTEMPTS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_hazeljs_adds_survives_our_heartbeats() {
    if !node_available() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let registry = registry_2s(&server).await;
    let instance = Instance::new("fields-rust", "127.0.0.1", serve().await);
    let registration = Registration::start(registry.clone(), instance.clone()).unwrap();
    registration.ready();
    let key = registry.instance_key(&instance.id);
    eventually("our entry turns UP", Duration::from_secs(3), || async {
        let value = stored(&server, &key).await?;
        (value["status"] == json!("UP")).then_some(())
    })
    .await;

    let extra = json!({"from": "node", "list": [1, 2, {"deep": true}]});
    let mut survived = false;
    for attempt in 1..=ATTEMPTS {
        // HazelJS-style rewrite with the extra field, then HazelJS's own heartbeat on our entry.
        let annotated = run_script(
            "annotate.js",
            &[
                "--redis".to_owned(),
                url.clone(),
                "--id".to_owned(),
                instance.id.clone(),
                "--field".to_owned(),
                "hazelExtra".to_owned(),
                "--value".to_owned(),
                extra.to_string(),
                "--ttl".to_owned(),
                "2".to_owned(),
            ],
        )
        .await;
        assert_eq!(annotated["hazelExtra"], extra, "{annotated}");
        assert_eq!(annotated["status"], json!("UP"));
        assert!(is_iso_millis(annotated["lastHeartbeat"].as_str().unwrap()));
        // Two of our heartbeats later (a heartbeat is about ttl/3).
        let before = registration.stats().heartbeats;
        eventually("two more heartbeats", Duration::from_secs(3), || async {
            (registration.stats().heartbeats >= before + 2).then_some(())
        })
        .await;
        let after = stored(&server, &key).await.expect("entry present");
        assert_eq!(after["status"], json!("UP"), "{after}");
        assert_ne!(
            after["lastHeartbeat"], annotated["lastHeartbeat"],
            "our heartbeat rewrote the entry: {after}"
        );
        if after["hazelExtra"] == extra {
            survived = true;
            break;
        }
        eprintln!("attempt {attempt}: hazelExtra missing after our heartbeats: {after}");
    }
    assert!(
        survived,
        "a field written by HazelJS is kept across our heartbeats"
    );
    // HazelJS still reads the entry, field included.
    let found = hazeljs_discover(&url, "fields-rust", &[]).await;
    let entry = entry_for(&found, &instance.id);
    assert_eq!(entry["seen"]["hazelExtra"], extra, "{entry}");
    assert_eq!(entry["seen"]["status"], json!("UP"));
    assert_eq!(found["chosen"]["id"], json!(instance.id));
    drop(registration);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_we_add_survives_hazeljs_heartbeats() {
    if !node_available() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let hazel = HazelService::start(
        &url,
        &[
            "--name",
            "fields-hazel",
            "--ttl",
            "2",
            "--interval",
            "400",
            "--metadata",
            r#"{"nested":{"a":[1,2]},"flag":true}"#,
        ],
    )
    .await;
    let registry = registry_2s(&server).await;
    let key = registry.instance_key(&hazel.id);
    let extra = json!({"from": "rust", "n": 7});
    let mut survived = false;
    for attempt in 1..=ATTEMPTS {
        let original = stored(&server, &key).await.expect("HazelJS's entry");
        // Through our code: decode HazelJS's entry, add a field, write it back with our registry.
        let mut instance = registry
            .instances("fields-hazel")
            .await
            .unwrap()
            .into_iter()
            .find(|instance| instance.id == hazel.id)
            .expect("our registry decodes HazelJS's entry");
        instance.extra.insert("rustExtra".to_owned(), extra.clone());
        registry.register(&instance).await.unwrap();
        let written = stored(&server, &key).await.expect("our write");
        // Our round trip changed nothing HazelJS wrote (the entry may have heartbeated in between: compare the rest).
        let without = |value: &Value| {
            let mut value = value.clone();
            let object = value.as_object_mut().unwrap();
            object.remove("rustExtra");
            object.remove("lastHeartbeat");
            value
        };
        assert_eq!(
            without(&written),
            without(&original),
            "our rewrite of a HazelJS entry is lossless"
        );
        // Wait for HazelJS's heartbeat (GET, JSON.parse, JSON.stringify, SETEX) to rewrite the entry twice.
        let mut beats = 0;
        let mut last = written["lastHeartbeat"].clone();
        let deadline = Instant::now() + Duration::from_secs(3);
        let after = loop {
            let value = stored(&server, &key)
                .await
                .expect("HazelJS keeps its entry");
            if value["lastHeartbeat"] != last {
                last = value["lastHeartbeat"].clone();
                beats += 1;
                if beats >= 2 {
                    break value;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no two HazelJS heartbeats in 3 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(after["status"], json!("UP"), "{after}");
        if after["rustExtra"] == extra {
            survived = true;
            break;
        }
        eprintln!("attempt {attempt}: rustExtra missing after HazelJS's heartbeats: {after}");
    }
    assert!(
        survived,
        "a field written by us is kept across HazelJS's heartbeats"
    );
    let found = hazeljs_discover(&url, "fields-hazel", &[]).await;
    assert_eq!(
        entry_for(&found, &hazel.id)["seen"]["rustExtra"],
        extra,
        "{found}"
    );
    drop(hazel);
}

// ---------------------------------------------------------------------------------------------------------------
// Sharing a service with HazelJS instances of a longer TTL
// ---------------------------------------------------------------------------------------------------------------

/// HazelJS's heartbeat only refreshes the service set's TTL (`EXPIRE`); it never re-adds its id. A Rust instance
/// with a short TTL in the same service must therefore never shorten the set's TTL: if it did, the set would expire
/// soon after the Rust instance left, and every HazelJS instance of the service would vanish for good while
/// running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_ttl_rust_instance_does_not_make_hazeljs_instances_vanish() {
    if !node_available() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    // HazelJS defaults (ttl 90 s, set 180 s), and no heartbeat during the test.
    let hazel = HazelService::start(&url, &["--name", "shared", "--interval", "60000"]).await;
    let set_key = format!("{HAZELJS_PREFIX}service:shared");
    let hazel_set_ttl = key_ttl(&server, &set_key).await;
    assert!(hazel_set_ttl > 170, "HazelJS set TTL {hazel_set_ttl}");

    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let rust = Instance::new("shared", "127.0.0.1", serve().await);
    let registration = Registration::start(registry.clone(), rust.clone()).unwrap();
    registration.ready();
    let before = registration.stats().heartbeats;
    eventually("three heartbeats", Duration::from_secs(3), || async {
        (registration.stats().heartbeats >= before + 3).then_some(())
    })
    .await;
    let members = {
        let mut connection = server.multiplexed().await;
        let members: Vec<String> = connection.smembers(&set_key).await.unwrap();
        members
    };
    assert!(
        members.contains(&rust.id) && members.contains(&hazel.id),
        "{members:?}"
    );
    let set_ttl = key_ttl(&server, &set_key).await;
    assert!(
        set_ttl > 170,
        "our heartbeats shortened the service set's TTL from {hazel_set_ttl} s to {set_ttl} s"
    );

    // The Rust instance stops (a crash: no deregistration). Past its entry's TTL and twice that, HazelJS still
    // finds its own running instance.
    drop(registration);
    let stopped = Instant::now();
    eventually("the Rust entry expires", Duration::from_secs(3), || async {
        stored(&server, &registry.instance_key(&rust.id))
            .await
            .is_none()
            .then_some(())
    })
    .await;
    tokio::time::sleep((Duration::from_millis(2_500)).saturating_sub(stopped.elapsed())).await;
    let found = hazeljs_discover(&url, "shared", &[]).await;
    assert_eq!(instances_of(&found).len(), 1, "{found}");
    assert_eq!(found["chosen"]["id"], json!(hazel.id), "{found}");
    drop(hazel);
}
