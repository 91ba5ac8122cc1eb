//! The fault matrix at crate level (issue 14, item 8): the rate limiter, the cache and discovery together on one
//! axum server over loopback, their Redis behind the fixtures' fault proxy, under bounded load (4 clients, about
//! 200 requests a second) before, during and after each fault. For every fault:
//!
//! - every response is a 200: no layer turns a Redis fault into a client error, during the fault or after it;
//! - once Redis is healthy again, the limiter decides through Redis within 1 s and the cache uses Redis within 5 s;
//! - discovery never removes the instance that stays alive and heartbeating.
//!
//! Connections are what the demo uses: `HealingConnection<ConnectionManager>` with TCP keepalive.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis_fixtures::{FaultProxy, RedisServer};
use tower_redis_cache::{CacheLayer, HttpCache};
use tower_redis_core::{HealingConfig, HealingConnection};
use tower_redis_discovery::{Discovery, Instance, RedisRegistry, Registration};
use tower_redis_ratelimit::key::Header;
use tower_redis_ratelimit::{DecisionSource, FailurePolicy, Policy, RateLimitLayer, RateLimiter};

/// How long each fault lasts.
const FAULT: Duration = Duration::from_secs(2);

async fn healing(proxy: &FaultProxy, server: &RedisServer) -> HealingConnection<ConnectionManager> {
    let info = redis::IntoConnectionInfo::into_connection_info(proxy.url_for(&server.url()))
        .unwrap()
        .set_tcp_settings(tower_redis_core::tcp::settings());
    let client = redis::Client::open(info).unwrap();
    let manager = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1));
    HealingConnection::connection_manager(client, manager, HealingConfig::default())
        .await
        .unwrap()
}

struct Stack {
    address: SocketAddr,
    limiter: RateLimiter<HealingConnection<ConnectionManager>>,
    cache: HttpCache,
    watch: tower_redis_discovery::WatchHandle,
    _registration: Registration<RedisRegistry<HealingConnection<ConnectionManager>>>,
    _discovery: tokio::task::JoinHandle<()>,
}

async fn stack(proxy: &FaultProxy, server: &RedisServer) -> Stack {
    let connection = healing(proxy, server).await;
    let limiter = RateLimiter::builder()
        .redis(connection.clone())
        .prefix("fm:rl:")
        .policy(Policy::new("writes", 1_000_000, Duration::from_secs(1)).unwrap())
        .on_redis_failure(FailurePolicy::Local { share: 1 })
        .build()
        .unwrap();
    // No memory tier: every read goes to Redis, so a Redis fault is felt on every request.
    let cache = HttpCache::builder()
        .redis(connection.clone())
        .memory_capacity(0)
        .subscribe(proxy.client_for(server))
        .prefix("fm:c:")
        .build()
        .unwrap();
    let items = Router::new()
        .route(
            "/items/{n}",
            get(|| async { ([("cache-control", "max-age=1")], "item") }),
        )
        .layer(CacheLayer::new(cache.clone()));
    let writes = Router::new()
        .route("/write", post(|| async { "written" }))
        .layer(RateLimitLayer::new(
            limiter.clone(),
            Header::try_new("x-api-key").unwrap(),
        ));
    let app = items.merge(writes);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let registry = RedisRegistry::builder()
        .redis(connection)
        .prefix("fm:d:")
        .ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    let registration = Registration::start(
        registry.clone(),
        Instance::new("items", "127.0.0.1", address.port()),
    )
    .unwrap();
    registration.ready();
    let options = Discovery::builder().interval(Duration::from_millis(200));
    let discovery = options.registry(registry).service("items").build().unwrap();
    let watch = discovery.handle();
    // Drain the change stream, as a balancer would.
    let discovery = tokio::spawn(async move {
        let mut discovery = std::pin::pin!(discovery);
        while futures_next(&mut discovery).await.is_some() {}
    });
    Stack {
        address,
        limiter,
        cache,
        watch,
        _registration: registration,
        _discovery: discovery,
    }
}

async fn futures_next<S: futures_core::Stream + Unpin + ?Sized>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx)).await
}

/// One request on its own connection; the status, or 0 when the request itself failed.
async fn send(address: SocketAddr, method: &str, path: &str) -> u16 {
    let attempt = test_support::try_send(address, method, path, &[("x-api-key", "k")]);
    // Generous: a layer waits at most its Redis timeout, and the machine is busy.
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(reply)) => reply.status.as_u16(),
        _ => 0,
    }
}

/// Four clients, each about 50 requests a second (reads and writes), until `stop`; every status with its time.
fn load(address: SocketAddr, until: Instant) -> Vec<tokio::task::JoinHandle<Vec<(Instant, u16)>>> {
    (0..4)
        .map(|client| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut n = client;
                while Instant::now() < until {
                    let status = if n % 3 == 0 {
                        send(address, "POST", "/write").await
                    } else {
                        send(address, "GET", &format!("/items/{}", n % 10)).await
                    };
                    seen.push((Instant::now(), status));
                    n += 4;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen
            })
        })
        .collect()
}

fn redis_decisions(limiter: &RateLimiter<HealingConnection<ConnectionManager>>) -> u64 {
    let (allowed, denied) = limiter.stats().from_source(DecisionSource::Redis);
    allowed + denied
}

/// Polls `check` until it holds; how long that took.
async fn time_until(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if check() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Runs load over `inject` / `heal` and checks the promises. `inject` starts the fault, `heal` ends it.
async fn matrix_row(
    name: &str,
    inject: impl FnOnce(&FaultProxy, &mut RedisServer),
    heal: impl FnOnce(&FaultProxy, &mut RedisServer),
) {
    let mut server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let stack = stack(&proxy, &server).await;
    let healthy = time_until(Duration::from_secs(10), || {
        stack.watch.stats().instances == 1
    })
    .await;
    assert!(
        healthy.is_some(),
        "{name}: the instance is discovered before the fault"
    );

    let started = Instant::now();
    let clients = load(
        stack.address,
        started + Duration::from_millis(500) + FAULT + Duration::from_secs(5),
    );
    let deciding = time_until(Duration::from_secs(5), || {
        redis_decisions(&stack.limiter) > 0
    })
    .await;
    assert!(deciding.is_some(), "{name}: Redis decides before the fault");

    inject(&proxy, &mut server);
    // The fault lasts this long under load (what a client sees meanwhile is judged below).
    tokio::time::sleep(FAULT).await;
    heal(&proxy, &mut server);

    let before = redis_decisions(&stack.limiter);
    let limiter_back = time_until(Duration::from_secs(4), || {
        redis_decisions(&stack.limiter) > before
    })
    .await;
    let cache_before = stack.cache.stats();
    let cache_back = time_until(Duration::from_secs(5), || {
        // No memory tier: a hit is a read that Redis answered.
        stack.cache.stats().redis_hits > cache_before.redis_hits
    })
    .await;

    let seen: Vec<(Instant, u16)> = {
        let mut seen = Vec::new();
        for client in clients {
            seen.extend(client.await.unwrap());
        }
        seen
    };
    let errors: Vec<(Duration, u16)> = seen
        .iter()
        .filter(|(_, status)| *status != 200)
        .map(|(at, status)| (at.saturating_duration_since(started), *status))
        .collect();
    let stats = stack.watch.stats();
    let record = format!(
        "{name}: {} requests, {} errors {:?}; limiter back after {:?}, cache after {:?}; discovery {stats:?}; \
         limiter {:?}",
        seen.len(),
        errors.len(),
        &errors[..errors.len().min(10)],
        limiter_back,
        cache_back,
        stack.limiter.stats(),
    );
    eprintln!("{record}");
    assert!(seen.len() >= 200, "bounded load ran: {record}");
    assert!(errors.is_empty(), "client errors: {record}");
    assert!(
        limiter_back.is_some_and(|after| after <= Duration::from_secs(1)),
        "the limiter is not back on Redis within 1 s: {record}"
    );
    assert!(
        cache_back.is_some(),
        "the cache is not back on Redis within 5 s: {record}"
    );
    assert_eq!(
        stats.removes, 0,
        "discovery removed a live instance: {record}"
    );
    assert_eq!(stats.instances, 1, "{record}");
    ALL.lock().unwrap().push(record);
}

static ALL: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open() {
    matrix_row("half-open", |proxy, _| proxy.half_open(), |_, _| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_then_release() {
    matrix_row("stall", |proxy, _| proxy.stall(), |proxy, _| proxy.pass()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_300_ms_late() {
    matrix_row(
        "delay 300 ms",
        |proxy, _| proxy.delay(Duration::from_millis(300)),
        |proxy, _| proxy.pass(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_reset_and_new_ones_refused() {
    matrix_row(
        "reset + refuse",
        |proxy, _| {
            proxy.refuse();
            proxy.reset_all();
        },
        |proxy, _| proxy.pass(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_then_restarted_empty() {
    matrix_row(
        "killed, restarted empty",
        |_, server| server.kill(),
        |_, server| server.restart(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pause() {
    let pause = Arc::new(Mutex::new(None));
    let paused = pause.clone();
    matrix_row(
        "CLIENT PAUSE",
        move |_, server| {
            let mut connection = server.client().get_connection().unwrap();
            let () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(FAULT.as_millis().to_string())
                .arg("ALL")
                .query(&mut connection)
                .unwrap();
            *paused.lock().unwrap() = Some(Instant::now());
        },
        |_, _| {},
    )
    .await;
    assert!(pause.lock().unwrap().is_some());
}
