//! tower-redis-cache on an axum router: each route its own TTL, entries tagged by the handler (`Surrogate-Key`), and
//! a write that invalidates what it changed, in this instance's memory, in Redis and, through pub/sub, in every
//! other instance's memory.
//!
//! ```text
//! cargo run -p cache-router                                    # no Redis: the memory tier alone
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p cache-router   # Redis as the shared tier (PORT=3101 for another)
//! curl -i localhost:3100/users/1      # twice: `cache-status: ...; hit` the second time
//! curl -i -X PUT localhost:3100/users/1 -d 'Grace'
//! curl -i localhost:3100/users/1      # a miss: the write invalidated the tag `user-1`, so `Grace`
//! curl -i localhost:3100/users        # the list: tagged `users`, cached 5 s
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::RwLock;
use tower_redis_cache::{CacheLayer, HttpCache};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
struct App {
    users: Arc<RwLock<BTreeMap<u32, String>>>,
    cache: HttpCache,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let port: u16 = std::env::var("PORT")
        .map_or(Ok(3100), |port| port.parse())
        .map_err(|e| format!("PORT must be a port number: {e}"))?;
    let mut cache = HttpCache::builder().prefix("cache-router:");
    if let Ok(url) = std::env::var("REDIS_URL") {
        let client = redis::Client::open(url)?;
        match tokio::time::timeout(Duration::from_secs(2), client.get_connection_manager()).await {
            Ok(Ok(connection)) => {
                println!("Redis is the shared tier; invalidations reach every instance");
                cache = cache.redis(connection).subscribe(client);
            }
            _ => println!("REDIS_URL does not answer: the memory tier alone"),
        }
    } else {
        println!("no REDIS_URL: the memory tier alone");
    }
    let users = BTreeMap::from([(1, "Ada".to_owned()), (2, "Alan".to_owned())]);
    let app = App { users: Arc::new(RwLock::new(users)), cache: cache.build()? };

    let router = Router::new()
        // One user: an hour at most; the write below invalidates it at once.
        .route(
            "/users/{id}",
            get(user)
                .layer(CacheLayer::new(app.cache.clone()).ttl(Duration::from_secs(3600)))
                .put(rename),
        )
        // The list: five seconds, and served stale for ten more while one refresh runs.
        .route(
            "/users",
            get(list).layer(
                CacheLayer::new(app.cache.clone())
                    .ttl(Duration::from_secs(5))
                    .stale_while_revalidate(Duration::from_secs(10)),
            ),
        )
        .with_state(app);

    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn user(State(app): State<App>, Path(id): Path<u32>) -> impl IntoResponse {
    match app.users.read().await.get(&id) {
        // The tags the entry is stored under: this user, and every page listing users.
        Some(name) => Ok(([("surrogate-key", format!("user-{id} users"))], format!("{name}\n"))),
        None => Err(StatusCode::NOT_FOUND),
    }
}

async fn list(State(app): State<App>) -> impl IntoResponse {
    let users = app.users.read().await;
    let lines: String = users.iter().map(|(id, name)| format!("{id}: {name}\n")).collect();
    ([("surrogate-key", "users")], lines)
}

/// The write, then the invalidation of what it changed. If Redis cannot be reached the memory tier is cleared at
/// once and the Redis part is replayed when Redis answers (the error says so); the write itself stands.
async fn rename(State(app): State<App>, Path(id): Path<u32>, name: String) -> impl IntoResponse {
    app.users.write().await.insert(id, name.trim().to_owned());
    for tag in [format!("user-{id}"), "users".to_owned()] {
        if let Err(error) = app.cache.invalidate_tag(&tag).await {
            eprintln!("invalidating {tag}: {error}");
        }
    }
    StatusCode::NO_CONTENT
}
