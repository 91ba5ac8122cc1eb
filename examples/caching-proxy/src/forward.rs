//! What the proxy does to a request on its way to the upstream and to the response on its way back.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
use tower_service::Service;

use crate::NAME;

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that belong to one hop: the connection fields of RFC 9110 §7.6.1 (with the obsolete `Keep-Alive` and
/// `Proxy-Connection`), the proxy authentication fields meant for this proxy alone (§11.7), and `Trailer`.
pub(crate) const HOP_BY_HOP: [HeaderName; 9] = [
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

/// Sends each request to the upstream and streams its response back. An upstream that cannot be reached (refused,
/// reset, closed before answering, no connection within the connect timeout) is an error, so that the cache in
/// front can stand a stale response in for it; [`bad_gateway`] is what the client gets otherwise.
#[derive(Clone)]
pub(crate) struct Forward {
    pub(crate) client: Client<HttpConnector, Body>,
    pub(crate) upstream: Upstream,
}

/// Where requests go: the scheme and authority of `--upstream`.
#[derive(Clone)]
pub(crate) struct Upstream {
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    pub(crate) host: HeaderValue,
}

impl Forward {
    pub(crate) fn new(upstream: Upstream, connect_timeout: Duration) -> Self {
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
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let client = self.client.clone();
        let upstream = self.upstream.clone();
        Box::pin(async move { forward(&client, &upstream, request).await })
    }
}

/// The upstream could not be reached (logged where it happened).
#[derive(Debug)]
pub(crate) struct UpstreamError;

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream is unreachable")
    }
}

impl std::error::Error for UpstreamError {}

/// What the client gets when the upstream is unreachable and no stored response may stand in.
pub(crate) fn bad_gateway() -> Response {
    let mut response = plain(
        StatusCode::BAD_GATEWAY,
        "502 Bad Gateway: the upstream is unreachable\n",
    );
    response.headers_mut().insert(
        tower_redis_cache::CACHE_STATUS,
        HeaderValue::from_static("caching-proxy; detail=origin-unreachable"),
    );
    response
}

pub(crate) async fn forward(
    client: &Client<HttpConnector, Body>,
    upstream: &Upstream,
    request: Request,
) -> Result<Response, UpstreamError> {
    if request.method() == Method::CONNECT {
        // A reverse proxy is not a tunnel; the upstream would be asked to open one to itself.
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported\n",
        ));
    }
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", PathAndQuery::as_str)
        .to_owned();
    let mut request = match to_upstream(request, upstream) {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%method, %path, %error, "cannot build the upstream request");
            return Ok(plain(StatusCode::BAD_REQUEST, "bad request target\n"));
        }
    };
    // An interim response (103 Early Hints, say) is read and dropped: hyper's server has no way to send a 1xx
    // before the final response (only its automatic 100 Continue), so it cannot be forwarded. The cache never
    // sees it either: what reaches it is the final response.
    let interim_path = path.clone();
    hyper::ext::on_informational(&mut request, move |interim| {
        tracing::debug!(
            path = %interim_path,
            status = interim.status().as_u16(),
            "interim response from the upstream not forwarded (hyper's server cannot send 1xx)"
        );
    });
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
            Ok(from_upstream(response.map(Body::new), upstream))
        }
        Err(error) => {
            // The source chain says what went wrong (refused, timed out, reset); the client only needs the status.
            let cause = std::error::Error::source(&error)
                .map_or_else(|| error.to_string(), ToString::to_string);
            tracing::warn!(%method, %path, connect = error.is_connect(), %cause, "upstream unreachable");
            Err(UpstreamError)
        }
    }
}

/// The request as the upstream gets it: absolute URI on the upstream, Host of the upstream, no hop-by-hop headers,
/// and `Via`, `X-Forwarded-For`, `X-Forwarded-Host` and `X-Forwarded-Proto` added.
pub(crate) fn to_upstream(
    request: Request,
    upstream: &Upstream,
) -> Result<Request, axum::http::Error> {
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
pub(crate) fn from_upstream(mut response: Response, upstream: &Upstream) -> Response {
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
pub(crate) fn relocate(headers: &mut HeaderMap, upstream: &Upstream) {
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
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
pub(crate) fn via(version: Version) -> HeaderValue {
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
pub(crate) fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
