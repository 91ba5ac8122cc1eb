//! The caching-proxy as a real process: freshness read as RFC 9111 and RFC 9110 say (`Age` by its first value,
//! `Expires` in the obsolete date formats, heuristic freshness when it is turned on).

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_age_of_several_values_counts_by_its_first() {
    // Fresh for an hour and two hours old: stale, so never a hit (read as 0, it would be one).
    let origin = Origin::start(|_| {
        reply(
            200,
            &[("cache-control", "max-age=3600"), ("age", "7200, 0")],
            "old",
        )
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    for _ in 0..2 {
        let reply = get(&proxy, "/old").await;
        assert!(
            !reply.cache_status().contains("; hit"),
            "{}",
            reply.cache_status()
        );
    }
    assert_eq!(origin.calls("GET", "/old"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_in_the_obsolete_formats_with_names_in_any_case_gives_freshness() {
    // `Expires` a minute after `Date`, in lower-case RFC 850 (`thursday, 03-dec-26 16:45:00 gmt`) on one path and
    // lower-case asctime (`thu dec  3 16:45:00 2026`) on the other.
    let origin = Origin::start(|seen| {
        let now = std::time::SystemTime::now();
        let date = httpdate::fmt_http_date(now);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(60));
        let fields: Vec<&str> = later
            .split([' ', ','])
            .filter(|field| !field.is_empty())
            .collect();
        let day = [
            "Monday",
            "Tuesday",
            "Wednesday",
            "Thursday",
            "Friday",
            "Saturday",
            "Sunday",
        ]
        .into_iter()
        .find(|day| day.starts_with(fields[0]))
        .unwrap();
        let (dd, month, year, clock) = (fields[1], fields[2], fields[3], fields[4]);
        let expires = if seen.uri.path() == "/rfc850" {
            format!("{day}, {dd}-{month}-{} {clock} GMT", &year[2..])
        } else {
            format!(
                "{} {month} {:>2} {clock} {year}",
                fields[0],
                dd.trim_start_matches('0')
            )
        }
        .to_lowercase();
        reply(200, &[("date", &date), ("expires", &expires)], "dated")
    })
    .await;
    let proxy = Proxy::start(&origin.url(), &[]).await;
    for path in ["/rfc850", "/asctime"] {
        let first = get(&proxy, path).await;
        assert!(
            first.cache_status().contains("stored"),
            "{path}: {}",
            first.cache_status()
        );
        let second = get(&proxy, path).await;
        assert!(
            second.cache_status().contains("; hit"),
            "{path}: {}",
            second.cache_status()
        );
        assert_eq!(origin.calls("GET", path), 1, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heuristic_freshness_is_off_unless_turned_on_and_then_capped() {
    // Modified ten days ago, no lifetime of its own: a tenth of its age is a day.
    let origin = Origin::start(|_| {
        let now = std::time::SystemTime::now();
        reply(
            200,
            &[
                ("date", &httpdate::fmt_http_date(now)),
                (
                    "last-modified",
                    &httpdate::fmt_http_date(now - Duration::from_secs(10 * 86_400)),
                ),
            ],
            "old news",
        )
    })
    .await;

    let standards = Proxy::start(&origin.url(), &[]).await;
    for _ in 0..2 {
        let reply = get(&standards, "/news").await;
        assert!(
            reply.cache_status().contains("detail=no-freshness"),
            "{}",
            reply.cache_status()
        );
    }
    assert_eq!(origin.calls("GET", "/news"), 2, "off by default");

    let heuristic = Proxy::start(&origin.url(), &["--heuristic-max-secs", "120"]).await;
    let first = get(&heuristic, "/news").await;
    assert!(
        first.cache_status().contains("stored; ttl=120"),
        "a day's heuristic lifetime, capped at 120 s: {}",
        first.cache_status()
    );
    let second = get(&heuristic, "/news").await;
    assert!(
        second.cache_status().contains("hit"),
        "{}",
        second.cache_status()
    );
    assert_eq!(second.text(), "old news");
    assert_eq!(origin.calls("GET", "/news"), 3);
}
