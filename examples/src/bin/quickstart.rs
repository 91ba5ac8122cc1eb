//! The smallest runnable example: an axum server that reports whether the shared Redis is reachable.
//!
//! ```text
//! cargo run -p examples --bin quickstart        # then: curl localhost:3000/health/redis
//! ```
//!
//! Environment: `REDIS_URL` (default `redis://127.0.0.1:6379`), `PORT` (default 3000). With no Redis reachable it
//! starts anyway, in single-instance mode, and says so.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

#[derive(Clone)]
struct AppState {
    redis: Option<redis::aio::ConnectionManager>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let port: u16 = match std::env::var("PORT") {
        Ok(value) => value
            .parse()
            .map_err(|e| format!("PORT must be a port number, got {value:?}: {e}"))?,
        Err(_) => 3000,
    };
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let redis = connect(&redis_url).await;
    match &redis {
        Some(_) => tracing::info!(%redis_url, "connected to Redis"),
        None => tracing::warn!(
            %redis_url,
            "Redis is not reachable: running in single-instance mode on in-memory defaults"
        ),
    }

    let app = Router::new()
        .route("/", get(|| async { "hello from tower-redis quickstart\n" }))
        .route("/health/redis", get(redis_health))
        .with_state(AppState { redis });

    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// Connects with a short deadline so start-up never hangs on a missing Redis.
async fn connect(url: &str) -> Option<redis::aio::ConnectionManager> {
    let client = match redis::Client::open(url) {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!("REDIS_URL is not a valid Redis URL ({e})");
            return None;
        }
    };
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1);
    tokio::time::timeout(
        Duration::from_secs(2),
        client.get_connection_manager_with_config(config),
    )
    .await
    .ok()?
    .ok()
}

/// What `/health/redis` answers.
#[derive(serde::Serialize)]
struct Health {
    status: &'static str,
    latency_ms: Option<f64>,
}

async fn redis_health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let Some(mut con) = state.redis else {
        return (
            StatusCode::OK,
            Json(Health {
                status: "single-instance",
                latency_ms: None,
            }),
        );
    };
    let started = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_millis(500),
        redis::cmd("PING").query_async::<String>(&mut con),
    )
    .await;
    let latency_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
    match reply {
        Ok(Ok(_)) => (
            StatusCode::OK,
            Json(Health {
                status: "up",
                latency_ms,
            }),
        ),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "down",
                latency_ms,
            }),
        ),
    }
}
