//! What the workspace's tests share, written once: waiting on observable state instead of sleeping a fixed time
//! ([`wait_until`], [`wait_for`], [`eventually`]), a real axum server on loopback ([`serve`]), an HTTP/1.1 client
//! ([`send`], [`try_send`], [`get`]), and a [`SentinelConnection`] to a fixture set ([`sentinel_connection`]).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)] // test helpers fail loudly on a broken fixture

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use redis_fixtures::RedisSentinel;
use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};

/// How often the waits look again.
const POLL: Duration = Duration::from_millis(5);

/// Polls `condition` until it holds; panics naming `what` once `within` has passed.
pub async fn wait_until(what: &str, within: Duration, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_until`] for a condition that needs no `.await`.
pub async fn wait_for(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    wait_until(what, within, async || condition()).await;
}

/// Polls `check` until it gives a value, and returns it; panics naming `what` once `within` has passed.
pub async fn eventually<T>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Whether `condition` comes to hold within `within` (for a test that asserts on the answer itself).
pub async fn holds_within(within: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Serves `app` on a free loopback port until the test ends; returns its address.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The header fields.
    pub headers: HeaderMap,
    /// The body, as text.
    pub body: String,
}

impl Reply {
    /// The last `Cache-Status` member (RFC 9211): the one the cache nearest the client added.
    pub fn cache_status(&self) -> String {
        self.headers
            .get_all("cache-status")
            .iter()
            .next_back()
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    /// Whether that member says `hit`.
    pub fn is_hit(&self) -> bool {
        self.cache_status().contains("; hit")
    }

    /// A header field's value, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|value| value.to_str().unwrap().to_owned())
    }
}

/// `GET path` on `address`.
pub async fn get(address: SocketAddr, path: &str) -> Reply {
    send(address, "GET", path, &[]).await
}

/// Sends one request on a fresh HTTP/1.1 connection (`Host: test` unless `headers` give one) and reads the
/// response whole; panics when the request cannot be made.
pub async fn send(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    match try_send(address, method, path, headers).await {
        Ok(reply) => reply,
        Err(error) => panic!("{method} {path} on {address}: {error}"),
    }
}

/// As [`send`], for tests where a request may fail (a fault under test): the error says at which step.
pub async fn try_send(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("handshake: {error}"))?;
    tokio::spawn(connection);
    let mut request = Request::builder().method(method).uri(path);
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request = request.header("host", "test");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Body::empty())
        .map_err(|error| format!("request: {error}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("send: {error}"))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|error| format!("body: {error}"))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A connection to `set`'s primary through its sentinels, with the default settings.
pub async fn sentinel_connection(set: &RedisSentinel) -> SentinelConnection {
    SentinelConnection::connect(
        &set.sentinel_urls(),
        set.master_name(),
        SentinelConfig::default(),
    )
    .await
    .unwrap()
}
