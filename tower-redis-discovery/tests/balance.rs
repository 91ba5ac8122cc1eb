//! Balancing over discovered instances: real axum servers on loopback, registered in a real Redis; fail-fast when
//! there is no endpoint or none is ready.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::collections::HashMap;
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis_fixtures::RedisServer;
use tower::{Service, ServiceExt};
use tower_redis_discovery::{
    BalanceOptions, Discovery, DiscoveryBuilder, HttpEndpoint, Instance, MemoryRegistry,
    NoEndpoints, RedisRegistry, Registry, Status, Unavailable, balance,
};

fn fast_watch() -> DiscoveryBuilder<()> {
    Discovery::builder().interval(Duration::from_millis(50))
}

async fn serve_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().route("/whoami", get(move || async move { port.to_string() }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

fn up(name: &str, port: u16) -> Instance {
    let mut instance = Instance::new(name, "127.0.0.1", port);
    instance.status = Status::Up;
    instance
}

#[tokio::test]
async fn requests_are_spread_over_every_discovered_instance() {
    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .build()
        .unwrap();
    let ports = [serve_port().await, serve_port().await];
    for port in ports {
        registry.register(&up("user-service", port)).await.unwrap();
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let discovery = fast_watch()
        .registry(registry)
        .service("user-service")
        .build()
        .unwrap();
    let mut balanced = balance(
        discovery,
        move |instance| HttpEndpoint::new(client.clone(), instance),
        BalanceOptions::default(),
    );

    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 || seen.values().sum::<usize>() < 40 {
        assert!(
            Instant::now() < deadline,
            "traffic did not reach both instances: {seen:?}"
        );
        let request = http::Request::get("/whoami").body(Empty::new()).unwrap();
        match balanced.ready().await.unwrap().call(request).await {
            Ok(response) => {
                let body = response.into_body().collect().await.unwrap().to_bytes();
                *seen
                    .entry(String::from_utf8(body.to_vec()).unwrap())
                    .or_default() += 1;
            }
            // The very first requests can race the first poll of the registry.
            Err(error) if error.is::<NoEndpoints>() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("unexpected error: {error}"),
        }
    }
    for port in ports {
        assert!(
            seen.get(&port.to_string()).copied().unwrap_or(0) > 0,
            "{seen:?}"
        );
    }
}

#[tokio::test]
async fn with_no_instance_a_request_fails_at_once_with_no_endpoints() {
    let registry = MemoryRegistry::default();
    let discovery = fast_watch()
        .registry(registry)
        .service("nobody")
        .build()
        .unwrap();
    let watch = discovery.handle();
    let mut balanced = balance(
        discovery,
        |_: &Instance| tower::service_fn(|_: ()| async { Ok::<_, Infallible>(()) }),
        BalanceOptions::default(),
    );
    test_support::wait_for("the first poll", Duration::from_secs(5), || {
        watch.stats().polls >= 1
    })
    .await;
    let started = Instant::now();
    let error = balanced.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(error.is::<NoEndpoints>(), "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
}

/// An endpoint that is never ready (a dead connection pool, say).
#[derive(Clone)]
struct NeverReady;

impl Service<()> for NeverReady {
    type Response = ();
    type Error = Infallible;
    type Future = std::future::Ready<Result<(), Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Pending
    }

    fn call(&mut self, (): ()) -> Self::Future {
        std::future::ready(Ok(()))
    }
}

#[tokio::test]
async fn with_no_ready_instance_a_request_fails_after_the_failfast_timeout() {
    let registry = MemoryRegistry::default();
    registry.register(&up("stuck", 1)).await.unwrap();
    let discovery = fast_watch()
        .registry(registry)
        .service("stuck")
        .build()
        .unwrap();
    let options = BalanceOptions::builder()
        .failfast(Duration::from_millis(300))
        .build()
        .unwrap();
    let watch = discovery.handle();
    let mut balanced = balance(discovery, |_: &Instance| NeverReady, options);
    test_support::wait_for("the instance is discovered", Duration::from_secs(5), || {
        watch.stats().instances >= 1
    })
    .await;
    let started = Instant::now();
    let error = balanced.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(error.is::<Unavailable>(), "{error}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2),
        "took {elapsed:?}"
    );
}

#[tokio::test]
async fn a_tonic_client_balances_over_discovered_grpc_instances() {
    use grpc_echo::{EchoClient, EchoRequest, EchoServer};
    use tower_redis_discovery::Protocol;

    let server = RedisServer::start();
    let registry = RedisRegistry::builder()
        .redis(server.connection_manager().await)
        .build()
        .unwrap();
    let echoes = [EchoServer::new(), EchoServer::new()];
    for echo in &echoes {
        let (address, _task) = grpc_echo::serve(echo.clone()).await;
        let mut instance = up("echo", address.port());
        instance.protocol = Protocol::Grpc;
        registry.register(&instance).await.unwrap();
    }
    let discovery = fast_watch()
        .registry(registry)
        .service("echo")
        .build()
        .unwrap();
    // One lazily connected channel per instance, each wrapped by the balancer's peak-EWMA load (tonic's own
    // balanced channel reports a load of zero for every endpoint).
    let balanced = balance(
        discovery,
        |instance: &Instance| {
            tonic::transport::Endpoint::from_shared(instance.base_uri())
                .map(|endpoint| endpoint.connect_lazy())
                .unwrap_or_else(|_| {
                    tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy()
                })
        },
        BalanceOptions::default(),
    );
    let mut client = EchoClient::with_origin(balanced, "http://echo".parse().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ok = 0;
    while echoes.iter().any(|echo| echo.calls() == 0) || ok < 20 {
        assert!(
            Instant::now() < deadline,
            "calls: {:?}",
            echoes.iter().map(EchoServer::calls).collect::<Vec<_>>()
        );
        let request = EchoRequest {
            message: "hi".to_owned(),
            fail_with: 0,
            delay_ms: 0,
        };
        match client.say(request).await {
            Ok(reply) => {
                assert_eq!(reply.into_inner().message, "hi");
                ok += 1;
            }
            Err(status) if status.message().contains("no endpoints") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("unexpected status: {status}"),
        }
    }
    assert!(echoes.iter().all(|echo| echo.calls() > 0));
}

#[tokio::test]
async fn a_failing_instance_is_ejected_then_re_admitted_after_a_successful_probe() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU16, Ordering};

    use tower_redis_discovery::{Ejecting, EjectionOptions};

    // Two instances: one healthy, one answering 503 until told otherwise.
    let healthy = serve_port().await;
    let status = Arc::new(AtomicU16::new(503));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sick = listener.local_addr().unwrap().port();
    let app = Router::new().route(
        "/whoami",
        get({
            let status = status.clone();
            move || async move {
                (
                    http::StatusCode::from_u16(status.load(Ordering::Relaxed)).unwrap(),
                    sick.to_string(),
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let registry = MemoryRegistry::default();
    registry.register(&up("svc", healthy)).await.unwrap();
    registry.register(&up("svc", sick)).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let options = EjectionOptions::builder()
        .consecutive_failures(3)
        .base(Duration::from_secs(2))
        .max(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut balanced = balance(
        fast_watch()
            .registry(registry)
            .service("svc")
            .build()
            .unwrap(),
        move |instance: &Instance| {
            Ejecting::new(
                HttpEndpoint::new(client.clone(), instance),
                instance,
                options,
            )
        },
        BalanceOptions::default(),
    );
    let mut call = async || -> Option<(u16, String)> {
        let request = http::Request::get("/whoami").body(Empty::new()).unwrap();
        match balanced.ready().await.unwrap().call(request).await {
            Ok(response) => {
                let code = response.status().as_u16();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                Some((code, String::from_utf8(body.to_vec()).unwrap()))
            }
            Err(error) if error.is::<NoEndpoints>() => None,
            Err(error) => panic!("unexpected error: {error}"),
        }
    };
    // Until the sick instance has failed 3 times in a row it gets some traffic; then it is ejected.
    let mut sick_hits = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sick_hits < 3 {
        assert!(
            Instant::now() < deadline,
            "the sick instance never got traffic"
        );
        if let Some((503, _)) = call().await {
            sick_hits += 1;
        }
    }
    // Ejected: the next 50 requests (well within the 2 s backoff, even on a busy machine) go to the healthy instance.
    let ejected_at = Instant::now();
    for _ in 0..50 {
        let (code, body) = call().await.unwrap();
        assert_eq!(
            (code, body),
            (200, healthy.to_string()),
            "traffic reached the ejected instance"
        );
    }
    assert!(
        ejected_at.elapsed() < Duration::from_secs(2),
        "the check took longer than the backoff"
    );
    // It recovers; after the backoff a probe succeeds and it gets traffic again.
    status.store(200, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "the instance was never re-admitted"
        );
        if let Some((200, body)) = call().await
            && body == sick.to_string()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
