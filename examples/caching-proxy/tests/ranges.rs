//! The caching-proxy as a real process: range requests answered from the stored 200 (206 with `Content-Range`, 416,
//! `If-Range`, several ranges as the whole 200), and a 206 from the origin passed on but never stored.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use axum::http::StatusCode;
use support::*;

const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz";

async fn alphabet_origin() -> Origin {
    Origin::start(|seen| {
        let headers = [("cache-control", "max-age=60"), ("etag", "\"v1\"")];
        if seen.uri.path() == "/partial" && seen.header("range").is_some() {
            let mut headers = headers.to_vec();
            headers.push(("content-range", "bytes 0-4/26"));
            return reply(206, &headers, &ALPHABET[..5]);
        }
        reply(200, &headers, ALPHABET)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_answered_from_the_stored_response() {
    let origin = alphabet_origin().await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    assert_eq!(get(&proxy, "/doc").await.text(), ALPHABET);

    let part = call(&proxy, "GET", "/doc", &[("range", "bytes=-3")], "").await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.text(), "xyz");
    assert_eq!(part.header("content-range"), Some("bytes 23-25/26"));
    assert_eq!(part.header("content-length"), Some("3"));
    assert!(
        part.cache_status().contains("hit"),
        "{}",
        part.cache_status()
    );

    let beyond = call(&proxy, "GET", "/doc", &[("range", "bytes=30-")], "").await;
    assert_eq!(beyond.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(beyond.header("content-range"), Some("bytes */26"));

    let several = call(&proxy, "GET", "/doc", &[("range", "bytes=0-0,9-9")], "").await;
    assert_eq!(
        (several.status, several.text().as_str()),
        (StatusCode::OK, ALPHABET)
    );

    let changed = call(
        &proxy,
        "GET",
        "/doc",
        &[("range", "bytes=0-0"), ("if-range", "\"v2\"")],
        "",
    )
    .await;
    assert_eq!(
        (changed.status, changed.text().as_str()),
        (StatusCode::OK, ALPHABET)
    );
    let same = call(
        &proxy,
        "GET",
        "/doc",
        &[("range", "bytes=0-0"), ("if-range", "\"v1\"")],
        "",
    )
    .await;
    assert_eq!(
        (same.status, same.text().as_str()),
        (StatusCode::PARTIAL_CONTENT, "a")
    );

    assert_eq!(origin.calls("GET", "/doc"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_206_from_the_origin_is_passed_on_and_never_stored() {
    let origin = alphabet_origin().await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    for _ in 0..2 {
        let part = call(&proxy, "GET", "/partial", &[("range", "bytes=0-4")], "").await;
        assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(part.text(), "abcde");
        assert!(
            !part.cache_status().contains("stored"),
            "{}",
            part.cache_status()
        );
    }
    assert_eq!(origin.calls("GET", "/partial"), 2);
    let whole = get(&proxy, "/partial").await;
    assert_eq!(
        (whole.status, whole.text().as_str()),
        (StatusCode::OK, ALPHABET)
    );
}
