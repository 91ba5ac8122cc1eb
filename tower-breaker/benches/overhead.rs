//! What the breaker adds to a call, side by side with a bare service and with tower-resilience-circuitbreaker 0.14
//! configured the same way (count window of 100 calls, failure rate 0.5, at least 20 calls).
//!
//! `overhead` (one criterion group, so the figures come out side by side in one run): one call per iteration, on
//! the bench thread, with no runtime. Every service future here is ready on its first poll, so each call is: build
//! the request, `poll_ready` with a no-op waker, `call`, poll the future once and assert it is ready. The same
//! harness runs every variant.
//!
//! - `closed/bare`: the bare `service_fn`.
//! - `closed/tower-breaker-core`: `try_acquire` + `success` around the bare call.
//! - `closed/tower-breaker-layer`: the bare service behind `BreakerLayer::new(breaker).for_http()`.
//! - `closed/tower-resilience`: the bare service behind tower-resilience's layer.
//! - `open/...`: the rejection path: tower-breaker forced open (no `Retry-After`), tower-breaker tripped open by
//!   failures (its 503 carries `Retry-After`), and tower-resilience tripped open by failures.
//!
//! `throughput`: 8 tasks on a multi-thread tokio runtime with 2 workers share one service (clones of it, so one
//! breaker), each making `CALLS_PER_TASK` calls through `ready().await` + `call().await`. The service does a small
//! fixed amount of work per call, so the figure reflects a service rather than a no-op. Criterion reports calls/s.
//!
//! `interleaved` (printed after criterion, on a plain `cargo bench` run or with the filter `interleaved`): the same
//! closed-path and 8-task variants again, measured in rounds that alternate the variants (order rotating each
//! round), with medians per variant. On a shared machine, load that comes and goes while criterion runs one variant
//! after the other skews the ratios between variants; interleaving spreads it over all of them. This section also
//! measures the layer over a time window (10 s in 10 buckets, the same thresholds).

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group};
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breaker::{BreakerLayer, CircuitBreaker};
use tower_resilience_circuitbreaker::CircuitBreakerLayer;
use tower_resilience_circuitbreaker::classifier::FailureClassifier;

type Body = Empty<Bytes>;

/// How long tripped breakers stay open: longer than the whole run.
const OPEN_FOR: Duration = Duration::from_secs(3_600);
/// Calls each of the 8 tasks makes per throughput iteration.
const CALLS_PER_TASK: u64 = 1_000;
const TASKS: u64 = 8;
/// Iterations of the throughput service's busy loop: about 2.4 ns each on the 2-core bench VM, so the bare working
/// service costs about 200 ns a call.
const WORK: u32 = 80;

async fn bare(_request: Request<()>) -> Result<Response<Body>, Infallible> {
    Ok(Response::new(Empty::new()))
}

async fn failing(_request: Request<()>) -> Result<Response<Body>, Infallible> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    Ok(response)
}

async fn working(_request: Request<()>) -> Result<Response<Body>, Infallible> {
    spin(WORK);
    Ok(Response::new(Empty::new()))
}

/// About ten times `working`'s work (roughly 1 µs here): closer to a handler that does anything at all.
async fn working_1us(_request: Request<()>) -> Result<Response<Body>, Infallible> {
    spin(WORK * 10);
    Ok(Response::new(Empty::new()))
}

fn spin(iterations: u32) {
    let mut acc = 0u32;
    for i in 0..iterations {
        acc = black_box(acc.wrapping_add(i));
    }
    black_box(acc);
}

/// One call, polled by hand: the futures here are all ready on the first poll.
fn call_now<S>(service: &mut S, cx: &mut Context<'_>) -> Result<S::Response, S::Error>
where
    S: Service<Request<()>>,
    S::Error: Debug,
{
    match service.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(error)) => panic!("poll_ready failed: {error:?}"),
        Poll::Pending => panic!("poll_ready is pending"),
    }
    let future = pin!(service.call(Request::new(())));
    match future.poll(cx) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("the call future is pending"),
    }
}

fn tower_breaker(name: &'static str) -> CircuitBreaker {
    breaker_builder(name)
        .build()
        .expect("a valid breaker configuration")
}

/// The same breaker, built for the life of the process (no reference count per call).
fn static_breaker(name: &'static str) -> CircuitBreaker {
    breaker_builder(name)
        .build_static()
        .expect("a valid breaker configuration")
}

/// The same thresholds over a time window of 10 s in 10 buckets (every call reads the clock).
fn time_window_breaker(name: &'static str) -> CircuitBreaker {
    breaker_builder(name)
        .time_window(Duration::from_secs(10), 10)
        .build()
        .expect("a valid breaker configuration")
}

fn breaker_builder(name: &'static str) -> tower_breaker::BreakerBuilder {
    CircuitBreaker::builder()
        .name(name)
        .count_window(100)
        .minimum_calls(20)
        .failure_rate(0.5)
        .open_for(OPEN_FOR)
}

/// tower-resilience configured like [`tower_breaker`]: count-based window of 100, failure rate 0.5, minimum 20
/// calls; a 5xx response is a failure (as tower-breaker's HTTP classifier has it). Every service made by the
/// layer shares one circuit.
fn resilience_layer<B: 'static>()
-> CircuitBreakerLayer<impl FailureClassifier<Response<B>, Infallible> + 'static> {
    let (layer, _handle) = CircuitBreakerLayer::builder()
        .name("bench")
        .sliding_window_size(100)
        .failure_rate_threshold(0.5)
        .minimum_number_of_calls(20)
        .wait_duration_in_open(OPEN_FOR)
        .classify_response(|response: &Response<B>| response.status().is_server_error())
        .build_with_handle()
        .expect("a valid tower-resilience configuration");
    layer
}

fn overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("overhead");
    let mut cx = Context::from_waker(Waker::noop());

    // Closed path.
    let mut svc = service_fn(bare);
    group.bench_function("closed/bare", |b| {
        b.iter(|| black_box(call_now(&mut svc, &mut cx)));
    });

    let breaker = tower_breaker("core");
    let mut svc = service_fn(bare);
    group.bench_function("closed/tower-breaker-core", |b| {
        b.iter(|| {
            let permit = breaker.try_acquire().expect("closed");
            let response = call_now(&mut svc, &mut cx);
            permit.success();
            black_box(response)
        });
    });

    let mut svc = BreakerLayer::new(tower_breaker("layer"))
        .for_http()
        .layer(service_fn(bare));
    group.bench_function("closed/tower-breaker-layer", |b| {
        b.iter(|| black_box(call_now(&mut svc, &mut cx)));
    });

    let mut svc = BreakerLayer::new(static_breaker("layer-static"))
        .for_http()
        .layer(service_fn(bare));
    group.bench_function("closed/tower-breaker-layer-static", |b| {
        b.iter(|| black_box(call_now(&mut svc, &mut cx)));
    });

    let mut svc = resilience_layer().layer(service_fn(bare));
    group.bench_function("closed/tower-resilience", |b| {
        b.iter(|| black_box(call_now(&mut svc, &mut cx).expect("closed")));
    });

    // Open path: every call is rejected.
    let breaker = tower_breaker("core-forced");
    breaker.force_open();
    group.bench_function("open/tower-breaker-core", |b| {
        b.iter(|| {
            let request = black_box(Request::new(()));
            match breaker.try_acquire() {
                Ok(_) => panic!("admitted while forced open"),
                Err(rejected) => black_box((request, rejected)),
            }
        });
    });

    let breaker = tower_breaker("core-tripped");
    trip(&breaker);
    group.bench_function("open/tower-breaker-core-tripped", |b| {
        b.iter(|| {
            let request = black_box(Request::new(()));
            match breaker.try_acquire() {
                Ok(_) => panic!("admitted while open"),
                Err(rejected) => black_box((request, rejected)),
            }
        });
    });

    let breaker = tower_breaker("layer-forced");
    breaker.force_open();
    let mut svc = BreakerLayer::new(breaker)
        .for_http()
        .layer(service_fn(bare));
    group.bench_function("open/tower-breaker-layer", |b| {
        b.iter(|| {
            let response = call_now(&mut svc, &mut cx).expect("a 503");
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            black_box(response)
        });
    });

    let breaker = tower_breaker("layer-tripped");
    trip(&breaker);
    let mut svc = BreakerLayer::new(breaker)
        .for_http()
        .layer(service_fn(bare));
    group.bench_function("open/tower-breaker-layer-tripped", |b| {
        b.iter(|| {
            let response = call_now(&mut svc, &mut cx).expect("a 503");
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            black_box(response)
        });
    });

    let layer = resilience_layer();
    let mut tripper = layer.layer(service_fn(failing));
    // tower-resilience evaluates a count-based window only once it is full, so it takes 100 failures.
    for _ in 0..100 {
        let response = call_now(&mut tripper, &mut cx).expect("a 500");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    let mut svc = layer.layer(service_fn(bare));
    assert!(
        call_now(&mut svc, &mut cx).is_err(),
        "tower-resilience did not trip"
    );
    group.bench_function("open/tower-resilience", |b| {
        b.iter(|| black_box(call_now(&mut svc, &mut cx).expect_err("rejected")));
    });

    group.finish();
}

/// Opens `breaker` with 20 failures (the minimum number of calls, all failed).
fn trip(breaker: &CircuitBreaker) {
    for _ in 0..20 {
        breaker.try_acquire().expect("closed").failure();
    }
    assert!(breaker.try_acquire().is_err(), "the breaker did not trip");
}

/// 8 tasks, each making `CALLS_PER_TASK` calls through its clone of `service`.
async fn run_tasks<S>(service: &S)
where
    S: Service<Request<()>> + Clone + Send + 'static,
    S::Response: Send,
    S::Error: Debug + Send,
    S::Future: Send,
{
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut service = service.clone();
            tokio::spawn(async move {
                for _ in 0..CALLS_PER_TASK {
                    let ready = service.ready().await.expect("ready");
                    black_box(ready.call(Request::new(())).await.expect("a response"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("the task panicked");
    }
}

fn throughput(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    throughput_group(c, &runtime, "throughput", working);
    throughput_group(c, &runtime, "throughput-1us", working_1us);
}

/// The same four variants around `handler`.
fn throughput_group<F, Fut>(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    handler: F,
) where
    F: Fn(Request<()>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(TASKS * CALLS_PER_TASK));

    let svc = service_fn(handler.clone());
    group.bench_function("bare", |b| b.to_async(runtime).iter(|| run_tasks(&svc)));

    let svc = BreakerLayer::new(tower_breaker("throughput"))
        .for_http()
        .layer(service_fn(handler.clone()));
    group.bench_function("tower-breaker-layer", |b| {
        b.to_async(runtime).iter(|| run_tasks(&svc));
    });

    let svc = BreakerLayer::new(static_breaker("throughput-static"))
        .for_http()
        .layer(service_fn(handler.clone()));
    group.bench_function("tower-breaker-layer-static", |b| {
        b.to_async(runtime).iter(|| run_tasks(&svc));
    });

    let svc = resilience_layer().layer(service_fn(handler));
    group.bench_function("tower-resilience", |b| {
        b.to_async(runtime).iter(|| run_tasks(&svc));
    });

    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(40)
}

/// Rounds of the interleaved section, and calls per closed-path batch.
const ROUNDS: usize = 100;
const BATCH: u32 = 20_000;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `measure(variant)` for every variant in every round, the order rotating each round; returns the samples
/// per variant.
fn rounds(variants: usize, mut measure: impl FnMut(usize) -> f64) -> Vec<Vec<f64>> {
    let mut samples = vec![Vec::with_capacity(ROUNDS); variants];
    for round in 0..ROUNDS {
        for offset in 0..variants {
            let index = (round + offset) % variants;
            measure(index); // untimed: the first run after another variant pays for the switch
            samples[index].push(measure(index));
        }
    }
    samples
}

fn interleaved_closed() {
    let mut cx = Context::from_waker(Waker::noop());
    let mut bare_service = service_fn(bare);
    let core = tower_breaker("interleaved-core");
    let mut core_service = service_fn(bare);
    let mut layer = BreakerLayer::new(tower_breaker("interleaved-layer"))
        .for_http()
        .layer(service_fn(bare));
    let mut layer_static = BreakerLayer::new(static_breaker("interleaved-layer-static"))
        .for_http()
        .layer(service_fn(bare));
    let mut layer_time = BreakerLayer::new(time_window_breaker("interleaved-layer-time"))
        .for_http()
        .layer(service_fn(bare));
    let mut resilience = resilience_layer().layer(service_fn(bare));
    let names = [
        "bare",
        "tower-breaker core",
        "tower-breaker layer",
        "tower-breaker layer, static",
        "tower-breaker layer, time window",
        "tower-resilience layer",
    ];
    let samples = rounds(names.len(), |index| {
        let started = Instant::now();
        for _ in 0..BATCH {
            match index {
                0 => drop(black_box(call_now(&mut bare_service, &mut cx))),
                1 => {
                    let permit = core.try_acquire().expect("closed");
                    let response = call_now(&mut core_service, &mut cx);
                    permit.success();
                    drop(black_box(response));
                }
                2 => drop(black_box(call_now(&mut layer, &mut cx))),
                3 => drop(black_box(call_now(&mut layer_static, &mut cx))),
                4 => drop(black_box(call_now(&mut layer_time, &mut cx))),
                _ => drop(black_box(call_now(&mut resilience, &mut cx))),
            }
        }
        started.elapsed().as_nanos() as f64 / f64::from(BATCH)
    });
    print_closed(
        "closed path, one call",
        &names,
        &samples.into_iter().map(median).collect::<Vec<_>>(),
    );
}

/// Prints one call's medians: `names[0]` is the bare service, the last one tower-resilience.
fn print_closed(title: &str, names: &[&str], medians: &[f64]) {
    let rival = medians[medians.len() - 1] - medians[0];
    println!("\n## interleaved: {title} ({ROUNDS} rounds of {BATCH} calls, medians)\n");
    println!(
        "| variant | ns/call | overhead over bare | tower-resilience's overhead ÷ this one's |"
    );
    println!("|---|---:|---:|---:|");
    for (index, (name, median)) in names.iter().zip(medians).enumerate() {
        let overhead = median - medians[0];
        if index == 0 {
            println!("| {name} | {median:.1} | — | |");
        } else {
            println!(
                "| {name} | {median:.1} | {overhead:+.1} | {:.1}× |",
                rival / overhead
            );
        }
    }
}

async fn bare_axum(_request: Request<()>) -> Result<Response<axum::body::Body>, Infallible> {
    Ok(Response::new(axum::body::Body::empty()))
}

/// The closed path again with axum's response body (a boxed body of 16 bytes, so a bare response is 128 bytes and
/// the breaker's wrapped one 136): what a layer on an axum router pays.
fn interleaved_axum_body() {
    let mut cx = Context::from_waker(Waker::noop());
    let mut bare_service = service_fn(bare_axum);
    let mut layer = BreakerLayer::new(tower_breaker("interleaved-axum"))
        .for_http()
        .layer(service_fn(bare_axum));
    let mut layer_static = BreakerLayer::new(static_breaker("interleaved-axum-static"))
        .for_http()
        .layer(service_fn(bare_axum));
    let mut resilience = resilience_layer().layer(service_fn(bare_axum));
    let names = [
        "bare, axum body",
        "tower-breaker layer",
        "tower-breaker layer, static",
        "tower-resilience layer",
    ];
    let samples = rounds(names.len(), |index| {
        let started = Instant::now();
        for _ in 0..BATCH {
            match index {
                0 => drop(black_box(call_now(&mut bare_service, &mut cx))),
                1 => drop(black_box(call_now(&mut layer, &mut cx))),
                2 => drop(black_box(call_now(&mut layer_static, &mut cx))),
                _ => drop(black_box(call_now(&mut resilience, &mut cx))),
            }
        }
        started.elapsed().as_nanos() as f64 / f64::from(BATCH)
    });
    print_closed(
        "closed path with axum's body, one call",
        &names,
        &samples.into_iter().map(median).collect::<Vec<_>>(),
    );
}

fn interleaved_throughput<F, Fut>(runtime: &tokio::runtime::Runtime, label: &str, handler: F)
where
    F: Fn(Request<()>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let bare_service = service_fn(handler.clone());
    let layer = BreakerLayer::new(tower_breaker("interleaved-throughput"))
        .for_http()
        .layer(service_fn(handler.clone()));
    let layer_static = BreakerLayer::new(static_breaker("interleaved-throughput-static"))
        .for_http()
        .layer(service_fn(handler.clone()));
    let layer_time = BreakerLayer::new(time_window_breaker("interleaved-throughput-time"))
        .for_http()
        .layer(service_fn(handler.clone()));
    let resilience = resilience_layer().layer(service_fn(handler));
    let names = [
        "bare",
        "tower-breaker layer",
        "tower-breaker layer, static",
        "tower-breaker layer, time window",
        "tower-resilience layer",
    ];
    let samples = rounds(names.len(), |index| {
        let started = Instant::now();
        match index {
            0 => runtime.block_on(run_tasks(&bare_service)),
            1 => runtime.block_on(run_tasks(&layer)),
            2 => runtime.block_on(run_tasks(&layer_static)),
            3 => runtime.block_on(run_tasks(&layer_time)),
            _ => runtime.block_on(run_tasks(&resilience)),
        }
        (TASKS * CALLS_PER_TASK) as f64 / started.elapsed().as_secs_f64()
    });
    let medians: Vec<f64> = samples.into_iter().map(median).collect();
    println!(
        "\n## interleaved: 8 tasks, 2 workers, {label} ({ROUNDS} rounds of {} calls, medians)\n",
        TASKS * CALLS_PER_TASK
    );
    println!("| variant | calls/s | vs bare |");
    println!("|---|---:|---:|");
    for (name, median) in names.iter().zip(&medians) {
        println!(
            "| {name} | {:.3} M | {:.2} |",
            median / 1e6,
            median / medians[0]
        );
    }
}

fn interleaved() {
    interleaved_closed();
    interleaved_axum_body();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    interleaved_throughput(&runtime, "tiny handler", working);
    interleaved_throughput(&runtime, "~1 µs handler", working_1us);
}

criterion_group! {
    name = benches;
    config = config();
    targets = overhead, throughput
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // A plain `cargo bench` passes only `--bench` (flags such as `--noplot` may follow); a filter naming
    // `interleaved` runs it alone.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plain_run = args.iter().all(|arg| arg.starts_with("--"));
    if args.iter().any(|arg| arg == "--bench")
        && (plain_run || args.iter().any(|arg| arg.contains("interleaved")))
    {
        interleaved();
    }
}
