//! The Redis registry through a `SentinelConnection`: registrations made before a failover are still listed after
//! it (they were replicated), and heartbeats and new registrations reach the promoted replica; a balanced client
//! under load sees no failure through the failover.
#![cfg(feature = "sentinel")]
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis_fixtures::RedisSentinel;
use test_support::wait_until;
use tower::{Service, ServiceExt};
use tower_redis_discovery::{
    BalanceOptions, Discovery, HttpEndpoint, Instance, RedisRegistry, Registration, Registry,
    Status, balance,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_survive_a_failover_and_new_ones_reach_the_promoted_replica() {
    let mut set = RedisSentinel::start();
    let promoted = set.replica_port();
    let connection = test_support::sentinel_connection(&set).await;
    let registry = RedisRegistry::builder()
        .redis(connection)
        .prefix("sentinel-test:")
        .build()
        .unwrap();
    let before = Instance::new("user-service", "127.0.0.1", 3101);
    registry.register(&before).await.unwrap();
    // Replication is asynchronous: wait until the replica has the entry before killing the primary.
    let replica = redis::Client::open(format!("redis://127.0.0.1:{promoted}").as_str()).unwrap();
    let mut replica = replica.get_multiplexed_async_connection().await.unwrap();
    let key = registry.instance_key(&before.id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis::cmd("EXISTS")
        .arg(&key)
        .query_async::<bool>(&mut replica)
        .await
        .unwrap()
    {
        assert!(
            Instant::now() < deadline,
            "the registration never replicated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    set.kill_primary();
    let after = Instance::new("user-service", "127.0.0.1", 3102);
    let deadline = Instant::now() + Duration::from_secs(40);
    while registry.register(&after).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no registration succeeded after the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    registry.heartbeat(&before, Status::Up).await.unwrap();
    let mut ports: Vec<u16> = registry
        .instances("user-service")
        .await
        .unwrap()
        .iter()
        .map(|instance| instance.port)
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, [3101, 3102]);
    assert_eq!(set.wait_for_new_primary(Duration::from_secs(5)), promoted);
}

/// A backend on loopback answering `/whoami` with its port, counting the requests it serves.
async fn backend(served: Arc<AtomicUsize>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().route(
        "/whoami",
        get(move || async move {
            served.fetch_add(1, Ordering::Relaxed);
            port.to_string()
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_requests_survive_a_failover_and_reach_an_instance_registered_after_it() {
    let started = Instant::now();
    let mut set = RedisSentinel::start();
    let promoted = set.replica_port();
    let connection = test_support::sentinel_connection(&set).await;
    // A TTL longer than a failover takes: the replicated entries must outlive the primary.
    let registry = RedisRegistry::builder()
        .redis(connection)
        .prefix("failover-load:")
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let served: [Arc<AtomicUsize>; 3] = Default::default();
    let mut ports = Vec::new();
    for counter in &served {
        ports.push(backend(counter.clone()).await);
    }
    let registrations: Vec<_> = ports[..2]
        .iter()
        .map(|&port| {
            let registration =
                Registration::start(registry.clone(), Instance::new("users", "127.0.0.1", port))
                    .unwrap();
            registration.ready();
            registration
        })
        .collect();
    let discovery = Discovery::builder()
        .interval(Duration::from_millis(100))
        .registry(registry.clone())
        .service("users")
        .build()
        .unwrap();
    let watch = discovery.handle();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let balanced = balance(
        discovery,
        move |instance| HttpEndpoint::new(client.clone(), instance),
        BalanceOptions::default(),
    );
    wait_until(
        "both instances are discovered",
        Duration::from_secs(10),
        async || watch.stats().instances == 2,
    )
    .await;
    // Replication is asynchronous: the replica must hold both entries (UP) before the primary dies.
    let replica = redis::Client::open(format!("redis://127.0.0.1:{promoted}").as_str()).unwrap();
    let mut replica = replica.get_multiplexed_async_connection().await.unwrap();
    for registration in &registrations {
        let key = registry.instance_key(&registration.instance().id);
        wait_until(
            "the registrations replicate",
            Duration::from_secs(10),
            async || {
                let json: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut replica)
                    .await
                    .unwrap();
                json.is_some_and(|json| json.contains("\"UP\""))
            },
        )
        .await;
    }

    // Four tasks send requests back to back through the balancer, recording every outcome.
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (stop, mut balanced) = (stop.clone(), balanced.clone());
            tokio::spawn(async move {
                let mut outcomes: Vec<Result<u16, String>> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let request = http::Request::get("/whoami").body(Empty::new()).unwrap();
                    let outcome = match balanced.ready().await {
                        Ok(service) => match service.call(request).await {
                            Ok(response) if response.status().is_success() => {
                                let body = response.into_body().collect().await.unwrap();
                                Ok(String::from_utf8(body.to_bytes().to_vec())
                                    .unwrap()
                                    .parse()
                                    .unwrap())
                            }
                            Ok(response) => Err(format!("status {}", response.status())),
                            Err(error) => Err(error.to_string()),
                        },
                        Err(error) => Err(error.to_string()),
                    };
                    outcomes.push(outcome);
                }
                outcomes
            })
        })
        .collect();
    // Both first instances take traffic before the kill.
    test_support::wait_for("both instances serve", Duration::from_secs(10), || {
        served[..2].iter().all(|n| n.load(Ordering::Relaxed) >= 10)
    })
    .await;
    let before_kill: Vec<usize> = served.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    let killed_at = Instant::now();
    set.kill_primary();
    let new_primary =
        tokio::task::block_in_place(|| set.wait_for_new_primary(Duration::from_secs(30)));
    assert_eq!(new_primary, promoted);
    let failover = killed_at.elapsed();
    let at_promotion: Vec<usize> = served.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    let heartbeats_at_promotion: Vec<u64> = registrations
        .iter()
        .map(|registration| registration.stats().heartbeats)
        .collect();

    // A third instance registers on the promoted replica; discovery finds it and it gets traffic.
    let third = Registration::start(
        registry.clone(),
        Instance::new("users", "127.0.0.1", ports[2]),
    )
    .unwrap();
    third.ready();
    wait_until(
        "the third instance gets traffic",
        Duration::from_secs(10),
        async || served[2].load(Ordering::Relaxed) > 0,
    )
    .await;
    // The first two keep heartbeating, now to the promoted replica.
    wait_until(
        "the first instances heartbeat after the failover",
        Duration::from_secs(10),
        async || {
            registrations
                .iter()
                .zip(&heartbeats_at_promotion)
                .all(|(registration, &before)| {
                    let stats = registration.stats();
                    stats.heartbeats > before && stats.consecutive_failures == 0
                })
        },
    )
    .await;
    // The load goes on a while on the promoted primary: no request in this window may fail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for sender in senders {
        outcomes.extend(sender.await.unwrap());
    }
    let after: Vec<usize> = served.iter().map(|n| n.load(Ordering::Relaxed)).collect();

    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failures.len(),
        outcomes.len(),
        failures.first()
    );
    for (index, port) in ports.iter().enumerate() {
        let answered = outcomes
            .iter()
            .filter(|o| o.as_ref().ok() == Some(port))
            .count();
        assert_eq!(answered, after[index], "backend {port}");
    }
    // Both first instances served on each side of the promotion; the third only after it registered.
    for index in 0..2 {
        assert!(
            before_kill[index] > 0 && after[index] > at_promotion[index],
            "backend {index}: {before_kill:?} before the kill, {at_promotion:?} at the promotion, {after:?} at the end"
        );
    }
    assert_eq!(at_promotion[2], 0);
    // The discovery watch really lost the registry during the failover, and kept its last good set.
    let stats = watch.stats();
    assert!(stats.poll_failures > 0, "{stats:?}");
    assert!(
        stats.registry_reachable && stats.instances == 3,
        "{stats:?}"
    );
    let mut listed: Vec<u16> = registry
        .instances("users")
        .await
        .unwrap()
        .iter()
        .map(|instance| instance.port)
        .collect();
    listed.sort_unstable();
    let mut expected = ports;
    expected.sort_unstable();
    assert_eq!(listed, expected);
    eprintln!(
        "failover under load: {} requests, none failed; primary killed → replica promoted in {failover:?}; \
         served per backend {after:?}; {} failed polls; whole test {:?}",
        outcomes.len(),
        stats.poll_failures,
        started.elapsed()
    );
}
