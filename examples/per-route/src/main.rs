//! The four layers composed per route on one axum router, each route with the stack it needs:
//!
//! | route | stack, outermost first |
//! |---|---|
//! | `GET /catalog/{id}` | rate limit per client address (100/min), then the cache (60 s) |
//! | `POST /checkout` | rate limit per API key, else per address (5/min: a denied call costs nothing below), then a breaker with a fallback, around a call to `payments`, found through discovery |
//! | `POST /payments/charge` | none: the payments service itself, registered as `payments` (in a real system, another process) |
//!
//! ```text
//! cargo run -p per-route                                    # memory backends
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p per-route   # shared through Redis
//! curl -i localhost:3300/catalog/7                          # twice: a hit the second time
//! curl -i -X POST localhost:3300/checkout -H 'x-api-key: k1'
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{Request, Response, StatusCode};
use axum::routing::{get, post};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis::aio::{ConnectionLike, ConnectionManager};
use tower::{ServiceBuilder, ServiceExt};
use tower_breaker::{BreakerLayer, CircuitBreaker, FallbackRequest};
use tower_redis_cache::{CacheLayer, HttpCache};
use tower_redis_discovery::{
    BalanceOptions, Balanced, Discovery, HttpEndpoint, Instance, MemoryRegistry, RedisRegistry,
    Registration, Registry, balance,
};
use tower_redis_ratelimit::key::{ClientIp, Header, KeyExtractor};
use tower_redis_ratelimit::{Policy, RateLimitLayer, RateLimiter, RateLimiterBuilder};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Payments = Balanced<Request<Full<Bytes>>, Response<hyper::body::Incoming>>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let ttl = Duration::from_secs(15);
    match redis().await {
        Some(redis) => {
            println!("shared through Redis");
            let cache = HttpCache::builder().redis(redis.clone()).prefix("per-route:cache:");
            let registry =
                RedisRegistry::builder().redis(redis.clone()).prefix("per-route:discovery:");
            let limiters =
                move || RateLimiter::builder().redis(redis.clone()).prefix("per-route:rl:");
            serve(limiters, cache.build()?, registry.ttl(ttl).build()?).await
        }
        None => {
            println!("memory backends: one instance");
            serve(RateLimiter::builder, HttpCache::builder().build()?, MemoryRegistry::new(ttl))
                .await
        }
    }
}

/// A connection to `REDIS_URL`, if it is set and answers within two seconds.
async fn redis() -> Option<ConnectionManager> {
    let client = redis::Client::open(std::env::var("REDIS_URL").ok()?).ok()?;
    tokio::time::timeout(Duration::from_secs(2), client.get_connection_manager()).await.ok()?.ok()
}

async fn serve<C, R>(
    limiters: impl Fn() -> RateLimiterBuilder<C>,
    cache: HttpCache,
    registry: R,
) -> Result<(), Error>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
    R: Registry,
{
    let reads = limiters().name("reads").policy(Policy::per_minute("reads", 100)?).build()?;
    let writes = limiters().name("writes").policy(Policy::per_minute("checkout", 5)?).build()?;
    let breaker = CircuitBreaker::builder().name("payments").consecutive_failures(3).build()?;
    let port: u16 = std::env::var("PORT")
        .map_or(Ok(3300), |port| port.parse())
        .map_err(|e| format!("PORT must be a port number: {e}"))?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let address = listener.local_addr()?;
    let registration = Registration::start(
        registry.clone(),
        Instance::new("payments", "127.0.0.1", address.port()),
    )?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let discovery = Discovery::builder().registry(registry).service("payments").build()?;
    let watch = discovery.handle();
    let payments: Payments = balance(
        discovery,
        move |instance: &Instance| HttpEndpoint::new(client.clone(), instance),
        BalanceOptions::default(),
    );

    let app = Router::new()
        .route(
            "/catalog/{id}",
            // In a `ServiceBuilder`, the first layer is the outermost.
            get(|Path(id): Path<u32>| async move { format!("product {id}\n") }).layer(
                ServiceBuilder::new()
                    .layer(RateLimitLayer::new(reads, ClientIp::trusted_hops(0)))
                    .layer(CacheLayer::new(cache).ttl(Duration::from_secs(60))),
            ),
        )
        .route(
            "/checkout",
            post(checkout).layer(
                ServiceBuilder::new()
                    .layer(RateLimitLayer::new(
                        writes,
                        Header::try_new("x-api-key")?.or(ClientIp::trusted_hops(0)),
                    ))
                    .layer(BreakerLayer::new(breaker).fallback(|_: FallbackRequest<Body>| {
                        let mut busy =
                            Response::new(Body::from("payments are down; your cart is kept\n"));
                        *busy.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        busy
                    })),
            ),
        )
        .route("/payments/charge", post(|| async { "charged\n" }))
        .with_state(payments);

    registration.ready();
    // Serve once discovery sees `payments` (at most 5 s), so that the first checkouts find it.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while watch.stats().instances == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    println!("listening on http://{address}");
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    registration.deregister(Some(Duration::from_secs(1))).await?;
    Ok(())
}

/// Charges through a discovered `payments` instance; its failure is a 502, which the breaker counts.
async fn checkout(State(payments): State<Payments>) -> (StatusCode, &'static str) {
    let Ok(request) = Request::post("/payments/charge").body(Full::default()) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "could not build the request\n");
    };
    match payments.oneshot(request).await {
        Ok(response) if response.status().is_success() => (StatusCode::OK, "order placed\n"),
        _ => (StatusCode::BAD_GATEWAY, "payments did not answer\n"),
    }
}
