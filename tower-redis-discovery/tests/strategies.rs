//! The HazelJS strategies through `balance_with`: which instance each request reaches.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis_fixtures::RedisServer;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceExt};
use tower_redis_discovery::{
    BalanceOptions, Balanced, Discovery, DiscoveryBuilder, HttpEndpoint, Instance, MemoryRegistry,
    NoEndpoints, RedisRegistry, Registry, Status, Strategy, balance_with,
};

fn fast_watch() -> DiscoveryBuilder<()> {
    Discovery::builder().interval(Duration::from_millis(20))
}

fn instance(port: u16, zone: Option<&str>, weight: Option<f64>) -> Instance {
    let mut instance = Instance::new("svc", "127.0.0.1", port);
    instance.status = Status::Up;
    instance.zone = zone.map(str::to_owned);
    if let Some(weight) = weight {
        instance
            .metadata
            .insert("weight".to_owned(), serde_json::json!(weight));
    }
    instance
}

/// An endpoint that answers with its instance's port after `delay` (a stand-in for a real client).
fn endpoint(instance: &Instance, delay: Duration) -> BoxCloneSyncService<u64, u16, Infallible> {
    let port = instance.port;
    BoxCloneSyncService::new(tower::service_fn(move |_key: u64| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, Infallible>(port)
    }))
}

async fn balanced(
    instances: &[Instance],
    strategy: Strategy<u64>,
    delay: Duration,
) -> Balanced<u64, u16> {
    let registry = MemoryRegistry::new(Duration::from_secs(60));
    for instance in instances {
        registry.register(instance).await.unwrap();
    }
    let service = balance_with(
        fast_watch()
            .registry(registry)
            .service("svc")
            .build()
            .unwrap(),
        move |instance: &Instance| endpoint(instance, delay),
        strategy,
        BalanceOptions::default(),
    );
    wait_for(&service, instances.len()).await;
    service
}

/// Sends requests until every instance has answered once (discovery is asynchronous).
async fn wait_for(service: &Balanced<u64, u16>, count: usize) {
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut key = 0;
    while seen.len() < count && tokio::time::Instant::now() < deadline {
        key += 1;
        match service.clone().oneshot(key).await {
            Ok(port) => {
                seen.insert(port);
            }
            // NoEndpoints comes back at once: let discovery's task run.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    assert_eq!(seen.len(), count, "every instance discovered");
}

async fn spread(
    service: &Balanced<u64, u16>,
    requests: usize,
    key: impl Fn(usize) -> u64,
) -> HashMap<u16, usize> {
    let mut counts = HashMap::new();
    for i in 0..requests {
        let port = service.clone().oneshot(key(i)).await.unwrap();
        *counts.entry(port).or_default() += 1;
    }
    counts
}

/// Like `spread`, ignoring failures (before discovery has found anything).
async fn spread_ok(service: &Balanced<u64, u16>, requests: usize) -> HashMap<u16, usize> {
    let mut counts = HashMap::new();
    for _ in 0..requests {
        match service.clone().oneshot(0).await {
            Ok(port) => *counts.entry(port).or_default() += 1,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    counts
}

#[tokio::test]
async fn round_robin_takes_each_instance_in_turn() {
    let instances = [
        instance(1, None, None),
        instance(2, None, None),
        instance(3, None, None),
    ];
    let service = balanced(&instances, Strategy::RoundRobin, Duration::ZERO).await;
    let counts = spread(&service, 300, |_| 0).await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![100; 3],
        "{counts:?}"
    );
}

#[tokio::test]
async fn random_reaches_every_instance() {
    let instances = [
        instance(1, None, None),
        instance(2, None, None),
        instance(3, None, None),
    ];
    let service = balanced(&instances, Strategy::Random, Duration::ZERO).await;
    let counts = spread(&service, 600, |_| 0).await;
    assert_eq!(counts.len(), 3);
    assert!(counts.values().all(|count| *count > 100), "{counts:?}");
}

#[tokio::test]
async fn weighted_follows_metadata_weight() {
    let instances = [instance(1, None, Some(3.0)), instance(2, None, None)];
    let service = balanced(&instances, Strategy::Weighted, Duration::ZERO).await;
    let counts = spread(&service, 400, |_| 0).await;
    assert_eq!(counts[&1], 300, "{counts:?}");
    assert_eq!(counts[&2], 100, "{counts:?}");
}

#[tokio::test]
async fn hashing_keeps_a_key_on_one_instance_and_moves_only_the_departed_instances_keys() {
    let registry = MemoryRegistry::new(Duration::from_secs(60));
    let instances = [
        instance(1, None, None),
        instance(2, None, None),
        instance(3, None, None),
    ];
    for instance in &instances {
        registry.register(instance).await.unwrap();
    }
    let service = balance_with(
        fast_watch()
            .registry(registry.clone())
            .service("svc")
            .build()
            .unwrap(),
        |instance: &Instance| endpoint(instance, Duration::ZERO),
        Strategy::hash_by(|key: &u64| Some(*key)),
        BalanceOptions::default(),
    );
    wait_for(&service, 3).await;
    let mut placement = HashMap::new();
    for key in 0..300u64 {
        let first = service.clone().oneshot(key).await.unwrap();
        assert_eq!(
            service.clone().oneshot(key).await.unwrap(),
            first,
            "key {key} is sticky"
        );
        placement.insert(key, first);
    }
    let per_instance = placement.values().fold(HashMap::new(), |mut counts, port| {
        *counts.entry(*port).or_insert(0) += 1;
        counts
    });
    assert!(
        per_instance.values().all(|count| *count > 50),
        "{per_instance:?}"
    );

    registry.deregister(&instances[2]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while spread(&service, 30, |i| i as u64).await.contains_key(&3) {
        assert!(tokio::time::Instant::now() < deadline, "instance 3 leaves");
    }
    for (key, before) in placement {
        let now = service.clone().oneshot(key).await.unwrap();
        if before != 3 {
            assert_eq!(now, before, "key {key} stays where it was");
        } else {
            assert_ne!(now, 3);
        }
    }
}

#[tokio::test]
async fn least_connections_avoids_the_busy_instance() {
    let registry = MemoryRegistry::new(Duration::from_secs(60));
    let instances = [instance(1, None, None), instance(2, None, None)];
    for instance in &instances {
        registry.register(instance).await.unwrap();
    }
    // Instance 1 takes 300 ms per request, instance 2 answers at once.
    let service = balance_with(
        fast_watch()
            .registry(registry)
            .service("svc")
            .build()
            .unwrap(),
        |instance: &Instance| {
            let delay = if instance.port == 1 {
                Duration::from_millis(300)
            } else {
                Duration::ZERO
            };
            endpoint(instance, delay)
        },
        Strategy::LeastConnections,
        BalanceOptions::default(),
    );
    wait_for(&service, 2).await;
    // One slow request in flight on instance 1 ...
    let mut slow = None;
    for _ in 0..2 {
        let call = tokio::spawn(service.clone().oneshot(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
        if !call.is_finished() {
            slow = Some(call);
            break;
        }
    }
    let slow = slow.expect("a request reached the slow instance");
    // ... so every request meanwhile goes to instance 2.
    let counts = spread(&service, 50, |_| 0).await;
    assert_eq!(counts.get(&2), Some(&50), "{counts:?}");
    assert_eq!(slow.await.unwrap().unwrap(), 1);
}

#[tokio::test]
async fn zone_preference_stays_in_the_zone_and_falls_back_when_it_is_empty() {
    let registry = MemoryRegistry::new(Duration::from_secs(60));
    let instances = [
        instance(1, Some("eu-west-1a"), None),
        instance(2, Some("eu-west-1b"), None),
        instance(3, Some("eu-west-1a"), None),
    ];
    for instance in &instances {
        registry.register(instance).await.unwrap();
    }
    let service = balance_with(
        fast_watch()
            .registry(registry.clone())
            .service("svc")
            .build()
            .unwrap(),
        |instance: &Instance| endpoint(instance, Duration::ZERO),
        Strategy::zone_preference("eu-west-1a", Strategy::RoundRobin),
        BalanceOptions::default(),
    );
    // Discovery is asynchronous: wait until both instances in the zone answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let counts = spread_ok(&service, 10).await;
        if counts.contains_key(&1) && counts.contains_key(&3) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the zone's instances are discovered"
        );
    }
    let counts = spread(&service, 100, |_| 0).await;
    assert_eq!(counts.get(&1), Some(&50), "{counts:?}");
    assert_eq!(counts.get(&3), Some(&50), "{counts:?}");

    // Both instances in the zone go DOWN (a status change is removed at once; two of three deleted in one poll
    // would be held by self-preservation as a registry that lost its data).
    registry
        .heartbeat(&instances[0], Status::Down)
        .await
        .unwrap();
    registry
        .heartbeat(&instances[2], Status::Down)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let counts = spread(&service, 10, |_| 0).await;
        if counts.get(&2) == Some(&10) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "falls back to the other zone: {counts:?}"
        );
    }
}

#[tokio::test]
async fn no_instance_fails_at_once_with_no_endpoints() {
    let registry = MemoryRegistry::new(Duration::from_secs(60));
    let service = balance_with(
        fast_watch()
            .registry(registry)
            .service("svc")
            .build()
            .unwrap(),
        |instance: &Instance| endpoint(instance, Duration::ZERO),
        Strategy::RoundRobin,
        BalanceOptions::default(),
    );
    let started = std::time::Instant::now();
    let error: BoxError = service.oneshot(0).await.unwrap_err();
    assert!(error.downcast_ref::<NoEndpoints>().is_some(), "{error}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn weighted_http_balancing_over_real_servers_registered_in_redis() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .build()
        .unwrap();
    let mut ports = Vec::new();
    for weight in [1.0, 4.0] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = Router::new().route("/whoami", get(move || async move { port.to_string() }));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let mut up = Instance::new("web", "127.0.0.1", port);
        up.status = Status::Up;
        up.metadata
            .insert("weight".to_owned(), serde_json::json!(weight));
        registry.register(&up).await.unwrap();
        ports.push(port);
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let mut service = balance_with(
        fast_watch()
            .registry(registry)
            .service("web")
            .build()
            .unwrap(),
        move |instance: &Instance| HttpEndpoint::new(client.clone(), instance),
        Strategy::Weighted,
        BalanceOptions::default(),
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    // Until both are discovered, then 500 more.
    let mut total = 0;
    while counts.len() < 2 || total < 500 {
        assert!(tokio::time::Instant::now() < deadline || counts.len() == 2);
        let request = http::Request::get("http://web/whoami")
            .body(Empty::new())
            .unwrap();
        // Until discovery's first poll lands, the balancer fails fast with NoEndpoints.
        let Ok(response) = service.ready().await.unwrap().call(request).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let port = String::from_utf8(body.to_vec()).unwrap();
        if counts.len() == 2 {
            total += 1;
        }
        *counts.entry(port).or_default() += 1;
    }
    let heavy = counts[&ports[1].to_string()] as f64;
    let light = counts[&ports[0].to_string()] as f64;
    assert!((heavy / light - 4.0).abs() < 0.5, "{counts:?}");
}
