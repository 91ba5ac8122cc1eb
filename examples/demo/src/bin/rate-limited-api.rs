//! A small JSON API behind `tower-redis-ratelimit`: a limit per API key with `free` and `pro` tiers, a stricter
//! policy on writes, the client address behind a proxy for callers without a key, the IETF `RateLimit` fields on
//! every answer, and a local-only limiter when Redis cannot be reached.
//!
//! ```text
//! cargo run --release -p demo --bin rate-limited-api
//! curl -i localhost:3010/items -H 'x-api-key: free_alice'    # ratelimit: "free-1m";r=29;t=50
//! curl -i localhost:3010/items -H 'x-api-key: pro_bob'       # ratelimit: "pro-1s";r=9;t=1, "pro-1m";r=299;t=50
//! curl -i -X POST localhost:3010/items -H 'x-api-key: pro_bob' -H 'content-type: application/json' -d '{"name":"tea"}'
//! ```
//!
//! | route | limits |
//! |---|---|
//! | `GET /items`, `GET /items/{id}` | the caller's tier |
//! | `POST /items`, `DELETE /items/{id}` | `RATE_LIMIT_WRITES` first (a denied write costs nothing of the tier), then the tier |
//! | `GET /health` | none |
//!
//! The tier comes from the API key (`x-api-key`): a key starting with `pro_` is `pro`, any other key is `free`
//! (a real service would look the key up), and a caller without a key is `anonymous`, counted by client address:
//! the peer address, or with `TRUSTED_PROXIES` the address the proxies in front saw. Every limit is shared by all
//! instances through Redis (`{REDIS_PREFIX}api:rl:`); when Redis fails mid-run each instance decides alone with a
//! local limiter, and when Redis cannot be reached at start-up the API runs on a local-only limiter and says so.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `PORT` | `3010` | the port (0: any free port) |
//! | `RATE_LIMIT_ANONYMOUS` | `10/1m` | callers without an API key, per client address |
//! | `RATE_LIMIT_FREE` | `30/1m` | per `free` key |
//! | `RATE_LIMIT_PRO` | `10/1s,300/1m` | per `pro` key (several rates: all apply) |
//! | `RATE_LIMIT_WRITES` | `5/1m` | writes per key (else per client address), whatever the tier (one rate) |
//! | `TRUSTED_PROXIES` | `0` | how to find the client address: a number of proxies in front (`1`), or their networks (`10.0.0.0/8,192.168.0.0/16`) |
//!
//! and the Redis variables every example reads (`REDIS_URL`, `REDIS_PREFIX`, ...; see `demo::config`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, Response, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use demo::config::{self, Config, ConfigError};
use demo::connection::{ConnectError, Redis, connect};
use demo::lifecycle::{Stop, stop_on_signals};
use demo::telemetry;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;
use tower_redis_ratelimit::key::{Cidr, ClientIp, Header, KeyExtractor, RequestParts};
use tower_redis_ratelimit::{
    Decision, FailurePolicy, HeaderStyle, LimiterStats, Policy, RateLimitLayer, RateLimiter,
    RateLimiterBuilder, Selection,
};

/// The name in logs and in the "listening" line.
const NAME: &str = "rate-limited-api";

/// The default port.
const PORT: u16 = 3010;

/// The header carrying the API key.
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Keys with this prefix are `pro`.
const PRO_PREFIX: &str = "pro_";

/// The tiers, by name; `anonymous` is the limiter's first, so the default one.
const ANONYMOUS: &str = "anonymous";
const FREE: &str = "free";
const PRO: &str = "pro";

/// Everything this binary reads from the environment besides the shared [`Config`].
#[derive(Debug)]
struct Limits {
    anonymous: Vec<Policy>,
    free: Vec<Policy>,
    pro: Vec<Policy>,
    writes: Policy,
    client_ip: ClientIp,
}

impl Limits {
    fn from_env() -> Result<Self, ConfigError> {
        let writes = config::policies_from_env("RATE_LIMIT_WRITES", "writes", "5/1m")?;
        let [writes] = <[Policy; 1]>::try_from(writes).map_err(|_| ConfigError {
            variable: "RATE_LIMIT_WRITES",
            message: "takes one rate, such as 5/1m".to_owned(),
        })?;
        Ok(Self {
            anonymous: config::policies_from_env("RATE_LIMIT_ANONYMOUS", ANONYMOUS, "10/1m")?,
            free: config::policies_from_env("RATE_LIMIT_FREE", FREE, "30/1m")?,
            pro: config::policies_from_env("RATE_LIMIT_PRO", PRO, "10/1s,300/1m")?,
            writes,
            client_ip: parse_trusted_proxies(config::var("TRUSTED_PROXIES")?.as_deref())?,
        })
    }
}

/// `TRUSTED_PROXIES`: a hop count, or a comma-separated list of networks.
fn parse_trusted_proxies(value: Option<&str>) -> Result<ClientIp, ConfigError> {
    let Some(value) = value else {
        return Ok(ClientIp::trusted_hops(0));
    };
    if let Ok(hops) = value.parse::<usize>() {
        return Ok(ClientIp::trusted_hops(hops));
    }
    let networks = value
        .split(',')
        .map(str::trim)
        .filter(|network| !network.is_empty())
        .map(|network| {
            network.parse::<Cidr>().map_err(|error| ConfigError {
                variable: "TRUSTED_PROXIES",
                message: format!(
                    "{network:?} is not a network ({error}); give a number of proxies (1) or networks \
                     (10.0.0.0/8,192.168.0.0/16)"
                ),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ClientIp::trusted_proxies(networks))
}

/// The two limiters on one connection (`Redis`) or none (`Offline`), with their common settings.
///
/// The deny cache is off, so every decision asks Redis and every 429 carries the `RateLimit` fields. With it on
/// (the crate's default) a key Redis denied is denied locally until its retry time, without a Redis call, but those
/// 429s carry `Retry-After` alone: turn it on when abusive clients cost more than the fields are worth.
fn limiters<C>(
    make: impl Fn() -> RateLimiterBuilder<C>,
    limits: &Limits,
) -> Result<(RateLimiter<C>, RateLimiter<C>), String>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let tiers = make()
        .name("api-tiers")
        .no_deny_cache()
        .tier(ANONYMOUS, limits.anonymous.clone())
        .tier(FREE, limits.free.clone())
        .tier(PRO, limits.pro.clone())
        .build()
        .map_err(|error| format!("tier limiter: {error}"))?;
    let writes = make()
        .name("api-writes")
        .no_deny_cache()
        .policy(limits.writes.clone())
        .build()
        .map_err(|error| format!("write limiter: {error}"))?;
    Ok((tiers, writes))
}

#[tokio::main]
async fn main() -> ExitCode {
    telemetry::init_tracing();
    let (config, limits) =
        match Config::from_env(PORT).and_then(|config| Ok((config, Limits::from_env()?))) {
            Ok(read) => read,
            Err(error) => {
                eprintln!("{NAME}: invalid configuration: {error}");
                return ExitCode::from(2);
            }
        };
    let stop = stop_on_signals();
    let served = match connect(&config.redis).await {
        Ok(redis) => {
            tracing::info!(
                redis = %config.redis.target.redacted(),
                prefix = %config.redis.prefix,
                "connected to Redis: every instance shares the limits"
            );
            shared(&config, &limits, &redis)
        }
        Err(ConnectError::Config(message)) => {
            eprintln!("{NAME}: invalid configuration: {message}");
            return ExitCode::from(2);
        }
        Err(ConnectError::Unreachable(message)) => {
            tracing::warn!("{message}");
            tracing::warn!(
                "SINGLE-INSTANCE MODE: {NAME} limits with a local-only limiter; each instance counts alone \
                 until it is restarted with Redis reachable"
            );
            local(&limits)
        }
    };
    let result = match served {
        Ok(app) => serve(&config, app, stop).await,
        Err(error) => Err(error),
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

/// The API on the shared Redis: a limiter whose Redis calls have the command timeout, and a local limiter per
/// instance while Redis is unavailable.
fn shared(config: &Config, limits: &Limits, redis: &Redis) -> Result<Router, String> {
    let prefix = format!("{}api:rl:", config.redis.prefix);
    let (tiers, writes) = limiters(
        || {
            RateLimiter::builder()
                .redis(redis.connection.clone())
                .prefix(prefix.clone())
                .redis_timeout(redis.command_timeout)
                .on_redis_failure(FailurePolicy::Local { share: 1 })
        },
        limits,
    )?;
    Ok(app(tiers, writes, limits, "redis"))
}

/// The API without Redis: both limiters count in this process.
fn local(limits: &Limits) -> Result<Router, String> {
    let (tiers, writes) = limiters(RateLimiter::builder, limits)?;
    Ok(app(tiers, writes, limits, "single-instance"))
}

/// The routes, with the tier limit on every API route and the write limit in front of the writes.
fn app<C>(
    tiers: RateLimiter<C>,
    writes: RateLimiter<C>,
    limits: &Limits,
    mode: &'static str,
) -> Router
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    // By API key, else by client address (behind the proxies `TRUSTED_PROXIES` describes).
    let key = Header::new(API_KEY).or(limits.client_ip.clone());
    let by_tier = RateLimitLayer::new(tiers.clone(), key.clone())
        .select(select_tier)
        .headers(HeaderStyle::default().on_allowed(true))
        .on_reject(too_many);
    let on_writes = RateLimitLayer::new(writes.clone(), key).on_reject(too_many);
    let state = Arc::new(Api {
        items: RwLock::new(BTreeMap::new()),
        next_id: AtomicU64::new(1),
        mode,
        stats: Box::new(move || Stats {
            tiers: tiers.stats(),
            writes: writes.stats(),
        }),
    });
    let reads = Router::new()
        .route("/items", get(list_items))
        .route("/items/{id}", get(get_item))
        .route_layer(by_tier.clone());
    // `route_layer` applies to matched routes only, so an unknown path is a 404 that costs nothing. The write
    // limit is outermost: a write it denies never reaches the tier's count.
    let writes = Router::new()
        .route("/items", post(create_item))
        .route("/items/{id}", delete(delete_item))
        .route_layer(by_tier)
        .route_layer(on_writes);
    reads
        .merge(writes)
        .route("/health", get(health))
        .with_state(state)
}

/// The tier of a request, from its API key.
fn select_tier(request: &RequestParts<'_>) -> Selection<'static> {
    let tier = match request
        .headers
        .get(&API_KEY)
        .and_then(|value| value.to_str().ok())
    {
        Some(key) if key.starts_with(PRO_PREFIX) => Some(PRO),
        Some(_) => Some(FREE),
        None => None,
    };
    Selection::new(tier, 1)
}

/// A denied request: `429` with a JSON body saying which policies are exhausted (the layer adds `Retry-After` and
/// the `RateLimit` fields).
fn too_many(decision: &Decision, _grpc: bool) -> Response<Body> {
    let exhausted: Vec<&str> = decision
        .policies
        .iter()
        .filter(|policy| policy.remaining == 0)
        .map(|policy| &*policy.name)
        .collect();
    let body = serde_json::json!({
        "error": "rate limit exceeded",
        "exhausted": exhausted,
        "retry_after_s": decision.retry_after.map(|after| after.as_secs_f64()),
        "decided_by": decision.source.as_str(),
    });
    (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response()
}

/// Serves `app` until `stop`, then lets the requests in flight finish.
async fn serve(config: &Config, app: Router, stop: Stop) -> Result<(), String> {
    let bind = SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|error| format!("cannot listen on {bind}: {error}"))?;
    let local = listener
        .local_addr()
        .map_err(|error| format!("cannot read the bound address: {error}"))?;
    println!("{NAME} listening on http://{local}");
    tracing::info!("{NAME} listening on http://{local}");
    // The peer address (`ConnectInfo`) is what anonymous callers are counted by.
    // With a header-read timeout and a connection cap, which `axum::serve` does not set.
    demo::server::serve(listener, app, stop.wait())
        .await
        .map_err(|error| format!("server error: {error}"))?;
    tracing::info!("{NAME}: stopped");
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The API itself: items in memory.

struct Api {
    items: RwLock<BTreeMap<u64, Item>>,
    next_id: AtomicU64,
    mode: &'static str,
    stats: Box<dyn Fn() -> Stats + Send + Sync>,
}

#[derive(Serialize)]
struct Stats {
    tiers: LimiterStats,
    writes: LimiterStats,
}

#[derive(Debug, Clone, Serialize)]
struct Item {
    id: u64,
    name: String,
}

#[derive(Debug, Deserialize)]
struct NewItem {
    name: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn list_items(State(api): State<Arc<Api>>) -> Json<Vec<Item>> {
    Json(api.items.read().await.values().cloned().collect())
}

async fn get_item(
    State(api): State<Arc<Api>>,
    Path(id): Path<u64>,
) -> Result<Json<Item>, Response<Body>> {
    api.items
        .read()
        .await
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no item {id}")))
}

async fn create_item(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response<Body> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !is_json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the item as JSON (content-type: application/json)",
        );
    }
    let new: NewItem = match serde_json::from_slice(&body) {
        Ok(new) => new,
        Err(problem) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not {{\"name\": \"...\"}}: {problem}"),
            );
        }
    };
    let name = new.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name must have 1 to 100 characters",
        );
    }
    let item = Item {
        id: api.next_id.fetch_add(1, Ordering::Relaxed),
        name: name.to_owned(),
    };
    api.items.write().await.insert(item.id, item.clone());
    let location = format!("/items/{}", item.id);
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(item),
    )
        .into_response()
}

async fn delete_item(State(api): State<Arc<Api>>, Path(id): Path<u64>) -> Response<Body> {
    match api.items.write().await.remove(&id) {
        Some(_) => {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        None => error(StatusCode::NOT_FOUND, format!("no item {id}")),
    }
}

/// Not rate limited: load balancers poll it.
async fn health(State(api): State<Arc<Api>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "service": NAME,
        "mode": api.mode,
        "items": api.items.read().await.len(),
        "rate_limiter": (api.stats)(),
    }))
}
