//! The caching-proxy as a real process when its origin dies: a 502 when nothing stored may stand in, the stored
//! response within `stale-if-error` or the unreachable bound (RFC 9111 §4.2.4), marked in `Cache-Status`, and a 504
//! for a response whose directives forbid serving it stale.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use redis_fixtures::RedisServer;
use support::*;

/// The first answer for `path` once its entry, stored fresh for a second, is no longer a fresh hit (the fresh
/// hits before it are checked to be hits).
async fn once_stale(proxy: &Proxy, path: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = get(proxy, path).await;
        let status = reply.cache_status().to_owned();
        let fresh = status.starts_with("caching-proxy; hit; ttl=") && !status.contains("ttl=-");
        if !fresh {
            return reply;
        }
        assert!(Instant::now() < deadline, "the entry never went stale");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_gives_502() {
    let proxy = Proxy::start(&format!("http://127.0.0.1:{}", closed_port()), &[]).await;

    let got = get(&proxy, "/anything").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        got.cache_status(),
        "caching-proxy; detail=origin-unreachable"
    );
    let posted = call(&proxy, "POST", "/anything", &[], "data").await;
    assert_eq!(posted.status, StatusCode::BAD_GATEWAY);
    assert!(
        proxy.log().contains("upstream unreachable"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_response_with_stale_if_error_is_served_when_the_origin_dies() {
    let redis = RedisServer::start();
    let mut origin = Origin::start(|_| {
        reply(
            200,
            &[("cache-control", "max-age=1, stale-if-error=300")],
            "last good report",
        )
    })
    .await;
    let proxy = Proxy::start(
        &origin.url(),
        &["--redis-url", &redis.url(), "--prefix", "sie:"],
    )
    .await;

    let first = get(&proxy, "/report").await;
    assert!(
        first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );
    origin.kill().await;

    // Fresh hits until the second of freshness runs out, then the stale response instead of a 502.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = get(&proxy, "/report").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.cache_status());
        assert_eq!(reply.text(), "last good report");
        let status = reply.cache_status();
        if status.contains("detail=stale-if-error") {
            assert!(status.starts_with("caching-proxy; hit; ttl="), "{status}");
            break;
        }
        assert!(status.starts_with("caching-proxy; hit; ttl="), "{status}");
        assert!(Instant::now() < deadline, "the entry never went stale");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(origin.calls("GET", "/report"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_response_stands_in_for_a_dead_origin_within_the_bound_and_502_without_it() {
    let mut origin =
        Origin::start(|_| reply(200, &[("cache-control", "max-age=1")], "report")).await;
    let default = Proxy::start(&origin.url(), &[]).await;
    let off = Proxy::start(&origin.url(), &["--stale-if-unreachable-secs", "0"]).await;
    for proxy in [&default, &off] {
        assert!(
            get(proxy, "/report")
                .await
                .cache_status()
                .contains("stored")
        );
    }
    origin.kill().await;

    // Fresh hits until the second of freshness runs out; then the stale response (default: within 10 minutes),
    // or a 502 (turned off).
    let reply = once_stale(&default, "/report").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.cache_status());
    assert_eq!(reply.text(), "report");
    let status = reply.cache_status();
    assert!(
        status.starts_with("caching-proxy; hit; ttl=-")
            && status.ends_with("detail=origin-unreachable"),
        "{status}"
    );
    let reply = get(&off, "/report").await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        reply.cache_status()
    );
    assert_eq!(
        reply.cache_status(),
        "caching-proxy; detail=origin-unreachable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_must_be_revalidated_gives_504_when_the_origin_dies() {
    let mut origin = Origin::start(|_| {
        reply(
            200,
            // The ETag keeps it stored once stale, for revalidation: so it is there to be refused.
            &[
                ("cache-control", "max-age=1, must-revalidate"),
                ("etag", "\"v1\""),
            ],
            "strict",
        )
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    assert!(
        get(&proxy, "/strict")
            .await
            .cache_status()
            .contains("stored")
    );
    origin.kill().await;

    let reply = once_stale(&proxy, "/strict").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        reply.cache_status().ends_with("detail=must-revalidate"),
        "{}",
        reply.cache_status()
    );
    assert_eq!(reply.text(), "", "nothing stale");
}
