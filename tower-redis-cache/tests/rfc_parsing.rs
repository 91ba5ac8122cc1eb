//! Header parsing as RFC 9110 and RFC 9111 ask, through the layer on a real axum server: `Age` with several values
//! or lines counts by its first, and `Expires` in the obsolete RFC 850 and asctime formats is read, with day and month
//! names in any case; heuristic freshness from `Last-Modified` applies only when turned on, only to the status codes
//! RFC 9110 §15.1 calls heuristically cacheable, and within its cap.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::http::Response;
use axum::routing::get as get_route;
use support::{Calls, get, serve};
use tower_breaker::ManualClock;
use tower_redis_cache::{CacheLayer, HttpCache};

/// An origin at `/` whose every response carries the headers `headers()` gives then, counting its calls.
fn origin(calls: &Calls, headers: fn() -> Vec<(&'static str, String)>) -> Router {
    let calls = calls.clone();
    Router::new().route(
        "/",
        get_route(move || {
            let calls = calls.clone();
            async move {
                let call = calls.bump();
                let mut response = Response::builder();
                for (name, value) in headers() {
                    response = response.header(name, value);
                }
                response.body(Body::from(format!("call {call}"))).unwrap()
            }
        }),
    )
}

/// How many of two requests in a row reached the origin.
async fn origin_calls(headers: fn() -> Vec<(&'static str, String)>) -> usize {
    let calls = Calls::default();
    let cache = HttpCache::builder().build().unwrap();
    let address = serve(origin(&calls, headers).layer(CacheLayer::new(cache))).await;
    get(address, "/").await;
    get(address, "/").await;
    calls.get()
}

/// `time` as an IMF-fixdate, and its parts: full day name, two-digit day, month, year, clock.
fn parts(time: SystemTime) -> (String, String, String, String, String, String) {
    let imf = httpdate::fmt_http_date(time); // "Thu, 03 Dec 2026 16:45:00 GMT"
    let fields: Vec<&str> = imf
        .split([' ', ','])
        .filter(|field| !field.is_empty())
        .collect();
    let day = match fields[0] {
        "Mon" => "Monday",
        "Tue" => "Tuesday",
        "Wed" => "Wednesday",
        "Thu" => "Thursday",
        "Fri" => "Friday",
        "Sat" => "Saturday",
        _ => "Sunday",
    };
    (
        imf.clone(),
        day.to_owned(),
        fields[1].to_owned(),
        fields[2].to_owned(),
        fields[3].to_owned(),
        fields[4].to_owned(),
    )
}

fn in_a_minute() -> SystemTime {
    SystemTime::now() + Duration::from_secs(60)
}

#[tokio::test]
async fn an_age_of_several_values_counts_by_the_first_so_7200_then_0_is_stale() {
    // Fresh for an hour, but already two hours old: `Age: 7200, 0` is 7200, not an unreadable value taken for 0.
    let two_values = || {
        vec![
            ("cache-control", "max-age=3600".to_owned()),
            ("age", "7200, 0".to_owned()),
        ]
    };
    assert_eq!(origin_calls(two_values).await, 2);
    let two_lines = || {
        vec![
            ("cache-control", "max-age=3600".to_owned()),
            ("age", "7200".to_owned()),
            ("age", "0".to_owned()),
        ]
    };
    assert_eq!(origin_calls(two_lines).await, 2);
    // The control: an age inside the lifetime is a hit.
    let young = || {
        vec![
            ("cache-control", "max-age=3600".to_owned()),
            ("age", "10, 7200".to_owned()),
        ]
    };
    assert_eq!(origin_calls(young).await, 1);
}

#[tokio::test]
async fn expires_in_the_rfc_850_format_with_names_in_any_case_gives_freshness() {
    let rfc_850 = || {
        let (date, _, _, _, _, _) = parts(SystemTime::now());
        let (_, day, dd, month, year, clock) = parts(in_a_minute());
        let expires = format!("{day}, {dd}-{month}-{} {clock} GMT", &year[2..]).to_lowercase();
        vec![("date", date), ("expires", expires)]
    };
    assert_eq!(origin_calls(rfc_850).await, 1);
}

#[tokio::test]
async fn expires_in_the_asctime_format_with_names_in_any_case_gives_freshness() {
    let asctime = || {
        let (date, _, _, _, _, _) = parts(SystemTime::now());
        let (_, day, dd, month, year, clock) = parts(in_a_minute());
        let dd = dd.trim_start_matches('0');
        let expires = format!(
            "{} {} {dd:>2} {clock} {year}",
            &day[..3],
            month.to_uppercase()
        );
        vec![("date", date), ("expires", expires.to_lowercase())]
    };
    assert_eq!(origin_calls(asctime).await, 1);
}

#[tokio::test]
async fn an_expires_that_is_no_date_is_stale() {
    let garbage = || vec![("expires", "next tuesday".to_owned())];
    assert_eq!(origin_calls(garbage).await, 2);
}

/// How many of two requests reached the origin, with heuristic freshness capped at `cap` (`None`: off), the second
/// request `later` after the first by the cache's clock.
async fn heuristic_calls(
    status: u16,
    last_modified_ago: Duration,
    cap: Option<Duration>,
    later: Duration,
) -> usize {
    let calls = Calls::default();
    let counted = calls.clone();
    let origin = Router::new().route(
        "/",
        get_route(move || {
            let calls = counted.clone();
            async move {
                calls.bump();
                let now = SystemTime::now();
                Response::builder()
                    .status(status)
                    .header("date", httpdate::fmt_http_date(now))
                    .header(
                        "last-modified",
                        httpdate::fmt_http_date(now - last_modified_ago),
                    )
                    .body(Body::from("modified long ago"))
                    .unwrap()
            }
        }),
    );
    let clock = ManualClock::new();
    let cache = HttpCache::builder().clock(clock.clone()).build().unwrap();
    let layer = match cap {
        Some(cap) => CacheLayer::new(cache).heuristic_freshness(cap),
        None => CacheLayer::new(cache),
    };
    let address = serve(origin.layer(layer)).await;
    get(address, "/").await;
    clock.advance(later);
    get(address, "/").await;
    calls.get()
}

const DAY: Duration = Duration::from_secs(86_400);

#[tokio::test]
async fn heuristic_freshness_is_off_by_default() {
    assert_eq!(
        heuristic_calls(200, 10 * DAY, None, Duration::ZERO).await,
        2
    );
}

#[tokio::test]
async fn heuristic_freshness_gives_a_tenth_of_the_time_since_last_modified() {
    // Modified 10 days ago: fresh for a day (under the week's cap), so a hit an hour later, a miss two days later.
    let week = 7 * DAY;
    let hour = Duration::from_secs(3600);
    assert_eq!(heuristic_calls(200, 10 * DAY, Some(week), hour).await, 1);
    assert_eq!(heuristic_calls(200, 10 * DAY, Some(week), 2 * DAY).await, 2);
    // A 404 and a 410 are heuristically cacheable too.
    assert_eq!(heuristic_calls(404, 10 * DAY, Some(week), hour).await, 1);
    assert_eq!(heuristic_calls(410, 10 * DAY, Some(week), hour).await, 1);
}

#[tokio::test]
async fn heuristic_freshness_is_capped() {
    // A tenth of 10 days is a day, but the cap is a minute: stale two minutes later.
    let minute = Duration::from_secs(60);
    assert_eq!(
        heuristic_calls(200, 10 * DAY, Some(minute), 2 * minute).await,
        2
    );
    assert_eq!(
        heuristic_calls(200, 10 * DAY, Some(minute), minute / 2).await,
        1
    );
}

#[tokio::test]
async fn heuristic_freshness_skips_the_status_codes_that_are_not_heuristically_cacheable() {
    // 201, 302 and 500 are not in RFC 9110 §15.1's list: never stored without explicit freshness.
    for status in [201, 302, 500] {
        assert_eq!(
            heuristic_calls(status, 10 * DAY, Some(7 * DAY), Duration::ZERO).await,
            2,
            "{status}"
        );
    }
}
