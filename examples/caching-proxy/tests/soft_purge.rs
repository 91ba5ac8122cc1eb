//! The caching-proxy as real processes, two on one real Redis: `PURGE` (with `--allow-purge`, from loopback) with
//! `Soft-Purge: 1` marks the URL stale on both instances instead of deleting it, and the next request revalidates;
//! without it the purge deletes.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::time::{Duration, Instant};

use redis_fixtures::RedisServer;
use support::*;

/// A fresh hit: `hit`, a positive ttl, and no detail (a stale answer says why it was served).
fn fresh_hit(reply: &Reply) -> bool {
    let status = reply.cache_status();
    status.contains("; hit") && !status.contains("ttl=-") && !status.contains("detail=")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_purge_marks_the_url_stale_on_every_instance_and_the_next_request_revalidates() {
    let redis = RedisServer::start();
    let origin = Origin::start(|seen| {
        let _ = seen;
        reply(
            200,
            &[("cache-control", "max-age=600"), ("etag", "\"v1\"")],
            "report",
        )
    })
    .await;
    let shared = [
        "--redis-url",
        &redis.url(),
        "--prefix",
        "soft:",
        "--allow-purge",
    ];
    let a = Proxy::start(&origin.url(), &shared).await;
    let b = Proxy::start(&origin.url(), &shared).await;

    // One Host for both proxies, so both have the same cache key.
    let host = ("host", "www.example.test");
    let hosted = [host];
    let get = |proxy, path| call(proxy, "GET", path, &hosted, "");
    get(&a, "/report").await;
    wait_for_redis_entry(&redis, "soft:").await;
    let from_redis = get(&b, "/report").await;
    assert!(
        from_redis.cache_status().contains("hit"),
        "{}\n{}",
        from_redis.cache_status(),
        b.log()
    );
    assert!(fresh_hit(&get(&b, "/report").await), "B holds it in memory");
    assert_eq!(origin.calls("GET", "/report"), 1);

    let purged = call(&a, "PURGE", "/report", &[host, ("soft-purge", "1")], "").await;
    assert!(
        purged.cache_status().ends_with("detail=soft-purged"),
        "{}",
        purged.cache_status()
    );

    // Only from the cache (only-if-cached), accepting staleness (max-stale): stale, not fresh, on both.
    let peek = [host, ("cache-control", "only-if-cached, max-stale")];
    let on_a = call(&a, "GET", "/report", &peek, "").await;
    assert!(
        !fresh_hit(&on_a) && on_a.text() == "report",
        "{}",
        on_a.cache_status()
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let on_b = call(&b, "GET", "/report", &peek, "").await;
        if on_b.cache_status().ends_with("detail=max-stale") {
            assert_eq!(on_b.text(), "report", "kept, not deleted");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B still fresh 2 s after the purge: {}",
            on_b.cache_status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.calls("GET", "/report"), 1);

    // A plain request revalidates with the stored ETag.
    let next = get(&b, "/report").await;
    assert!(
        next.cache_status().contains("fwd=stale"),
        "{}",
        next.cache_status()
    );
    assert_eq!(origin.calls("GET", "/report"), 2);
    assert_eq!(origin.last().header("if-none-match"), Some("\"v1\""));

    // A hard purge deletes: a miss, not a revalidation.
    let hard = call(&a, "PURGE", "/report", &[host], "").await;
    assert!(
        hard.cache_status().ends_with("detail=purged"),
        "{}",
        hard.cache_status()
    );
    let after = get(&a, "/report").await;
    assert!(
        after.cache_status().contains("fwd=uri-miss"),
        "{}",
        after.cache_status()
    );
}
