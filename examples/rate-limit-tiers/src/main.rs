//! tower-redis-ratelimit on axum: a caller with an API key (`x-api-key`) is limited per key by its tier (`pro_…`
//! keys get more), a caller without one per client address; every answer carries the IETF `RateLimit` fields, and
//! a denied one is a `429` with `Retry-After`. With Redis the limits hold across every instance; without, or while
//! Redis fails, each instance counts alone.
//!
//! ```text
//! cargo run -p rate-limit-tiers                                    # no Redis: a local limiter
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p rate-limit-tiers   # shared limits (PORT=3201 for another)
//! curl -i localhost:3200/items                          # anonymous: 5 a minute per address
//! curl -i localhost:3200/items -H 'x-api-key: free_ada' # free: 20 a minute
//! curl -i localhost:3200/items -H 'x-api-key: pro_bob'  # pro: 10 a second and 600 a minute
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use redis::aio::ConnectionLike;
use tower_redis_ratelimit::key::{ClientIp, Header, KeyExtractor, RequestParts};
use tower_redis_ratelimit::{
    FailurePolicy, HeaderStyle, Policy, RateLimitLayer, RateLimiter, RateLimiterBuilder, Selection,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let port: u16 = std::env::var("PORT")
        .map_or(Ok(3200), |port| port.parse())
        .map_err(|e| format!("PORT must be a port number: {e}"))?;
    let redis = match std::env::var("REDIS_URL") {
        Ok(url) => {
            let client = redis::Client::open(url)?;
            tokio::time::timeout(Duration::from_secs(2), client.get_connection_manager())
                .await
                .ok()
                .and_then(Result::ok)
        }
        Err(_) => None,
    };
    match redis {
        Some(connection) => {
            println!("limits shared through Redis; each instance counts alone while Redis fails");
            let builder = RateLimiter::builder()
                .redis(connection)
                .prefix("rate-limit-tiers:")
                // Three instances: while Redis fails, each allows a third of every limit on its own.
                .on_redis_failure(FailurePolicy::Local { share: 3 });
            serve(port, tiers(builder)?).await
        }
        None => {
            println!("no Redis: this instance counts alone");
            serve(port, tiers(RateLimiter::builder())?).await
        }
    }
}

/// The tiers; the first is the default, for callers without a key.
fn tiers<C>(builder: RateLimiterBuilder<C>) -> Result<RateLimiter<C>, Error>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    Ok(builder
        .tier("anonymous", [Policy::per_minute("anonymous-1m", 5)?])
        .tier("free", [Policy::per_minute("free-1m", 20)?])
        .tier("pro", [Policy::per_second("pro-1s", 10)?, Policy::per_minute("pro-1m", 600)?])
        .build()?)
}

/// The tier of a request, from its API key (a real service would look the key up).
fn tier(request: &RequestParts<'_>) -> Selection<'static> {
    let key = request.headers.get("x-api-key").and_then(|value| value.to_str().ok());
    match key {
        Some(key) if key.starts_with("pro_") => Selection::new(Some("pro"), 1),
        Some(_) => Selection::new(Some("free"), 1),
        None => Selection::new(None, 1),
    }
}

async fn serve<C>(port: u16, limiter: RateLimiter<C>) -> Result<(), Error>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    // Counted per key when there is one, else per client address (the peer: no proxy in front here; behind one,
    // `ClientIp::trusted_hops(1)` reads the address it saw).
    let key = Header::try_new("x-api-key")?.or(ClientIp::trusted_hops(0));
    let limited = RateLimitLayer::new(limiter, key)
        .select(tier)
        .headers(HeaderStyle::default().on_allowed(true));
    let app = Router::new()
        .route("/items", get(|| async { "tea, coffee\n" }))
        .route_layer(limited)
        // Not limited: `route_layer` covers the routes above it only.
        .route("/health", get(|| async { "ok\n" }));

    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
