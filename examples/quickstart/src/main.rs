//! The four crates on one axum router: a response cache on the reads, a rate limit per client address, a breaker
//! with a fallback around the route that calls another service, and discovery (each instance registers itself, and
//! `/greeting` reaches an instance it discovered, through the balancer).
//!
//! ```text
//! cargo run -p quickstart                                     # no Redis: memory backends, one instance
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p quickstart    # shared through Redis; PORT=3001 for a second one
//! curl -i localhost:3000/items/1      # twice: `cache-status: ...; hit` the second time
//! curl -i localhost:3000/greeting     # a discovered instance's /hello, behind the breaker
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Request, Response, StatusCode};
use axum::routing::get;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis::aio::{ConnectionLike, ConnectionManager};
use tower_breaker::{BreakerLayer, CircuitBreaker, FallbackRequest};
use tower_redis_cache::{CacheLayer, HttpCache};
use tower_redis_discovery::{
    BalanceOptions, Balanced, Discovery, HttpEndpoint, Instance, MemoryRegistry, RedisRegistry,
    Registration, Registry, balance,
};
use tower_redis_ratelimit::key::ClientIp;
use tower_redis_ratelimit::{Policy, RateLimitLayer, RateLimiter};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Greeter = Balanced<Request<Empty<axum::body::Bytes>>, Response<hyper::body::Incoming>>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let port: u16 = std::env::var("PORT")
        .map_or(Ok(3000), |port| port.parse())
        .map_err(|e| format!("PORT must be a port number: {e}"))?;
    let policy = Policy::per_minute("per-client", 60)?;
    match redis().await {
        Some(redis) => {
            println!("REDIS_URL reachable: cache, limits and registry are shared through Redis");
            let limiter = RateLimiter::builder().redis(redis.clone()).prefix("quickstart:rl:");
            let cache = HttpCache::builder().redis(redis.clone()).prefix("quickstart:cache:");
            let registry = RedisRegistry::builder()
                .redis(redis)
                .prefix("quickstart:discovery:")
                .ttl(Duration::from_secs(15))
                .build()?;
            serve(port, limiter.policy(policy).build()?, cache.build()?, registry).await
        }
        None => {
            println!("no REDIS_URL (or unreachable): memory backends, this instance alone");
            let limiter = RateLimiter::builder().policy(policy).build()?;
            let registry = MemoryRegistry::new(Duration::from_secs(15));
            serve(port, limiter, HttpCache::builder().build()?, registry).await
        }
    }
}

/// A connection to `REDIS_URL`, if it is set and answers within two seconds.
async fn redis() -> Option<ConnectionManager> {
    let client = redis::Client::open(std::env::var("REDIS_URL").ok()?).ok()?;
    tokio::time::timeout(Duration::from_secs(2), client.get_connection_manager()).await.ok()?.ok()
}

async fn serve<C, R>(
    port: u16,
    limiter: RateLimiter<C>,
    cache: HttpCache,
    registry: R,
) -> Result<(), Error>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
    R: Registry,
{
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let address = listener.local_addr()?;
    // This instance, in the registry; `/greeting` balances over every instance registered as "quickstart".
    let registration = Registration::start(
        registry.clone(),
        Instance::new("quickstart", "127.0.0.1", address.port()),
    )?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let discovery = Discovery::builder().registry(registry).service("quickstart").build()?;
    let watch = discovery.handle();
    let greeter: Greeter = balance(
        discovery,
        move |instance: &Instance| HttpEndpoint::new(client.clone(), instance),
        BalanceOptions::default(),
    );
    let breaker = CircuitBreaker::builder()
        .name("greeting")
        .consecutive_failures(3)
        .open_for(Duration::from_secs(5))
        .build()?;

    let app = Router::new()
        .route(
            "/items/{id}",
            get(|Path(id): Path<u32>| async move { format!("item {id}\n") })
                .layer(CacheLayer::new(cache).ttl(Duration::from_secs(30))),
        )
        .route("/hello", get(move || async move { format!("hello from {address}\n") }))
        .route(
            "/greeting",
            get(greeting).layer(BreakerLayer::new(breaker).fallback(|_: FallbackRequest<Body>| {
                let mut unavailable =
                    Response::new(Body::from("the greeter is unavailable; try later\n"));
                *unavailable.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                unavailable
            })),
        )
        .with_state(greeter)
        .layer(RateLimitLayer::new(limiter, ClientIp::trusted_hops(0)));

    registration.ready();
    // Serve once discovery sees this instance (at most 5 s), so that the first greetings find one.
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
    // Out of service for a second (balancers stop sending), then gone from the registry.
    registration.deregister(Some(Duration::from_secs(1))).await?;
    Ok(())
}

/// Calls `/hello` on an instance discovery found; a failure is a 502, which the breaker counts.
async fn greeting(State(greeter): State<Greeter>) -> Response<Body> {
    let request = Request::get("/hello").body(Empty::new());
    let answer = match request {
        Ok(request) => tower::ServiceExt::oneshot(greeter, request).await,
        Err(error) => Err(error.into()),
    };
    match answer {
        Ok(response) => response.map(Body::new),
        Err(error) => Response::builder()
            .status(502)
            .body(Body::from(format!("no greeter answered: {error}\n")))
            .unwrap_or_default(),
    }
}
