//! A tonic client balanced over the instances discovery finds, behind a circuit breaker. Three gRPC servers start
//! in this process and register as `health-api` (in Redis with `REDIS_URL`, else in memory); the client discovers
//! them, spreads 300 calls over them (power of two choices over peak-EWMA), and the breaker guards the whole service.
//! One server then leaves (deregistered with a drain), and the next calls go to the two left, none failing.
//!
//! ```text
//! cargo run -p tonic-balanced-client
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p tonic-balanced-client
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower_breaker::{BreakerLayer, CircuitBreaker};
use tower_redis_discovery::{
    BalanceOptions, Discovery, Instance, MemoryRegistry, RedisRegistry, Registration, Registry,
    balance,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    match std::env::var("REDIS_URL") {
        Ok(url) => {
            let connection = redis::Client::open(url)?.get_connection_manager().await?;
            let registry =
                RedisRegistry::builder().redis(connection).prefix("tonic-example:discovery:");
            run(registry.ttl(Duration::from_secs(15)).build()?).await
        }
        Err(_) => run(MemoryRegistry::new(Duration::from_secs(15))).await,
    }
}

async fn run<R: Registry>(registry: R) -> Result<(), Error> {
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(start_server(registry.clone()).await?);
    }
    let discovery = Discovery::builder()
        .registry(registry)
        .service("health-api")
        .interval(Duration::from_millis(200))
        .build()?;
    // One lazily connected channel per instance; the balancer adds and drops them as instances come and go.
    // (An address that does not parse gets a channel that never connects, which the balancer avoids.)
    let watch = discovery.handle();
    let channels = balance(
        discovery,
        |instance: &Instance| {
            Endpoint::from_shared(instance.base_uri())
                .unwrap_or_else(|_| Endpoint::from_static("http://127.0.0.1:1"))
                .connect_lazy()
        },
        BalanceOptions::default(),
    );
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while watch.stats().instances < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    found.await.map_err(|_| "the three servers were not discovered within 10 s")?;
    let breaker = CircuitBreaker::builder().name("health-api").consecutive_failures(5).build()?;
    let guarded = ServiceBuilder::new().layer(BreakerLayer::new(breaker.clone())).service(channels);
    let mut client = HealthClient::with_origin(guarded, "http://health-api".parse()?);

    let counters: Vec<Arc<AtomicU64>> = servers.iter().map(|(_, calls, _)| calls.clone()).collect();
    for round in ["three instances", "after one left"] {
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..300 {
            match client.check(HealthCheckRequest { service: String::new() }).await {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        let served: Vec<u64> = counters.iter().map(|calls| calls.load(Ordering::Relaxed)).collect();
        println!(
            "{round}: {ok} ok, {failed} failed; calls per server so far {served:?}; breaker {:?}",
            breaker.state()
        );
        if !servers.is_empty() && round == "three instances" {
            // Out of service first (the balancer stops choosing it), then gone from the registry, then stopped.
            let (registration, _, task) = servers.remove(0);
            registration.deregister(Some(Duration::from_millis(500))).await?;
            task.abort();
        }
    }
    Ok(())
}

/// A health server on a free port, registered as `health-api`, counting the calls it serves.
async fn start_server<R: Registry>(
    registry: R,
) -> Result<(Registration<R>, Arc<AtomicU64>, JoinHandle<()>), Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let server = Server::builder()
        .layer(tower::util::MapRequestLayer::new(move |request| {
            counted.fetch_add(1, Ordering::Relaxed);
            request
        }))
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener));
    let task = tokio::spawn(async move {
        if let Err(error) = server.await {
            eprintln!("server on port {port}: {error}");
        }
    });
    let registration =
        Registration::start(registry, Instance::new("health-api", "127.0.0.1", port))?;
    registration.ready();
    Ok((registration, calls, task))
}
