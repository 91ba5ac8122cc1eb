//! Scenarios that must hold on a single node and on a Cluster alike: each test file runs them on its backend.

use std::collections::HashSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{Response, StatusCode};
use axum::routing::get as get_route;
use redis::aio::ConnectionLike;
use tower_breaker::ManualClock;
use tower_redis_cache::{CacheLayer, HttpCache};

use super::{Calls, get, holds_within, send, serve};

/// A Redis connection (one node or a Cluster) that caches are built on.
pub struct Backend<C> {
    pub connection: C,
}

impl<C> Backend<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub fn cache(&self, prefix: &str, memory: bool) -> HttpCache {
        self.cache_with(prefix, memory, ManualClock::new())
    }

    /// A cache whose time moves only with `clock` (entries go stale without sleeping).
    pub fn cache_with(&self, prefix: &str, memory: bool, clock: ManualClock) -> HttpCache {
        let mut builder = HttpCache::builder()
            .redis(self.connection.clone())
            .prefix(prefix)
            .clock(clock);
        if !memory {
            builder = builder.memory_capacity(0);
        }
        builder.build().unwrap()
    }

    async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut connection = self.connection.clone();
        redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut connection)
            .await
            .unwrap()
    }
}

/// `/slow/{n}`: answers after `delay` with `cache_control`, the body naming the call.
pub fn slow_origin(calls: &Calls, delay: Duration, cache_control: &'static str) -> Router {
    let calls = calls.clone();
    Router::new().route(
        "/slow/{n}",
        get_route(move |Path(n): Path<String>| {
            let calls = calls.clone();
            async move {
                let call = calls.bump();
                tokio::time::sleep(delay).await;
                (
                    [("cache-control", cache_control)],
                    format!("{n} call {call}"),
                )
            }
        }),
    )
}

/// 100 concurrent requests for a cold key make exactly one origin call, and all get the same 200.
pub async fn cold_herd<C: ConnectionLike + Clone + Send + Sync + 'static>(backend: &Backend<C>) {
    let calls = Calls::default();
    let cache = backend.cache("herd:", true);
    let address = serve(
        slow_origin(&calls, Duration::from_millis(300), "max-age=60")
            .layer(CacheLayer::new(cache.clone())),
    )
    .await;

    let replies =
        futures_util::future::join_all((0..100).map(|_| get(address, "/slow/cold"))).await;
    assert_eq!(calls.get(), 1);
    let bodies: HashSet<_> = replies.iter().map(|reply| reply.body.clone()).collect();
    assert_eq!(bodies.len(), 1, "identical responses: {bodies:?}");
    assert!(replies.iter().all(|reply| reply.status == StatusCode::OK));
    let misses = replies
        .iter()
        .filter(|reply| reply.cache_status().contains("fwd=uri-miss"))
        .count();
    let hits = replies.iter().filter(|reply| reply.is_hit()).count();
    assert_eq!((misses, hits), (1, 99));
}

/// 100 requests in the stale-while-revalidate window wait on no origin call and trigger exactly one refresh.
pub async fn stale_while_revalidate<C: ConnectionLike + Clone + Send + Sync + 'static>(
    backend: &Backend<C>,
) {
    let calls = Calls::default();
    let clock = ManualClock::new();
    let cache = backend.cache_with("swr:", true, clock.clone());
    let origin = slow_origin(
        &calls,
        Duration::from_millis(500),
        "max-age=1, stale-while-revalidate=30",
    );
    let address = serve(origin.layer(CacheLayer::new(cache.clone()))).await;
    // The first fill takes 500 ms too; then the entry goes stale after 1 s.
    assert_eq!(get(address, "/slow/s").await.body, "s call 1");
    clock.advance(Duration::from_millis(1100)); // max-age=1 has passed

    let replies = futures_util::future::join_all((0..100).map(|_| get(address, "/slow/s"))).await;
    // Any request that had waited for the refresh would have its body ("call 2").
    assert!(
        replies.iter().all(|reply| reply.body == "s call 1"),
        "no request waited on the origin"
    );
    assert!(replies.iter().all(|reply| {
        reply
            .cache_status()
            .contains("detail=stale-while-revalidate")
    }));
    assert!(
        holds_within(Duration::from_secs(5), || async {
            get(address, "/slow/s").await.body == "s call 2"
        })
        .await
    );
    assert_eq!(calls.get(), 2, "exactly one background refresh");
    assert_eq!(cache.stats().background_refreshes, 1);
}

/// Responses a shared cache must not store never reach either tier.
pub async fn never_stored<C: ConnectionLike + Clone + Send + Sync + 'static>(backend: &Backend<C>) {
    let cases: [(
        &'static [(&'static str, &'static str)],
        &[(&str, &str)],
        &str,
    ); 5] = [
        (&[("cache-control", "private, max-age=60")], &[], "private"),
        (
            &[("cache-control", "no-store, max-age=60")],
            &[],
            "no-store",
        ),
        (
            &[("cache-control", "max-age=60")],
            &[("authorization", "Bearer x")],
            "authorization",
        ),
        (
            &[
                ("cache-control", "public, max-age=60"),
                ("set-cookie", "session=1"),
            ],
            &[],
            "set-cookie",
        ),
        (&[], &[], "no-freshness"),
    ];
    for (response_headers, request_headers, reason) in cases {
        let calls = Calls::default();
        let cache = backend.cache("never:", true);
        let counted = calls.clone();
        let origin = Router::new().route(
            "/x",
            get_route(move || {
                let calls = counted.clone();
                async move {
                    calls.bump();
                    let mut response = Response::builder();
                    for (name, value) in response_headers {
                        response = response.header(*name, *value);
                    }
                    response.body(Body::from("secret")).unwrap()
                }
            }),
        );
        let address = serve(origin.layer(CacheLayer::new(cache.clone()))).await;
        let first = send(address, "GET", "/x", request_headers).await;
        assert_eq!(
            first.cache_status(),
            format!("tower-redis-cache; fwd=uri-miss; fwd-status=200; detail={reason}")
        );
        let second = send(address, "GET", "/x", request_headers).await;
        assert!(!second.is_hit(), "{reason}");
        assert_eq!(calls.get(), 2, "{reason}");
        assert_eq!(cache.stats().stores, 0, "{reason}");
    }
    let keys = backend.keys("never:*").await;
    assert!(keys.is_empty(), "nothing reached Redis: {keys:?}");
}

/// Garbage under an entry's key (the wrong type, or bytes that are no entry) is a miss, not an error, and the next
/// store replaces it.
pub async fn garbage_is_a_miss<C: ConnectionLike + Clone + Send + Sync + 'static>(
    backend: &Backend<C>,
) {
    let calls = Calls::default();
    let cache = backend.cache("garbage:", false);
    let address = serve(
        slow_origin(&calls, Duration::ZERO, "max-age=60").layer(CacheLayer::new(cache.clone())),
    )
    .await;
    let redis_key = cache.redis_key("http://test/slow/g").unwrap();
    let mut connection = backend.connection.clone();

    // A string where a hash belongs.
    let _: () = redis::cmd("SET")
        .arg(&redis_key)
        .arg(b"\x00\xffnot an entry")
        .query_async(&mut connection)
        .await
        .unwrap();
    let first = get(address, "/slow/g").await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(first.cache_status().contains("fwd=uri-miss"));
    // Stored over it, as a hash; then the right type but bytes that are no entry.
    assert!(
        holds_within(Duration::from_secs(5), || {
            let mut connection = connection.clone();
            let redis_key = redis_key.clone();
            async move {
                redis::cmd("TYPE")
                    .arg(&redis_key)
                    .query_async::<String>(&mut connection)
                    .await
                    .unwrap()
                    == "hash"
            }
        })
        .await
    );
    let _: () = redis::cmd("HSET")
        .arg(&redis_key)
        .arg("~")
        .arg("TRC\x01garbage")
        .query_async(&mut connection)
        .await
        .unwrap();
    let second = get(address, "/slow/g").await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body, "g call 2");
    assert!(!second.is_hit());
    assert_eq!(cache.stats().undecodable, 1);
    assert_eq!(
        cache.stats().redis_errors,
        0,
        "a bad value is not a Redis failure"
    );
}
