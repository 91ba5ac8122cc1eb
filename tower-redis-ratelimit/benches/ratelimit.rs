//! End-to-end figures for the rate limiter against a private `redis-server` (from `redis-fixtures`; never the Redis
//! on 6379). A plain `main` (`harness = false`) with its own timing and percentiles; it prints markdown.
//!
//! ```text
//! cargo bench -p tower-redis-ratelimit --bench ratelimit                 # every section
//! cargo bench -p tower-redis-ratelimit --bench ratelimit -- throughput   # or latency, flood, memory
//! ```
//!
//! - `throughput`: `redis-benchmark` running the limiter's own script (read at run time from `src/script.rs`) with
//!   EVALSHA, 50 clients, one key, a limit so large that every decision is an allowed write; then the limiter
//!   making the same decisions from 50 tokio tasks sharing one `RateLimiter` (over a `ConnectionManager`, then a
//!   `MultiplexedConnection`), and the same through `RateLimitLayer` around a trivial `service_fn`. Runs
//!   alternate, `RUNS` times; the median is reported.
//! - `latency`: sequential HTTP/1.1 requests on one kept-alive loopback connection to an axum server with and
//!   without the layer, next to the Redis round trip alone (PING, the raw EVALSHA, `limiter.check`), interleaved
//!   in rounds.
//! - `flood`: 100 000 requests on one key limited to 10/min with the deny cache on; EVALSHA calls counted with
//!   `INFO commandstats`; then the latency of a decision served by the deny cache.
//! - `memory`: `used_memory` delta per key and `MEMORY USAGE` of one key, for 10 000 keys per algorithm.

#![allow(clippy::unwrap_used)] // a bench fails loudly on a broken fixture

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis_fixtures::RedisServer;
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_redis_ratelimit::key::RequestParts;
use tower_redis_ratelimit::{Algorithm, DecisionSource, Policy, RateLimitLayer, RateLimiter};

/// The request key: with the default prefix `rl:` and the policy `p`, the Redis keys are `rl:{k}:!block` and
/// `rl:{k}:p`, as in the redis-benchmark command.
const KEY: &str = "k";
/// The throughput policy's limit: every decision is an allowed write.
const HUGE_LIMIT: u64 = 1_000_000_000;
const WINDOW_MS: u64 = 60_000;
/// Concurrent clients (redis-benchmark `-c`) and tasks.
const CONCURRENCY: usize = 50;
/// Decisions per throughput run (redis-benchmark `-n`).
const DECISIONS: usize = 200_000;
/// Throughput runs per variant (the median is reported).
const RUNS: usize = 5;
/// Deadline of each Redis call in every limiter here: long enough that a scheduling hiccup on a shared VM does not
/// turn into a fail-open decision (which would be cheaper and flatter the figures). Every run checks that all
/// decisions came from Redis.
const TIMEOUT: Duration = Duration::from_secs(2);

const SECTIONS: [&str; 4] = ["throughput", "latency", "flood", "memory"];

fn main() {
    // `cargo bench` passes `--bench`; any other argument names a section.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    for name in &wanted {
        assert!(
            SECTIONS.contains(&name.as_str()),
            "unknown section {name:?}; choose among {SECTIONS:?}"
        );
    }
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let started = Instant::now();
    println!("# tower-redis-ratelimit benchmarks\n");
    println!(
        "{} cores; redis-server {}\n",
        std::thread::available_parallelism().map_or(0, usize::from),
        version("redis-server")
    );
    if run("throughput") {
        throughput();
    }
    if run("latency") {
        latency();
    }
    if run("flood") {
        flood();
    }
    if run("memory") {
        memory();
    }
    println!(
        "_total bench time: {:.1} s_",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Shared helpers.

fn version(binary: &str) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_else(|error| format!("({binary}: {error})"))
}

fn multi_thread() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The Lua text of `DECIDE_LUA`, read from the crate's source (not duplicated here).
fn decide_lua() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/script.rs");
    let source = std::fs::read_to_string(path).unwrap();
    let start_marker = "const DECIDE_LUA: &str = r\"";
    let start = source.find(start_marker).unwrap() + start_marker.len();
    let len = source[start..].find("\";").unwrap();
    source[start..start + len].to_owned()
}

/// The limiter used for throughput and latency: one sliding-window policy `p` with a huge limit.
fn huge_limiter<C>(connection: C) -> RateLimiter<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    RateLimiter::builder()
        .redis(connection)
        .redis_timeout(TIMEOUT)
        .policy(Policy::new("p", HUGE_LIMIT, Duration::from_millis(WINDOW_MS)).unwrap())
        .build()
        .unwrap()
}

fn fixed_key(_: &RequestParts<'_>) -> Option<String> {
    Some(KEY.to_owned())
}

/// `p`-quantile (0..=1) of sorted samples, nearest rank.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty());
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

async fn info_field(con: &mut MultiplexedConnection, section: &str, field: &str) -> String {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(con)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
        .trim()
        .to_owned()
}

/// Script calls so far: EVALSHA (and EVAL, should redis-rs ever fall back to it).
async fn script_calls(con: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .unwrap();
    ["cmdstat_evalsha:calls=", "cmdstat_eval:calls="]
        .iter()
        .filter_map(|prefix| {
            info.lines()
                .find_map(|line| line.strip_prefix(prefix))
                .and_then(|rest| rest.split(',').next())
                .and_then(|calls| calls.parse::<u64>().ok())
        })
        .sum()
}

/// redis-server's CPU time so far (user + system), in seconds.
async fn server_cpu(con: &mut MultiplexedConnection) -> f64 {
    let user: f64 = info_field(con, "cpu", "used_cpu_user")
        .await
        .parse()
        .unwrap();
    let sys: f64 = info_field(con, "cpu", "used_cpu_sys")
        .await
        .parse()
        .unwrap();
    user + sys
}

/// This process's CPU time so far (user + system, every thread), in seconds, from `/proc/self/stat` (100 Hz ticks).
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based, as in proc(5)).
    let ticks = |index: usize| {
        fields
            .get(index - 3)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Throughput.

/// One throughput measurement: decisions/s, and CPU µs per decision of redis-server and of the client.
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_second: f64,
    server_cpu_us: f64,
    client_cpu_us: Option<f64>,
}

/// Decisions per warm-up pass of each variant.
const WARMUP_DECISIONS: usize = 20_000;

/// The redis-benchmark arguments: `-c 50` clients (or, with `pipelined`, one client with 50 commands in flight),
/// `total` requests of the limiter's EVALSHA.
fn redis_benchmark_args(port: u16, sha: &str, total: usize, pipelined: bool) -> Vec<String> {
    let mut args = vec!["-p".to_owned(), port.to_string()];
    if pipelined {
        args.extend(["-c", "1", "-P", "50"].map(str::to_owned));
    } else {
        args.extend(["-c", "50"].map(str::to_owned));
    }
    args.extend(["-n".to_owned(), total.to_string(), "--csv".to_owned()]);
    let command = [
        "EVALSHA",
        sha,
        "2",
        "rl:{k}:!block",
        "rl:{k}:p",
        "1",
        "1",
        "1",
        "1000000000",
        "60000",
        "1",
    ];
    args.extend(command.iter().map(|arg| (*arg).to_owned()));
    args
}

/// Runs redis-benchmark under `/usr/bin/time` (for its CPU time); requests/s from its CSV line, and its CPU
/// seconds.
fn redis_benchmark(args: &[String]) -> (f64, Option<f64>) {
    let output = Command::new("/usr/bin/time")
        .args(["-f", "cpu %U %S", "redis-benchmark"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "redis-benchmark failed: {stderr}");
    let line = stdout
        .lines()
        .find(|line| line.starts_with("\"EVALSHA"))
        .unwrap_or_else(|| panic!("no EVALSHA line in redis-benchmark's output: {stdout}"));
    let rps: f64 = line.split("\",\"").nth(1).unwrap().parse().unwrap();
    let cpu = stderr.lines().find_map(|line| {
        let mut parts = line.strip_prefix("cpu ")?.split_whitespace();
        let user: f64 = parts.next()?.parse().ok()?;
        let sys: f64 = parts.next()?.parse().ok()?;
        Some(user + sys)
    });
    (rps, cpu)
}

/// 50 tasks, each making `total / 50` decisions with a clone of `decide`; returns how many were allowed, and the
/// wall time.
async fn concurrent<F, Fut>(decide: F, total: usize) -> (u64, Duration)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let per_task = total / CONCURRENCY;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..CONCURRENCY {
        let decide = decide.clone();
        tasks.spawn(async move {
            let mut allowed = 0_u64;
            for _ in 0..per_task {
                if decide().await {
                    allowed += 1;
                }
            }
            allowed
        });
    }
    let mut allowed = 0;
    while let Some(result) = tasks.join_next().await {
        allowed += result.unwrap();
    }
    (allowed, started.elapsed())
}

/// Runs `decide` concurrently for `total` decisions and checks that every one was allowed by Redis.
async fn measure<C, F, Fut>(
    limiter: &RateLimiter<C>,
    admin: &mut MultiplexedConnection,
    decide: F,
    total: usize,
) -> Rate
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let before = limiter.stats().from_source(DecisionSource::Redis).0;
    let (server0, client0) = (server_cpu(admin).await, own_cpu());
    let (allowed, elapsed) = concurrent(decide, total).await;
    let (server1, client1) = (server_cpu(admin).await, own_cpu());
    let by_redis = limiter.stats().from_source(DecisionSource::Redis).0 - before;
    assert_eq!(
        (allowed, by_redis),
        (total as u64, total as u64),
        "every decision must be an allowed one made by Redis: {:?}",
        limiter.stats()
    );
    rate(total, elapsed, server1 - server0, Some(client1 - client0))
}

async fn limiter_rate<C>(
    limiter: &RateLimiter<C>,
    admin: &mut MultiplexedConnection,
    total: usize,
) -> Rate
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let shared = limiter.clone();
    let decide = move || {
        let limiter = shared.clone();
        async move { limiter.check(KEY).await.allowed }
    };
    measure(limiter, admin, decide, total).await
}

async fn layer_rate<C, S>(
    service: S,
    limiter: &RateLimiter<C>,
    admin: &mut MultiplexedConnection,
    total: usize,
) -> Rate
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
    S: Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let decide = move || {
        let service = service.clone();
        async move {
            let response = service.oneshot(Request::new(())).await.unwrap();
            response.status() == StatusCode::OK
        }
    };
    measure(limiter, admin, decide, total).await
}

fn rate(total: usize, elapsed: Duration, server_cpu: f64, client_cpu: Option<f64>) -> Rate {
    let n = total as f64;
    Rate {
        per_second: n / elapsed.as_secs_f64(),
        server_cpu_us: server_cpu * 1e6 / n,
        client_cpu_us: client_cpu.map(|cpu| cpu * 1e6 / n),
    }
}

fn layered<C>(
    limiter: &RateLimiter<C>,
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    RateLimitLayer::new(limiter.clone(), fixed_key).layer(service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(()))
    }))
}

fn throughput() {
    let server = RedisServer::start();
    let port = server.port();
    let lua = decide_lua();
    let sha = redis::Script::new(&lua).get_hash().to_owned();
    let runtime = multi_thread();
    let (mut admin, by_manager, by_multiplexed) = runtime.block_on(async {
        let mut admin = server.multiplexed().await;
        let by_manager = huge_limiter(server.connection_manager().await);
        let by_multiplexed = huge_limiter(server.multiplexed().await);
        // The limiter loads its script on its first call; the text read from src/script.rs must hash the same.
        assert!(by_manager.check(KEY).await.allowed);
        let exists: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(&sha)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(
            exists,
            [true],
            "DECIDE_LUA read from src/script.rs differs from the limiter's script"
        );
        let loaded: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(&lua)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(loaded, sha);
        (admin, by_manager, by_multiplexed)
    });
    let layer_manager = layered(&by_manager);
    let layer_multiplexed = layered(&by_multiplexed);

    let names = [
        "(a) redis-benchmark -c 50, EVALSHA",
        "(b) RateLimiter::check, ConnectionManager",
        "(c) RateLimitLayer + service_fn, ConnectionManager",
        "(b') RateLimiter::check, MultiplexedConnection",
        "(c') RateLimitLayer + service_fn, MultiplexedConnection",
        "(a') context: redis-benchmark -c 1 -P 50 (one connection, 50 in flight)",
    ];
    let mut variant = |index: usize, total: usize| -> Rate {
        if index == 0 || index == 5 {
            let server0 = runtime.block_on(server_cpu(&mut admin));
            let (rps, cpu) = redis_benchmark(&redis_benchmark_args(port, &sha, total, index == 5));
            let server1 = runtime.block_on(server_cpu(&mut admin));
            let mut bench = rate(
                total,
                Duration::from_secs_f64(total as f64 / rps),
                server1 - server0,
                cpu,
            );
            bench.per_second = rps;
            return bench;
        }
        runtime.block_on(async {
            match index {
                1 => limiter_rate(&by_manager, &mut admin, total).await,
                2 => layer_rate(layer_manager.clone(), &by_manager, &mut admin, total).await,
                3 => limiter_rate(&by_multiplexed, &mut admin, total).await,
                _ => {
                    layer_rate(
                        layer_multiplexed.clone(),
                        &by_multiplexed,
                        &mut admin,
                        total,
                    )
                    .await
                }
            }
        })
    };
    // Warm-up: a short pass of every variant (connections, allocator, script cache).
    for index in 0..names.len() {
        variant(index, WARMUP_DECISIONS);
    }
    // Runs: every variant once per run, starting from a different one each run (so drift is spread evenly).
    let mut rates: Vec<Vec<Rate>> = vec![Vec::new(); names.len()];
    for run in 0..RUNS {
        for offset in 0..names.len() {
            let index = (run + offset) % names.len();
            rates[index].push(variant(index, DECISIONS));
        }
    }

    println!("## 1. Decision throughput (one key, every decision an allowed write)\n");
    println!(
        "(a) is `redis-benchmark {}`; (b)/(c) are {CONCURRENCY} tokio tasks on a {}-worker multi-thread runtime \
         sharing one limiter (policy `p`: sliding window, limit {HUGE_LIMIT} per {WINDOW_MS} ms, key `{KEY}`, \
         so the same keys and ARGV), {DECISIONS} decisions per run, {RUNS} runs per variant, variants alternating; \
         median shown. Every decision is checked to be an allowed one made by Redis. redis-server, \
         redis-benchmark and this process share the same 2 cores: each variant runs alone, but its client always \
         competes with redis-server for them.\n",
        redis_benchmark_args(port, &sha, DECISIONS, false).join(" "),
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    println!(
        "| variant | decisions/s (median) | runs | vs (a) | redis-server CPU µs/decision | client CPU µs/decision |"
    );
    println!("|---|---:|---|---:|---:|---:|");
    let baseline = median(&rates[0].iter().map(|r| r.per_second).collect::<Vec<_>>());
    for (name, runs) in names.iter().zip(&rates) {
        let per_second: Vec<f64> = runs.iter().map(|r| r.per_second).collect();
        let med = median(&per_second);
        let server_us = median(&runs.iter().map(|r| r.server_cpu_us).collect::<Vec<_>>());
        let client_us: Vec<f64> = runs.iter().filter_map(|r| r.client_cpu_us).collect();
        let client = if client_us.is_empty() {
            "n/a".to_owned()
        } else {
            format!("{:.1}", median(&client_us))
        };
        let all = per_second
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {name} | {med:.0} | {all} | {:.0} % | {server_us:.1} | {client} |",
            100.0 * med / baseline
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Added latency.

const LATENCY_WARMUP: usize = 500;
const LATENCY_ROUNDS: usize = 10;
const LATENCY_PER_ROUND: usize = 500;

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

type Sender = hyper::client::conn::http1::SendRequest<String>;

async fn connect(address: SocketAddr) -> Sender {
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn get_once(sender: &mut Sender) -> Duration {
    let started = Instant::now();
    sender.ready().await.unwrap();
    let request = Request::builder()
        .uri("/")
        .header("host", "bench")
        .body(String::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let elapsed = started.elapsed();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    elapsed
}

fn latency() {
    let server = RedisServer::start();
    let lua = decide_lua();
    let sha = redis::Script::new(&lua).get_hash().to_owned();
    // The servers run on their own multi-thread runtime; the client is sequential on this thread.
    let server_runtime = multi_thread();
    let (bare_address, layered_address, served_limiter) = server_runtime.block_on(async {
        let limiter = huge_limiter(server.connection_manager().await);
        let bare = Router::new().route("/", get(|| async { "ok" }));
        let layered = Router::new()
            .route("/", get(|| async { "ok" }))
            .layer(RateLimitLayer::new(limiter.clone(), fixed_key));
        (serve(bare).await, serve(layered).await, limiter)
    });
    let client_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let samples = client_runtime.block_on(async {
        let mut bare = connect(bare_address).await;
        let mut layered = connect(layered_address).await;
        let mut manager: ConnectionManager = server.connection_manager().await;
        let local_limiter = huge_limiter(server.connection_manager().await);
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); 5];
        for round in 0..=LATENCY_ROUNDS {
            let n = if round == 0 {
                LATENCY_WARMUP
            } else {
                LATENCY_PER_ROUND
            };
            let mut take = |index: usize, sample: Duration| {
                if round > 0 {
                    samples[index].push(sample);
                }
            };
            for _ in 0..n {
                take(0, get_once(&mut bare).await);
            }
            for _ in 0..n {
                take(1, get_once(&mut layered).await);
            }
            for _ in 0..n {
                let started = Instant::now();
                let pong: String = redis::cmd("PING").query_async(&mut manager).await.unwrap();
                take(2, started.elapsed());
                assert_eq!(pong, "PONG");
            }
            for _ in 0..n {
                let started = Instant::now();
                let reply: Vec<i64> = redis::cmd("EVALSHA")
                    .arg(&sha)
                    .arg(2)
                    .arg("rl:{k}:!block")
                    .arg("rl:{k}:p")
                    .arg(1)
                    .arg(1)
                    .arg(1)
                    .arg(HUGE_LIMIT)
                    .arg(WINDOW_MS)
                    .arg(1)
                    .query_async(&mut manager)
                    .await
                    .unwrap();
                take(3, started.elapsed());
                assert_eq!(reply[0], 1);
            }
            for _ in 0..n {
                let started = Instant::now();
                let decision = local_limiter.check(KEY).await;
                take(4, started.elapsed());
                assert_eq!(decision.source, DecisionSource::Redis);
                assert!(decision.allowed);
            }
        }
        samples
    });
    let served = served_limiter.stats();
    assert_eq!(
        served.from_source(DecisionSource::Redis).0,
        served.allowed,
        "every layered request must be decided by Redis: {served:?}"
    );
    let mut summary = Vec::new();
    for mut variant in samples {
        variant.sort();
        summary.push((
            percentile(&variant, 0.5),
            percentile(&variant, 0.99),
            variant.len(),
        ));
    }
    let names = [
        "axum, bare (HTTP/1.1, kept-alive)",
        "axum + RateLimitLayer",
        "Redis PING (ConnectionManager)",
        "Redis EVALSHA of the script (ConnectionManager)",
        "RateLimiter::check (ConnectionManager)",
    ];
    println!("## 2. Added latency at concurrency 1\n");
    println!(
        "One client task on a current-thread runtime; the axum servers on their own multi-thread runtime; \
         {LATENCY_WARMUP} warm-up requests per variant, then {LATENCY_ROUNDS} rounds of {LATENCY_PER_ROUND} per \
         variant, variants alternating within each round.\n"
    );
    println!("| variant | samples | p50 µs | p99 µs |");
    println!("|---|---:|---:|---:|");
    for (name, (p50, p99, n)) in names.iter().zip(&summary) {
        println!(
            "| {name} | {n} | {:.1} | {:.1} |",
            micros(*p50),
            micros(*p99)
        );
    }
    let added_p50 = micros(summary[1].0) - micros(summary[0].0);
    let added_p99 = micros(summary[1].1) - micros(summary[0].1);
    let (ping50, ping99) = (micros(summary[2].0), micros(summary[2].1));
    let (eval50, eval99) = (micros(summary[3].0), micros(summary[3].1));
    println!();
    println!(
        "- added by the layer: p50 **{added_p50:+.1} µs**, p99 **{added_p99:+.1} µs** (layered minus bare, \
         percentile by percentile)"
    );
    println!(
        "- goal p50 ≤ 1 RTT + 50 µs: vs the EVALSHA RTT {eval50:.1} + 50 = {:.1} µs → {}; vs PING {ping50:.1} + 50 \
         = {:.1} µs → {}",
        eval50 + 50.0,
        verdict(added_p50 <= eval50 + 50.0),
        ping50 + 50.0,
        verdict(added_p50 <= ping50 + 50.0)
    );
    println!(
        "- goal p99 ≤ 1 RTT + 250 µs: vs the EVALSHA RTT {eval99:.1} + 250 = {:.1} µs → {}; vs PING {ping99:.1} + \
         250 = {:.1} µs → {}",
        eval99 + 250.0,
        verdict(added_p99 <= eval99 + 250.0),
        ping99 + 250.0,
        verdict(added_p99 <= ping99 + 250.0)
    );
    println!(
        "- added minus the EVALSHA round trip: p50 {:+.1} µs, p99 {:+.1} µs\n",
        added_p50 - eval50,
        added_p99 - eval99
    );
    drop(server_runtime);
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**not met**" }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Flood on one key.

const FLOOD: usize = 100_000;
const FLOOD_LIMIT: u64 = 10;

fn flood() {
    let server = RedisServer::start();
    let runtime = multi_thread();
    runtime.block_on(async {
        let mut admin = server.multiplexed().await;
        let limiter = RateLimiter::builder().redis(server.connection_manager().await)
            .redis_timeout(TIMEOUT)
            .deny_cache(100_000)
            .policy(Policy::per_minute("p", FLOOD_LIMIT).unwrap())
            .build()
            .unwrap();
        assert!(limiter.check("warm-up").await.allowed); // loads the script
        let calls_before = script_calls(&mut admin).await;
        let stats_before = limiter.stats();

        let per_task = FLOOD / CONCURRENCY;
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..CONCURRENCY {
            let limiter = limiter.clone();
            tasks.spawn(async move {
                let mut allowed = 0_u64;
                for _ in 0..per_task {
                    if limiter.check("flood").await.allowed {
                        allowed += 1;
                    }
                }
                allowed
            });
        }
        let mut allowed = 0;
        while let Some(result) = tasks.join_next().await {
            allowed += result.unwrap();
        }
        let elapsed = started.elapsed();
        let calls = script_calls(&mut admin).await - calls_before;
        let stats = limiter.stats();
        let denied = FLOOD as u64 - allowed;
        let redis_denials =
            stats.from_source(DecisionSource::Redis).1 - stats_before.from_source(DecisionSource::Redis).1;
        let cache_denials = stats.from_source(DecisionSource::DenyCache).1
            - stats_before.from_source(DecisionSource::DenyCache).1;
        assert_eq!(
            redis_denials + cache_denials,
            denied,
            "every denial comes from Redis or the deny cache: {stats:?}"
        );
        // Each script call decided one request: the allowed ones, and the rest are denials that asked Redis.
        let denials_with_call = calls.saturating_sub(allowed);
        let share = 100.0 * (denied - denials_with_call) as f64 / denied as f64;

        // The deny-cache path alone: sequential checks on the denied key.
        let calls_before = script_calls(&mut admin).await;
        let mut cached = Vec::with_capacity(FLOOD);
        let mut other = 0;
        for _ in 0..FLOOD {
            let start = Instant::now();
            let decision = limiter.check("flood").await;
            let took = start.elapsed();
            if decision.source == DecisionSource::DenyCache {
                cached.push(took);
            } else {
                other += 1;
            }
        }
        let later_calls = script_calls(&mut admin).await - calls_before;
        cached.sort();

        println!("## 3. Flood on one key (limit {FLOOD_LIMIT}/min, sliding window, deny cache on)\n");
        println!(
            "{FLOOD} `limiter.check(\"flood\")` calls from {CONCURRENCY} tasks ({:.0} decisions/s).\n",
            FLOOD as f64 / elapsed.as_secs_f64()
        );
        println!("| figure | value |");
        println!("|---|---:|");
        println!("| allowed | {allowed} |");
        println!("| denied | {denied} |");
        println!("| script calls (INFO commandstats cmdstat_evalsha + cmdstat_eval, delta) | {calls} |");
        println!("| denials decided by Redis (limiter stats) | {redis_denials} |");
        println!("| denials decided by the deny cache (limiter stats) | {cache_denials} |");
        println!("| **denials without a Redis call** | **{share:.3} %** (goal ≥ 95 %) → {} |", verdict(share >= 95.0));
        println!();
        println!(
            "Deny-cache path, {FLOOD} sequential `limiter.check` on the denied key ({} served by the cache, {other} \
             not; {later_calls} script calls meanwhile): p50 **{:.2} µs**, p99 **{:.2} µs**, p99.9 {:.2} µs, max \
             {:.2} µs.\n",
            cached.len(),
            micros(percentile(&cached, 0.5)),
            micros(percentile(&cached, 0.99)),
            micros(percentile(&cached, 0.999)),
            micros(*cached.last().unwrap()),
        );
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Memory per (policy, key).

const MEMORY_KEYS: usize = 10_000;

fn memory() {
    let server = RedisServer::start();
    let runtime = multi_thread();
    let cases = [
        ("sliding window", Algorithm::SlidingWindow),
        ("GCRA", Algorithm::Gcra),
        ("fixed window", Algorithm::FixedWindow),
    ];
    println!("## 4. Redis memory per (policy, key)\n");
    println!(
        "{MEMORY_KEYS} keys `user:000000`..`user:{:06}` per algorithm, each through `limiter.check` (policy `p`, \
         100/hour, so no key expires during the measurement), FLUSHALL between algorithms; Redis keys look like \
         `rl:{{user:000000}}:p` (18 bytes). Delta of `INFO memory` used_memory / {MEMORY_KEYS}; `MEMORY USAGE` of \
         one key.\n",
        MEMORY_KEYS - 1
    );
    println!(
        "| algorithm | keys created | used_memory delta / key (bytes) | MEMORY USAGE one key (bytes) | encoding | goal ≤ 300 B |"
    );
    println!("|---|---:|---:|---:|---|---|");
    runtime.block_on(async {
        let mut admin = server.multiplexed().await;
        for (name, algorithm) in cases {
            let () = redis::cmd("FLUSHALL")
                .arg("SYNC")
                .query_async(&mut admin)
                .await
                .unwrap();
            let policy = Policy::per_hour("p", 100).unwrap().algorithm(algorithm);
            let limiter = RateLimiter::builder()
                .redis(server.connection_manager().await)
                .redis_timeout(TIMEOUT)
                .policy(policy)
                .build()
                .unwrap();
            // Warm-up with the same concurrency, so client buffers and the script cache are in the baseline.
            let keys = |prefix: &'static str, count: usize| {
                let limiter = limiter.clone();
                async move {
                    let mut tasks = JoinSet::new();
                    for task in 0..CONCURRENCY {
                        let limiter = limiter.clone();
                        tasks.spawn(async move {
                            for i in (task..count).step_by(CONCURRENCY) {
                                let decision = limiter.check(&format!("{prefix}{i:06}")).await;
                                assert_eq!(decision.source, DecisionSource::Redis);
                                assert!(decision.allowed);
                            }
                        });
                    }
                    while let Some(result) = tasks.join_next().await {
                        result.unwrap();
                    }
                }
            };
            keys("warm:", CONCURRENCY).await;
            let used = |admin: &mut MultiplexedConnection| {
                let mut admin = admin.clone();
                async move {
                    info_field(&mut admin, "memory", "used_memory")
                        .await
                        .parse::<i64>()
                        .unwrap()
                }
            };
            let dbsize = |admin: &mut MultiplexedConnection| {
                let mut admin = admin.clone();
                async move {
                    redis::cmd("DBSIZE")
                        .query_async::<i64>(&mut admin)
                        .await
                        .unwrap()
                }
            };
            let (before, size_before) = (used(&mut admin).await, dbsize(&mut admin).await);
            keys("user:", MEMORY_KEYS).await;
            let (after, size_after) = (used(&mut admin).await, dbsize(&mut admin).await);
            let created = size_after - size_before;
            let one: i64 = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg("rl:{user:000000}:p")
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut admin)
                .await
                .unwrap();
            let encoding: String = redis::cmd("OBJECT")
                .arg("ENCODING")
                .arg("rl:{user:000000}:p")
                .query_async(&mut admin)
                .await
                .unwrap();
            let per_key = (after - before) as f64 / MEMORY_KEYS as f64;
            println!(
                "| {name} | {created} | {per_key:.1} | {one} | {encoding} | {} |",
                verdict(per_key <= 300.0 && one <= 300)
            );
        }
    });
    println!();
}
