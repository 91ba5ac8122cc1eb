//! The layer on a real axum server and a real tonic server over loopback, against a real redis-server.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Response, StatusCode};
use axum::routing::{get, post};
use redis::aio::ConnectionManager;
use redis_fixtures::RedisServer;
use test_support::serve;
use tower_redis_ratelimit::key::{Header, RequestParts};
use tower_redis_ratelimit::{
    DecisionSource, HeaderStyle, Policy, RateLimitLayer, RateLimiter, RateLimiterBuilder, Selection,
};

async fn send(
    address: SocketAddr,
    method: &str,
    path: &str,
    api_key: Option<&str>,
) -> (StatusCode, HeaderMap, String) {
    let headers: Vec<(&str, &str)> = api_key.map(|key| ("x-api-key", key)).into_iter().collect();
    send_with(address, method, path, &headers).await
}

async fn send_with(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let reply = test_support::send(address, method, path, headers).await;
    (reply.status, reply.headers, reply.body)
}

async fn builder(server: &RedisServer) -> RateLimiterBuilder<ConnectionManager> {
    RateLimiter::builder()
        .redis(server.connection_manager().await)
        .prefix("layer-test:")
}

fn api_key() -> Header {
    Header::try_new("x-api-key").unwrap()
}

#[tokio::test]
async fn a_denied_request_gets_429_with_retry_after_and_ratelimit_fields() {
    let server = RedisServer::start();
    let limiter = builder(&server)
        .await
        .policy(Policy::new("api", 2, Duration::from_secs(60)).unwrap())
        .build()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(limiter.clone(), api_key()));
    let address = serve(app).await;
    for _ in 0..2 {
        let (status, headers, body) = send(address, "GET", "/", Some("alice")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
        assert!(
            headers.get("ratelimit").is_none(),
            "no fields on allowed responses by default"
        );
    }
    let (status, headers, _) = send(address, "GET", "/", Some("alice")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    // With a sliding window, room comes back as the counted requests slide out: within two windows at most.
    assert!((1..=120).contains(&retry_after), "{retry_after}");
    assert_eq!(headers["ratelimit-policy"], "\"api\";q=2;w=60");
    assert_eq!(
        headers["ratelimit"],
        format!("\"api\";r=0;t={retry_after}").as_str()
    );
    assert_eq!(
        send(address, "GET", "/", Some("bob")).await.0,
        StatusCode::OK,
        "another key has its own limit"
    );
    let stats = limiter.stats();
    assert_eq!((stats.allowed, stats.denied), (3, 1));
    assert_eq!(
        server.keys_without_ttl(),
        Vec::<String>::new(),
        "every key has a TTL"
    );
}

#[tokio::test]
async fn a_route_layer_limits_only_its_route_and_fields_can_go_on_allowed_responses() {
    let server = RedisServer::start();
    let limiter = builder(&server)
        .await
        .policy(Policy::new("writes", 1, Duration::from_secs(60)).unwrap())
        .build()
        .unwrap();
    let layer = RateLimitLayer::new(limiter, api_key()).headers(
        HeaderStyle::default()
            .legacy(true)
            .x_ratelimit(true)
            .on_allowed(true),
    );
    let app = Router::new()
        .route("/orders", post(|| async { "created" }).route_layer(layer))
        .route("/orders", get(|| async { "list" }));
    let address = serve(app).await;
    let (status, headers, _) = send(address, "POST", "/orders", Some("k")).await;
    assert_eq!(status, StatusCode::OK);
    let field = headers["ratelimit"].to_str().unwrap();
    let reset: u64 = field
        .strip_prefix("\"writes\";r=0;t=")
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&reset), "{field}");
    assert_eq!(headers["x-ratelimit-limit"], "1");
    assert_eq!(headers["ratelimit-remaining"], "0");
    assert_eq!(
        send(address, "POST", "/orders", Some("k")).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    for _ in 0..5 {
        assert_eq!(
            send(address, "GET", "/orders", Some("k")).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        server.keys_without_ttl(),
        Vec::<String>::new(),
        "every key has a TTL"
    );
}

#[tokio::test]
async fn shadow_mode_decides_and_reports_but_never_rejects() {
    let server = RedisServer::start();
    let limiter = builder(&server)
        .await
        .policy(Policy::new("p", 1, Duration::from_secs(60)).unwrap())
        .build()
        .unwrap();
    let layer = RateLimitLayer::new(limiter.clone(), api_key()).shadow(true);
    let address = serve(
        Router::new()
            .route("/", get(|| async { "ok" }))
            .layer(layer),
    )
    .await;
    for _ in 0..4 {
        assert_eq!(send(address, "GET", "/", Some("k")).await.0, StatusCode::OK);
    }
    let stats = limiter.stats();
    assert_eq!(
        (stats.allowed, stats.denied, stats.shadow_denials),
        (1, 3, 3)
    );
    assert_eq!(
        server.keys_without_ttl(),
        Vec::<String>::new(),
        "every key has a TTL"
    );
}

#[tokio::test]
async fn the_allow_list_bypasses_and_requests_without_a_key_pass_unless_configured() {
    let server = RedisServer::start();
    let limiter = builder(&server)
        .await
        .policy(Policy::new("p", 1, Duration::from_secs(60)).unwrap())
        .build()
        .unwrap();
    let layer = RateLimitLayer::new(limiter.clone(), api_key())
        .allow_if(|request: &RequestParts<'_>| request.uri.path() == "/health");
    let app = Router::new()
        .route("/health", get(|| async { "up" }))
        .route("/", get(|| async { "ok" }))
        .layer(layer);
    let address = serve(app).await;
    for _ in 0..3 {
        assert_eq!(
            send(address, "GET", "/health", Some("k")).await.0,
            StatusCode::OK
        );
        assert_eq!(send(address, "GET", "/", None).await.0, StatusCode::OK);
    }
    let stats = limiter.stats();
    assert_eq!(stats.from_source(DecisionSource::AllowList), (3, 0));
    assert_eq!(stats.from_source(DecisionSource::NoKey), (3, 0));
    assert_eq!(stats.redis_calls, 0);

    let strict = RateLimitLayer::new(limiter, api_key()).deny_without_key(true);
    let address = serve(
        Router::new()
            .route("/", get(|| async { "ok" }))
            .layer(strict),
    )
    .await;
    assert_eq!(
        send(address, "GET", "/", None).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        server.keys_without_ttl(),
        Vec::<String>::new(),
        "every key has a TTL"
    );
}

#[tokio::test]
async fn a_selector_chooses_the_tier_and_the_cost_per_request() {
    let server = RedisServer::start();
    let limiter = builder(&server)
        .await
        .policy(Policy::new("free", 2, Duration::from_secs(60)).unwrap())
        .tier(
            "pro",
            [Policy::new("pro", 100, Duration::from_secs(60)).unwrap()],
        )
        .build()
        .unwrap();
    let layer = RateLimitLayer::new(limiter, api_key()).select(|request: &RequestParts<'_>| {
        let cost = if request.uri.path() == "/export" {
            40
        } else {
            1
        };
        Selection::new(request.headers.get("x-plan").map(|_| "pro"), cost)
    });
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/export", get(|| async { "export" }))
        .layer(layer);
    let address = serve(app).await;
    // Free tier: two requests.
    assert_eq!(
        send(address, "GET", "/", Some("free-user")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(address, "GET", "/", Some("free-user")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(address, "GET", "/", Some("free-user")).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Pro tier (by header): exports cost 40 of 100.
    let pro = |path: &'static str| async move {
        send_with(
            address,
            "GET",
            path,
            &[("x-api-key", "pro-user"), ("x-plan", "pro")],
        )
        .await
        .0
    };
    assert_eq!(pro("/export").await, StatusCode::OK);
    assert_eq!(pro("/export").await, StatusCode::OK);
    assert_eq!(pro("/export").await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        pro("/").await,
        StatusCode::OK,
        "20 units are left for cheap requests"
    );
    assert_eq!(
        server.keys_without_ttl(),
        Vec::<String>::new(),
        "every key has a TTL"
    );
}

#[tokio::test]
async fn the_rejection_can_be_replaced_and_keeps_the_fields() {
    let server = RedisServer::start();
    let limiter = builder(&server)
        .await
        .policy(Policy::new("p", 1, Duration::from_secs(60)).unwrap())
        .build()
        .unwrap();
    let layer = RateLimitLayer::new(limiter, api_key()).on_reject(
        |decision: &tower_redis_ratelimit::Decision, _grpc: bool| {
            let mut response = Response::new(Body::from(format!(
                "slow down ({})",
                decision.source.as_str()
            )));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            response
        },
    );
    let address = serve(
        Router::new()
            .route("/", get(|| async { "ok" }))
            .layer(layer),
    )
    .await;
    send(address, "GET", "/", Some("k")).await;
    let (status, headers, body) = send(address, "GET", "/", Some("k")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "slow down (redis)")
    );
    assert!(headers.contains_key("retry-after") && headers.contains_key("ratelimit"));
    assert_eq!(
        server.keys_without_ttl(),
        Vec::<String>::new(),
        "every key has a TTL"
    );
}

#[tokio::test]
async fn a_tonic_server_answers_resource_exhausted_with_the_fields_as_metadata() {
    use grpc_echo::{EchoClient, EchoRequest, EchoServer};
    let server = RedisServer::start();
    let limiter = builder(&server)
        .await
        .policy(Policy::new("rpc", 2, Duration::from_secs(60)).unwrap())
        .build()
        .unwrap();
    let echo = EchoServer::new();
    let (address, _task) =
        grpc_echo::serve_with_layer(RateLimitLayer::new(limiter, api_key()), echo.clone()).await;
    let mut client = EchoClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let request = || {
        let mut request = tonic::Request::new(EchoRequest {
            message: "hi".to_owned(),
            fail_with: 0,
            delay_ms: 0,
        });
        request
            .metadata_mut()
            .insert("x-api-key", "grpc-user".parse().unwrap());
        request
    };
    assert!(client.say(request()).await.is_ok());
    assert!(client.say(request()).await.is_ok());
    let status = client.say(request()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.message(), "rate limit exceeded");
    assert!(status.metadata().get("retry-after").is_some());
    assert!(status.metadata().get("ratelimit").is_some());
    assert_eq!(echo.calls(), 2, "the denied call never reached the service");
    assert_eq!(
        server.keys_without_ttl(),
        Vec::<String>::new(),
        "every key has a TTL"
    );
}
