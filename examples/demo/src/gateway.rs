//! The gateway: the public API on :3003, composed from the four layers per route.
//!
//! | route | layers | what it does |
//! |---|---|---|
//! | `POST /users` | rate limit | creates a user (user service) |
//! | `GET /users/{id}` | cache | a user (user service) |
//! | `PUT /users/{id}` | rate limit | updates a user, then invalidates `/users/{id}` and every cached order of that user |
//! | `POST /orders` | rate limit | creates an order (order service, which checks the user with the user service) |
//! | `GET /orders/{id}` | cache | an order with its user (order service, then user service) |
//! | `PATCH /orders/{id}` | rate limit | changes an order's status, then invalidates `/orders/{id}` |
//! | `GET /events` | | every user and order created or changed, through any gateway, as Server-Sent Events |
//! | `GET /services` | | the registry: every service and its instances |
//! | `GET /health` | | the gateway, its downstream breakers and discovery (instances known, polls, hints), limiter and cache |
//! | `GET /health/redis` | | `PING` status and latency |
//! | `GET /metrics` | | Prometheus text |
//!
//! Every downstream call goes through a [`Downstream`]: discovery-based balancing, passive health, retries of
//! requests that were never sent, and a breaker whose fallback answers `503` with a JSON body.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, Response, StatusCode, header};
use axum::middleware::Next;
use axum::routing::{get, patch, post, put};
use bytes::Bytes;
use redis::aio::ConnectionLike;
use serde::Serialize;
use tower_redis_cache::{CacheLayer, HttpCache, InvalidateError};
use tower_redis_discovery::{
    Registry, RegistryError, ServiceEntry, ServiceListing, Status, list_services,
};
use tower_redis_ratelimit::key::{Header, KeyExtractor, PeerIp};
use tower_redis_ratelimit::{Decision, LimiterStats, RateLimitLayer, RateLimiter};

use crate::downstream::Downstream;
use crate::env::Env;
use crate::events::Events;
use crate::json;
use crate::lifecycle::{InstanceInfo, ServeError, Stop, serve};
use crate::orders::Order;
use crate::users::User;

/// The gateway's registered name.
pub const NAME: &str = "gateway";

/// The default port.
pub const PORT: u16 = 3003;

/// How long the gateway caches a user or an order (writes through the gateway invalidate at once).
pub const CACHE_TTL: Duration = Duration::from_secs(60);

/// The header that carries the API key the write limit is keyed by.
pub const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The header naming the downstream instance that answered.
const UPSTREAM: HeaderName = HeaderName::from_static("x-upstream-instance");

struct Gateway<R> {
    env: Env<R>,
    info: InstanceInfo,
    users: Downstream,
    orders: Downstream,
    cache: HttpCache,
    events: Events,
    limiter: Arc<dyn Fn() -> LimiterStats + Send + Sync>,
    local_limiter: bool,
}

/// The cache the gateway uses: Redis-backed and subscribed to invalidations in shared mode, memory-only otherwise.
///
/// # Errors
///
/// The cache's configuration error.
pub fn cache<R: Registry>(env: &Env<R>) -> Result<HttpCache, ServeError> {
    let mut builder = HttpCache::builder()
        .name(NAME)
        .prefix(format!("{}cache:", env.config.redis.prefix))
        .memory_capacity(32 * 1024 * 1024);
    if let Some(redis) = &env.redis {
        builder = builder
            .redis(redis.connection.clone())
            .subscribe(redis.subscriber.clone())
            .redis_timeout(redis.command_timeout);
        for replica in &redis.replicas {
            builder = builder.read_replica(replica.clone());
        }
    }
    builder
        .build()
        .map_err(|error| ServeError(format!("{NAME}: cache: {error}")))
}

/// Runs the gateway on `port` until `stop`, with `limiter` on writes and `cache` on reads.
///
/// # Errors
///
/// [`ServeError`] when the port cannot be bound or the server fails.
pub async fn run<R, C>(
    env: Env<R>,
    limiter: RateLimiter<C>,
    cache: HttpCache,
    port: u16,
    stop: Stop,
) -> Result<(), ServeError>
where
    R: Registry,
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let users = Downstream::new(
        crate::users::NAME,
        env.discover(crate::users::NAME)?,
        env.client.clone(),
    )
    .map_err(|error| ServeError(format!("{NAME}: {error}")))?;
    let orders = Downstream::new(
        crate::orders::NAME,
        env.discover(crate::orders::NAME)?,
        env.client.clone(),
    )
    .map_err(|error| ServeError(format!("{NAME}: {error}")))?;
    let state_env = env.clone();
    let events = Events::new(env.redis.as_ref(), &env.config.redis.prefix, stop.clone());
    serve(
        NAME,
        &env,
        port,
        move |info| {
            let stats_limiter = limiter.clone();
            let state = Arc::new(Gateway {
                env: state_env,
                info,
                users,
                orders,
                cache,
                events,
                limiter: Arc::new(move || stats_limiter.stats()),
                local_limiter: limiter.is_local_only(),
            });
            Ok(router(state, limiter))
        },
        stop,
    )
    .await
}

/// The write limit's rejection: `429` with a JSON body (the layer adds `Retry-After` and the `RateLimit` fields).
fn too_many(decision: &Decision, _grpc: bool) -> Response<Body> {
    let retry_after = decision.retry_after.map(|after| after.as_secs_f64());
    let body = serde_json::json!({
        "error": "rate limit exceeded",
        "retry_after_s": retry_after,
        "decided_by": decision.source.as_str(),
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn router<R, C>(state: Arc<Gateway<R>>, limiter: RateLimiter<C>) -> Router
where
    R: Registry,
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    // Writes: by API key, else by the client's address.
    let writes =
        RateLimitLayer::new(limiter, Header::new(API_KEY).or(PeerIp::new())).on_reject(too_many);
    // Reads: keyed by path and query (whatever Host the client used), served stale for a minute if the service
    // behind fails.
    let reads = CacheLayer::new(state.cache.clone())
        .key_fn(|parts| {
            parts
                .uri
                .path_and_query()
                .map(|path| path.as_str().to_owned())
        })
        .stale_if_error(Duration::from_secs(60));
    Router::new()
        .route("/users", post(create_user::<R>).layer(writes.clone()))
        .route("/users/{id}", get(get_user::<R>).layer(reads.clone()))
        .route("/users/{id}", put(update_user::<R>).layer(writes.clone()))
        .route("/orders", post(create_order::<R>).layer(writes.clone()))
        .route("/orders/{id}", get(get_order::<R>).layer(reads))
        .route("/orders/{id}", patch(update_order::<R>).layer(writes))
        .route("/events", get(events::<R>))
        .route("/services", get(services::<R>))
        .route("/health", get(health::<R>))
        .route("/health/redis", get(redis_health::<R>))
        .route("/metrics", get(prometheus::<R>))
        .with_state(state)
        .layer(axum::middleware::from_fn(count_request))
}

/// Counts requests by route and status (`demo_gateway_requests_total`).
async fn count_request(request: Request, next: Next) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().to_string();
    let response = next.run(request).await;
    metrics::counter!(
        "demo_gateway_requests_total",
        "method" => method,
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}

/// The downstream answer as the gateway's: status, body, content type and `Retry-After`, the answering instance in
/// `x-upstream-instance`, and a cache lifetime for successful reads.
fn relay(response: Response<Body>, cacheable: bool) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let mut relayed = Response::new(body);
    *relayed.status_mut() = parts.status;
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
        if let Some(value) = parts.headers.get(&name) {
            relayed.headers_mut().insert(name, value.clone());
        }
    }
    if let Some(value) = parts.headers.get("x-served-by") {
        relayed.headers_mut().insert(UPSTREAM, value.clone());
    }
    let cache_control = if cacheable && parts.status == StatusCode::OK {
        format!("max-age={}", CACHE_TTL.as_secs())
    } else {
        "no-store".to_owned()
    };
    if let Ok(value) = HeaderValue::from_str(&cache_control) {
        relayed.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    relayed
}

async fn create_user<R: Registry>(
    State(state): State<Arc<Gateway<R>>>,
    body: Bytes,
) -> Response<Body> {
    let response = state.users.call(Method::POST, "/users", Some(body)).await;
    relay(state.announce("user.created", response).await, false)
}

async fn get_user<R: Registry>(
    State(state): State<Arc<Gateway<R>>>,
    Path(id): Path<String>,
) -> Response<Body> {
    let mut reply = relay(
        state
            .users
            .call(Method::GET, &format!("/users/{id}"), None)
            .await,
        true,
    );
    // Tagged, so that a change of the user drops every cached variant (`/users/7?x=1` too), not only `/users/7`.
    if reply.status() == StatusCode::OK
        && let Ok(tag) = HeaderValue::from_str(&format!("user:{id}"))
    {
        reply.headers_mut().insert("surrogate-key", tag);
    }
    reply
}

async fn update_user<R: Registry>(
    State(state): State<Arc<Gateway<R>>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response<Body> {
    let response = state
        .users
        .call(Method::PUT, &format!("/users/{id}"), Some(body))
        .await;
    if response.status().is_success() {
        state.invalidate_user(&id).await;
    }
    relay(state.announce("user.updated", response).await, false)
}

async fn create_order<R: Registry>(
    State(state): State<Arc<Gateway<R>>>,
    body: Bytes,
) -> Response<Body> {
    let response = state.orders.call(Method::POST, "/orders", Some(body)).await;
    relay(state.announce("order.created", response).await, false)
}

async fn update_order<R: Registry>(
    State(state): State<Arc<Gateway<R>>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response<Body> {
    let response = state
        .orders
        .call(Method::PATCH, &format!("/orders/{id}"), Some(body))
        .await;
    if response.status().is_success() {
        // Every cached variant of the order (`/orders/7`, `/orders/7?x=1`) carries its tag.
        state
            .invalidate_tagged(&format!("order:{id}"), &format!("/orders/{id}"), None)
            .await;
    }
    relay(state.announce("order.updated", response).await, false)
}

/// The order with its user. If the user cannot be had, the order comes with `"user": null` and `user_error`,
/// and is not cached.
async fn get_order<R: Registry>(
    State(state): State<Arc<Gateway<R>>>,
    Path(id): Path<String>,
) -> Response<Body> {
    let response = state
        .orders
        .call(Method::GET, &format!("/orders/{id}"), None)
        .await;
    if response.status() != StatusCode::OK {
        return relay(response, false);
    }
    let upstream = response.headers().get("x-served-by").cloned();
    let order: Order = match axum::body::to_bytes(response.into_body(), 1024 * 1024)
        .await
        .map_err(|error| error.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|error| error.to_string()))
    {
        Ok(order) => order,
        Err(error) => {
            return json::error(
                StatusCode::BAD_GATEWAY,
                format!("the order service answered something that is not an order: {error}"),
            );
        }
    };
    let user = state
        .users
        .call(Method::GET, &format!("/users/{}", order.user_id), None)
        .await;
    let user_status = user.status();
    let user_body = axum::body::to_bytes(user.into_body(), 1024 * 1024)
        .await
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    let user: Option<User> = (user_status == StatusCode::OK)
        .then(|| {
            user_body
                .clone()
                .and_then(|body| serde_json::from_value(body).ok())
        })
        .flatten();
    let user_error = user.is_none().then(|| {
        user_body
            .as_ref()
            .and_then(|body| body.get("error"))
            .and_then(serde_json::Value::as_str)
            .map_or_else(
                || format!("the user service answered {user_status}"),
                str::to_owned,
            )
    });
    let complete = user.is_some();
    let tags = format!("user:{} order:{}", order.user_id, order.id);
    let mut reply = json::reply(
        StatusCode::OK,
        &OrderWithUser {
            order,
            user,
            user_error,
        },
    );
    let headers = reply.headers_mut();
    if let Some(upstream) = upstream {
        headers.insert(UPSTREAM, upstream);
    }
    if complete {
        if let Ok(value) = HeaderValue::from_str(&format!("max-age={}", CACHE_TTL.as_secs())) {
            headers.insert(header::CACHE_CONTROL, value);
        }
        // Tags, so that a change of the user invalidates this order too.
        if let Ok(tags) = HeaderValue::from_str(&tags) {
            headers.insert("surrogate-key", tags);
        }
    } else {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    reply
}

/// `GET /orders/{id}`: the order's fields, then its user (or `null` and why).
#[derive(Debug, Serialize)]
struct OrderWithUser {
    #[serde(flatten)]
    order: Order,
    user: Option<User>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_error: Option<String>,
}

/// `GET /events`: Server-Sent Events, resumed after `Last-Event-ID` when the client sends one.
async fn events<R: Registry>(
    State(state): State<Arc<Gateway<R>>>,
    headers: axum::http::HeaderMap,
) -> impl axum::response::IntoResponse {
    let last = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    state.events.sse(last)
}

impl<R: Registry> Gateway<R> {
    /// After a successful write: publishes `kind` with the record the service answered, and gives the answer back.
    /// An answer that is not JSON publishes nothing.
    async fn announce(&self, kind: &str, response: Response<Body>) -> Response<Body> {
        if !response.status().is_success() {
            return response;
        }
        let (parts, body) = response.into_parts();
        let bytes = match axum::body::to_bytes(body, 1024 * 1024).await {
            Ok(bytes) => bytes,
            Err(error) => {
                return json::error(
                    StatusCode::BAD_GATEWAY,
                    format!("the service's answer could not be read: {error}"),
                );
            }
        };
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(record) => self.events.publish(kind, &record).await,
            Err(error) => {
                tracing::warn!(%error, kind, "the service answered something that is not JSON: no event");
            }
        }
        Response::from_parts(parts, Body::from(bytes))
    }

    /// After a user changed: drop the cached user and every cached order that embeds it. Every cached answer about
    /// the user carries its tag (`get_user` and `get_order` tag every response they let be stored), so with Redis
    /// one tag invalidation does it; without Redis tags are not tracked, so the user's key and every cached order go.
    async fn invalidate_user(&self, id: &str) {
        self.invalidate_tagged(
            &format!("user:{id}"),
            &format!("/users/{id}"),
            Some("/orders/"),
        )
        .await;
    }

    /// Invalidates `tag` (through Redis, on every instance); without Redis, `key` and the keys under `prefix`.
    async fn invalidate_tagged(&self, tag: &str, key: &str, prefix: Option<&str>) {
        match self.cache.invalidate_tag(tag).await {
            Ok(_) => {}
            Err(InvalidateError::NoRedis) => {
                let _ = self.cache.invalidate(&[key.to_owned()]).await;
                if let Some(prefix) = prefix {
                    let _ = self.cache.invalidate_prefix(prefix).await;
                }
            }
            Err(error) => {
                // The memory tier dropped the tag's entries already, and the cache owes the tag to Redis: it reads
                // nothing from Redis until the tag's entries there are gone.
                tracing::warn!(%error, tag, "could not invalidate by tag in Redis; owed until Redis is back");
            }
        }
    }
}

async fn services<R: Registry>(State(state): State<Arc<Gateway<R>>>) -> Response<Body> {
    let on_cluster = state
        .env
        .redis
        .as_ref()
        .is_some_and(|redis| redis.connection.is_cluster());
    let listing = if on_cluster {
        // `Registry::services` SCANs one Cluster node only, so on a Cluster the demo lists its own services by name.
        known_services(&state.env.registry).await
    } else {
        list_services(&state.env.registry).await
    };
    match listing {
        Ok(listing) => json::reply(StatusCode::OK, &listing),
        Err(error) => json::error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the registry is unavailable: {error}"),
        ),
    }
}

/// The listing of the demo's three services, read service by service.
async fn known_services<R: Registry>(registry: &R) -> Result<ServiceListing, RegistryError> {
    let mut services = Vec::new();
    for name in [
        crate::gateway::NAME,
        crate::orders::NAME,
        crate::users::NAME,
    ] {
        let instances = registry.instances(name).await?;
        if instances.is_empty() {
            continue;
        }
        let up = instances
            .iter()
            .filter(|instance| instance.status == Status::Up)
            .count();
        services.push(ServiceEntry {
            name: name.to_owned(),
            up,
            instances,
        });
    }
    Ok(ServiceListing { services })
}

async fn health<R: Registry>(State(state): State<Arc<Gateway<R>>>) -> Response<Body> {
    json::reply(
        StatusCode::OK,
        &serde_json::json!({
            "status": "ok",
            "service": NAME,
            "instance": &*state.info.id,
            "mode": state.env.mode().as_str(),
            "requests": state.info.requests(),
            "downstream": {
                crate::users::NAME: {
                    "breaker": state.users.breaker().state(),
                    "discovery": state.users.discovery(),
                },
                crate::orders::NAME: {
                    "breaker": state.orders.breaker().state(),
                    "discovery": state.orders.discovery(),
                },
            },
            "rate_limiter": {
                "local_only": state.local_limiter,
                "stats": (state.limiter)(),
            },
            "cache": state.cache.stats(),
            "events": state.events.stats(),
        }),
    )
}

async fn redis_health<R: Registry>(State(state): State<Arc<Gateway<R>>>) -> Response<Body> {
    let Some(redis) = &state.env.redis else {
        return json::reply(
            StatusCode::OK,
            &serde_json::json!({
                "status": "single-instance",
                "latency_ms": null,
                "detail": "no Redis: running on in-memory backends",
            }),
        );
    };
    let started = Instant::now();
    match redis.ping().await {
        Ok(latency) => json::reply(
            StatusCode::OK,
            &serde_json::json!({
                "status": "up",
                "latency_ms": latency.as_secs_f64() * 1000.0,
            }),
        ),
        Err(error) => json::reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({
                "status": "down",
                "latency_ms": started.elapsed().as_secs_f64() * 1000.0,
                "error": error,
            }),
        ),
    }
}

async fn prometheus<R: Registry>(State(state): State<Arc<Gateway<R>>>) -> Response<Body> {
    let text = state
        .env
        .metrics
        .as_ref()
        .map(metrics_exporter_prometheus::PrometheusHandle::render)
        .unwrap_or_default();
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
