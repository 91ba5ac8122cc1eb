//! Range requests (RFC 9110 §14) through the layer on a real axum server: answered from a stored complete 200 as
//! a 206 with `Content-Range` (single, suffix and open-ended ranges), a 416 when unsatisfiable, `If-Range` by
//! strong comparison only, several ranges as the whole 200; on a miss the request goes to the origin as it is, and
//! a 206 from the origin is never stored.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Response, StatusCode};
use axum::routing::get as get_route;
use support::{Calls, get, send, serve};
use test_support::Reply;
use tower_redis_cache::{CacheLayer, HttpCache};

const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz";

fn last_modified() -> String {
    httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

/// `/full` answers the whole alphabet whatever the request's range; `/partial` answers a 206 of its first five
/// letters to a range request (as an origin that serves ranges itself) and the whole alphabet otherwise. Both are
/// fresh for a minute, with a strong ETag and an old Last-Modified.
fn origin(calls: &Calls) -> Router {
    let answer = move |calls: Calls, ranged: bool| async move {
        calls.bump();
        let response = Response::builder()
            .header("cache-control", "max-age=60")
            .header("etag", "\"v1\"")
            .header("last-modified", last_modified())
            .header("date", httpdate::fmt_http_date(SystemTime::now()))
            .header("content-type", "text/plain");
        if ranged {
            response
                .status(206)
                .header("content-range", "bytes 0-4/26")
                .body(Body::from(&ALPHABET[..5]))
                .unwrap()
        } else {
            response.body(Body::from(ALPHABET)).unwrap()
        }
    };
    let (full, partial) = (calls.clone(), calls.clone());
    Router::new()
        .route("/full", get_route(move || answer(full.clone(), false)))
        .route(
            "/partial",
            get_route(move |headers: HeaderMap| {
                answer(partial.clone(), headers.contains_key("range"))
            }),
        )
}

async fn started() -> (SocketAddr, Calls) {
    let calls = Calls::default();
    let cache = HttpCache::builder().build().unwrap();
    let address = serve(origin(&calls).layer(CacheLayer::new(cache))).await;
    (address, calls)
}

async fn ranged(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(address, "GET", path, headers).await
}

fn assert_partial(reply: &Reply, body: &str, content_range: &str) {
    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "{}", reply.body);
    assert_eq!(reply.body, body);
    assert_eq!(
        reply.header("content-range").as_deref(),
        Some(content_range)
    );
    assert_eq!(
        reply.header("content-length").as_deref(),
        Some(body.len().to_string().as_str())
    );
    assert!(reply.is_hit(), "{}", reply.cache_status());
}

fn assert_whole(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, ALPHABET);
    assert_eq!(reply.header("content-range"), None);
}

#[tokio::test]
async fn single_suffix_and_open_ended_ranges_are_206_from_the_stored_200() {
    let (address, calls) = started().await;
    assert_whole(&get(address, "/full").await);
    for (range, body, content_range) in [
        ("bytes=0-4", "abcde", "bytes 0-4/26"),
        ("bytes=-3", "xyz", "bytes 23-25/26"),
        ("bytes=20-", "uvwxyz", "bytes 20-25/26"),
        ("bytes=24-100", "yz", "bytes 24-25/26"),
        ("bytes=-100", ALPHABET, "bytes 0-25/26"),
        // Two ranges that meet are one.
        ("bytes=0-1,2-3", "abcd", "bytes 0-3/26"),
    ] {
        let reply = ranged(address, "/full", &[("range", range)]).await;
        assert_partial(&reply, body, content_range);
    }
    assert_eq!(calls.get(), 1, "every range came from the stored response");
}

#[tokio::test]
async fn an_unsatisfiable_range_is_416_with_the_length() {
    let (address, _) = started().await;
    get(address, "/full").await;
    for range in ["bytes=26-", "bytes=100-200", "bytes=-0"] {
        let reply = ranged(address, "/full", &[("range", range)]).await;
        assert_eq!(reply.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(reply.header("content-range").as_deref(), Some("bytes */26"));
        assert!(reply.body.is_empty());
    }
}

#[tokio::test]
async fn several_ranges_an_invalid_range_and_other_units_get_the_whole_200() {
    let (address, calls) = started().await;
    get(address, "/full").await;
    for range in ["bytes=0-1,5-6", "bytes=5-1", "items=0-1", "bytes=x-"] {
        let reply = ranged(address, "/full", &[("range", range)]).await;
        assert_whole(&reply);
        assert!(reply.is_hit(), "{range}: {}", reply.cache_status());
    }
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn if_range_honours_the_range_only_on_a_strong_match() {
    let (address, _) = started().await;
    get(address, "/full").await;
    let range = ("range", "bytes=0-0");
    let matching = ranged(address, "/full", &[range, ("if-range", "\"v1\"")]).await;
    assert_partial(&matching, "a", "bytes 0-0/26");
    let date = last_modified();
    let by_date = ranged(address, "/full", &[range, ("if-range", &date)]).await;
    assert_partial(&by_date, "a", "bytes 0-0/26");
    for mismatch in [
        "\"v2\"".to_owned(),
        "W/\"v1\"".to_owned(),
        httpdate::fmt_http_date(SystemTime::now()),
    ] {
        assert_whole(&ranged(address, "/full", &[range, ("if-range", &mismatch)]).await);
    }
}

#[tokio::test]
async fn a_head_ignores_the_range() {
    let (address, _) = started().await;
    get(address, "/full").await;
    let reply = send(address, "HEAD", "/full", &[("range", "bytes=0-4")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("content-range"), None);
}

#[tokio::test]
async fn on_a_miss_the_range_goes_to_the_origin_and_its_206_is_never_stored() {
    let (address, calls) = started().await;
    for _ in 0..2 {
        let reply = ranged(address, "/partial", &[("range", "bytes=0-4")]).await;
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(reply.body, "abcde");
        assert!(
            reply.cache_status().contains("fwd-status=206")
                && !reply.cache_status().contains("stored"),
            "{}",
            reply.cache_status()
        );
    }
    assert_eq!(calls.get(), 2, "the 206 was not stored");
    // A whole GET stores the 200, which then answers ranges.
    assert_whole(&get(address, "/partial").await);
    let reply = ranged(address, "/partial", &[("range", "bytes=5-9")]).await;
    assert_partial(&reply, "fghij", "bytes 5-9/26");
    assert_eq!(calls.get(), 3);
    // A plain GET after the 206s is the whole 200, not the partial body.
    assert_whole(&get(address, "/partial").await);
}

#[tokio::test]
async fn a_range_request_on_a_miss_that_the_origin_answers_whole_stores_it() {
    let (address, calls) = started().await;
    let first = ranged(address, "/full", &[("range", "bytes=0-4")]).await;
    assert_whole(&first);
    assert!(
        first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );
    let second = ranged(address, "/full", &[("range", "bytes=0-4")]).await;
    assert_partial(&second, "abcde", "bytes 0-4/26");
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_stored_entry_is_refreshed_whole_for_a_range_request() {
    // `/partial` answers a range request with its own 206: refreshing the entry must ask for the whole response.
    let calls = Calls::default();
    let clock = tower_breaker::ManualClock::new();
    let cache = HttpCache::builder().clock(clock.clone()).build().unwrap();
    let address = serve(origin(&calls).layer(CacheLayer::new(cache.clone()))).await;
    assert_whole(&get(address, "/partial").await);
    cache
        .invalidate_with(
            &["http://test/partial".to_owned()],
            tower_redis_cache::Purge::Soft,
        )
        .await
        .unwrap();
    // A fill sent in the purge's own millisecond is not stored (it may predate the change): let one pass.
    clock.advance(Duration::from_millis(1));
    // Stale now: this range request revalidates, and the whole 200 the origin sends replaces the entry.
    let refreshing = ranged(address, "/partial", &[("range", "bytes=5-9")]).await;
    assert!(
        refreshing.cache_status().contains("fwd=stale"),
        "{}",
        refreshing.cache_status()
    );
    assert_eq!(calls.get(), 2);
    let reply = ranged(address, "/partial", &[("range", "bytes=5-9")]).await;
    assert_partial(&reply, "fghij", "bytes 5-9/26");
    assert_eq!(calls.get(), 2, "answered from the refreshed entry");
}

#[tokio::test]
async fn a_head_with_a_range_on_a_miss_fetches_and_stores_the_whole_response() {
    // `/partial` would answer a forwarded range with its 206; a HEAD has no range, so the GET it becomes has none.
    let (address, calls) = started().await;
    let head = send(address, "HEAD", "/partial", &[("range", "bytes=0-4")]).await;
    assert_eq!(head.status, StatusCode::OK, "{}", head.cache_status());
    assert!(
        head.cache_status().contains("stored"),
        "{}",
        head.cache_status()
    );
    assert_whole(&get(address, "/partial").await);
    assert_eq!(calls.get(), 1);
}
