//! A caching reverse proxy: every request goes to one upstream, and `tower-redis-cache` answers what it may as an
//! RFC 9111 shared cache, with Redis as the shared tier when one is given.
//!
//! ```text
//! cargo run --release -p examples --bin caching-proxy -- \
//!     --listen 127.0.0.1:8080 --upstream http://127.0.0.1:3000 [--redis-url redis://127.0.0.1:6379]
//! curl -i localhost:8080/some/path                # then look at Cache-Status and Age
//! ```
//!
//! Standards mode: only responses that say how long they are fresh are stored, and nothing else is assumed. Every
//! method is forwarded (extension methods too) with every end-to-end header; hop-by-hop headers are dropped in both
//! directions. An unreachable upstream gives `502 Bad Gateway`, or the stale response where `stale-if-error`
//! allows. Without `--redis-url`, or with a Redis that does not answer at start-up, it runs on the memory tier
//! alone (single-instance mode) and says so.

use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::header::{
    CONNECTION, CONTENT_LOCATION, CONTENT_TYPE, HOST, HeaderName, HeaderValue, LOCATION,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE, VIA,
};
use axum::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use axum::http::{HeaderMap, Method, StatusCode, Version};
use axum::response::Response;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_layer::Layer;
use tower_redis_cache::{CacheLayer, HttpCache};
use tower_service::Service;

/// The pseudonym this proxy gives itself in `Via` and `Cache-Status`.
const NAME: &str = "caching-proxy";

const USAGE: &str = "\
usage: caching-proxy --listen ADDR --upstream URL [options]

  --listen ADDR             address to serve on, e.g. 127.0.0.1:8080 (port 0 picks a free one)
  --upstream URL            the origin, http://host[:port] (no path)
  --redis-url URL           Redis for the shared tier, e.g. redis://127.0.0.1:6379 (memory tier alone without it)
  --prefix PREFIX           prefix of every Redis key and of the invalidation channel (default caching-proxy:)
  --memory-mb N             size of the in-memory tier in MiB, 0 turns it off (default 100)
  --connect-timeout-ms N    how long to wait for a connection to the upstream (default 5000)
  -h, --help                print this help

Logs go to stderr; RUST_LOG sets the level (default info).";

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that belong to one hop: the connection fields of RFC 9110 §7.6.1 (with the obsolete `Keep-Alive` and
/// `Proxy-Connection`), the proxy authentication fields meant for this proxy alone (§11.7), and `Trailer`.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("caching-proxy: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut builder = HttpCache::builder()
        .name(NAME)
        .prefix(args.prefix.clone())
        .memory_capacity(args.memory_bytes);
    let mut shared = false;
    match args.redis {
        Some((url, client)) => match connect_redis(&client).await {
            Some(connection) => {
                tracing::info!(redis_url = %url, prefix = %args.prefix, "connected to Redis: shared tier on");
                builder = builder.redis(connection).subscribe(client);
                shared = true;
            }
            None => tracing::warn!(
                redis_url = %url,
                "Redis is not reachable: running in single-instance mode on the memory tier alone \
                 (restart once Redis is up to share the cache)"
            ),
        },
        None => tracing::info!("no --redis-url: running on the memory tier alone"),
    }
    if args.memory_bytes == 0 && !shared {
        tracing::warn!("--memory-mb 0 and no Redis: nothing will be cached");
    }
    let cache = builder
        .build()
        .map_err(|error| format!("cannot build the cache: {error}"))?;

    let forward = Forward::new(args.upstream, args.connect_timeout);
    // Hop-by-hop headers go before the cache sees the request, so that it selects `Vary` variants by the headers
    // the upstream really gets: otherwise `Connection: accept-language` with `Accept-Language: fr` would store the
    // upstream's default-language answer as the French variant, for everyone.
    let app = Router::new()
        .fallback_service(CacheLayer::new(cache.clone()).layer(forward))
        .layer(axum::middleware::map_request(
            |mut request: Request| async move {
                strip_hop_by_hop(request.headers_mut());
                request
            },
        ));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|error| format!("cannot read the listening address: {error}"))?;
    tracing::info!(
        "listening on http://{local}, forwarding to {}",
        args.upstream_text
    );
    // With a header-read timeout and a connection cap, which `axum::serve` does not set.
    demo::server::serve(listener, app, shutdown())
        .await
        .map_err(|error| format!("server error: {error}"))?;
    tracing::info!(stats = ?cache.stats(), "stopped");
    Ok(())
}

/// Resolves on Ctrl-C (or SIGTERM on Unix); in-flight requests then finish before the process exits.
async fn shutdown() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing the requests in flight");
}

/// Connects to Redis with short deadlines so start-up never hangs on a missing server; `None` when Redis does not
/// answer.
async fn connect_redis(client: &redis::Client) -> Option<redis::aio::ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    match tokio::time::timeout(
        Duration::from_secs(2),
        client.get_connection_manager_with_config(config),
    )
    .await
    {
        Ok(Ok(connection)) => Some(connection),
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot connect to Redis");
            None
        }
        Err(_) => {
            tracing::warn!("Redis did not answer within 2 s");
            None
        }
    }
}

/// Sends each request to the upstream and streams its response back; never fails (a connection error is a 502).
#[derive(Clone)]
struct Forward {
    client: Client<HttpConnector, Body>,
    upstream: Upstream,
}

/// Where requests go: the scheme and authority of `--upstream`.
#[derive(Clone)]
struct Upstream {
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
}

impl Forward {
    fn new(upstream: Upstream, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { client, upstream }
    }
}

impl Service<Request> for Forward {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let client = self.client.clone();
        let upstream = self.upstream.clone();
        Box::pin(async move { Ok(forward(&client, &upstream, request).await) })
    }
}

async fn forward(
    client: &Client<HttpConnector, Body>,
    upstream: &Upstream,
    request: Request,
) -> Response {
    if request.method() == Method::CONNECT {
        // A reverse proxy is not a tunnel; the upstream would be asked to open one to itself.
        return plain(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n");
    }
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", PathAndQuery::as_str)
        .to_owned();
    let request = match to_upstream(request, upstream) {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%method, %path, %error, "cannot build the upstream request");
            return plain(StatusCode::BAD_REQUEST, "bad request target\n");
        }
    };
    let started = Instant::now();
    match client.request(request).await {
        Ok(response) => {
            tracing::debug!(
                %method,
                %path,
                status = response.status().as_u16(),
                elapsed_ms = started.elapsed().as_millis(),
                "forwarded"
            );
            from_upstream(response.map(Body::new), upstream)
        }
        Err(error) => {
            // The source chain says what went wrong (refused, timed out, reset); the client only needs the status.
            let cause = std::error::Error::source(&error)
                .map_or_else(|| error.to_string(), ToString::to_string);
            tracing::warn!(%method, %path, connect = error.is_connect(), %cause, "upstream unreachable");
            plain(
                StatusCode::BAD_GATEWAY,
                "502 Bad Gateway: the upstream is unreachable\n",
            )
        }
    }
}

/// The request as the upstream gets it: absolute URI on the upstream, Host of the upstream, no hop-by-hop headers,
/// and `Via`, `X-Forwarded-For`, `X-Forwarded-Host` and `X-Forwarded-Proto` added.
fn to_upstream(request: Request, upstream: &Upstream) -> Result<Request, axum::http::Error> {
    let (mut parts, body) = request.into_parts();
    let original_host = parts
        .uri
        .authority()
        .map(|authority| HeaderValue::from_str(authority.as_str()))
        .transpose()?
        .or_else(|| parts.headers.get(HOST).cloned());
    parts.uri = Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        )
        .build()?;
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    headers.append(VIA, via(parts.version));
    if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
        let client = peer.ip().to_string();
        let chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        let value = if chain.is_empty() {
            client
        } else {
            format!("{}, {client}", chain.join(", "))
        };
        headers.insert(X_FORWARDED_FOR, HeaderValue::try_from(value)?);
    }
    // This proxy is the edge: what a client claims about the host and scheme it used is replaced, not passed on.
    match original_host {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    headers.insert(HOST, upstream.host.clone());
    // The proxy speaks its own HTTP/1.1 to the upstream, whatever the client spoke.
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}

/// The upstream's response as the client gets it: no hop-by-hop headers, locations on the upstream made relative,
/// and `Via` added.
fn from_upstream(mut response: Response, upstream: &Upstream) -> Response {
    let version = response.version();
    let headers = response.headers_mut();
    strip_hop_by_hop(headers);
    relocate(headers, upstream);
    headers.append(VIA, via(version));
    // The client gets this proxy's HTTP/1.1, whatever the upstream spoke (an HTTP/1.0 status line would also end
    // the client's keep-alive).
    *response.version_mut() = Version::HTTP_11;
    response
}

/// Turns a `Location` or `Content-Location` on the upstream's own address (the origin builds them from the `Host`
/// it got) into a path-absolute reference, which the client resolves against the URL it used: redirects keep
/// working, the upstream's address does not leak, and the cache's invalidation by `Location` finds the URL.
fn relocate(headers: &mut HeaderMap, upstream: &Upstream) {
    for name in [LOCATION, CONTENT_LOCATION] {
        let Some(uri) = headers
            .get(&name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<Uri>().ok())
        else {
            continue;
        };
        let on_upstream = uri.scheme() == Some(&upstream.scheme)
            && uri.authority().is_some_and(|authority| {
                authority
                    .host()
                    .eq_ignore_ascii_case(upstream.authority.host())
                    && authority.port_u16().unwrap_or(80)
                        == upstream.authority.port_u16().unwrap_or(80)
            });
        if on_upstream
            && let Ok(path) =
                HeaderValue::from_str(uri.path_and_query().map_or("/", PathAndQuery::as_str))
        {
            headers.insert(name, path);
        }
    }
}

/// Removes the headers that describe one connection: the fixed hop-by-hop set and whatever `Connection` lists.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// `Via: <received-protocol> caching-proxy` (RFC 9110 §7.6.3).
fn via(version: Version) -> HeaderValue {
    let protocol = match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    HeaderValue::try_from(format!("{protocol} {NAME}"))
        .unwrap_or_else(|_| HeaderValue::from_static("1.1 caching-proxy"))
}

/// A short plain-text answer made by the proxy itself.
fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The command line.
struct Args {
    listen: SocketAddr,
    upstream: Upstream,
    upstream_text: String,
    /// The URL as given (for the logs) and a client for it.
    redis: Option<(String, redis::Client)>,
    prefix: String,
    memory_bytes: u64,
    connect_timeout: Duration,
}

impl Args {
    /// `Ok(None)` when help was asked for; `Err` names the argument that is wrong.
    fn parse(mut raw: impl Iterator<Item = String>) -> Result<Option<Self>, String> {
        let mut listen = None;
        let mut upstream = None;
        let mut redis = None;
        let mut prefix = "caching-proxy:".to_owned();
        let mut memory_mb: u64 = 100;
        let mut connect_timeout_ms: u64 = 5000;
        while let Some(arg) = raw.next() {
            if arg == "-h" || arg == "--help" {
                return Ok(None);
            }
            // Both `--flag value` and `--flag=value`.
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), Some(value.to_owned()))
                }
                _ => (arg, None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| raw.next())
                    .ok_or_else(|| format!("{flag}: a value is required"))
            };
            match flag.as_str() {
                "--listen" => listen = Some(parse_listen(&value()?)?),
                "--upstream" => {
                    let text = value()?;
                    upstream = Some((parse_upstream(&text)?, text));
                }
                "--redis-url" => {
                    let url = value()?;
                    let client = redis::Client::open(url.as_str()).map_err(|error| {
                        format!("--redis-url: {url:?} is not a Redis URL ({error})")
                    })?;
                    redis = Some((url, client));
                }
                "--prefix" => prefix = value()?,
                "--memory-mb" => {
                    let text = value()?;
                    memory_mb = text.parse().map_err(|_| {
                        format!("--memory-mb: expected a whole number of MiB, got {text:?}")
                    })?;
                }
                "--connect-timeout-ms" => {
                    let text = value()?;
                    connect_timeout_ms = text
                        .parse()
                        .ok()
                        .filter(|ms| *ms > 0)
                        .ok_or_else(|| {
                            format!(
                                "--connect-timeout-ms: expected a number of milliseconds above 0, got {text:?}"
                            )
                        })?;
                }
                other => return Err(format!("{other}: unknown argument")),
            }
        }
        let listen = listen.ok_or("--listen: required (for example --listen 127.0.0.1:8080)")?;
        let (upstream, upstream_text) = upstream
            .ok_or("--upstream: required (for example --upstream http://127.0.0.1:3000)")?;
        let memory_bytes = memory_mb
            .checked_mul(1024 * 1024)
            .ok_or_else(|| format!("--memory-mb: {memory_mb} MiB is too large"))?;
        Ok(Some(Self {
            listen,
            upstream,
            upstream_text,
            redis,
            prefix,
            memory_bytes,
            connect_timeout: Duration::from_millis(connect_timeout_ms),
        }))
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| {
            format!(
                "--listen: expected an address with a port such as 127.0.0.1:8080, got {text:?}"
            )
        })
}

fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let invalid = |why: &str| format!("--upstream: {why}, got {text:?}");
    let uri: Uri = text
        .parse()
        .map_err(|_| invalid("expected a URL such as http://127.0.0.1:3000"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| invalid("expected a URL with a scheme, such as http://127.0.0.1:3000"))?;
    if scheme != Scheme::HTTP {
        return Err(invalid("only http:// upstreams are supported"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| invalid("expected a URL with a host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("credentials in the URL are not supported"));
    }
    if uri
        .path_and_query()
        .is_some_and(|path| path.as_str() != "/")
    {
        return Err(invalid(
            "expected no path or query (requests keep their own path)",
        ));
    }
    let host = HeaderValue::from_str(authority.as_str())
        .map_err(|_| invalid("the host is not a valid Host header"))?;
    Ok(Upstream {
        scheme,
        authority,
        host,
    })
}
