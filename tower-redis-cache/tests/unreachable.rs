//! Stale when the origin is unreachable (RFC 9111 §4.2.4), through the layer around a real hyper client that talks
//! to a real origin on loopback. The origin is then made unreachable as production does it: the port refuses, the
//! connection closes before a response, it is reset, or it stalls past the route's origin timeout. The stored
//! stale response stands in within the route's bound, and `Cache-Status` says why; one whose directives forbid
//! serving it stale gives a 504.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Layer, ServiceExt};
use tower_breaker::ManualClock;
use tower_redis_cache::{CacheLayer, HttpCache};

/// How the origin treats each new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Answers with the scripted response.
    Serve,
    /// Answers 500.
    ServerError,
    /// Reads the request, then closes without a response.
    Close,
    /// Reads the request, then resets the connection (RST).
    Reset,
    /// Reads the request and never answers.
    Stall,
}

/// A hand-written HTTP/1.1 origin, so each fault is exactly what goes on the wire; `refuse` stops it listening.
struct Origin {
    address: SocketAddr,
    mode: Arc<AtomicU8>,
    accept: tokio::task::JoinHandle<()>,
}

impl Origin {
    async fn start(headers: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Serve as u8));
        let served = Arc::new(AtomicUsize::new(0));
        let task_mode = mode.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mode = task_mode.load(Ordering::SeqCst);
                let served = served.clone();
                tokio::spawn(connection(stream, mode, served, headers));
            }
        });
        Self {
            address,
            mode,
            accept,
        }
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Stops listening, and waits until the port refuses connections.
    async fn refuse(&self) {
        self.accept.abort();
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(self.address).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the origin's port still accepts connections");
    }
}

async fn connection(
    mut stream: tokio::net::TcpStream,
    mode: u8,
    served: Arc<AtomicUsize>,
    headers: &'static str,
) {
    let mut head = Vec::new();
    let mut chunk = [0_u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => head.extend_from_slice(&chunk[..read]),
        }
    }
    let answer = match mode {
        m if m == Mode::Serve as u8 => {
            let call = served.fetch_add(1, Ordering::SeqCst) + 1;
            let body = format!("call {call}");
            format!(
                "HTTP/1.1 200 OK\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        m if m == Mode::ServerError as u8 => {
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                .to_owned()
        }
        m if m == Mode::Close as u8 => return,
        m if m == Mode::Reset as u8 => {
            let _ = stream.set_zero_linger();
            return;
        }
        _ => {
            std::future::pending::<()>().await;
            return;
        }
    };
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The origin service the cache wraps: a hyper client with no connection reuse, so every request meets the fault
/// of the moment. Its error is hyper's: a refused, closed or reset connection.
fn client_to(
    address: SocketAddr,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Incoming>,
    Error = hyper_util::client::legacy::Error,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    tower::service_fn(move |mut request: Request<Body>| {
        let client = client.clone();
        let path = request.uri().path().to_owned();
        *request.uri_mut() = format!("http://{address}{path}").parse().unwrap();
        async move { client.request(request).await }
    })
}

/// What the client got: the status, `Cache-Status`, and the body; or the origin's error, passed on.
async fn fetch<S>(service: &S) -> Result<(StatusCode, String, String), String>
where
    S: tower::Service<
            Request<Body>,
            Response = Response<tower_redis_cache::CacheBody<Incoming>>,
            Error = hyper_util::client::legacy::Error,
        > + Clone,
{
    let response = service
        .clone()
        .oneshot(
            Request::get("http://test/page")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status();
    let cache_status = response
        .headers()
        .get("cache-status")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Ok((
        status,
        cache_status,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// A cache on `origin` configured by `layer`, with an entry stored and then made `stale_by` stale by the clock.
async fn stored_then_stale(
    origin: &Origin,
    layer: impl FnOnce(CacheLayer) -> CacheLayer,
    stale_by: Duration,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<tower_redis_cache::CacheBody<Incoming>>,
    Error = hyper_util::client::legacy::Error,
> + Clone {
    let clock = ManualClock::new();
    let cache = HttpCache::builder().clock(clock.clone()).build().unwrap();
    let service = layer(CacheLayer::new(cache)).layer(client_to(origin.address));
    let (status, cache_status, body) = fetch(&service).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "call 1");
    assert!(cache_status.contains("stored"), "{cache_status}");
    // `max-age=1` in every script: stale one second in.
    clock.advance(Duration::from_secs(1) + stale_by);
    service
}

const ONE_SECOND: &str = "cache-control: max-age=1\r\n";

#[tokio::test]
async fn a_refused_closed_or_reset_origin_gets_the_stale_response_marked_unreachable() {
    for fault in [Mode::Close, Mode::Reset, Mode::Stall] {
        let origin = Origin::start(ONE_SECOND).await;
        let service = stored_then_stale(&origin, |layer| layer, Duration::from_secs(30)).await;
        if fault == Mode::Stall {
            // Stalling is covered with a timeout below; here the port refuses.
            origin.refuse().await;
        } else {
            origin.set(fault);
        }
        let (status, cache_status, body) = fetch(&service).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{fault:?}");
        assert_eq!(body, "call 1", "{fault:?}: the stored response");
        assert!(
            cache_status.contains("hit; ttl=-")
                && cache_status.ends_with("detail=origin-unreachable"),
            "{fault:?}: {cache_status}"
        );
    }
}

#[tokio::test]
async fn a_stalled_origin_past_the_route_timeout_gets_the_stale_response_marked_timeout() {
    let origin = Origin::start(ONE_SECOND).await;
    let service = stored_then_stale(
        &origin,
        |layer| layer.origin_timeout(Duration::from_millis(200)),
        Duration::from_secs(30),
    )
    .await;
    origin.set(Mode::Stall);
    let (status, cache_status, body) = fetch(&service).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "call 1"));
    assert!(
        cache_status.ends_with("detail=origin-timeout"),
        "{cache_status}"
    );
}

#[tokio::test]
async fn beyond_the_bound_or_with_it_off_the_failure_goes_on() {
    // Ten minutes by default: eleven minutes stale is too stale.
    let origin = Origin::start(ONE_SECOND).await;
    let service = stored_then_stale(&origin, |layer| layer, Duration::from_secs(660)).await;
    origin.set(Mode::Reset);
    assert!(fetch(&service).await.is_err());

    // A configured bound of a minute: 30 s stale stands in, 90 s does not.
    for (stale_by, stands_in) in [(30, true), (90, false)] {
        let origin = Origin::start(ONE_SECOND).await;
        let service = stored_then_stale(
            &origin,
            |layer| layer.stale_if_unreachable(Duration::from_secs(60)),
            Duration::from_secs(stale_by),
        )
        .await;
        origin.set(Mode::Close);
        assert_eq!(
            fetch(&service).await.is_ok(),
            stands_in,
            "{stale_by} s stale"
        );
    }

    // Turned off.
    let origin = Origin::start(ONE_SECOND).await;
    let service = stored_then_stale(
        &origin,
        |layer| layer.stale_if_unreachable(Duration::ZERO),
        Duration::from_secs(5),
    )
    .await;
    origin.set(Mode::Close);
    assert!(fetch(&service).await.is_err());
}

#[tokio::test]
async fn stale_if_error_still_names_itself_when_it_is_what_allows_the_stale_response() {
    let origin = Origin::start("cache-control: max-age=1, stale-if-error=3600\r\n").await;
    let service = stored_then_stale(&origin, |layer| layer, Duration::from_secs(1200)).await;
    origin.set(Mode::Reset);
    let (status, cache_status, _) = fetch(&service).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        cache_status.ends_with("detail=stale-if-error"),
        "{cache_status}"
    );
}

#[tokio::test]
async fn a_5xx_is_not_unreachable_and_gets_no_stale_response_without_stale_if_error() {
    let origin = Origin::start(ONE_SECOND).await;
    let service = stored_then_stale(&origin, |layer| layer, Duration::from_secs(5)).await;
    origin.set(Mode::ServerError);
    let (status, _, _) = fetch(&service).await.unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn directives_that_forbid_stale_give_a_504_naming_them() {
    for (headers, directive) in [
        (
            "cache-control: max-age=1, must-revalidate\r\n",
            "must-revalidate",
        ),
        (
            "cache-control: max-age=1, proxy-revalidate\r\n",
            "proxy-revalidate",
        ),
        ("cache-control: s-maxage=1\r\n", "s-maxage"),
        ("cache-control: no-cache\r\netag: \"v1\"\r\n", "no-cache"),
    ] {
        let origin = Origin::start(headers).await;
        let service = stored_then_stale(&origin, |layer| layer, Duration::from_secs(5)).await;
        origin.set(Mode::Reset);
        let (status, cache_status, body) = fetch(&service).await.unwrap();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{directive}");
        assert!(body.is_empty(), "{directive}: nothing stale in the body");
        assert!(
            cache_status.ends_with(&format!("detail={directive}")),
            "{directive}: {cache_status}"
        );
    }
}

#[tokio::test]
async fn without_a_stored_response_the_failure_goes_on() {
    let origin = Origin::start(ONE_SECOND).await;
    origin.set(Mode::Reset);
    let cache = HttpCache::builder().build().unwrap();
    let service = CacheLayer::new(cache).layer(client_to(origin.address));
    assert!(fetch(&service).await.is_err());
}
