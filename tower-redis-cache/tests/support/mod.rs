//! Shared helpers: a real axum origin on loopback, an HTTP/1.1 client, and an origin whose behaviour tests script.

#![allow(dead_code, unreachable_pub)] // each test file uses a different part; `pub` is for the test files

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use axum::routing::get as get_route;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

pub mod scenarios;

pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// This cache's `Cache-Status` member (the last one).
    pub fn cache_status(&self) -> String {
        self.headers
            .get_all("cache-status")
            .iter()
            .next_back()
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    pub fn is_hit(&self) -> bool {
        self.cache_status().contains("; hit")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|value| value.to_str().unwrap().to_owned())
    }
}

pub async fn get(address: SocketAddr, path: &str) -> Reply {
    send(address, "GET", path, &[]).await
}

pub async fn send(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "test");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
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

/// Polls `condition` every 20 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until Redis holds `redis_key` (the cache writes to Redis in the background, after the body has streamed).
pub async fn stored_in_redis<C>(connection: &C, redis_key: &str) -> bool
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync,
{
    eventually(Duration::from_secs(5), || {
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
