//! Interim responses (1xx) are never stored. A Tower service can hand the layer a 1xx as its response (hyper's
//! server would turn one into a 500, so these tests call the service directly): the cache passes it on and asks
//! the origin again next time, even when the 1xx carries a lifetime.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use support::Calls;
use tower::{Layer, ServiceExt};
use tower_redis_cache::{CacheLayer, HttpCache};

#[tokio::test]
async fn a_1xx_is_passed_on_and_never_stored() {
    for status in [100, 102, 103] {
        let calls = Calls::default();
        let counted = calls.clone();
        let origin = tower::service_fn(move |_: Request<Body>| {
            let calls = counted.clone();
            async move {
                calls.bump();
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .header("cache-control", "max-age=60")
                        .header("link", "</style.css>; rel=preload")
                        .body(Body::empty())
                        .unwrap(),
                )
            }
        });
        let cache = HttpCache::builder().build().unwrap();
        let service = CacheLayer::new(cache.clone()).layer(origin);
        for _ in 0..2 {
            let response = service
                .clone()
                .oneshot(
                    Request::get("http://test/hints")
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::from_u16(status).unwrap());
            let cache_status = response.headers()["cache-status"]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(
                cache_status.contains("detail=status") && !cache_status.contains("stored"),
                "{status}: {cache_status}"
            );
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(calls.get(), 2, "{status} reached the origin every time");
        assert_eq!(cache.stats().memory_entries, 0, "{status}");
    }
}
