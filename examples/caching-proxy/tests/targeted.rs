//! The caching-proxy as a real process: targeted cache control (RFC 9213). `CDN-Cache-Control`, or the fields given
//! with `--cache-control-field` in order, replaces `Cache-Control` for the proxy, an invalid one is ignored, and the
//! targets are removed from what the client gets unless `--keep-targeted-fields`.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdn_cache_control_stores_what_cache_control_forbids_and_is_removed() {
    let origin = Origin::start(|_| {
        reply(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=60"),
            ],
            "for the CDN",
        )
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    let first = get(&proxy, "/t").await;
    let second = get(&proxy, "/t").await;
    assert!(
        first.cache_status().contains("stored; ttl=60"),
        "{}",
        first.cache_status()
    );
    assert!(
        second.cache_status().contains("hit"),
        "{}",
        second.cache_status()
    );
    assert_eq!(origin.calls("GET", "/t"), 1);
    for reply in [&first, &second] {
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        assert_eq!(reply.header("cdn-cache-control"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_can_forbid_storage_and_an_invalid_one_is_ignored() {
    let origin = Origin::start(|seen| {
        let target = if seen.uri.path() == "/forbidden" {
            "no-store"
        } else {
            "no-store, max-age=1.5.5"
        };
        reply(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", target),
            ],
            "body",
        )
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    for _ in 0..2 {
        get(&proxy, "/forbidden").await;
        get(&proxy, "/invalid").await;
    }
    assert_eq!(
        origin.calls("GET", "/forbidden"),
        2,
        "the target's no-store"
    );
    assert_eq!(
        origin.calls("GET", "/invalid"),
        1,
        "an invalid target is ignored, and Cache-Control's max-age applies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_fields_come_first_and_can_be_kept() {
    let origin = Origin::start(|_| {
        reply(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "no-store"),
                ("acme-cache-control", "max-age=60"),
            ],
            "for acme",
        )
    })
    .await;
    let acme_first = Proxy::start(
        &origin.url(),
        &[
            "--cache-control-field",
            "Acme-Cache-Control",
            "--cache-control-field",
            "CDN-Cache-Control",
        ],
    )
    .await;
    let first = get(&acme_first, "/a").await;
    let second = get(&acme_first, "/a").await;
    assert!(
        second.cache_status().contains("hit"),
        "{}",
        second.cache_status()
    );
    assert_eq!(first.header("acme-cache-control"), None);
    assert_eq!(first.header("cdn-cache-control"), None);
    assert_eq!(origin.calls("GET", "/a"), 1);

    // The default list is CDN-Cache-Control alone; kept, it reaches the client.
    let default = Proxy::start(&origin.url(), &["--keep-targeted-fields"]).await;
    let kept = get(&default, "/b").await;
    get(&default, "/b").await;
    assert_eq!(origin.calls("GET", "/b"), 2, "CDN-Cache-Control's no-store");
    assert_eq!(kept.header("cdn-cache-control"), Some("no-store"));
    assert_eq!(kept.header("acme-cache-control"), Some("max-age=60"));
}
