//! What the cache reads back from Redis is not trusted: an entry crafted by hand and written straight into a real
//! redis-server is a miss (the origin answers), never a panic or an error for the client.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use redis_fixtures::RedisServer;
use support::{Calls, get, holds_within, origin, serve};
use tower_redis_cache::{CacheLayer, HttpCache};

/// The start of an entry in the layout of the crate's `entry` module: magic and version, a 200, both times.
fn entry_start() -> Vec<u8> {
    let mut out = b"TRC\x01".to_vec();
    out.extend(200u16.to_be_bytes());
    out.extend(0u64.to_be_bytes());
    out.extend(0u64.to_be_bytes());
    out
}

/// An entry with `count` headers `a: ` (the smallest that decode), no selecting headers and an empty body.
fn with_headers(count: u16) -> Vec<u8> {
    let mut out = entry_start();
    out.extend(count.to_be_bytes());
    for _ in 0..count {
        out.extend(1u16.to_be_bytes());
        out.push(b'a');
        out.extend(0u32.to_be_bytes());
    }
    out.extend(0u16.to_be_bytes());
    out.extend(0u32.to_be_bytes());
    out
}

/// Entries that once panicked or that claim more than they hold, by name.
fn crafted() -> Vec<(&'static str, Vec<u8>)> {
    let mut claims_65535_headers = entry_start();
    claims_65535_headers.extend(u16::MAX.to_be_bytes());
    let mut claims_a_4_gib_body = with_headers(0);
    let body_length_at = claims_a_4_gib_body.len() - 4;
    claims_a_4_gib_body[body_length_at..].copy_from_slice(&u32::MAX.to_be_bytes());
    vec![
        // `HeaderMap::with_capacity(24_577)` panicked on every request for the URL.
        ("24577-headers", with_headers(24_577)),
        ("65535-headers-claimed", claims_65535_headers),
        ("4-gib-body-claimed", claims_a_4_gib_body),
        ("garbage", b"TRC\x01\xff\xff\xff".to_vec()),
    ]
}

#[tokio::test]
async fn a_crafted_entry_in_redis_is_a_miss_answered_by_the_origin() {
    let server = RedisServer::start();
    let connection = server.connection_manager().await;
    let cache = HttpCache::builder()
        .redis(connection.clone())
        .prefix("decode-fuzz:")
        .build()
        .unwrap();
    let calls = Calls::default();
    let address = serve(
        origin(&calls, &[("cache-control", "max-age=60")]).layer(CacheLayer::new(cache.clone())),
    )
    .await;

    for (round, (name, bytes)) in crafted().into_iter().enumerate() {
        let key = cache.redis_key(&format!("http://test/r/{name}")).unwrap();
        // Where the cache would have stored the URL's only variant (the README's key layout).
        redis::pipe()
            .cmd("HSET")
            .arg(&key)
            .arg("~vary")
            .arg("")
            .arg("~")
            .arg(&bytes)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(60_000)
            .ignore()
            .query_async::<()>(&mut connection.clone())
            .await
            .unwrap();

        let reply = get(address, &format!("/r/{name}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}");
        assert_eq!(reply.body, format!("{name} call {}", round + 1), "{name}");
        assert!(!reply.is_hit(), "{name}: {}", reply.cache_status());
        assert_eq!(calls.get(), round + 1, "{name}");
        assert_eq!(cache.stats().undecodable, round as u64 + 1, "{name}");

        // The origin's answer replaces the crafted entry in Redis.
        let replaced = holds_within(Duration::from_secs(5), || {
            let mut connection = connection.clone();
            let key = key.clone();
            let crafted = bytes.clone();
            async move {
                let stored: Option<Vec<u8>> = redis::cmd("HGET")
                    .arg(&key)
                    .arg("~")
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                stored.is_some_and(|stored| stored != crafted && stored.starts_with(b"TRC\x01"))
            }
        })
        .await;
        assert!(replaced, "{name}: the crafted entry was not replaced");
    }
}
