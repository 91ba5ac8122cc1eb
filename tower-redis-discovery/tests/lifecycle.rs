//! The instance lifecycle under traffic, against a real Redis and real axum servers: a new instance gets traffic
//! within 200 ms, a graceful deregistration fails no request, and the registry load does not grow with traffic.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis_fixtures::RedisServer;
use tower::{Service, ServiceExt};
use tower_redis_discovery::{
    BalanceOptions, Balanced, Discovery, HttpEndpoint, Instance, NoEndpoints, RedisRegistry,
    Registration, balance,
};

type Response = http::Response<hyper::body::Incoming>;

async fn serve_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().route("/whoami", get(move || async move { port.to_string() }));
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

/// Sends one request; the port that answered, or the error.
async fn whoami(
    service: &mut Balanced<http::Request<Empty<bytes::Bytes>>, Response>,
) -> Result<u16, tower::BoxError> {
    let request = http::Request::get("/whoami").body(Empty::new()).unwrap();
    let response = service.ready().await?.call(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8(body.to_vec())?.parse()?)
}

async fn registry(server: &RedisServer) -> RedisRegistry<redis::aio::ConnectionManager> {
    RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_new_instance_gets_its_first_request_within_200_ms_of_registering() {
    let server = RedisServer::start();
    let registry = registry(&server).await;
    let first = Registration::start(
        registry.clone(),
        Instance::new("api", "127.0.0.1", serve_port().await),
    )
    .unwrap();
    first.ready();
    let options = Discovery::builder().interval(Duration::from_secs(30));
    let discovery = options
        .registry(registry.clone())
        .service("api")
        .hints(server.client(), registry.events_channel())
        .build()
        .unwrap();
    let mut service = balanced(discovery);
    let deadline = Instant::now() + Duration::from_secs(5);
    while whoami(&mut service).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the first instance never got traffic"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let port = serve_port().await;
    let registered = Instant::now();
    let second =
        Registration::start(registry.clone(), Instance::new("api", "127.0.0.1", port)).unwrap();
    second.ready();
    loop {
        if whoami(&mut service).await.unwrap() == port {
            break;
        }
        assert!(
            registered.elapsed() < Duration::from_secs(2),
            "no request reached the new instance"
        );
    }
    let elapsed = registered.elapsed();
    println!("new instance's first request after {elapsed:?}");
    assert!(elapsed < Duration::from_millis(200), "took {elapsed:?}");
    drop((first, second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_deregistration_fails_no_request() {
    let server = RedisServer::start();
    let registry = registry(&server).await;
    let staying = Registration::start(
        registry.clone(),
        Instance::new("api", "127.0.0.1", serve_port().await),
    )
    .unwrap();
    let leaving = Registration::start(
        registry.clone(),
        Instance::new("api", "127.0.0.1", serve_port().await),
    )
    .unwrap();
    staying.ready();
    leaving.ready();
    let options = Discovery::builder().interval(Duration::from_millis(100));
    let service = balanced(
        options
            .registry(registry.clone())
            .service("api")
            .hints(server.client(), registry.events_channel())
            .build()
            .unwrap(),
    );
    // Wait until both instances take traffic.
    let mut probe = service.clone();
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.len() < 2 {
        assert!(Instant::now() < deadline);
        match whoami(&mut probe).await {
            Ok(port) => {
                seen.insert(port);
            }
            Err(error) if error.is::<NoEndpoints>() => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("{error}"),
        }
    }
    // Load from 8 tasks while one instance drains and leaves.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (mut service, stop, sent, failed) =
            (service.clone(), stop.clone(), sent.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                if whoami(&mut service).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    test_support::wait_for("the load is on", Duration::from_secs(5), || {
        sent.load(Ordering::Relaxed) >= 50
    })
    .await;
    leaving
        .deregister(Some(Duration::from_millis(300)))
        .await
        .unwrap();
    // The load goes on after the departure: no request in this window may fail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("{sent} requests during a graceful deregistration, {failed} failed");
    assert!(sent > 100, "too little load to judge: {sent}");
    assert_eq!(failed, 0);
    drop(staying);
}

#[tokio::test]
async fn the_registry_load_is_one_read_per_interval_whatever_the_request_rate() {
    let server = RedisServer::start();
    let registry = registry(&server).await;
    let registration = Registration::start(
        registry.clone(),
        Instance::new("api", "127.0.0.1", serve_port().await),
    )
    .unwrap();
    registration.ready();
    let options = Discovery::builder().interval(Duration::from_millis(100));
    let mut service = balanced(
        options
            .registry(registry.clone())
            .service("api")
            .build()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while whoami(&mut service).await.is_err() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut admin = server.multiplexed().await;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();
    let started = Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(1) {
        whoami(&mut service).await.unwrap();
        requests += 1;
    }
    let (smembers, gets) = (
        server.command_calls("smembers"),
        server.command_calls("get"),
    );
    println!("{requests} requests in 1 s: {smembers} SMEMBERS, {gets} GET");
    assert!(requests > 100, "too little load to judge: {requests}");
    // One read per 100 ms interval (±10 % jitter), plus at most one heartbeat GET per 10 s: about 10 each.
    assert!((8..=13).contains(&smembers), "{smembers} SMEMBERS in 1 s");
    assert!(gets <= smembers + 1, "{gets} GET for {smembers} SMEMBERS");
}

/// A server on its own runtime and thread, so killing it closes its listener and every open connection at once.
struct KillableServer {
    port: u16,
    runtime: Option<tokio::runtime::Runtime>,
}

impl KillableServer {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener).unwrap()
        };
        let app = Router::new().route("/whoami", get(move || async move { port.to_string() }));
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            port,
            runtime: Some(runtime),
        }
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for KillableServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_under_load_gets_no_traffic_within_a_second_and_few_requests_fail() {
    use tower_redis_discovery::{Ejecting, EjectionOptions};

    let server = RedisServer::start();
    let registry = registry(&server).await;
    let mut servers: Vec<KillableServer> = (0..3).map(|_| KillableServer::start()).collect();
    let registrations: Vec<_> = servers
        .iter()
        .map(|s| {
            let registration =
                Registration::start(registry.clone(), Instance::new("api", "127.0.0.1", s.port))
                    .unwrap();
            registration.ready();
            registration
        })
        .collect();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let options = Discovery::builder().interval(Duration::from_millis(200));
    let service: Balanced<http::Request<Empty<bytes::Bytes>>, Response> = balance(
        options
            .registry(registry.clone())
            .service("api")
            .build()
            .unwrap(),
        move |instance: &Instance| {
            Ejecting::new(
                HttpEndpoint::new(client.clone(), instance),
                instance,
                EjectionOptions::default(),
            )
        },
        BalanceOptions::default(),
    );
    let mut probe = service.clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "not every instance took traffic: {seen:?}"
        );
        if let Ok(port) = whoami(&mut probe).await {
            seen.insert(port);
        }
    }

    let dead = servers[0].port;
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let last_dead_attempt = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let killed_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (mut service, stop, sent, failed) =
            (service.clone(), stop.clone(), sent.clone(), failed.clone());
        let (last_dead_attempt, killed_at) = (last_dead_attempt.clone(), killed_at.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                if whoami(&mut service).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                    // After the kill, only the dead instance fails requests.
                    if killed_at.lock().unwrap().is_some() {
                        *last_dead_attempt.lock().unwrap() = Some(Instant::now());
                    }
                }
            }
        }));
    }
    test_support::wait_for("the load is on", Duration::from_secs(5), || {
        sent.load(Ordering::Relaxed) >= 100
    })
    .await;
    *killed_at.lock().unwrap() = Some(Instant::now());
    servers[0].kill();
    // The load goes on for the ejection and two probe backoffs: what fails in this window is counted.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let killed = killed_at.lock().unwrap().unwrap();
    let last_failure = last_dead_attempt
        .lock()
        .unwrap()
        .map(|at| at.duration_since(killed));
    println!(
        "{sent} requests, {failed} failed; last failed request {last_failure:?} after the kill (port {dead})"
    );
    assert!(sent > 500, "too little load to judge: {sent}");
    assert!(
        (failed as f64) < sent as f64 * 0.01,
        "{failed} of {sent} failed"
    );
    // Ejected after 5 failures in a row; after that only a probe per backoff (about 1 s, then 2 s) reaches it.
    assert!(failed <= 20, "{failed} failures");
    drop(registrations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_longer_than_the_ttl_keeps_the_last_set_and_registrations_come_back_by_themselves()
 {
    let mut server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .ttl(Duration::from_secs(1))
        .redis_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let ports = [serve_port().await, serve_port().await];
    let registrations: Vec<_> = ports
        .iter()
        .map(|port| {
            let registration =
                Registration::start(registry.clone(), Instance::new("svc", "127.0.0.1", *port))
                    .unwrap();
            registration.ready();
            registration
        })
        .collect();
    let discovery = Discovery::builder()
        .interval(Duration::from_millis(50))
        .registry(registry.clone())
        .service("svc")
        .build()
        .unwrap();
    let watch = discovery.handle();
    let mut service = balanced(discovery);
    let deadline = Instant::now() + Duration::from_secs(5);
    while watch.stats().instances < 2 {
        assert!(Instant::now() < deadline, "both instances discovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Down for two and a half TTLs: every entry would have expired.
    server.kill();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stats = watch.stats();
    assert!(!stats.registry_reachable);
    assert!(stats.poll_failures > 0);
    assert_eq!(stats.instances, 2, "the last good set is kept");
    for _ in 0..20 {
        let response = whoami(&mut service).await;
        assert!(
            response.is_ok(),
            "requests keep flowing to the known instances"
        );
    }
    assert!(
        registrations
            .iter()
            .all(|registration| registration.stats().consecutive_failures > 0)
    );

    // Redis comes back empty: the registrations re-create their entries, discovery finds them again.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = watch.stats();
        let healthy = registrations
            .iter()
            .all(|registration| registration.stats().consecutive_failures == 0);
        if stats.registry_reachable && stats.instances == 2 && healthy {
            break;
        }
        assert!(Instant::now() < deadline, "recovered: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut connection = server.connection_manager().await;
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(registry.service_key("svc"))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(members.len(), 2, "both entries re-created");
}
