//! The `caching-proxy` example as a real process, between a real HTTP client and a real axum origin on loopback:
//! what it forwards, what it drops, what it caches (standards mode), and how it fails.
//!
//! Cargo builds the binary before this test (`CARGO_BIN_EXE_caching-proxy`).

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::convert::Infallible;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::routing;
use bytes::Bytes;
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis_fixtures::RedisServer;

use support::*;

// ---------------------------------------------------------------------------------------------------------------
// Caching, standards mode
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cacheable_get_is_a_miss_then_a_hit_and_reaches_the_origin_once() {
    let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "hello")).await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    let first = get(&proxy, "/doc?page=1").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.text(), "hello");
    assert_eq!(
        first.cache_status(),
        "caching-proxy; fwd=uri-miss; fwd-status=200; stored; ttl=60"
    );

    let second = get(&proxy, "/doc?page=1").await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.text(), "hello");
    assert!(
        second
            .cache_status()
            .starts_with("caching-proxy; hit; ttl="),
        "{}",
        second.cache_status()
    );
    assert!(second.header("age").is_some(), "a hit carries Age");
    assert_eq!(origin.calls("GET", "/doc"), 1);

    let other_query = get(&proxy, "/doc?page=2").await;
    assert!(
        other_query.cache_status().contains("fwd=uri-miss"),
        "the query is part of the key"
    );
    assert_eq!(origin.calls("GET", "/doc"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_without_freshness_is_not_stored() {
    let origin = Origin::start(|_| {
        // Old enough for heuristic freshness, which standards mode does not apply.
        reply(
            200,
            &[("last-modified", "Mon, 01 Jan 2001 00:00:00 GMT")],
            "no lifetime",
        )
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    for _ in 0..2 {
        let reply = get(&proxy, "/plain").await;
        assert_eq!(reply.text(), "no lifetime");
        assert_eq!(
            reply.cache_status(),
            "caching-proxy; fwd=uri-miss; fwd-status=200; detail=no-freshness"
        );
    }
    assert_eq!(origin.calls("GET", "/plain"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_stale_on_arrival_without_validators_is_not_reported_stored() {
    let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=0")], "zero")).await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    let first = get(&proxy, "/zero").await;
    let second = get(&proxy, "/zero").await;
    assert_eq!(origin.calls("GET", "/zero"), 2, "nothing was stored");
    assert!(
        !first.cache_status().contains("stored"),
        "Cache-Status claims a store that did not happen: {}",
        first.cache_status()
    );
    assert!(second.cache_status().contains("fwd=uri-miss"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_a_shared_cache_must_not_store_reach_the_origin_every_time() {
    let origin = Origin::start(|seen| match seen.uri.path() {
        "/private" => reply(200, &[("cache-control", "private, max-age=60")], "mine"),
        "/no-store" => reply(200, &[("cache-control", "no-store, max-age=60")], "never"),
        "/cookie" => reply(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("set-cookie", "session=abc"),
            ],
            "cookie",
        ),
        _ => reply(200, &[("cache-control", "max-age=60")], "authorized"),
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    for (path, headers, detail) in [
        ("/private", &[][..], "private"),
        ("/no-store", &[][..], "no-store"),
        ("/cookie", &[][..], "set-cookie"),
        (
            "/auth",
            &[("authorization", "Bearer secret")][..],
            "authorization",
        ),
    ] {
        for _ in 0..2 {
            let reply = call(&proxy, "GET", path, headers, "").await;
            assert_eq!(
                reply.cache_status(),
                format!("caching-proxy; fwd=uri-miss; fwd-status=200; detail={detail}"),
                "{path}"
            );
        }
        assert_eq!(origin.calls("GET", path), 2, "{path}");
    }
    let cookie = get(&proxy, "/cookie").await;
    assert_eq!(cookie.header("set-cookie"), Some("session=abc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_cache_response_is_revalidated_with_its_etag_on_every_use() {
    let origin = Origin::start(|seen| {
        let headers = [("cache-control", "no-cache"), ("etag", "\"v1\"")];
        if seen.header("if-none-match") == Some("\"v1\"") {
            reply(304, &headers, "")
        } else {
            reply(200, &headers, "body v1")
        }
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    let first = get(&proxy, "/etag").await;
    assert_eq!(
        first.cache_status(),
        "caching-proxy; fwd=uri-miss; fwd-status=200; stored; ttl=0"
    );

    let second = get(&proxy, "/etag").await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.text(), "body v1");
    assert!(
        second
            .cache_status()
            .starts_with("caching-proxy; fwd=stale; fwd-status=304; stored"),
        "{}",
        second.cache_status()
    );
    assert_eq!(origin.last().header("if-none-match"), Some("\"v1\""));

    let conditional = call(&proxy, "GET", "/etag", &[("if-none-match", "\"v1\"")], "").await;
    assert_eq!(conditional.status, StatusCode::NOT_MODIFIED);
    assert_eq!(conditional.header("etag"), Some("\"v1\""));
    assert_eq!(origin.calls("GET", "/etag"), 3);
}

/// An origin whose 200 is fresh for a second and whose 304 adds `extra` (and 60 s of freshness); what a second
/// client gets after the first client's revalidation.
async fn after_a_revalidation_whose_304_carries(
    extra: (&'static str, &'static str),
) -> (Reply, usize) {
    let origin = Origin::start(move |seen| {
        if seen.header("if-none-match") == Some("\"v1\"") {
            reply(
                304,
                &[("etag", "\"v1\""), ("cache-control", "max-age=60"), extra],
                "",
            )
        } else {
            reply(
                200,
                &[("etag", "\"v1\""), ("cache-control", "max-age=1")],
                "page",
            )
        }
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    assert!(get(&proxy, "/page").await.cache_status().contains("stored"));

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let first_client = get(&proxy, "/page").await;
        if first_client.cache_status().contains("fwd-status=304") {
            break;
        }
        assert!(Instant::now() < deadline, "the entry was never revalidated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second_client = get(&proxy, "/page").await;
    (second_client, origin.calls("GET", "/page"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_cookie_on_a_304_never_reaches_another_client() {
    let (second_client, _) =
        after_a_revalidation_whose_304_carries(("set-cookie", "session=alice")).await;
    // The origin sends its cookie with every 304, so a client whose own request was revalidated gets one from the
    // origin; what must never happen is a cookie served from the cache.
    if second_client.header("set-cookie").is_some() {
        assert!(
            second_client.cache_status().contains("fwd-status=304")
                && !second_client.cache_status().contains("; hit"),
            "the first client's cookie was served from the cache: {}",
            second_client.cache_status()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_that_makes_the_response_private_stops_its_reuse() {
    let (second_client, calls) =
        after_a_revalidation_whose_304_carries(("cache-control", "private")).await;
    assert!(
        !second_client.cache_status().contains("hit"),
        "a private response was served from the shared cache: {}",
        second_client.cache_status()
    );
    assert_eq!(calls, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_keeps_one_variant_per_selecting_header_value() {
    let origin = Origin::start(|seen| {
        let language = seen.header("accept-language").unwrap_or("default");
        reply(
            200,
            &[("cache-control", "max-age=60"), ("vary", "accept-language")],
            language,
        )
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    let english = [("accept-language", "en")];
    let french = [("accept-language", "fr")];

    let first = call(&proxy, "GET", "/greeting", &english, "").await;
    assert!(first.cache_status().contains("fwd=uri-miss"));
    let second = call(&proxy, "GET", "/greeting", &french, "").await;
    assert_eq!(second.text(), "fr");
    assert!(
        second.cache_status().contains("fwd=vary-miss"),
        "{}",
        second.cache_status()
    );
    for (headers, body) in [(&english, "en"), (&french, "fr")] {
        let reply = call(&proxy, "GET", "/greeting", headers, "").await;
        assert_eq!(reply.text(), body);
        assert!(reply.cache_status().starts_with("caching-proxy; hit"));
    }
    assert_eq!(origin.calls("GET", "/greeting"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_named_in_connection_cannot_poison_a_vary_variant() {
    let origin = Origin::start(|seen| {
        let language = seen.header("accept-language").unwrap_or("default");
        reply(
            200,
            &[("cache-control", "max-age=60"), ("vary", "accept-language")],
            language,
        )
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    // The proxy drops Accept-Language on the way (Connection names it), so the origin answers its default.
    let sneaky = call(
        &proxy,
        "GET",
        "/greeting",
        &[("connection", "accept-language"), ("accept-language", "fr")],
        "",
    )
    .await;
    assert_eq!(sneaky.text(), "default");

    let french = call(&proxy, "GET", "/greeting", &[("accept-language", "fr")], "").await;
    assert_eq!(
        french.text(),
        "fr",
        "the default answer was stored as the French variant"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_is_answered_from_the_stored_get() {
    let origin =
        Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "0123456789")).await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    assert_eq!(get(&proxy, "/file").await.text(), "0123456789");
    let head = call(&proxy, "HEAD", "/file", &[], "").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("10"));
    assert!(head.cache_status().starts_with("caching-proxy; hit"));
    assert_eq!(origin.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_within_stale_while_revalidate_is_served_stale_while_one_request_refreshes_it() {
    let version = Arc::new(AtomicUsize::new(0));
    let counter = version.clone();
    let origin = Origin::start(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        // Two seconds, so that the refreshed copy is still fresh when it is checked (Date has 1 s resolution).
        reply(
            200,
            &[("cache-control", "max-age=2, stale-while-revalidate=30")],
            &format!("v{n}"),
        )
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    assert_eq!(get(&proxy, "/feed").await.text(), "v1");

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = get(&proxy, "/feed").await;
        assert_eq!(reply.text(), "v1", "{}", reply.cache_status());
        if reply
            .cache_status()
            .contains("detail=stale-while-revalidate")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the entry never went stale");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The background request lands; from then on the new version is a fresh hit.
    loop {
        let reply = get(&proxy, "/feed").await;
        if reply.text() == "v2" {
            assert!(
                reply.cache_status().starts_with("caching-proxy; hit; ttl="),
                "{}",
                reply.cache_status()
            );
            break;
        }
        assert!(Instant::now() < deadline, "the entry was never refreshed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.calls("GET", "/feed"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_served_stale_reports_a_negative_ttl() {
    let origin = Origin::start(|_| {
        reply(
            200,
            &[("cache-control", "max-age=1, stale-while-revalidate=30")],
            "feed",
        )
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    get(&proxy, "/feed").await;

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = get(&proxy, "/feed").await;
        let status = reply.cache_status();
        if status.contains("detail=stale-while-revalidate") {
            assert!(status.contains("; ttl=-"), "served stale, yet: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "the entry never went stale");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_methods_are_forwarded_with_their_body_and_headers() {
    let origin = Origin::start(|seen| {
        let body = format!("{} {}", seen.method, String::from_utf8_lossy(&seen.body));
        reply(200, &[], &body)
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    for method in ["FOO", "PURGE"] {
        let reply = call(
            &proxy,
            method,
            "/thing?x=1",
            &[("x-custom", "42"), ("content-type", "text/plain")],
            "payload",
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), format!("{method} payload"));
        assert_eq!(reply.cache_status(), "caching-proxy; fwd=method");

        let seen = origin.last();
        assert_eq!(seen.method, method);
        assert_eq!(seen.uri, "/thing?x=1");
        assert_eq!(seen.body, "payload");
        assert_eq!(seen.header("x-custom"), Some("42"));
        assert_eq!(seen.header("content-type"), Some("text/plain"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_forwarded_with_its_body_and_invalidates_the_cached_get() {
    let origin = Origin::start(|seen| {
        if seen.method == Method::GET {
            reply(200, &[("cache-control", "max-age=60")], "document")
        } else {
            reply(201, &[("x-created", "yes")], "created")
        }
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    get(&proxy, "/doc").await;
    assert!(get(&proxy, "/doc").await.cache_status().contains("hit"));

    let posted = call(
        &proxy,
        "POST",
        "/doc",
        &[("content-type", "application/json"), ("x-request-id", "7")],
        r#"{"a":1}"#,
    )
    .await;
    assert_eq!(posted.status, StatusCode::CREATED);
    assert_eq!(posted.text(), "created");
    assert_eq!(posted.header("x-created"), Some("yes"));
    let seen = origin.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.body, r#"{"a":1}"#);
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("x-request-id"), Some("7"));

    let after = get(&proxy, "/doc").await;
    assert!(
        after.cache_status().contains("fwd=uri-miss"),
        "a successful POST invalidates its URL: {}",
        after.cache_status()
    );
    assert_eq!(origin.calls("GET", "/doc"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locations_on_the_upstream_become_relative_and_invalidate_what_they_name() {
    let upstream = Arc::new(OnceLock::<String>::new());
    let own = upstream.clone();
    let origin = Origin::start(move |seen| {
        if seen.method == Method::POST {
            let location = format!("{}/items/1", own.get().unwrap());
            reply(201, &[("location", &location)], "created")
        } else {
            reply(200, &[("cache-control", "max-age=60")], "item")
        }
    })
    .await;
    upstream.set(origin.url()).unwrap();
    let proxy = Proxy::start(&origin.url(), &[]).await;

    assert!(
        get(&proxy, "/items/1")
            .await
            .cache_status()
            .contains("stored")
    );
    let created = call(&proxy, "POST", "/items", &[], "new item").await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.header("location"), Some("/items/1"));

    let after = get(&proxy, "/items/1").await;
    assert!(
        after.cache_status().contains("fwd=uri-miss"),
        "the POST's Location invalidates /items/1: {}",
        after.cache_status()
    );
    assert_eq!(origin.calls("GET", "/items/1"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_never_reach_the_origin() {
    let origin = Origin::start(|_| reply(200, &[], "ok")).await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    let reply = call(
        &proxy,
        "POST",
        "/hop",
        &[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-end-to-end", "kept"),
        ],
        "body",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);

    let seen = origin.last();
    for name in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
    ] {
        assert_eq!(seen.header(name), None, "{name} reached the origin");
    }
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    assert_eq!(seen.body, "body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_request_is_forwarded_without_its_upgrade() {
    let origin = Origin::start(|_| reply(200, &[], "plain http")).await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    let reply = call(
        &proxy,
        "GET",
        "/socket",
        &[("connection", "upgrade"), ("upgrade", "websocket")],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "plain http");
    assert_eq!(origin.last().header("upgrade"), None);
    assert_eq!(origin.last().header("connection"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_never_reach_the_client_on_a_miss_or_a_hit() {
    let origin = Origin::start(|_| {
        reply(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("connection", "x-origin-secret"),
                ("x-origin-secret", "1"),
                ("keep-alive", "timeout=5, max=100"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authenticate", "Basic realm=\"origin\""),
                ("trailer", "x-checksum"),
                ("upgrade", "example/1"),
                ("x-end-to-end", "kept"),
            ],
            "response",
        )
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    for expected in ["fwd=uri-miss", "hit"] {
        let reply = get(&proxy, "/hop").await;
        assert!(
            reply.cache_status().contains(expected),
            "{}",
            reply.cache_status()
        );
        assert_eq!(reply.text(), "response");
        for name in [
            "connection",
            "x-origin-secret",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "trailer",
            "upgrade",
        ] {
            assert_eq!(
                reply.header(name),
                None,
                "{name} reached the client ({expected})"
            );
        }
        assert_eq!(reply.header("x-end-to-end"), Some("kept"));
    }
    assert_eq!(origin.calls("GET", "/hop"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_sees_its_own_host_and_the_forwarding_headers() {
    let origin = Origin::start(|_| reply(200, &[], "ok")).await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    let reply = call(
        &proxy,
        "GET",
        "/path/to?q=1&r=two",
        &[
            ("host", "www.example.test"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
        ],
        "",
    )
    .await;
    assert_eq!(reply.header("via"), Some("1.1 caching-proxy"));

    let seen = origin.last();
    assert_eq!(seen.uri, "/path/to?q=1&r=two");
    assert_eq!(seen.header("host"), Some(origin.addr.to_string().as_str()));
    assert_eq!(seen.header("x-forwarded-host"), Some("www.example.test"));
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("via"), Some("1.1 caching-proxy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_stream_through_unbuffered_even_while_being_stored() {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = Arc::new(Mutex::new(Some(released)));
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = Router::new().route(
        "/stream",
        routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let released = released.lock().unwrap().take();
            async move {
                let (mut sender, body) = Channel::<Bytes, Infallible>::new(1);
                tokio::spawn(async move {
                    sender
                        .send_data(Bytes::from_static(b"first "))
                        .await
                        .unwrap();
                    if let Some(released) = released {
                        let _ = released.await;
                    }
                    sender
                        .send_data(Bytes::from_static(b"second"))
                        .await
                        .unwrap();
                });
                ([("cache-control", "max-age=60")], Body::new(body))
            }
        }),
    );
    let origin = Origin::serve(app, Arc::default()).await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = axum::http::Request::get(proxy.uri("/stream"))
        .body(Full::default())
        .unwrap();
    let response = tokio::time::timeout(REQUEST_DEADLINE, client.request(request))
        .await
        .unwrap()
        .unwrap();
    let mut body = response.into_body();
    let mut received = Vec::new();
    while received.len() < b"first ".len() {
        let frame = tokio::time::timeout(REQUEST_DEADLINE, body.frame())
            .await
            .expect("the first chunk did not arrive while the origin held the rest")
            .unwrap()
            .unwrap();
        received.extend_from_slice(&frame.into_data().unwrap());
    }
    assert_eq!(received, b"first ");

    release.send(()).unwrap();
    let rest = tokio::time::timeout(REQUEST_DEADLINE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "second");

    let again = get(&proxy, "/stream").await;
    assert_eq!(again.text(), "first second");
    assert!(
        again.cache_status().starts_with("caching-proxy; hit"),
        "{}",
        again.cache_status()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_through_unbuffered() {
    let (first_seen, first_arrived) = tokio::sync::oneshot::channel::<Bytes>();
    let first_seen = Arc::new(Mutex::new(Some(first_seen)));
    let app = Router::new().route(
        "/upload",
        routing::post(move |request: Request| {
            let first_seen = first_seen.lock().unwrap().take();
            async move {
                let mut body = request.into_body();
                let mut received = Vec::new();
                let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
                received.extend_from_slice(&first);
                if let Some(first_seen) = first_seen {
                    let _ = first_seen.send(first);
                }
                while let Some(frame) = body.frame().await {
                    received.extend_from_slice(&frame.unwrap().into_data().unwrap());
                }
                Body::from(received)
            }
        }),
    );
    let origin = Origin::serve(app, Arc::default()).await;
    let proxy = Proxy::start(&origin.url(), &[]).await;

    let (mut sender, body) = Channel::<Bytes, Infallible>::new(1);
    let request = axum::http::Request::post(proxy.uri("/upload"))
        .body(body)
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Channel<Bytes, Infallible>>();
    let response = tokio::spawn(async move { client.request(request).await });

    sender
        .send_data(Bytes::from_static(b"first "))
        .await
        .unwrap();
    let first = tokio::time::timeout(REQUEST_DEADLINE, first_arrived)
        .await
        .expect("the origin did not get the first chunk while the client held the rest")
        .unwrap();
    assert_eq!(first, "first ");
    sender
        .send_data(Bytes::from_static(b"second"))
        .await
        .unwrap();
    drop(sender);

    let response = tokio::time::timeout(REQUEST_DEADLINE, response)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, "first second");
}

// ---------------------------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_the_same_redis_answers_from_the_shared_tier() {
    let redis = RedisServer::start();
    let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "shared")).await;
    let url = redis.url();
    let args = ["--redis-url", url.as_str(), "--prefix", "shared:"];
    let first_proxy = Proxy::start(&origin.url(), &args).await;
    let second_proxy = Proxy::start(&origin.url(), &args).await;
    assert!(
        second_proxy.log().contains("shared tier on"),
        "{}",
        second_proxy.log()
    );
    // Both proxies sit behind one public name; the cache key is that name, path and query.
    let host = [("host", "www.example.test")];

    let miss = call(&first_proxy, "GET", "/doc", &host, "").await;
    assert!(
        miss.cache_status().contains("stored"),
        "{}",
        miss.cache_status()
    );
    wait_for_redis_entry(&redis, "shared:").await;

    let hit = call(&second_proxy, "GET", "/doc", &host, "").await;
    assert_eq!(hit.text(), "shared");
    assert!(
        hit.cache_status().starts_with("caching-proxy; hit"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(origin.calls("GET", "/doc"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_leaves_the_proxy_caching_in_memory() {
    let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "memory")).await;
    let redis_url = format!("redis://127.0.0.1:{}", closed_port());
    let proxy = Proxy::start(&origin.url(), &["--redis-url", &redis_url]).await;
    assert!(
        proxy.log().contains("single-instance mode"),
        "{}",
        proxy.log()
    );

    assert!(get(&proxy, "/doc").await.cache_status().contains("stored"));
    let hit = get(&proxy, "/doc").await;
    assert!(
        hit.cache_status().starts_with("caching-proxy; hit"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(origin.calls("GET", "/doc"), 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn bad_arguments_stop_start_up_with_a_message_naming_them() {
    for (args, named) in [
        (&["--upstream", "http://127.0.0.1:1"][..], "--listen"),
        (
            &["--listen", "nowhere", "--upstream", "http://127.0.0.1:1"][..],
            "--listen",
        ),
        (&["--listen", "127.0.0.1:0"][..], "--upstream"),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "https://127.0.0.1:1",
            ][..],
            "--upstream",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:1/api",
            ][..],
            "--upstream",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:1",
                "--redis-url",
                "nope",
            ][..],
            "--redis-url",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:1",
                "--memory-mb",
                "lots",
            ][..],
            "--memory-mb",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:1",
                "--heuristic-max-secs",
                "0",
            ][..],
            "--heuristic-max-secs",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:1",
                "--cache-control-field",
                "not a name",
            ][..],
            "--cache-control-field",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:1",
                "--bogus",
            ][..],
            "--bogus",
        ),
        (&["--listen"][..], "--listen"),
    ] {
        let output = Command::new(proxy_binary())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        let first_line = stderr.lines().next().unwrap_or_default();
        assert!(
            first_line.starts_with(&format!("caching-proxy: {named}")),
            "{args:?}: {stderr}"
        );
    }
}
