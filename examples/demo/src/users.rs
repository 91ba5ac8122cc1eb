//! The user service: users in memory, ids from a counter shared through Redis.
//!
//! | route | answer |
//! |---|---|
//! | `POST /users` `{"name", "email"}` | `201` and the user |
//! | `GET /users/{id}` | `200` and the user, or `404` |
//! | `PUT /users/{id}` `{"name"?, "email"?}` | `200` and the updated user, or `404` |
//! | `GET /health` | `{"status": "ok", "service", "instance", "requests", "mode"}` |

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

use crate::env::Env;
use crate::ids::Ids;
use crate::json::{self, Problem};
use crate::lifecycle::{InstanceInfo, ServeError, Stop, serve};
use crate::peers;

/// The service's registered name.
pub const NAME: &str = "user-service";

/// The default port.
pub const PORT: u16 = 3001;

/// A user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The id.
    pub id: String,
    /// The name.
    pub name: String,
    /// The e-mail address.
    pub email: String,
}

#[derive(Debug, Deserialize)]
struct NewUser {
    name: String,
    email: String,
}

#[derive(Debug, Deserialize)]
struct UserUpdate {
    name: Option<String>,
    email: Option<String>,
}

struct Users<R> {
    env: Env<R>,
    info: InstanceInfo,
    users: RwLock<HashMap<String, User>>,
    ids: Ids,
}

/// Runs the user service on `port` until `stop`.
///
/// # Errors
///
/// [`ServeError`] when the port cannot be bound or the server fails.
pub async fn run<R: Registry>(env: Env<R>, port: u16, stop: Stop) -> Result<(), ServeError> {
    let ids = Ids::new("users", env.redis.as_ref(), &env.config.redis.prefix);
    let state_env = env.clone();
    serve(
        NAME,
        &env,
        port,
        move |info| {
            let state = Arc::new(Users {
                env: state_env,
                info,
                users: RwLock::new(HashMap::new()),
                ids,
            });
            Ok(router(state))
        },
        stop,
    )
    .await
}

fn router<R: Registry>(state: Arc<Users<R>>) -> Router {
    Router::new()
        .route("/users", axum::routing::post(create::<R>))
        .route("/users/{id}", get(fetch::<R>).put(update::<R>))
        .route("/health", get(health::<R>))
        .with_state(state)
}

fn check_name(name: &str) -> Result<String, Problem> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Problem::invalid("name must have 1 to 100 characters"));
    }
    Ok(name.to_owned())
}

fn check_email(email: &str) -> Result<String, Problem> {
    let email = email.trim();
    let valid = email
        .split_once('@')
        .is_some_and(|(user, domain)| !user.is_empty() && domain.contains('.'))
        && email.len() <= 254
        && !email.contains(char::is_whitespace);
    if !valid {
        return Err(Problem::invalid(
            "email must be an address such as ada@example.com",
        ));
    }
    Ok(email.to_owned())
}

async fn create<R: Registry>(State(state): State<Arc<Users<R>>>, body: Bytes) -> Response {
    let new: NewUser = match json::parse(&body) {
        Ok(new) => new,
        Err(problem) => return problem.into_response(),
    };
    let (name, email) = match (check_name(&new.name), check_email(&new.email)) {
        (Ok(name), Ok(email)) => (name, email),
        (Err(problem), _) | (_, Err(problem)) => return problem.into_response(),
    };
    let mut user = User {
        id: state.ids.next().await,
        name,
        email,
    };
    {
        let mut users = state.users.write().await;
        if users.contains_key(&user.id) {
            // Never overwrite a record: the counter's floor makes this unreachable, a random id is the safe side.
            tracing::warn!(id = %user.id, "id already taken here; using a random one");
            user.id = crate::ids::fresh_random();
        }
        users.insert(user.id.clone(), user.clone());
    }
    tracing::info!(id = %user.id, "user created");
    json::reply(StatusCode::CREATED, &user)
}

async fn fetch<R: Registry>(
    State(state): State<Arc<Users<R>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(user) = state.users.read().await.get(&id) {
        return json::reply(StatusCode::OK, user);
    }
    elsewhere(&state, &headers, Method::GET, &id, Bytes::new()).await
}

async fn update<R: Registry>(
    State(state): State<Arc<Users<R>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let change: UserUpdate = match json::parse(&body) {
        Ok(change) => change,
        Err(problem) => return problem.into_response(),
    };
    let name = match change.name.as_deref().map(check_name).transpose() {
        Ok(name) => name,
        Err(problem) => return problem.into_response(),
    };
    let email = match change.email.as_deref().map(check_email).transpose() {
        Ok(email) => email,
        Err(problem) => return problem.into_response(),
    };
    {
        let mut users = state.users.write().await;
        if let Some(user) = users.get_mut(&id) {
            if let Some(name) = name {
                user.name = name;
            }
            if let Some(email) = email {
                user.email = email;
            }
            tracing::info!(%id, "user updated");
            return json::reply(StatusCode::OK, user);
        }
    }
    elsewhere(&state, &headers, Method::PUT, &id, body).await
}

/// A user this instance does not have: another instance may (unless the request came from a peer).
async fn elsewhere<R: Registry>(
    state: &Users<R>,
    headers: &HeaderMap,
    method: Method,
    id: &str,
    body: Bytes,
) -> Response {
    let absent = || json::error(StatusCode::NOT_FOUND, format!("no user has id {id}"));
    if peers::from_peer(headers) {
        return absent();
    }
    peers::ask(
        &state.env,
        NAME,
        &state.info.id,
        method,
        &format!("/users/{id}"),
        body,
    )
    .await
    .into_response(absent)
}

async fn health<R: Registry>(State(state): State<Arc<Users<R>>>) -> Response {
    let users = state.users.read().await.len();
    json::reply(
        StatusCode::OK,
        &serde_json::json!({
            "status": "ok",
            "service": NAME,
            "instance": &*state.info.id,
            "mode": state.env.mode().as_str(),
            "requests": state.info.requests(),
            "users": users,
        }),
    )
}
