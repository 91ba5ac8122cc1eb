//! Read replicas from the environment (`REDIS_REPLICA_URLS`), end to end over real processes: two gateways share
//! a primary and its replica (`--replicaof`); what one gateway stores, the other reads from the replica; a replica
//! URL that does not answer at start-up is left out; killing the replica mid-load fails no request.
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture or a process that misbehaves

use std::net::SocketAddr;
use std::time::Duration;

use redis_fixtures::RedisServer;
use serde_json::{Value, json};

mod support;

use support::{closed_port, get, poll, prefix, request, two_gateways};

/// A replica of `primary`, once its link to the primary is up.
fn replica_of(primary: &RedisServer) -> RedisServer {
    let replica = RedisServer::builder()
        .args(&["--replicaof", "127.0.0.1", &primary.port().to_string()])
        .start();
    let mut connection = replica.client().get_connection().unwrap();
    poll(Duration::from_secs(20), || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut connection)
            .ok()?;
        info.contains("master_link_status:up").then_some(())
    })
    .expect("the replica never linked to its primary");
    replica
}

fn cache_stats(gateway: SocketAddr) -> Value {
    let health = get(gateway, "/health").json();
    health["cache"].clone()
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
}

#[test]
fn a_gateway_reads_what_another_stored_from_the_replica_and_survives_losing_it() {
    let primary = RedisServer::start();
    let replica = replica_of(&primary);
    let prefix = prefix("replicas");
    let env = vec![
        ("REDIS_URL", primary.url()),
        // The second URL answers nothing: it is left out at start-up, not an error.
        (
            "REDIS_REPLICA_URLS",
            format!("{},redis://127.0.0.1:{}", replica.url(), closed_port()),
        ),
        ("REDIS_PREFIX", prefix),
        ("PORT", "0".to_owned()),
        ("RATE_LIMIT_WRITES", "1000/1m".to_owned()),
    ];
    let (_procs, a, b) = two_gateways(&env);

    let mut users = Vec::new();
    for n in 0..20 {
        let reply = request(
            a,
            "POST",
            "/users",
            Some(&json!({"name": format!("user {n}"), "email": format!("u{n}@example.com")})),
            &[],
        );
        assert_eq!(reply.status, 201, "{reply:?}");
        users.push(reply.json()["id"].as_str().unwrap().to_owned());
    }
    // a fills the shared tier; its writes reach the replica by replication.
    let mut bodies = Vec::new();
    for user in &users {
        let reply = get(a, &format!("/users/{user}"));
        assert_eq!(reply.status, 200, "{reply:?}");
        bodies.push(reply.body);
    }
    let before = cache_stats(b);
    // b has never seen these paths: each is a memory miss, read from Redis, from the replica when it has the entry.
    let found = poll(Duration::from_secs(10), || {
        for (user, body) in users.iter().zip(&bodies) {
            let reply = get(b, &format!("/users/{user}"));
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(&reply.body, body);
        }
        let stats = cache_stats(b);
        (counter(&stats, "replica_hits") > counter(&before, "replica_hits")).then_some(stats)
    })
    .expect("b never read an entry from the replica");
    assert!(counter(&found, "redis_hits") >= 1, "{found}");

    // The replica dies; reads keep working through the primary (or the origin), none fails.
    drop(replica);
    for round in 0..3 {
        for (user, body) in users.iter().zip(&bodies) {
            // A query string b has never cached: every read goes past memory to Redis.
            let reply = get(b, &format!("/users/{user}?round={round}"));
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(&reply.body, body);
        }
    }
    let after = cache_stats(b);
    assert!(
        counter(&after, "replica_fallbacks") > counter(&found, "replica_fallbacks"),
        "reads fell back to the primary after the replica died: {after}"
    );
}
