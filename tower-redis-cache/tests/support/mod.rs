//! Shared helpers: a real axum origin on loopback, an HTTP/1.1 client, and an origin whose behaviour tests script.

#![allow(dead_code, unreachable_pub)] // each test file uses a different part; `pub` is for the test files

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::Response;
use axum::routing::get as get_route;

pub mod scenarios;

pub use test_support::{get, holds_within, send, serve, wait_for};

/// Waits until every cache's invalidation subscription is up, so that what one announces the others hear.
pub async fn subscribed(caches: &[&tower_redis_cache::HttpCache]) {
    wait_for(
        "every invalidation subscription is up",
        Duration::from_secs(10),
        || {
            caches.iter().all(|cache| {
                cache
                    .stats()
                    .subscription
                    .is_some_and(|subscription| subscription.connected)
            })
        },
    )
    .await;
}

/// Counts origin calls.
#[derive(Debug, Clone, Default)]
pub struct Calls(Arc<AtomicUsize>);

impl Calls {
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Waits until Redis holds `redis_key` (the cache writes to Redis in the background, after the body has streamed).
pub async fn stored_in_redis<C>(connection: &C, redis_key: &str) -> bool
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync,
{
    holds_within(Duration::from_secs(5), || {
        let mut connection = connection.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(redis_key)
                .query_async::<u64>(&mut connection)
                .await
                .unwrap()
                == 1
        }
    })
    .await
}

/// An origin at `/r/{n}` whose responses carry `headers`, counting its calls; the body names the call.
pub fn origin(calls: &Calls, headers: &'static [(&'static str, &'static str)]) -> Router {
    let calls = calls.clone();
    Router::new().route(
        "/r/{n}",
        get_route(move |Path(n): Path<String>| {
            let calls = calls.clone();
            async move {
                let call = calls.bump();
                let mut response = Response::builder();
                for (name, value) in headers {
                    response = response.header(*name, *value);
                }
                response
                    .body(Body::from(format!("{n} call {call}")))
                    .unwrap()
            }
        }),
    )
}
