//! A tonic gRPC server behind tower-redis-ratelimit: each API key (metadata `x-api-key`), or each client address
//! without one, gets 5 calls per 10 seconds; past that a call fails with `RESOURCE_EXHAUSTED` and carries
//! `retry-after` and `ratelimit` metadata. The service is gRPC's standard health service (`tonic-health`), so no
//! `.proto` is needed. At start the program calls itself eight times to show the limit, then serves until Ctrl-C.
//!
//! ```text
//! cargo run -p tonic-rate-limited-server                                    # local limiter
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p tonic-rate-limited-server   # limits shared by every instance
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use redis::aio::ConnectionLike;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::health_reporter;
use tower_redis_ratelimit::key::{ClientIp, Header, KeyExtractor};
use tower_redis_ratelimit::{Policy, RateLimitLayer, RateLimiter};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let port: u16 = std::env::var("PORT")
        .map_or(Ok(50051), |port| port.parse())
        .map_err(|e| format!("PORT must be a port number: {e}"))?;
    let policy = Policy::new("grpc-10s", 5, Duration::from_secs(10))?;
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
            println!("limits shared through Redis");
            let limiter = RateLimiter::builder().redis(connection).prefix("tonic-rl:");
            serve(port, limiter.policy(policy).build()?).await
        }
        None => {
            println!("no Redis: a local limiter");
            serve(port, RateLimiter::builder().policy(policy).build()?).await
        }
    }
}

async fn serve<C>(port: u16, limiter: RateLimiter<C>) -> Result<(), Error>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let (reporter, health) = health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    // By API key, else by the peer address tonic saw.
    let key = Header::try_new("x-api-key")?.or(ClientIp::trusted_hops(0));
    // Bound before the calls below, so the first one finds it listening.
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let address = listener.local_addr()?;
    let server = Server::builder()
        .layer(RateLimitLayer::new(limiter, key))
        .add_service(health)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        });
    let server = tokio::spawn(server);
    println!("serving grpc.health.v1.Health on {address}");

    let channel = Channel::from_shared(format!("http://{address}"))?.connect_lazy();
    let mut client = HealthClient::new(channel);
    for call in 1..=8 {
        let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
        request.metadata_mut().insert("x-api-key", "demo-key".parse()?);
        match client.check(request).await {
            Ok(reply) => println!("call {call}: {:?}", reply.into_inner().status()),
            Err(status) => println!(
                "call {call}: {:?} {:?}, retry-after {:?}",
                status.code(),
                status.message(),
                status.metadata().get("retry-after")
            ),
        }
    }
    server.await??;
    Ok(())
}
