//! What a cache hit costs, side by side with the handler alone, a raw Redis read of the same entry, and two other
//! caches on the same handler: axum-response-cache 0.5 and tower-http-cache 0.6 (used as dependencies only).
//!
//! ```text
//! cargo bench -p tower-redis-cache --bench cache     # criterion, then percentiles; about 1 minute
//! cargo bench -p tower-redis-cache --bench cache -- '^hit/redis_hit$' --profile-time 10   # one variant, for perf
//! ```
//!
//! Everything runs in-process against a private `redis-server` (from `redis-fixtures`; never the Redis on 6379),
//! on a 2-worker multi-thread tokio runtime driven from the bench thread. The handler answers `GET /item` with a
//! 4 KiB body and `cache-control: max-age=3600`; each cache wraps the whole axum `Router` from outside, and each
//! call is `oneshot` on a clone of the service with a fresh `GET http://bench/item`, then reads the whole body with
//! `http_body_util`. Every variant goes through the same boxed call, so the harness costs them all alike.
//!
//! - `bare`: the router alone (the handler's own cost).
//! - `raw_redis_get`: redis-rs `GET` of a string holding the very bytes our layer stored for the entry;
//!   `raw_redis_hmget`: the one command our layer sends on a Redis hit (`HMGET <key> ~vary ~`). Both over a
//!   `ConnectionManager`, as our layer and tower-http-cache's Redis backend use.
//! - `memory_hit`: our layer with the default memory tier (and Redis behind it), entry cached.
//! - `redis_hit`: our layer with `.memory_capacity(0)`, so every hit reads and decodes the entry from Redis.
//! - `axum_response_cache_hit`: axum-response-cache's `CacheLayer::with_lifespan(1 h)` (memory only).
//! - `tower_http_cache_memory_hit`, `tower_http_cache_redis_hit`: tower-http-cache with its in-memory and its Redis
//!   backend (TTL 1 h). Its layer needs a `Sync` response body, which axum's is not: the router's body is wrapped in
//!   [`SyncBody`], which only the miss path goes through.
//!
//! Before measuring, every cached variant is checked to serve from its cache: the handler is not called, our
//! stats count hits of the right tier, and the Redis-backed variants issue one read command per call.
//!
//! Two sections: one criterion group `hit` (means, with criterion's confidence intervals), then `percentiles`:
//! `ROUNDS` rounds in which every variant makes `PER_ROUND` sequential calls in turn (the order rotating each
//! round, so noise on this shared VM hits all alike; the first call of each turn is untimed, as it pays for the
//! switch), each call timed with `Instant`; p50, p90, p99 and p99.9 per variant, and the issue's goals checked
//! against the raw `GET` measured in the same rounds.

#![allow(clippy::unwrap_used)] // a bench fails loudly on a broken fixture

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use criterion::Criterion;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use redis::aio::ConnectionManager;
use redis_fixtures::RedisServer;
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};
use tower_redis_cache::{CacheLayer, HttpCache};

/// The handler's body: 4 KiB of text.
const BODY_LEN: usize = 4096;
static BODY: [u8; BODY_LEN] = [b'x'; BODY_LEN];
/// The request URL, and so our cache key.
const URL: &str = "http://bench/item";
/// The string the raw `GET` reads: a copy of our stored entry.
const RAW_KEY: &str = "bench:raw-entry";
/// tower-http-cache's Redis namespace; its key is `<namespace>:<path>`.
const THC_NAMESPACE: &str = "bench-thc";

/// Percentile section: `ROUNDS` × `PER_ROUND` = 20,000 timed calls per variant. Short turns (about 1 ms for a
/// Redis variant) spread the bursts of other work on a shared machine over every variant alike.
const ROUNDS: usize = 1_000;
const PER_ROUND: usize = 20;

/// How often the handler ran: a cached variant must not move it.
static HANDLER_CALLS: AtomicU64 = AtomicU64::new(0);

async fn item() -> impl IntoResponse {
    HANDLER_CALLS.fetch_add(1, Ordering::Relaxed);
    (
        [
            (CACHE_CONTROL, "max-age=3600"),
            // tower-http-cache never stores `application/octet-stream`, axum's type for bytes.
            (CONTENT_TYPE, "text/plain; charset=utf-8"),
        ],
        Bytes::from_static(&BODY),
    )
}

fn router() -> Router {
    Router::new().route("/item", get(item))
}

fn request() -> Request<Body> {
    Request::get(URL).body(Body::empty()).unwrap()
}

/// axum's body made `Sync` for tower-http-cache, which asks that of the inner service's body. `poll_frame` reaches
/// the body through `Mutex::get_mut` (no locking); only `size_hint` and `is_end_stream` lock.
struct SyncBody(Mutex<Body>);

impl http_body::Body for SyncBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(self.get_mut().0.get_mut().unwrap()).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().unwrap().is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().unwrap().size_hint()
    }
}

type CallFuture = Pin<Box<dyn Future<Output = usize> + Send>>;

/// One measured path: each call returns the bytes it read.
struct Variant {
    name: &'static str,
    call: Box<dyn Fn() -> CallFuture>,
}

/// A GET through `service`, body read whole; returns the body length.
fn http_variant<S, B>(name: &'static str, service: S) -> Variant
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    Variant {
        name,
        call: Box::new(move || {
            let service = service.clone();
            Box::pin(async move {
                let response = service.oneshot(request()).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let body = response.into_body().collect().await.unwrap().to_bytes();
                body.len()
            })
        }),
    }
}

fn raw_get(connection: &ConnectionManager) -> Variant {
    let connection = connection.clone();
    Variant {
        name: "raw_redis_get",
        call: Box::new(move || {
            let mut connection = connection.clone();
            Box::pin(async move {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg(RAW_KEY)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                bytes.len()
            })
        }),
    }
}

fn raw_hmget(connection: &ConnectionManager, key: String) -> Variant {
    let connection = connection.clone();
    Variant {
        name: "raw_redis_hmget",
        call: Box::new(move || {
            let mut connection = connection.clone();
            let key = key.clone();
            Box::pin(async move {
                let (vary, bytes): (Option<String>, Option<Vec<u8>>) = redis::cmd("HMGET")
                    .arg(key)
                    .arg("~vary")
                    .arg("~")
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                vary.unwrap().len() + bytes.unwrap().len()
            })
        }),
    }
}

async fn exists(connection: &mut ConnectionManager, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<u64>(connection)
        .await
        .unwrap()
        == 1
}

/// Waits until Redis holds `key` (caches write Redis in the background after the response).
async fn wait_for_key(connection: &mut ConnectionManager, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !exists(connection, key).await {
        assert!(Instant::now() < deadline, "{key} never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The services, caches filled, and the facts the checks need.
struct Setup {
    variants: Vec<Variant>,
    memory_cache: HttpCache,
    redis_cache: HttpCache,
    entry_len: usize,
}

async fn setup(server: &RedisServer) -> Setup {
    let mut admin = server.connection_manager().await;

    let memory_cache = HttpCache::builder()
        .redis(server.connection_manager().await)
        .prefix("bench-memory:")
        .build()
        .unwrap();
    let memory_hit = CacheLayer::new(memory_cache.clone()).layer(router());

    let redis_cache = HttpCache::builder()
        .redis(server.connection_manager().await)
        .memory_capacity(0)
        .prefix("bench-redis:")
        .build()
        .unwrap();
    let redis_hit = CacheLayer::new(redis_cache.clone()).layer(router());

    let response_cache =
        axum_response_cache::CacheLayer::with_lifespan(Duration::from_secs(3_600)).layer(router());

    let sync_router = || {
        ServiceExt::<Request<Body>>::map_response(router(), |response: Response<Body>| {
            response.map(|body| SyncBody(Mutex::new(body)))
        })
    };
    let thc_memory = tower_http_cache::CacheLayer::builder(
        tower_http_cache::backend::memory::InMemoryBackend::new(10_000),
    )
    .ttl(Duration::from_secs(3_600))
    .build()
    .layer(sync_router());
    let thc_redis = tower_http_cache::CacheLayer::builder(
        tower_http_cache::backend::redis::RedisBackend::new(server.connection_manager().await)
            .with_namespace(THC_NAMESPACE),
    )
    .ttl(Duration::from_secs(3_600))
    .build()
    .layer(sync_router());

    let mut variants = vec![
        http_variant("bare", router()),
        raw_get(&server.connection_manager().await),
        http_variant("memory_hit", memory_hit),
        http_variant("redis_hit", redis_hit),
        http_variant("axum_response_cache_hit", response_cache),
        http_variant("tower_http_cache_memory_hit", thc_memory),
        http_variant("tower_http_cache_redis_hit", thc_redis),
    ];

    // Fill every cache with one request (the raw variants need our stored entry first).
    for variant in &variants {
        if variant.name != "raw_redis_get" {
            assert_eq!((variant.call)().await, BODY_LEN, "{}", variant.name);
        }
    }
    let memory_key = memory_cache.redis_key(URL).unwrap();
    let redis_key = redis_cache.redis_key(URL).unwrap();
    let thc_key = format!("{THC_NAMESPACE}:/item");
    for key in [&memory_key, &redis_key, &thc_key] {
        wait_for_key(&mut admin, key).await;
    }

    // The raw GET reads a string holding exactly the bytes of our stored entry.
    let entry: Vec<u8> = redis::cmd("HGET")
        .arg(&redis_key)
        .arg("~")
        .query_async(&mut admin)
        .await
        .unwrap();
    let () = redis::cmd("SET")
        .arg(RAW_KEY)
        .arg(&entry)
        .query_async(&mut admin)
        .await
        .unwrap();
    variants.insert(2, raw_hmget(&server.connection_manager().await, redis_key));

    Setup {
        variants,
        memory_cache,
        redis_cache,
        entry_len: entry.len(),
    }
}

/// Every cached variant serves from its cache: no handler call, hits of the right tier, one Redis read per call
/// where Redis is the tier.
async fn check(setup: &Setup, server: &RedisServer) {
    const CALLS: u64 = 50;
    for variant in &setup.variants {
        let handler = HANDLER_CALLS.load(Ordering::Relaxed);
        let memory = setup.memory_cache.stats();
        let redis = setup.redis_cache.stats();
        let (gets, hmgets) = (server.command_calls("get"), server.command_calls("hmget"));
        for _ in 0..CALLS {
            let read = (variant.call)().await;
            if variant.name.starts_with("raw") {
                assert!(read >= BODY_LEN, "{}", variant.name);
            } else {
                assert_eq!(read, BODY_LEN, "{}", variant.name);
            }
        }
        let handler = HANDLER_CALLS.load(Ordering::Relaxed) - handler;
        let memory_hits = setup.memory_cache.stats().memory_hits - memory.memory_hits;
        let redis_hits = setup.redis_cache.stats().redis_hits - redis.redis_hits;
        let gets = server.command_calls("get") - gets;
        let hmgets = server.command_calls("hmget") - hmgets;
        let expected = match variant.name {
            "bare" => (CALLS, 0, 0, 0, 0),
            "raw_redis_get" | "tower_http_cache_redis_hit" => (0, 0, 0, CALLS, 0),
            "raw_redis_hmget" => (0, 0, 0, 0, CALLS),
            "memory_hit" => (0, CALLS, 0, 0, 0),
            "redis_hit" => (0, 0, CALLS, 0, CALLS),
            _ => (0, 0, 0, 0, 0),
        };
        assert_eq!(
            (handler, memory_hits, redis_hits, gets, hmgets),
            expected,
            "{}: (handler calls, memory hits, redis hits, GETs, HMGETs)",
            variant.name
        );
    }
}

fn criterion_section(criterion: &mut Criterion, runtime: &Runtime, variants: &[Variant]) {
    let mut group = criterion.benchmark_group("hit");
    for variant in variants {
        group.bench_function(variant.name, |b| {
            b.to_async(runtime).iter(|| (variant.call)());
        });
    }
    group.finish();
}

/// `q`-quantile (0..=1) of sorted samples, nearest rank.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**not met**" }
}

fn percentile_section(runtime: &Runtime, setup: &Setup, rounds: usize, per_round: usize) {
    let variants = &setup.variants;
    let samples = runtime.block_on(async {
        let mut samples: Vec<Vec<Duration>> = variants
            .iter()
            .map(|_| Vec::with_capacity(rounds * per_round))
            .collect();
        // Warm-up, untimed.
        for variant in variants {
            for _ in 0..per_round {
                (variant.call)().await;
            }
        }
        for round in 0..rounds {
            for offset in 0..variants.len() {
                let index = (round + offset) % variants.len();
                let call = &variants[index].call;
                // Untimed: the first call after another variant pays for the switch (caches, a parked thread).
                std::hint::black_box(call().await);
                for _ in 0..per_round {
                    let started = Instant::now();
                    std::hint::black_box(call().await);
                    samples[index].push(started.elapsed());
                }
            }
        }
        samples
    });

    println!("\n## percentiles\n");
    println!(
        "{rounds} rounds × {per_round} timed sequential calls per variant, interleaved (order rotating each round, \
         one untimed call at each turn); entry in Redis: {} bytes.\n",
        setup.entry_len
    );
    println!("| variant | p50 µs | p90 µs | p99 µs | p99.9 µs | mean µs |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut summary = Vec::new();
    for (variant, mut times) in variants.iter().zip(samples) {
        times.sort_unstable();
        let mean = times.iter().sum::<Duration>() / u32::try_from(times.len()).unwrap();
        let row = [0.5, 0.9, 0.99, 0.999].map(|q| micros(percentile(&times, q)));
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            variant.name,
            row[0],
            row[1],
            row[2],
            row[3],
            micros(mean)
        );
        summary.push((variant.name, row));
    }
    let of = |name: &str| summary.iter().find(|(n, _)| *n == name).unwrap().1;
    let (raw, hit, memory) = (of("raw_redis_get"), of("redis_hit"), of("memory_hit"));
    let (p50_over, p99_over) = (hit[0] - raw[0], hit[2] - raw[2]);
    println!();
    println!(
        "- redis_hit over raw_redis_get: **{p50_over:+.1} µs** at p50 (goal ≤ +100 µs: {}), **{p99_over:+.1} µs** at \
         p99 (goal ≤ +300 µs: {})",
        verdict(p50_over <= 100.0),
        verdict(p99_over <= 300.0)
    );
    println!(
        "- memory_hit p50: **{:.1} µs** (goal ≤ 10 µs: {})",
        memory[0],
        verdict(memory[0] <= 10.0)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) every part runs briefly.
    let bench = std::env::args().any(|arg| arg == "--bench");
    let started = Instant::now();
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let setup = runtime.block_on(setup(&server));
    runtime.block_on(check(&setup, &server));
    println!(
        "{} cores; entry in Redis {} bytes for a {BODY_LEN}-byte body",
        std::thread::available_parallelism().map_or(0, usize::from),
        setup.entry_len
    );

    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    criterion_section(&mut criterion, &runtime, &setup.variants);
    criterion.final_summary();

    // `--profile-time` (criterion's mode for profilers) runs the chosen criterion benches alone.
    if !std::env::args().any(|arg| arg == "--profile-time") {
        let (rounds, per_round) = if bench { (ROUNDS, PER_ROUND) } else { (2, 10) };
        percentile_section(&runtime, &setup, rounds, per_round);
    }
    println!(
        "\n_total bench time: {:.1} s_",
        started.elapsed().as_secs_f64()
    );
}
