//! Targeted cache control (RFC 9213) through the layer on a real axum server: the first valid target field replaces
//! `Cache-Control` and `Expires` for this cache, an invalid one is ignored as a whole, the target list is
//! configurable and ordered, and the fields addressed to this cache are stripped (by default) while
//! `Cache-Control` goes on as the origin sent it.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::time::Duration;

use axum::http::HeaderName;
use redis_fixtures::RedisServer;
use support::{Calls, get, origin, serve, stored_in_redis};
use test_support::Reply;
use tower_breaker::ManualClock;
use tower_redis_cache::{CacheBuilder, CacheLayer, HttpCache};

const ACME: HeaderName = HeaderName::from_static("acme-cache-control");
const CDN: HeaderName = HeaderName::from_static("cdn-cache-control");

/// Two requests for `/r/x` through a cache built by `builder`, the second `later` after the first by the cache's
/// clock; the origin's responses carry `headers`. Returns the origin's calls and both replies.
async fn twice(
    builder: CacheBuilder,
    headers: &'static [(&'static str, &'static str)],
    later: Duration,
) -> (usize, Reply, Reply) {
    let calls = Calls::default();
    let clock = ManualClock::new();
    let cache = builder.clock(clock.clone()).build().unwrap();
    let address = serve(origin(&calls, headers).layer(CacheLayer::new(cache))).await;
    let first = get(address, "/r/x").await;
    clock.advance(later);
    let second = get(address, "/r/x").await;
    (calls.get(), first, second)
}

async fn origin_calls(headers: &'static [(&'static str, &'static str)]) -> usize {
    twice(HttpCache::builder(), headers, Duration::ZERO).await.0
}

#[tokio::test]
async fn cdn_cache_control_lets_this_cache_store_what_cache_control_forbids_and_goes_no_further() {
    let headers: &'static [_] = &[
        ("cache-control", "no-store"),
        ("cdn-cache-control", "max-age=60"),
    ];
    let (calls, first, second) = twice(HttpCache::builder(), headers, Duration::ZERO).await;
    assert_eq!(calls, 1, "stored by the target's max-age");
    assert!(second.is_hit(), "{}", second.cache_status());
    assert!(
        first.cache_status().contains("stored; ttl=60"),
        "{}",
        first.cache_status()
    );
    for reply in [&first, &second] {
        assert_eq!(
            reply.header("cache-control").as_deref(),
            Some("no-store"),
            "Cache-Control goes on as sent, for the caches downstream"
        );
        assert_eq!(reply.header("cdn-cache-control"), None, "stripped");
    }
}

#[tokio::test]
async fn a_target_forbids_what_cache_control_allows() {
    for target in ["no-store", "private", "no-cache"] {
        let headers: &'static [_] = Box::leak(Box::new([
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", target),
        ]));
        assert_eq!(origin_calls(headers).await, 2, "{target}");
    }
}

#[tokio::test]
async fn the_target_sets_the_lifetime_and_cache_control_and_expires_give_none() {
    // Fresh for an hour by Cache-Control, a second by the target: stale two seconds later.
    let short: &'static [_] = &[
        ("cache-control", "max-age=3600"),
        ("cdn-cache-control", "max-age=1"),
    ];
    let (calls, _, _) = twice(HttpCache::builder(), short, Duration::from_secs(2)).await;
    assert_eq!(calls, 2);

    // A valid target without a lifetime: neither Cache-Control's nor Expires's lifetime applies.
    let expires = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
    let no_lifetime: &'static [_] = Box::leak(Box::new([
        ("cache-control", "max-age=3600"),
        ("expires", Box::leak(expires.into_boxed_str()) as &str),
        ("cdn-cache-control", "must-revalidate"),
    ]));
    assert_eq!(origin_calls(no_lifetime).await, 2);
    // The control: with targeted fields turned off, the same response is fresh for an hour.
    let (off, _, second) = twice(
        HttpCache::builder().targeted_fields([]),
        no_lifetime,
        Duration::ZERO,
    )
    .await;
    assert_eq!(off, 1);
    assert_eq!(
        second.header("cdn-cache-control").as_deref(),
        Some("must-revalidate"),
        "with no targets, nothing is stripped"
    );
}

#[tokio::test]
async fn an_invalid_target_is_ignored_as_a_whole_and_cache_control_applies() {
    for invalid in [
        "no-store, max-age=1.5.5",
        "No-Store",
        "no-store,",
        "no-store max-age=0",
    ] {
        let headers: &'static [_] = Box::leak(Box::new([
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", invalid),
        ]));
        let (calls, first, _) = twice(HttpCache::builder(), headers, Duration::ZERO).await;
        assert_eq!(calls, 1, "{invalid:?}: Cache-Control's max-age applies");
        assert_eq!(
            first.header("cdn-cache-control"),
            None,
            "addressed to this cache, so stripped even when invalid"
        );
    }
    // A directive of the wrong type is not used, and the rest of the field still applies.
    let decimal: &'static [_] = &[
        ("cache-control", "max-age=60"),
        ("cdn-cache-control", "max-age=60.0, public"),
    ];
    assert_eq!(
        origin_calls(decimal).await,
        2,
        "no lifetime: 60.0 is no Integer"
    );
}

#[tokio::test]
async fn the_target_list_is_configurable_and_ordered() {
    let headers: &'static [_] = &[
        ("cache-control", "no-store"),
        ("cdn-cache-control", "no-store"),
        ("acme-cache-control", "max-age=60"),
    ];
    // Our own field first: it wins over CDN-Cache-Control, and both are stripped.
    let (calls, first, _) = twice(
        HttpCache::builder().targeted_fields([ACME, CDN]),
        headers,
        Duration::ZERO,
    )
    .await;
    assert_eq!(calls, 1);
    assert_eq!(first.header("acme-cache-control"), None);
    assert_eq!(first.header("cdn-cache-control"), None);
    // CDN-Cache-Control first: its no-store wins.
    let (calls, _, _) = twice(
        HttpCache::builder().targeted_fields([CDN, ACME]),
        headers,
        Duration::ZERO,
    )
    .await;
    assert_eq!(calls, 2);
    // The default list is CDN-Cache-Control alone: a field addressed to another cache is passed on.
    let (calls, first, _) = twice(HttpCache::builder(), headers, Duration::ZERO).await;
    assert_eq!(calls, 2);
    assert_eq!(
        first.header("acme-cache-control").as_deref(),
        Some("max-age=60")
    );
}

#[tokio::test]
async fn stripping_can_be_turned_off() {
    let headers: &'static [_] = &[("cdn-cache-control", "max-age=60")];
    let (calls, first, second) = twice(
        HttpCache::builder().strip_targeted_fields(false),
        headers,
        Duration::ZERO,
    )
    .await;
    assert_eq!(calls, 1);
    for reply in [first, second] {
        assert_eq!(
            reply.header("cdn-cache-control").as_deref(),
            Some("max-age=60")
        );
    }
}

#[tokio::test]
async fn an_entry_read_back_from_redis_is_judged_by_its_target_too() {
    let server = RedisServer::start();
    let connection = server.connection_manager().await;
    let headers: &'static [_] = &[
        ("cache-control", "no-store"),
        ("cdn-cache-control", "max-age=60"),
    ];
    let calls = Calls::default();
    // No memory tier: the second request is answered from the entry decoded from Redis.
    let cache = HttpCache::builder()
        .memory_capacity(0)
        .redis(connection.clone())
        .prefix("targeted:")
        .build()
        .unwrap();
    let address = serve(origin(&calls, headers).layer(CacheLayer::new(cache))).await;
    get(address, "/r/x").await;
    assert!(stored_in_redis(&connection, "targeted:e:{http://test/r/x}").await);
    let second = get(address, "/r/x").await;
    assert!(second.is_hit(), "{}", second.cache_status());
    assert_eq!(second.header("cdn-cache-control"), None);
    assert_eq!(second.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_target_list_naming_cache_control_or_a_field_twice_is_a_configuration_error() {
    let cache_control = HttpCache::builder()
        .targeted_fields([CDN, axum::http::header::CACHE_CONTROL])
        .build()
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        cache_control.contains("targeted_fields") && cache_control.contains("not a targeted field"),
        "{cache_control}"
    );
    let twice = HttpCache::builder()
        .targeted_fields([CDN, ACME, CDN])
        .build()
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(twice.contains("listed twice"), "{twice}");
}
