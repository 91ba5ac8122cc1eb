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
use tower_discovery::{
    BalanceOptions, Balanced, Discovery, HttpEndpoint, Instance, NoEndpoints, RedisRegistry,
    Registration, WatchOptions, balance,
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
    RedisRegistry::new(server.connection_manager().await).ttl(Duration::from_secs(30))
}

#[tokio::test]
async fn a_new_instance_gets_its_first_request_within_200_ms_of_registering() {
    let server = RedisServer::start();
    let registry = registry(&server).await;
    let first = Registration::start(
        registry.clone(),
        Instance::new("api", "127.0.0.1", serve_port().await),
    );
    first.ready();
    let options = WatchOptions {
        interval: Duration::from_secs(30),
        ..WatchOptions::default()
    };
    let discovery = Discovery::watch_with_hints(
        registry.clone(),
        "api",
        options,
        server.client(),
        registry.events_channel(),
    );
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
    let second = Registration::start(registry.clone(), Instance::new("api", "127.0.0.1", port));
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
    );
    let leaving = Registration::start(
        registry.clone(),
        Instance::new("api", "127.0.0.1", serve_port().await),
    );
    staying.ready();
    leaving.ready();
    let options = WatchOptions {
        interval: Duration::from_millis(100),
        ..WatchOptions::default()
    };
    let service = balanced(Discovery::watch_with_hints(
        registry.clone(),
        "api",
        options,
        server.client(),
        registry.events_channel(),
    ));
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
    tokio::time::sleep(Duration::from_millis(200)).await;
    leaving
        .deregister(Some(Duration::from_millis(300)))
        .await
        .unwrap();
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
    );
    registration.ready();
    let options = WatchOptions {
        interval: Duration::from_millis(100),
        ..WatchOptions::default()
    };
    let mut service = balanced(Discovery::watch(registry.clone(), "api", options));
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
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin)
        .await
        .unwrap();
    let calls = |command: &str| -> u64 {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    };
    let (smembers, gets) = (calls("smembers"), calls("get"));
    println!("{requests} requests in 1 s: {smembers} SMEMBERS, {gets} GET");
    assert!(requests > 100, "too little load to judge: {requests}");
    // One read per 100 ms interval (±10 % jitter), plus at most one heartbeat GET per 10 s: about 10 each.
    assert!((8..=13).contains(&smembers), "{smembers} SMEMBERS in 1 s");
    assert!(gets <= smembers + 1, "{gets} GET for {smembers} SMEMBERS");
}
