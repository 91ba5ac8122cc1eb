//! The order service: orders in memory; creating one checks its user with the user service, found through
//! discovery and called through a balanced, guarded [`Downstream`].
//!
//! | route | answer |
//! |---|---|
//! | `POST /orders` `{"user_id", "item", "quantity"?}` | `201` and the order; `422` if the user does not exist; `503` if the user service is unavailable |
//! | `GET /orders/{id}` | `200` and the order, or `404` |
//! | `PATCH /orders/{id}` `{"status"}` | `200` and the updated order (`created`, `paid`, `shipped`, `cancelled`) |
//! | `GET /health` | `{"status": "ok", "service", "instance", "requests", "mode", "downstream"}` (the user service's breaker and discovery) |

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;
use tower_redis_discovery::Registry;

use crate::downstream::Downstream;
use crate::env::Env;
use crate::ids::Ids;
use crate::json;
use crate::lifecycle::{InstanceInfo, ServeError, Stop, serve};
use crate::peers;

/// The service's registered name.
pub const NAME: &str = "order-service";

/// The default port.
pub const PORT: u16 = 3002;

/// The statuses an order can have.
pub const STATUSES: [&str; 4] = ["created", "paid", "shipped", "cancelled"];

/// An order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The id.
    pub id: String,
    /// The user who placed it.
    pub user_id: String,
    /// What was ordered.
    pub item: String,
    /// How many.
    pub quantity: u32,
    /// One of [`STATUSES`].
    pub status: String,
}

#[derive(Debug, Deserialize)]
struct NewOrder {
    user_id: serde_json::Value,
    item: String,
    quantity: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct OrderUpdate {
    status: String,
}

struct Orders<R> {
    env: Env<R>,
    info: InstanceInfo,
    orders: RwLock<HashMap<String, Order>>,
    ids: Ids,
    users: Downstream,
}

/// Runs the order service on `port` until `stop`.
///
/// # Errors
///
/// [`ServeError`] when the port cannot be bound or the server fails.
pub async fn run<R: Registry>(env: Env<R>, port: u16, stop: Stop) -> Result<(), ServeError> {
    let ids = Ids::new("orders", env.redis.as_ref(), &env.config.redis.prefix);
    let users = Downstream::new(
        crate::users::NAME,
        env.discover(crate::users::NAME)?,
        env.client.clone(),
    )
    .map_err(|error| ServeError(format!("{NAME}: {error}")))?;
    let state_env = env.clone();
    serve(
        NAME,
        &env,
        port,
        move |info| {
            let state = Arc::new(Orders {
                env: state_env,
                info,
                orders: RwLock::new(HashMap::new()),
                ids,
                users,
            });
            Ok(router(state))
        },
        stop,
    )
    .await
}

fn router<R: Registry>(state: Arc<Orders<R>>) -> Router {
    Router::new()
        .route("/orders", axum::routing::post(create::<R>))
        .route("/orders/{id}", get(fetch::<R>).patch(update::<R>))
        .route("/health", get(health::<R>))
        .with_state(state)
}

async fn create<R: Registry>(State(state): State<Arc<Orders<R>>>, body: Bytes) -> Response {
    let new: NewOrder = match json::parse(&body) {
        Ok(new) => new,
        Err(problem) => return problem.into_response(),
    };
    let Some(user_id) = json::id_from(&new.user_id) else {
        return json::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "user_id must be a user's id (a string or a whole number)",
        );
    };
    let item = new.item.trim();
    if item.is_empty() || item.chars().count() > 200 {
        return json::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "item must have 1 to 200 characters",
        );
    }
    let quantity = new.quantity.unwrap_or(1);
    if !(1..=1000).contains(&quantity) {
        return json::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "quantity must be between 1 and 1000",
        );
    }

    // The user must exist: ask the user service, through discovery.
    let check = state
        .users
        .call(Method::GET, &format!("/users/{user_id}"), None)
        .await;
    match check.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => {
            return json::error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("user {user_id} does not exist"),
            );
        }
        status if status.is_server_error() => return check.into_response(),
        status => {
            return json::error(
                StatusCode::BAD_GATEWAY,
                format!("the user service answered {status}"),
            );
        }
    }

    let mut order = Order {
        id: state.ids.next().await,
        user_id,
        item: item.to_owned(),
        quantity,
        status: "created".to_owned(),
    };
    {
        let mut orders = state.orders.write().await;
        if orders.contains_key(&order.id) {
            // Never overwrite a record: the counter's floor makes this unreachable, a random id is the safe side.
            tracing::warn!(id = %order.id, "id already taken here; using a random one");
            order.id = crate::ids::fresh_random();
        }
        orders.insert(order.id.clone(), order.clone());
    }
    tracing::info!(id = %order.id, user = %order.user_id, "order created");
    json::reply(StatusCode::CREATED, &order)
}

async fn fetch<R: Registry>(
    State(state): State<Arc<Orders<R>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(order) = state.orders.read().await.get(&id) {
        return json::reply(StatusCode::OK, order);
    }
    elsewhere(&state, &headers, Method::GET, &id, Bytes::new()).await
}

async fn update<R: Registry>(
    State(state): State<Arc<Orders<R>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let change: OrderUpdate = match json::parse(&body) {
        Ok(change) => change,
        Err(problem) => return problem.into_response(),
    };
    let status = change.status.trim().to_ascii_lowercase();
    if !STATUSES.contains(&status.as_str()) {
        return json::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("status must be one of {}", STATUSES.join(", ")),
        );
    }
    {
        let mut orders = state.orders.write().await;
        if let Some(order) = orders.get_mut(&id) {
            order.status = status;
            tracing::info!(%id, status = %order.status, "order updated");
            return json::reply(StatusCode::OK, order);
        }
    }
    elsewhere(&state, &headers, Method::PATCH, &id, body).await
}

/// An order this instance does not have: another instance may (unless the request came from a peer).
async fn elsewhere<R: Registry>(
    state: &Orders<R>,
    headers: &HeaderMap,
    method: Method,
    id: &str,
    body: Bytes,
) -> Response {
    let absent = || json::error(StatusCode::NOT_FOUND, format!("no order has id {id}"));
    if peers::from_peer(headers) {
        return absent();
    }
    peers::ask(
        &state.env,
        NAME,
        &state.info.id,
        method,
        &format!("/orders/{id}"),
        body,
    )
    .await
    .into_response(absent)
}

async fn health<R: Registry>(State(state): State<Arc<Orders<R>>>) -> Response {
    let orders = state.orders.read().await.len();
    json::reply(
        StatusCode::OK,
        &serde_json::json!({
            "status": "ok",
            "service": NAME,
            "instance": &*state.info.id,
            "mode": state.env.mode().as_str(),
            "requests": state.info.requests(),
            "orders": orders,
            "downstream": {
                crate::users::NAME: {
                    "breaker": state.users.breaker().state(),
                    "discovery": state.users.discovery(),
                },
            },
        }),
    )
}
