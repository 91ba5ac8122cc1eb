//! The same behaviour on a real 3-master Redis Cluster: entries, variants, locks, tags and the index live in
//! different slots and nodes.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::collections::HashSet;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get as get_route;
use redis_fixtures::RedisCluster;
use support::scenarios::{self, Backend};
use support::{Calls, get, holds_within, send, serve, stored_in_redis};
use tower_redis_cache::{CacheLayer, HttpCache};

fn origin(calls: &Calls) -> Router {
    let calls = calls.clone();
    Router::new().route(
        "/items/{n}",
        get_route(move |Path(n): Path<String>, headers: HeaderMap| {
            let calls = calls.clone();
            async move {
                let call = calls.bump();
                tokio::time::sleep(Duration::from_millis(200)).await;
                let language = headers
                    .get("accept-language")
                    .map_or("none", |value| value.to_str().unwrap())
                    .to_owned();
                (
                    [
                        ("cache-control", "max-age=60"),
                        ("vary", "accept-language"),
                        ("surrogate-key", "items"),
                    ],
                    format!("{n} {language} call {call}"),
                )
            }
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_works_the_same_on_a_three_master_cluster() {
    let cluster = RedisCluster::start();
    let calls = Calls::default();
    let build = || async {
        HttpCache::builder()
            .redis(cluster.connection().await)
            .subscribe(cluster.node_client(0))
            .prefix("cl:")
            .fill_lock(Duration::from_secs(3))
            .build()
            .unwrap()
    };
    let one = build().await;
    let two = build().await;
    let a = serve(origin(&calls).layer(CacheLayer::new(one.clone()))).await;
    let b = serve(origin(&calls).layer(CacheLayer::new(two.clone()))).await;
    support::subscribed(&[&one, &two]).await;

    // Concurrent cold misses on both instances: one origin call in all.
    let replies =
        futures_util::future::join_all((0..40).map(|i| get([a, b][i % 2], "/items/1"))).await;
    assert!(replies.iter().all(|reply| reply.status == StatusCode::OK));
    assert_eq!(
        replies
            .iter()
            .map(|reply| reply.body.clone())
            .collect::<HashSet<_>>()
            .len(),
        1
    );
    assert_eq!(calls.get(), 1);

    // Many keys spread over the slots; each is read back from Redis by the other instance, variants included.
    for n in 2..12 {
        for language in ["en", "fr"] {
            send(
                a,
                "GET",
                &format!("/items/{n}"),
                &[("accept-language", language)],
            )
            .await;
        }
    }
    for n in 2..12 {
        for language in ["fr", "en"] {
            let path = format!("/items/{n}");
            assert!(
                holds_within(Duration::from_secs(5), || async {
                    send(b, "GET", &path, &[("accept-language", language)])
                        .await
                        .is_hit()
                })
                .await,
                "{path} {language}"
            );
        }
    }
    let before = calls.get();
    assert_eq!(before, 21);

    // Garbage on whichever node holds the key is a miss.
    let redis_key = one.redis_key("http://test/items/2").unwrap();
    let mut connection = cluster.connection().await;
    let _: () = redis::cmd("DEL")
        .arg(&redis_key)
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&redis_key)
        .arg("garbage")
        .query_async(&mut connection)
        .await
        .unwrap();
    let c = serve(origin(&calls).layer(CacheLayer::new(build().await))).await;
    let miss = send(c, "GET", "/items/2", &[("accept-language", "en")]).await;
    assert!(!miss.is_hit());
    assert_eq!(miss.status, StatusCode::OK);

    // A tag and a prefix span every node.
    let tagged = two.invalidate_tag("items").await.unwrap();
    assert!(tagged >= 10, "deleted {tagged}");
    // A miss fills Redis again, so each instance is checked on its own key.
    for (address, path) in [(a, "/items/7"), (b, "/items/8")] {
        assert!(
            holds_within(Duration::from_secs(5), || async {
                !send(address, "GET", path, &[("accept-language", "fr")])
                    .await
                    .is_hit()
            })
            .await
        );
    }
    // A fill sent before the tag's message reached its instance is not stored (it may predate the
    // invalidation): ask until each is back in Redis.
    for (address, path) in [(a, "/items/7"), (b, "/items/8")] {
        let redis_key = one.redis_key(&format!("http://test{path}")).unwrap();
        let refilled = holds_within(Duration::from_secs(5), || {
            let redis_key = redis_key.clone();
            let mut connection = connection.clone();
            async move {
                send(address, "GET", path, &[("accept-language", "fr")]).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                redis::cmd("EXISTS")
                    .arg(&redis_key)
                    .query_async::<u64>(&mut connection)
                    .await
                    .unwrap()
                    == 1
            }
        })
        .await;
        assert!(refilled, "{path} was not stored again");
    }
    for n in 3..6 {
        send(a, "GET", &format!("/items/{n}"), &[]).await;
    }
    for n in 3..6 {
        let redis_key = one.redis_key(&format!("http://test/items/{n}")).unwrap();
        assert!(stored_in_redis(&connection, &redis_key).await);
    }
    // Those three, and /items/7 and /items/8 filled again by the checks above.
    assert_eq!(
        one.invalidate_prefix("http://test/items/").await.unwrap(),
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_herd_swr_never_stored_and_garbage_scenarios_pass_on_a_cluster() {
    let cluster = RedisCluster::start();
    let backend = Backend {
        connection: cluster.connection().await,
    };
    scenarios::cold_herd(&backend).await;
    scenarios::stale_while_revalidate(&backend).await;
    scenarios::never_stored(&backend).await;
    scenarios::garbage_is_a_miss(&backend).await;
}
