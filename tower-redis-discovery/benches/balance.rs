//! Balancer figures: the overhead of `balance` per request, and power of two choices over peak-EWMA against round
//! robin with five instances, one of them 20× slower.
//!
//! `cargo bench -p tower-redis-discovery --bench balance`
#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tower::{Service, ServiceExt, service_fn};
use tower_redis_discovery::{
    BalanceOptions, Discovery, Instance, MemoryRegistry, Registry, Status, Strategy, balance,
    balance_with,
};

/// The peer: tower's own P2C over peak-EWMA behind a `Buffer` (what `balance` was built on before), fed by the same
/// discovery.
fn tower_p2c<S>(
    discovery: Discovery,
    make: impl Fn(&Instance) -> S + Send + 'static,
) -> tower::util::BoxCloneSyncService<(), (), tower::BoxError>
where
    S: Service<(), Response = (), Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    use futures_util::StreamExt;
    use tower::discover::Change;
    use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
    let changes = discovery.map(move |change| {
        change.map(|change| match change {
            Change::Insert(id, instance) => Change::Insert(id, make(&instance)),
            Change::Remove(id) => Change::Remove(id),
        })
    });
    let loaded = PeakEwmaDiscover::new::<()>(
        Box::pin(changes),
        Duration::from_millis(1),
        Duration::from_secs(10),
        CompleteOnResponse::default(),
    );
    let buffered = tower::buffer::Buffer::new(tower::balance::p2c::Balance::new(loaded), 1024);
    tower::util::BoxCloneSyncService::new(buffered)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn registry_with(ports: &[u16]) -> MemoryRegistry {
    let registry = MemoryRegistry::default();
    for port in ports {
        let mut instance = Instance::new("svc", "127.0.0.1", *port);
        instance.status = Status::Up;
        registry.register(&instance).await.unwrap();
    }
    registry
}

fn watch(registry: MemoryRegistry) -> Discovery {
    Discovery::builder()
        .interval(Duration::from_millis(20))
        .registry(registry)
        .service("svc")
        .build()
        .unwrap()
}

async fn overhead(runtime_name: &str) {
    const CALLS: usize = 20_000;
    let mut direct = service_fn(|(): ()| async { Ok::<_, Infallible>(()) });
    let make = |_: &Instance| service_fn(|(): ()| async { Ok::<_, Infallible>(()) });
    let mut balanced = [
        tower_p2c(watch(registry_with(&[1, 2, 3]).await), make),
        balance(
            watch(registry_with(&[1, 2, 3]).await),
            make,
            BalanceOptions::default(),
        ),
        balance_with(
            watch(registry_with(&[1, 2, 3]).await),
            make,
            Strategy::RoundRobin,
            BalanceOptions::default(),
        ),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let names = [
        "tower::balance::p2c + peak-EWMA + Buffer (the peer)",
        "balance (P2C + peak-EWMA, no buffer task)",
        "balance_with(RoundRobin)",
    ];
    let mut measure = async |path: Option<usize>| {
        let mut times = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let started = Instant::now();
            match path {
                Some(index) => balanced[index]
                    .ready()
                    .await
                    .unwrap()
                    .call(())
                    .await
                    .unwrap(),
                None => direct.ready().await.unwrap().call(()).await.unwrap(),
            }
            times.push(started.elapsed());
        }
        times.sort();
        times
    };
    for index in 0..names.len() {
        let _warm = measure(Some(index)).await;
    }
    // Interleaved rounds, so machine noise hits every path alike.
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); names.len() + 1];
    for _ in 0..3 {
        samples[0].extend(measure(None).await);
        for index in 0..names.len() {
            samples[index + 1].extend(measure(Some(index)).await);
        }
    }
    for times in &mut samples {
        times.sort();
    }
    println!(
        "## Overhead per request ({runtime_name} runtime, sequential, 3 × {CALLS} calls per path, 3 in-process endpoints)\n"
    );
    println!("| path | p50 µs | p99 µs | added at p50 µs |\n|---|---:|---:|---:|");
    let direct_p50 = percentile(&samples[0], 0.5).as_secs_f64() * 1e6;
    for (name, times) in std::iter::once("direct service").chain(names).zip(&samples) {
        let p50 = percentile(times, 0.5).as_secs_f64() * 1e6;
        println!(
            "| {name} | {p50:.2} | {:.2} | {:+.2} |",
            percentile(times, 0.99).as_secs_f64() * 1e6,
            p50 - direct_p50
        );
    }
    println!();
}

/// Five endpoints: four answer in 10 ms, one in 200 ms; each counts its requests.
fn endpoint(
    port: u16,
    counts: Arc<Vec<AtomicUsize>>,
) -> impl Service<(), Response = (), Error = Infallible, Future: Send> + Clone + Send {
    service_fn(move |(): ()| {
        let counts = counts.clone();
        async move {
            counts[usize::from(port - 1)].fetch_add(1, Ordering::Relaxed);
            let latency = if port == 5 { 200 } else { 10 };
            tokio::time::sleep(Duration::from_millis(latency)).await;
            Ok::<_, Infallible>(())
        }
    })
}

async fn slow_instance() {
    const REQUESTS: usize = 4_000;
    const CONCURRENCY: usize = 40;
    println!(
        "## Five instances, one 20× slower (10 ms and 200 ms), concurrency {CONCURRENCY}, {REQUESTS} requests\n"
    );
    println!(
        "| balancer | p50 ms | p90 ms | p99 ms | share to the slow one |\n|---|---:|---:|---:|---:|"
    );
    for strategy in [
        "round robin",
        "tower::balance::p2c + peak-EWMA + Buffer (the peer)",
        "balance (P2C + peak-EWMA)",
        "balance_with(LeastConnections)",
    ] {
        let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..5).map(|_| AtomicUsize::new(0)).collect());
        let next = Arc::new(AtomicUsize::new(0));
        let issued = Arc::new(AtomicUsize::new(0));
        let registry = registry_with(&[1, 2, 3, 4, 5]).await;
        let balanced = {
            let counts = counts.clone();
            let make = move |instance: &Instance| endpoint(instance.port, counts.clone());
            match strategy {
                "balance (P2C + peak-EWMA)" => {
                    balance(watch(registry), make, BalanceOptions::default())
                }
                "balance_with(LeastConnections)" => balance_with(
                    watch(registry),
                    make,
                    Strategy::LeastConnections,
                    BalanceOptions::default(),
                ),
                _ => tower_p2c(watch(registry), make),
            }
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let endpoints: Vec<_> = (1..=5).map(|port| endpoint(port, counts.clone())).collect();
        let mut tasks = Vec::new();
        for _ in 0..CONCURRENCY {
            let (issued, next, endpoints) = (issued.clone(), next.clone(), endpoints.clone());
            let mut balanced = balanced.clone();
            let round_robin = strategy == "round robin";
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                while issued.fetch_add(1, Ordering::Relaxed) < REQUESTS {
                    let started = Instant::now();
                    if round_robin {
                        let mut endpoint = endpoints
                            [next.fetch_add(1, Ordering::Relaxed) % endpoints.len()]
                        .clone();
                        endpoint.ready().await.unwrap().call(()).await.unwrap();
                    } else {
                        balanced.ready().await.unwrap().call(()).await.unwrap();
                    }
                    times.push(started.elapsed());
                }
                times
            }));
        }
        let mut times = Vec::new();
        for task in tasks {
            times.extend(task.await.unwrap());
        }
        times.sort();
        let total: usize = counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum();
        let slow_share = counts[4].load(Ordering::Relaxed) as f64 / total as f64 * 100.0;
        println!(
            "| {strategy} | {:.1} | {:.1} | {:.1} | {slow_share:.2} % |",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.9).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
        );
    }
    println!();
}

fn main() {
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    current.block_on(overhead("current-thread"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        overhead("2-worker multi-thread").await;
        slow_instance().await;
    });
}
