//! The demo on a Sentinel-managed primary (`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`), end to end over real
//! processes: the primary is killed while two gateways serve writes and reads; no request fails, and after the
//! replica is promoted everything that goes through Redis works again, the subscriptions included: the events
//! reader delivers a change made through one gateway to an SSE client of the other, and both gateways' cache
//! invalidation subscriptions are on the promoted replica.
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture or a process that misbehaves

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_fixtures::RedisSentinel;
use serde_json::json;

mod support;

use support::sse::SseClient;
use support::{get, poll, prefix, request, two_gateways};

/// How many clients are subscribed to `channel` on the server at `port` (0 when it does not answer).
fn subscribers(port: u16, channel: &str) -> i64 {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return 0;
    };
    let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
        return 0;
    };
    redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query::<(String, i64)>(&mut connection)
        .map_or(0, |(_, count)| count)
}

fn create_user(gateway: SocketAddr, name: &str) -> (u16, String) {
    let reply = request(
        gateway,
        "POST",
        "/users",
        Some(&json!({"name": name, "email": format!("{name}@example.com")})),
        &[],
    );
    let id = if reply.status == 201 {
        reply.json()["id"].as_str().unwrap_or_default().to_owned()
    } else {
        String::new()
    };
    (reply.status, id)
}

#[test]
fn the_demo_rides_through_a_sentinel_failover_and_its_subscriptions_follow_the_new_primary() {
    let mut set = RedisSentinel::start();
    let promoted = set.replica_port();
    let prefix = prefix("sentinel");
    let env = vec![
        ("REDIS_SENTINELS", set.sentinel_addrs().join(",")),
        ("REDIS_SENTINEL_MASTER", set.master_name().to_owned()),
        ("REDIS_PREFIX", prefix.clone()),
        ("PORT", "0".to_owned()),
        ("RATE_LIMIT_WRITES", "100000/1m".to_owned()),
    ];
    let (_procs, a, b) = two_gateways(&env);
    let events_on_b = SseClient::connect(b, None);
    let invalidations = format!("{prefix}cache:invalidate");
    assert!(
        poll(Duration::from_secs(10), || {
            (subscribers(set.primary_port(), &invalidations) == 2).then_some(())
        })
        .is_some(),
        "both gateways subscribe to invalidations on the first primary"
    );

    // Load: writes through a, reads through b, every answer checked.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let load = {
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let (status, id) = create_user(a, &format!("load{n}"));
                if status != 201 {
                    failed
                        .lock()
                        .unwrap()
                        .push(format!("POST /users: {status}"));
                } else {
                    let read = get(b, &format!("/users/{id}"));
                    // Another instance's user-service may not hold the user: 404 is an answer, a 5xx is not.
                    if read.status >= 500 {
                        failed
                            .lock()
                            .unwrap()
                            .push(format!("GET /users/{id}: {}", read.status));
                    }
                }
                served.fetch_add(1, Ordering::Relaxed);
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    poll(Duration::from_secs(20), || {
        (served.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .expect("the load never got going");

    set.kill_primary();
    assert_eq!(set.wait_for_new_primary(Duration::from_secs(40)), promoted);

    // The subscriptions moved to the promoted replica: both gateways' invalidation listeners...
    assert!(
        poll(Duration::from_secs(20), || {
            (subscribers(promoted, &invalidations) == 2).then_some(())
        })
        .is_some(),
        "the invalidation subscriptions never reached the promoted replica"
    );
    // ...and b's events reader: a user created through a after the promotion reaches b's SSE client.
    let mut attempt = 0;
    let delivered = poll(Duration::from_secs(20), || {
        attempt += 1;
        let (status, id) = create_user(a, &format!("after-failover-{attempt}"));
        assert_eq!(status, 201);
        poll(Duration::from_secs(2), || {
            events_on_b
                .events()
                .iter()
                .any(|event| event.data["id"] == id.as_str())
                .then_some(())
        })
    });
    let during = served.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert!(
        delivered.is_some(),
        "no event made after the failover reached b's SSE client: {:?}",
        events_on_b.events()
    );
    assert!(
        during > 40,
        "the load ran through the failover ({during} rounds)"
    );
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "requests failed during the failover: {failed:?}"
    );
}
