//! A tonic gRPC server behind `tower-redis-ratelimit`, registered in the service registry so that `tonic-client`
//! finds it.
//!
//! ```text
//! cargo run --release -p demo --bin tonic-server                 # :50051
//! PORT=50052 cargo run --release -p demo --bin tonic-server      # a second instance
//! cargo run --release -p demo --bin tonic-client -- --count 20   # calls both, through discovery
//! ```
//!
//! It serves `echo.Echo` (`Say`, `Stream`; the hand-written service from the `grpc-echo` package) with one
//! [`RateLimitLayer`] for the whole server: `RATE_LIMIT_CALLS` (default `50/1s`, several rates allowed:
//! `50/1s,1000/1m`) per API key (`x-api-key` metadata), else per peer address, shared by every instance through
//! Redis. A denied call gets a trailers-only reply with `grpc-status: 8` (RESOURCE_EXHAUSTED) and `retry-after`
//! metadata (and `ratelimit` when Redis decided rather than the deny cache). Every reply names the instance in `x-served-by` metadata.
//!
//! The instance registers as `echo` in `{REDIS_PREFIX}discovery:` (status `STARTING`, `UP` once it listens, a
//! heartbeat every 5 s, a 15 s TTL); Ctrl-C or SIGTERM reports `OUT_OF_SERVICE` for a second, removes the entry and
//! lets the calls in flight finish. Without Redis it runs alone with a local limiter and says so: clients then need
//! its address (`tonic-client --server http://127.0.0.1:50051`). Configuration: `PORT` (default 50051), `HOST`,
//! `ADVERTISE_HOST` and the Redis variables every example reads (`demo::config`).

use std::net::SocketAddr;
use std::process::ExitCode;

use demo::config::{self, Config, ConfigError};
use demo::connection::{ConnectError, connect};
use demo::echo::{API_KEY, PORT, SERVED_BY, SERVICE};
use demo::env::{Env, REGISTRY_TTL};
use demo::lifecycle::{Stop, stop_on_signals};
use demo::telemetry;
use grpc_echo::EchoServer;
use http::{HeaderName, HeaderValue};
use redis::aio::ConnectionLike;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tower::ServiceBuilder;
use tower_redis_discovery::{Instance, MemoryRegistry, Registration, Registry};
use tower_redis_ratelimit::key::{Header, KeyExtractor, PeerIp};
use tower_redis_ratelimit::{
    FailurePolicy, Policy, RateLimitLayer, RateLimiter, RateLimiterBuilder,
};

/// The name in logs and in the "listening" line.
const NAME: &str = "tonic-server";

fn main_config() -> Result<(Config, Vec<Policy>), ConfigError> {
    let config = Config::from_env(PORT)?;
    let calls = config::policies_from_env("RATE_LIMIT_CALLS", "calls", "50/1s")?;
    Ok((config, calls))
}

#[tokio::main]
async fn main() -> ExitCode {
    telemetry::init_tracing();
    let (config, calls) = match main_config() {
        Ok(read) => read,
        Err(error) => {
            eprintln!("{NAME}: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    let stop = stop_on_signals();
    let result = match connect(&config.redis).await {
        Ok(redis) => {
            tracing::info!(
                redis = %config.redis.target.redacted(),
                prefix = %config.redis.prefix,
                "connected to Redis: registered for clients to find, limits shared by every instance"
            );
            let prefix = format!("{}echo:rl:", config.redis.prefix);
            let limiter = limiter(
                RateLimiter::builder()
                    .redis(redis.connection.clone())
                    .prefix(prefix)
                    .redis_timeout(redis.command_timeout)
                    .on_redis_failure(FailurePolicy::Local { share: 1 }),
                &calls,
            );
            match limiter {
                Ok(limiter) => match Env::shared(config, redis, None) {
                    Ok(env) => serve(env, limiter, stop).await,
                    Err(error) => Err(error.0),
                },
                Err(error) => Err(error),
            }
        }
        Err(ConnectError::Config(message)) => {
            eprintln!("{NAME}: invalid configuration: {message}");
            return ExitCode::from(2);
        }
        Err(ConnectError::Unreachable(message)) => {
            tracing::warn!("{message}");
            tracing::warn!(
                "SINGLE-INSTANCE MODE: {NAME} limits calls locally and is registered in this process only; give \
                 clients its address (tonic-client --server http://<address>)"
            );
            match limiter(RateLimiter::builder(), &calls) {
                Ok(limiter) => {
                    let env = Env::single(config, MemoryRegistry::new(REGISTRY_TTL), None);
                    serve(env, limiter, stop).await
                }
                Err(error) => Err(error),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("{NAME}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The call limit.
fn limiter<C>(builder: RateLimiterBuilder<C>, calls: &[Policy]) -> Result<RateLimiter<C>, String>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    calls
        .iter()
        .fold(builder.name("echo-calls"), |builder, policy| {
            builder.policy(policy.clone())
        })
        .build()
        .map_err(|error| format!("rate limiter: {error}"))
}

/// Binds, registers, serves until `stop`, then leaves the registry and finishes the calls in flight.
async fn serve<R, C>(env: Env<R>, limiter: RateLimiter<C>, stop: Stop) -> Result<(), String>
where
    R: Registry,
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let bind = SocketAddr::new(env.config.host, env.config.port);
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|error| format!("cannot listen on {bind}: {error}"))?;
    let local = listener
        .local_addr()
        .map_err(|error| format!("cannot read the bound address: {error}"))?;

    let mut instance = Instance::new(SERVICE, env.config.advertise_host.clone(), local.port());
    for (key, value) in [
        ("version", env!("CARGO_PKG_VERSION").into()),
        ("pid", std::process::id().into()),
        ("mode", env.mode().as_str().into()),
        ("protocol", "grpc".into()),
    ] {
        instance.metadata.insert(key.to_owned(), value);
    }
    let served_by = HeaderValue::from_str(&instance.id)
        .map_err(|error| format!("the instance id is not a header value: {error}"))?;
    let id = instance.id.clone();

    // Outermost: name the instance on every reply, rejections included. Then the rate limit, which answers a
    // denied call itself (a trailers-only RESOURCE_EXHAUSTED) without reaching the service.
    let layers = ServiceBuilder::new()
        .map_response(move |mut response: http::Response<tonic::body::Body>| {
            response
                .headers_mut()
                .insert(HeaderName::from_static(SERVED_BY), served_by.clone());
            response
        })
        .layer(RateLimitLayer::new(
            limiter,
            Header::new(HeaderName::from_static(API_KEY)).or(PeerIp::new()),
        ));
    let echo = EchoServer::new();

    let registration =
        Registration::start(env.registry.clone(), instance).map_err(|error| error.to_string())?;
    // The socket is bound, so connections queue from now on: the instance can take calls.
    registration.ready();
    println!("{NAME} listening on http://{local}");
    tracing::info!(%id, mode = env.mode().as_str(), "{NAME} listening on http://{local}");

    let drain = env.drain;
    let shutdown = async move {
        stop.wait().await;
        tracing::info!(
            drain_ms = drain.as_millis(),
            "{NAME}: out of service; draining, then leaving the registry"
        );
        match registration.deregister(Some(drain)).await {
            Ok(()) => tracing::info!("{NAME}: deregistered"),
            Err(error) => {
                tracing::warn!(%error, "{NAME}: could not remove the registration; it expires on its own");
            }
        }
    };
    Server::builder()
        .layer(layers)
        .add_service(echo.clone())
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|error| format!("server error: {error}"))?;
    tracing::info!(calls = echo.calls(), "{NAME}: stopped");
    Ok(())
}
