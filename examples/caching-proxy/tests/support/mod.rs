//! What the caching-proxy's end-to-end tests share: the proxy as a real process, a scripted axum origin that
//! records what it receives, and an HTTP client.
#![allow(dead_code)] // each test file uses its own share of these
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis_fixtures::RedisServer;

/// Generous: the first test to get here waits for the proxy to be built.
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(60);
pub(crate) const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------------------------

/// The `caching-proxy` binary, which cargo builds before this test.
pub(crate) fn proxy_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_caching-proxy"))
}

/// A running `caching-proxy` process, listening on a port it picked itself; killed when dropped.
pub(crate) struct Proxy {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) log: Arc<Mutex<String>>,
}

impl Proxy {
    /// Starts the proxy in front of `upstream` and waits until it accepts connections.
    pub(crate) async fn start(upstream: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(proxy_binary())
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (listening, address) = tokio::sync::oneshot::channel::<SocketAddr>();
        let sink = log.clone();
        // Reads the log to its end, so the proxy never blocks on a full pipe; reports the address it listens on.
        std::thread::spawn(move || {
            let mut listening = Some(listening);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let addr = line
                    .split("listening on http://")
                    .nth(1)
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|addr| addr.trim().parse().ok());
                if let Some(addr) = addr
                    && let Some(listening) = listening.take()
                {
                    let _ = listening.send(addr);
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut proxy = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        proxy.addr = match tokio::time::timeout(START_DEADLINE, address).await {
            Ok(Ok(addr)) => addr,
            _ => panic!(
                "caching-proxy did not start listening; its log:\n{}",
                proxy.log()
            ),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(proxy.addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "caching-proxy does not accept connections; its log:\n{}",
                proxy.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy
    }

    pub(crate) fn uri(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the origin received.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Seen {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.to_str().unwrap())
    }
}

/// An axum server on a loopback port: records every request and answers from a script.
pub(crate) struct Origin {
    pub(crate) addr: SocketAddr,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
    pub(crate) stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) server: Option<tokio::task::JoinHandle<()>>,
}

impl Origin {
    pub(crate) async fn start(
        script: impl Fn(&Seen) -> Response + Clone + Send + Sync + 'static,
    ) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = Router::new().fallback(move |request: Request| {
            let script = script.clone();
            let record = record.clone();
            async move {
                let (parts, body) = request.into_parts();
                let seen = Seen {
                    method: parts.method,
                    uri: parts.uri,
                    headers: parts.headers,
                    body: body.collect().await.unwrap().to_bytes(),
                };
                record.lock().unwrap().push(seen.clone());
                script(&seen)
            }
        });
        Self::serve(app, seen).await
    }

    /// Serves a hand-made router (its requests are not recorded).
    pub(crate) async fn serve(app: Router, seen: Arc<Mutex<Vec<Seen>>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            seen,
            stop: Some(stop),
            server: Some(server),
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub(crate) fn last(&self) -> Seen {
        self.requests().pop().expect("the origin saw no request")
    }

    pub(crate) fn calls(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|seen| seen.method == method && seen.uri.path() == path)
            .count()
    }

    /// Stops the server, closes its connections and waits until its port refuses new ones.
    pub(crate) async fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("the origin did not stop")
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.addr).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the origin still accepts connections"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An origin response.
pub(crate) fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
    let mut response = Response::new(Body::from(body.to_owned()));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    for (name, value) in headers {
        response.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    response
}

/// What the client received.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.to_str().unwrap())
    }

    pub(crate) fn cache_status(&self) -> &str {
        self.header("cache-status")
            .expect("every response through the proxy has Cache-Status")
    }
}

/// Sends one request through the proxy on a fresh connection.
pub(crate) async fn call(
    proxy: &Proxy,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut request = axum::http::Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(proxy.uri(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(REQUEST_DEADLINE, client.request(request))
        .await
        .expect("the proxy did not answer in time")
        .unwrap();
    let (head, body) = response.into_parts();
    let body = tokio::time::timeout(REQUEST_DEADLINE, body.collect())
        .await
        .expect("the proxy did not finish the body in time")
        .unwrap()
        .to_bytes();
    Reply {
        status: head.status,
        headers: head.headers,
        body,
    }
}

pub(crate) async fn get(proxy: &Proxy, path: &str) -> Reply {
    call(proxy, "GET", path, &[], "").await
}

/// A loopback port nothing listens on.
pub(crate) fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Waits until the shared tier holds an entry under `prefix` (Redis writes run in the background).
pub(crate) async fn wait_for_redis_entry(redis: &RedisServer, prefix: &str) {
    let mut con = redis.connection_manager().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}e:*"))
            .query_async(&mut con)
            .await
            .unwrap();
        if !keys.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no entry reached Redis under {prefix}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
