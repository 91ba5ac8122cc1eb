//! tower-breaker around an HTTP client: the breaker opens after three failures in a row, answers from a fallback
//! while open (no call reaches the upstream), probes again after two seconds, and closes when the probe succeeds.
//! With `REDIS_URL`, every process sharing the breaker's name opens when one of them does.
//!
//! The upstream is a small server in this process that fails on purpose for a while; the program prints each call.
//!
//! ```text
//! cargo run -p breaker-http-client
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p breaker-http-client
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::routing::get;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_breaker::{BreakerLayer, CircuitBreaker, FallbackRequest};
use tower_redis_core::sharing::RedisSharing;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let failing = Arc::new(AtomicBool::new(false));
    let upstream = upstream(failing.clone()).await?;

    let breaker = CircuitBreaker::builder()
        .name("prices")
        .consecutive_failures(3)
        .open_for(Duration::from_secs(2))
        .call_timeout(Duration::from_secs(1))
        .build()?;
    // Kept alive for as long as openings should be shared; dropping it stops the sharing.
    let _sharing = match std::env::var("REDIS_URL") {
        Ok(url) => {
            let client = redis::Client::open(url)?;
            let connection = client.get_connection_manager().await?;
            let sharing =
                RedisSharing::builder().breaker(&breaker).redis(connection).subscribe(client);
            Some(sharing.prefix("breaker-http-client:").build()?)
        }
        Err(_) => None,
    };

    // The client answers with axum's `Body`, so the fallback can build one.
    let client = Client::builder(TokioExecutor::new())
        .build_http::<Body>()
        .map_response(|response| response.map(Body::new));
    let mut prices = ServiceBuilder::new()
        .layer(BreakerLayer::new(breaker.clone()).fallback(|_: FallbackRequest<Body>| {
            Response::new(Body::from("yesterday's prices (the breaker is open)"))
        }))
        .service(client);

    for call in 1..=24 {
        // Calls 4 to 12 meet a failing upstream.
        failing.store((4..=12).contains(&call), Ordering::Relaxed);
        let request = Request::get(format!("http://{upstream}/prices")).body(Body::empty())?;
        let response = prices.ready().await?.call(request).await?;
        let status = response.status();
        let body = axum::body::to_bytes(Body::new(response.into_body()), 1 << 16).await?;
        println!(
            "call {call:>2}: {status} {:<45} breaker {:?}",
            String::from_utf8_lossy(&body),
            breaker.state()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("{:#?}", breaker.stats());
    Ok(())
}

/// A server on a free loopback port whose `/prices` answers 500 while `failing` is set.
async fn upstream(failing: Arc<AtomicBool>) -> Result<SocketAddr, Error> {
    let app = Router::new().route(
        "/prices",
        get(move || async move {
            if failing.load(Ordering::Relaxed) {
                (StatusCode::INTERNAL_SERVER_ERROR, "upstream failure")
            } else {
                (StatusCode::OK, "today's prices")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(address)
}
