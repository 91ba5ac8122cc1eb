//! A caching reverse proxy: every request goes to one upstream, and `tower-redis-cache` answers what it may as an
//! RFC 9111 shared cache, with Redis as the shared tier when one is given.
//!
//! ```text
//! cargo run --release -p caching-proxy -- \
//!     --listen 127.0.0.1:8080 --upstream http://127.0.0.1:3000 [--redis-url redis://127.0.0.1:6379]
//! curl -i localhost:8080/some/path                # then look at Cache-Status and Age
//! ```
//!
//! Standards mode: only responses that say how long they are fresh are stored, and nothing else is assumed
//! (`--heuristic-max-secs N` turns on heuristic freshness from `Last-Modified`, capped at N seconds).
//! `CDN-Cache-Control` (RFC 9213), or the fields named with `--cache-control-field`, replaces `Cache-Control` for
//! this proxy and is removed from what it passes on. Every
//! method is forwarded (extension methods too) with every end-to-end header; hop-by-hop headers are dropped in both
//! directions. An unreachable upstream (refused, reset, closed before answering) gives the stored response, stale
//! by at most `--stale-if-unreachable-secs` (10 minutes by default) or as `stale-if-error` allows, or else
//! `502 Bad Gateway`; a stored response with `must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache` gives
//! `504 Gateway Timeout` instead of being served stale. Without `--redis-url`, or with a Redis that does not answer at start-up, it runs on the memory tier
//! alone (single-instance mode) and says so.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleError;
use axum::extract::{ConnectInfo, Request};
use tower_layer::Layer;
use tower_redis_cache::{CacheLayer, HttpCache};

mod args;
mod forward;
mod server;

use args::{Args, USAGE};
use forward::{Forward, UpstreamError, bad_gateway, strip_hop_by_hop};

/// The pseudonym this proxy gives itself in `Via` and `Cache-Status`.
const NAME: &str = "caching-proxy";

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("caching-proxy: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut builder = HttpCache::builder()
        .name(NAME)
        .prefix(args.prefix.clone())
        .memory_capacity(args.memory_bytes);
    let mut shared = false;
    match args.redis {
        Some((url, client)) => match connect_redis(&client).await {
            Some(connection) => {
                tracing::info!(redis_url = %url, prefix = %args.prefix, "connected to Redis: shared tier on");
                builder = builder.redis(connection).subscribe(client);
                shared = true;
            }
            None => tracing::warn!(
                redis_url = %url,
                "Redis is not reachable: running in single-instance mode on the memory tier alone \
                 (restart once Redis is up to share the cache)"
            ),
        },
        None => tracing::info!("no --redis-url: running on the memory tier alone"),
    }
    if let Some(fields) = args.targeted_fields {
        builder = builder.targeted_fields(fields);
    }
    builder = builder.strip_targeted_fields(!args.keep_targeted_fields);
    if args.memory_bytes == 0 && !shared {
        tracing::warn!("--memory-mb 0 and no Redis: nothing will be cached");
    }
    let cache = builder
        .build()
        .map_err(|error| format!("cannot build the cache: {error}"))?;

    let forward = Forward::new(args.upstream, args.connect_timeout);
    // Hop-by-hop headers go before the cache sees the request, so that it selects `Vary` variants by the headers
    // the upstream really gets: otherwise `Connection: accept-language` with `Accept-Language: fr` would store the
    // upstream's default-language answer as the French variant, for everyone.
    let mut layer = CacheLayer::new(cache.clone()).stale_if_unreachable(args.stale_if_unreachable);
    if let Some(cap) = args.heuristic_max {
        layer = layer.heuristic_freshness(cap);
    }
    if args.allow_purge {
        // Only from this machine: a purge from anywhere would let any client empty the cache.
        layer = layer.purge(|parts| {
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .is_some_and(|ConnectInfo(peer)| peer.ip().is_loopback())
        });
    }
    // The upstream's unreachability reaches the cache as an error, so a stored response can stand in; what no
    // stored response covers becomes a 502 here.
    let cached = HandleError::new(layer.layer(forward), |UpstreamError| async {
        bad_gateway()
    });
    let app = Router::new()
        .fallback_service(cached)
        .layer(axum::middleware::map_request(
            |mut request: Request| async move {
                strip_hop_by_hop(request.headers_mut());
                request
            },
        ));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|error| format!("cannot read the listening address: {error}"))?;
    tracing::info!(
        "listening on http://{local}, forwarding to {}",
        args.upstream_text
    );
    // With a header-read timeout and a connection cap, which `axum::serve` does not set.
    server::serve(listener, app, shutdown())
        .await
        .map_err(|error| format!("server error: {error}"))?;
    tracing::info!(stats = ?cache.stats(), "stopped");
    Ok(())
}

/// Resolves on Ctrl-C (or SIGTERM on Unix); in-flight requests then finish before the process exits.
async fn shutdown() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing the requests in flight");
}

/// Connects to Redis with short deadlines so start-up never hangs on a missing server; `None` when Redis does not
/// answer.
async fn connect_redis(client: &redis::Client) -> Option<redis::aio::ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    match tokio::time::timeout(
        Duration::from_secs(2),
        client.get_connection_manager_with_config(config),
    )
    .await
    {
        Ok(Ok(connection)) => Some(connection),
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot connect to Redis");
            None
        }
        Err(_) => {
            tracing::warn!("Redis did not answer within 2 s");
            None
        }
    }
}
