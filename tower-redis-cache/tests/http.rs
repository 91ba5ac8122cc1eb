//! HTTP caching semantics through a real axum server on loopback, with a real redis-server as the shared tier.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get as get_route;
use redis_fixtures::RedisServer;
use support::scenarios::{self, Backend};
use support::{Calls, get, holds_within, origin, send, serve, stored_in_redis};
use tower_breaker::ManualClock;
use tower_redis_cache::{CacheLayer, HttpCache};

async fn redis_cache(server: &RedisServer) -> HttpCache {
    redis_cache_with(server, ManualClock::new()).await
}

/// A cache whose time moves only with `clock` (entries go stale without sleeping).
async fn redis_cache_with(server: &RedisServer, clock: ManualClock) -> HttpCache {
    HttpCache::builder()
        .redis(server.connection_manager().await)
        .prefix("http-test:")
        .clock(clock)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_fresh_response_is_stored_then_served_from_memory_and_from_redis_with_every_header() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let headers: &'static [_] = &[
        ("cache-control", "max-age=60"),
        ("x-multi", "one"),
        ("x-multi", "two"),
        ("content-type", "text/plain"),
    ];
    let cache = redis_cache(&server).await;
    let address = serve(origin(&calls, headers).layer(CacheLayer::new(cache.clone()))).await;

    let first = get(address, "/r/a").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, "a call 1");
    assert_eq!(
        first.cache_status(),
        "tower-redis-cache; fwd=uri-miss; fwd-status=200; stored; ttl=60"
    );

    let second = get(address, "/r/a").await;
    assert_eq!(second.body, "a call 1");
    assert!(
        second
            .cache_status()
            .starts_with("tower-redis-cache; hit; ttl="),
        "{}",
        second.cache_status()
    );
    assert!(second.headers.contains_key("age"));
    assert_eq!(cache.stats().memory_hits, 1);
    let connection = server.connection_manager().await;
    assert!(stored_in_redis(&connection, &cache.redis_key("http://test/r/a").unwrap()).await);

    // Another instance with an empty memory tier finds it in Redis, every header line intact.
    let elsewhere = redis_cache(&server).await;
    let address = serve(origin(&calls, headers).layer(CacheLayer::new(elsewhere.clone()))).await;
    let from_redis = get(address, "/r/a").await;
    assert_eq!(from_redis.body, "a call 1");
    assert!(from_redis.is_hit());
    let multi: Vec<_> = from_redis.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two"]);
    assert_eq!(
        from_redis.header("content-type").as_deref(),
        Some("text/plain")
    );
    assert_eq!(elsewhere.stats().redis_hits, 1);
    assert_eq!(calls.get(), 1);
    assert!(server.keys_without_ttl().is_empty(), "every key has a TTL");
}

#[tokio::test]
async fn the_query_is_part_of_the_key_and_head_is_answered_from_the_stored_get() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let cache = redis_cache(&server).await;
    let address = serve(
        origin(&calls, &[("cache-control", "max-age=60")]).layer(CacheLayer::new(cache.clone())),
    )
    .await;

    assert_eq!(get(address, "/r/q?page=1").await.body, "q call 1");
    assert_eq!(get(address, "/r/q?page=2").await.body, "q call 2");
    assert_eq!(get(address, "/r/q?page=1").await.body, "q call 1");
    let head = send(address, "HEAD", "/r/q?page=2", &[]).await;
    assert!(head.is_hit());
    assert_eq!(head.body, "");
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn private_no_store_authorization_and_set_cookie_responses_are_never_stored() {
    let server = RedisServer::start();
    scenarios::never_stored(&Backend {
        connection: server.connection_manager().await,
    })
    .await;
}

#[tokio::test]
async fn garbage_under_an_entry_key_is_a_miss_and_is_replaced() {
    let server = RedisServer::start();
    scenarios::garbage_is_a_miss(&Backend {
        connection: server.connection_manager().await,
    })
    .await;
}

#[tokio::test]
async fn vary_keeps_one_variant_per_selecting_header_value() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let app = |calls: Calls| {
        Router::new().route(
            "/greeting",
            get_route(move |headers: HeaderMap| {
                let calls = calls.clone();
                async move {
                    calls.bump();
                    let language = headers
                        .get("accept-language")
                        .map_or("none", |value| value.to_str().unwrap())
                        .to_owned();
                    (
                        [("cache-control", "max-age=60"), ("vary", "Accept-Language")],
                        format!("hello in {language}"),
                    )
                }
            }),
        )
    };
    let cache = redis_cache(&server).await;
    let address = serve(app(calls.clone()).layer(CacheLayer::new(cache.clone()))).await;
    for language in ["en", "fr", "en", "fr"] {
        let reply = send(
            address,
            "GET",
            "/greeting",
            &[("accept-language", language)],
        )
        .await;
        assert_eq!(reply.body, format!("hello in {language}"));
    }
    let none = get(address, "/greeting").await;
    assert_eq!(none.body, "hello in none");
    assert!(none.cache_status().contains("fwd=vary-miss"));
    assert_eq!(calls.get(), 3);

    let elsewhere = redis_cache(&server).await;
    let address = serve(app(calls.clone()).layer(CacheLayer::new(elsewhere.clone()))).await;
    for language in ["fr", "en"] {
        let reply = send(
            address,
            "GET",
            "/greeting",
            &[("accept-language", language)],
        )
        .await;
        assert!(reply.is_hit(), "{language}: {}", reply.cache_status());
        assert_eq!(reply.body, format!("hello in {language}"));
    }
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn a_stale_entry_is_revalidated_and_a_304_updates_its_headers() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let origin_calls = calls.clone();
    let app = Router::new().route(
        "/doc",
        get_route(move |headers: HeaderMap| {
            let calls = origin_calls.clone();
            async move {
                let call = calls.bump();
                let revision = format!("{call}");
                if headers
                    .get("if-none-match")
                    .is_some_and(|tag| tag == "\"v1\"")
                {
                    return Response::builder()
                        .status(304)
                        .header("etag", "\"v1\"")
                        .header("cache-control", "max-age=1")
                        .header("x-revision", revision)
                        .body(Body::empty())
                        .unwrap();
                }
                Response::builder()
                    .header("etag", "\"v1\"")
                    .header("cache-control", "max-age=1")
                    .header("x-revision", revision)
                    .body(Body::from("document"))
                    .unwrap()
            }
        }),
    );
    let clock = ManualClock::new();
    let cache = redis_cache_with(&server, clock.clone()).await;
    let address = serve(app.layer(CacheLayer::new(cache.clone()))).await;
    assert_eq!(
        get(address, "/doc").await.header("x-revision").as_deref(),
        Some("1")
    );

    // The client's own validator is answered by the cache.
    let conditional = send(address, "GET", "/doc", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(conditional.status, StatusCode::NOT_MODIFIED);
    assert!(conditional.is_hit());
    assert_eq!(calls.get(), 1);

    clock.advance(Duration::from_millis(1100)); // max-age=1 has passed
    let revalidated = get(address, "/doc").await;
    assert_eq!(revalidated.status, StatusCode::OK);
    assert_eq!(revalidated.body, "document");
    assert_eq!(
        revalidated.header("x-revision").as_deref(),
        Some("2"),
        "the 304's headers replace the stored ones"
    );
    assert!(
        revalidated
            .cache_status()
            .contains("fwd=stale; fwd-status=304; stored"),
        "{}",
        revalidated.cache_status()
    );
    let after = get(address, "/doc").await;
    assert!(after.is_hit());
    assert_eq!(after.header("x-revision").as_deref(), Some("2"));
    assert_eq!(calls.get(), 2);
    assert_eq!(cache.stats().not_modified, 1);
}

#[tokio::test]
async fn request_directives_no_cache_max_age_and_only_if_cached_are_honoured() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let cache = redis_cache(&server).await;
    let address = serve(
        origin(&calls, &[("cache-control", "max-age=60")]).layer(CacheLayer::new(cache.clone())),
    )
    .await;

    let miss = send(
        address,
        "GET",
        "/r/d",
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(miss.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(calls.get(), 0);
    get(address, "/r/d").await;
    assert!(
        send(
            address,
            "GET",
            "/r/d",
            &[("cache-control", "only-if-cached")]
        )
        .await
        .is_hit()
    );
    let forced = send(address, "GET", "/r/d", &[("cache-control", "no-cache")]).await;
    assert!(
        forced.cache_status().contains("fwd=request"),
        "{}",
        forced.cache_status()
    );
    assert_eq!(forced.body, "d call 2");
    let pragma = send(address, "GET", "/r/d", &[("pragma", "no-cache")]).await;
    assert_eq!(pragma.body, "d call 3");
    let young = send(
        address,
        "GET",
        "/r/d",
        &[("cache-control", "max-age=0, foo=\"bar\"")],
    )
    .await;
    assert!(young.cache_status().contains("fwd=request"));
    assert!(
        send(
            address,
            "GET",
            "/r/d",
            &[("cache-control", "unknown-directive")]
        )
        .await
        .is_hit()
    );
    assert_eq!(calls.get(), 4);
}

#[tokio::test]
async fn stale_if_error_serves_the_stale_entry_when_the_origin_fails() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let origin_calls = calls.clone();
    let app = Router::new().route(
        "/flaky",
        get_route(move || {
            let calls = origin_calls.clone();
            async move {
                if calls.bump() == 1 {
                    ([("cache-control", "max-age=1, stale-if-error=60")], "good").into_response()
                } else {
                    (StatusCode::INTERNAL_SERVER_ERROR, "broken").into_response()
                }
            }
        }),
    );
    let clock = ManualClock::new();
    let cache = redis_cache_with(&server, clock.clone()).await;
    let address = serve(app.layer(CacheLayer::new(cache.clone()))).await;
    assert_eq!(get(address, "/flaky").await.body, "good");
    clock.advance(Duration::from_millis(1100)); // max-age=1 has passed
    let stale = get(address, "/flaky").await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.body, "good");
    assert!(
        stale.cache_status().contains("detail=stale-if-error"),
        "{}",
        stale.cache_status()
    );
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn a_successful_unsafe_method_invalidates_its_url_and_its_location() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let cache = redis_cache(&server).await;
    let app = origin(&calls, &[("cache-control", "max-age=60")])
        .route(
            "/r/{n}/edit",
            axum::routing::post(|| async { (StatusCode::SEE_OTHER, [("location", "/r/b")], "") }),
        )
        .route(
            "/r/{n}/fail",
            axum::routing::post(|| async { StatusCode::BAD_REQUEST }),
        );
    let address = serve(app.layer(CacheLayer::new(cache.clone()))).await;

    get(address, "/r/a").await;
    get(address, "/r/b").await;
    assert!(get(address, "/r/a").await.is_hit());
    // A failed write invalidates nothing.
    send(address, "POST", "/r/a/fail", &[]).await;
    assert!(get(address, "/r/a").await.is_hit());
    // DELETE on the URL itself.
    let deleted = send(address, "DELETE", "/r/a", &[]).await;
    assert!(deleted.cache_status().contains("fwd=method"));
    // 405 from axum: not a success, so nothing is invalidated.
    assert!(get(address, "/r/a").await.is_hit());

    let edit = send(address, "POST", "/r/b/edit", &[]).await;
    assert_eq!(edit.status, StatusCode::SEE_OTHER);
    let b = get(address, "/r/b").await;
    assert!(
        !b.is_hit(),
        "the Location of a successful POST is invalidated"
    );
    assert_eq!(b.body, "b call 3");
}

#[tokio::test]
async fn an_unsafe_method_the_origin_accepts_invalidates_in_redis_for_every_instance() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let app = |calls: &Calls| {
        origin(calls, &[("cache-control", "max-age=60")])
            .route("/r/{n}", axum::routing::put(|| async { "ok" }))
    };
    let first = redis_cache(&server).await;
    let second = redis_cache(&server).await;
    let a = serve(app(&calls).layer(CacheLayer::new(first.clone()))).await;
    let b = serve(app(&calls).layer(CacheLayer::new(second.clone()).coalesce(false))).await;
    get(a, "/r/u").await;
    // The write to Redis happens in the background once the body has streamed: wait for it.
    let redis_key = first.redis_key("http://test/r/u").unwrap();
    let connection = server.connection_manager().await;
    assert!(stored_in_redis(&connection, &redis_key).await);
    send(b, "PUT", "/r/u", &[]).await;
    let again = get(a, "/r/u").await;
    // The first instance still has it in memory (no subscription here), but Redis lost it:
    assert!(again.is_hit());
    let third = redis_cache(&server).await;
    let c = serve(app(&calls).layer(CacheLayer::new(third.clone()))).await;
    assert!(!get(c, "/r/u").await.is_hit());
}

#[tokio::test]
async fn invalidation_by_key_prefix_and_tag_reaches_every_subscribed_instance() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let headers: &'static [_] = &[
        ("cache-control", "max-age=60"),
        ("surrogate-key", "users user-1"),
    ];
    let build = || async {
        HttpCache::builder()
            .redis(server.connection_manager().await)
            .subscribe(server.client())
            .prefix("inv:")
            .build()
            .unwrap()
    };
    let one = build().await;
    let two = build().await;
    let a = serve(origin(&calls, headers).layer(CacheLayer::new(one.clone()))).await;
    let b = serve(origin(&calls, headers).layer(CacheLayer::new(two.clone()))).await;
    support::subscribed(&[&one, &two]).await;

    for path in ["/r/1", "/r/2", "/r/3"] {
        get(a, path).await;
        assert!(
            holds_within(Duration::from_secs(5), || async {
                get(b, path).await.is_hit()
            })
            .await,
            "b finds a's entry in Redis"
        );
    }
    let deleted = one
        .invalidate(&["http://test/r/1".to_owned()])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert!(
        holds_within(Duration::from_secs(5), || async {
            !get(b, "/r/1").await.is_hit()
        })
        .await
    );

    // Filled again by b's miss; wait for its background write to reach Redis.
    assert!(
        holds_within(Duration::from_secs(5), || async {
            get(a, "/r/1").await.is_hit()
        })
        .await
    );
    // Each check below is a miss that fills the entry again, so each instance is checked on its own path.
    let removed = two.invalidate_prefix("http://test/r/").await.unwrap();
    assert!(removed >= 2, "removed {removed}");
    assert!(
        !get(b, "/r/2").await.is_hit(),
        "the invalidating instance misses at once"
    );
    assert!(
        holds_within(Duration::from_secs(5), || async {
            !get(a, "/r/3").await.is_hit()
        })
        .await
    );

    // A tag taken from Surrogate-Key removes everything stored with it.
    for (address, path) in [(a, "/r/3"), (b, "/r/2")] {
        assert!(
            holds_within(Duration::from_secs(5), || async {
                get(address, path).await.is_hit()
            })
            .await
        );
    }
    let tagged = one.invalidate_tag("user-1").await.unwrap();
    assert!(tagged >= 1, "tagged {tagged}");
    assert!(!get(a, "/r/3").await.is_hit());
    assert!(
        holds_within(Duration::from_secs(5), || async {
            !get(b, "/r/2").await.is_hit()
        })
        .await
    );
    assert!(server.keys_without_ttl().is_empty());
}

#[tokio::test]
async fn tags_work_without_redis() {
    let calls = Calls::default();
    let cache = HttpCache::builder().build().unwrap();
    let headers: &'static [_] = &[
        ("cache-control", "max-age=60"),
        ("surrogate-key", "user:1 orders"),
    ];
    let address = serve(origin(&calls, headers).layer(CacheLayer::new(cache.clone()))).await;
    get(address, "/r/1").await;
    get(address, "/r/2").await;
    assert!(get(address, "/r/1").await.is_hit());
    assert_eq!(cache.invalidate_tag("user:1").await.unwrap(), 2);
    assert!(!get(address, "/r/1").await.is_hit());
    assert!(!get(address, "/r/2").await.is_hit());
    assert_eq!(cache.invalidate_tag("nobody").await.unwrap(), 0);
}

/// A response's Redis write is queued in the background; an invalidation made before that task has even run must
/// not be undone by it (the gateway's "rename a user, then read their order" found this under load). On a
/// current-thread runtime nothing else runs until the test awaits Redis, so the write is still queued when
/// `invalidate` starts.
#[tokio::test(flavor = "current_thread")]
async fn an_invalidation_waits_for_the_writes_queued_before_it() {
    use tower::ServiceExt;
    let server = RedisServer::start();
    let connection = server.connection_manager().await;
    let calls = Calls::default();
    let headers: &'static [_] = &[("cache-control", "max-age=60"), ("surrogate-key", "user-7")];
    let cache = HttpCache::builder()
        .redis(connection.clone())
        .prefix("settle:")
        .build()
        .unwrap();
    let app = origin(&calls, headers).layer(CacheLayer::new(cache.clone()));
    for round in 0..20 {
        let path = format!("/r/{round}");
        let request = axum::http::Request::builder()
            .uri(&path)
            .header("host", "test")
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        assert!(body.starts_with(format!("{round} call").as_bytes()));
        // By key on even rounds, by tag on odd ones.
        let key = format!("http://test{path}");
        if round % 2 == 0 {
            cache.invalidate(std::slice::from_ref(&key)).await.unwrap();
        } else {
            cache.invalidate_tag("user-7").await.unwrap();
        }
        // A window for a queued write to land late (none may): then the entry must not be in Redis.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut check = connection.clone();
        let exists: u64 = redis::cmd("EXISTS")
            .arg(cache.redis_key(&key).unwrap())
            .query_async(&mut check)
            .await
            .unwrap();
        assert_eq!(
            exists, 0,
            "round {round}: the queued write landed after the invalidation"
        );
    }
}

/// A request that reaches the origin before a write and answers after the write's invalidation carries the old
/// data: it is served to its own client, but stored in neither tier, so the next request sees the new data (this
/// race made the demo's gateway serve orders with a renamed user's old name until their TTL ran out).
#[tokio::test]
async fn a_fill_sent_before_an_invalidation_is_not_stored_after_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let server = RedisServer::start();
    let connection = server.connection_manager().await;
    for (round, by_tag) in [(0, false), (1, true)] {
        let cache = HttpCache::builder()
            .redis(connection.clone())
            .prefix(format!("race-{round}:"))
            .build()
            .unwrap();
        let version = Arc::new(AtomicUsize::new(1));
        let reads = Arc::new(AtomicUsize::new(0));
        let origin = {
            let (version, reads) = (version.clone(), reads.clone());
            Router::new().route(
                "/u/7",
                get_route(move || {
                    let (version, reads) = (version.clone(), reads.clone());
                    async move {
                        // Reads the record, then takes a while to answer.
                        let read = version.load(Ordering::SeqCst);
                        reads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Response::builder()
                            .header("cache-control", "max-age=60")
                            .header("surrogate-key", "user-7")
                            .body(Body::from(format!("v{read}")))
                            .unwrap()
                    }
                }),
            )
        };
        let address = serve(origin.layer(CacheLayer::new(cache.clone()))).await;
        let slow = tokio::spawn(async move { get(address, "/u/7").await });
        support::wait_for(
            "the read reaches the origin",
            Duration::from_secs(5),
            || reads.load(Ordering::SeqCst) == 1,
        )
        .await;
        // The write, and its invalidation, while the read is still at the origin.
        version.store(2, Ordering::SeqCst);
        if by_tag {
            cache.invalidate_tag("user-7").await.unwrap();
        } else {
            cache
                .invalidate(&["http://test/u/7".to_owned()])
                .await
                .unwrap();
        }
        assert_eq!(
            slow.await.unwrap().body,
            "v1",
            "its own client gets what it asked for"
        );
        let next = get(address, "/u/7").await;
        assert_eq!(next.body, "v2", "by tag: {by_tag}: {}", next.cache_status());
        assert!(!next.is_hit());
        // And the new data is stored as usual.
        let stored = holds_within(Duration::from_secs(5), || async {
            get(address, "/u/7").await.is_hit()
        })
        .await;
        assert!(stored);
        assert_eq!(get(address, "/u/7").await.body, "v2");
    }
}
