//! Header parsing as RFC 9110 and RFC 9111 ask, through the layer on a real axum server: `Age` with several values
//! or lines counts by its first, and `Expires` in the obsolete RFC 850 and asctime formats is read, with day and month
//! names in any case.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::http::Response;
use axum::routing::get as get_route;
use support::{Calls, get, serve};
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
