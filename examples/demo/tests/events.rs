//! Live events end to end: the gateway's `GET /events` (Server-Sent Events) over real processes. Two gateways share
//! one `redis-server` (or a 3-master Redis Cluster); SSE clients on both see every change made through either,
//! exactly once, and a client that reconnects with `Last-Event-ID` gets exactly what it missed, or, when some of it
//! is no longer retained, an `events.reset` first. Without Redis, the one gateway's clients get its events.
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture or a process that misbehaves

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use redis_fixtures::{RedisCluster, RedisServer};
use serde_json::{Value, json};

mod support;

use support::sse::{SseClient, SseEvent, summary};
use support::{Proc, closed_port, get, poll, prefix, request, start, wait_for_discovery};

fn shared_env(redis: &RedisServer, prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", redis.url()),
        ("REDIS_PREFIX", prefix.to_owned()),
        ("PORT", "0".to_owned()),
        ("RATE_LIMIT_WRITES", "100000/1m".to_owned()),
    ]
}

/// How many recent events a client can resume from (`demo::events::WINDOW`).
const WINDOW: usize = 1000;

/// Creates `count` users through `gateways` in turn, from four threads at once (the order of their events is the
/// stream's, which the clients see).
fn churn(gateways: &[SocketAddr], count: usize) {
    let threads: Vec<_> = (0..4)
        .map(|thread| {
            let gateways = gateways.to_vec();
            std::thread::spawn(move || {
                for n in (thread..count).step_by(4) {
                    create_user(gateways[n % gateways.len()], &format!("churn-{n}"));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

fn ids(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|event| event.id.as_str()).collect()
}

fn resets(events: &[SseEvent]) -> Vec<&SseEvent> {
    events
        .iter()
        .filter(|event| event.kind.starts_with("events."))
        .collect()
}

/// The demo's processes with two gateways on `redis`.
fn two_gateways(redis: &RedisServer, prefix: &str) -> (Vec<Proc>, SocketAddr, SocketAddr) {
    support::two_gateways(&shared_env(redis, prefix))
}

fn write(gateway: SocketAddr, method: &str, path: &str, body: &Value) -> String {
    let reply = request(gateway, method, path, Some(body), &[]);
    assert!(reply.status == 200 || reply.status == 201, "{reply:?}");
    reply.json()["id"].as_str().unwrap().to_owned()
}

fn create_user(gateway: SocketAddr, name: &str) -> String {
    write(
        gateway,
        "POST",
        "/users",
        &json!({"name": name, "email": format!("{name}@example.com")}),
    )
}

/// A user created through `a`, renamed through `b`, an order for them through `a`, paid through `b`, and a last user
/// through `b` (once it has arrived, anything sent twice would have arrived too): the `(type, record id)` each
/// client should see, in order.
fn five_changes(a: SocketAddr, b: SocketAddr) -> Vec<(String, String)> {
    let user = create_user(a, "ada");
    write(
        b,
        "PUT",
        &format!("/users/{user}"),
        &json!({"name": "Ada King"}),
    );
    let order = write(
        a,
        "POST",
        "/orders",
        &json!({"user_id": user, "item": "engine"}),
    );
    write(
        b,
        "PATCH",
        &format!("/orders/{order}"),
        &json!({"status": "paid"}),
    );
    let last = create_user(b, "grace");
    vec![
        ("user.created".to_owned(), user.clone()),
        ("user.updated".to_owned(), user),
        ("order.created".to_owned(), order.clone()),
        ("order.updated".to_owned(), order),
        ("user.created".to_owned(), last),
    ]
}

#[test]
fn a_change_through_either_gateway_reaches_the_clients_of_both_exactly_once() {
    let redis = RedisServer::start();
    let (_procs, a, b) = two_gateways(&redis, &prefix("events-fanout"));
    let on_a = SseClient::connect(a, None);
    let on_b = SseClient::connect(b, None);
    let health = get(a, "/health").json();
    assert_eq!(health["events"]["backend"], "redis-stream", "{health}");
    assert_eq!(health["events"]["clients"], 1, "{health}");

    let expected = five_changes(a, b);
    for client in [&on_a, &on_b] {
        let events = client.wait_for(expected.len());
        assert_eq!(summary(&events), expected);
        assert_eq!(events[1].data["name"], "Ada King");
        assert_eq!(events[3].data["status"], "paid");
    }
    // The same event has the same id on both gateways: it was published once.
    assert_eq!(on_a.events(), on_b.events());
    // The stream is bounded and expires.
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let key = format!("{}events", prefix("events-fanout"));
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut connection).unwrap();
    assert!(ttl > 0, "the stream has no expiry: {ttl}");
}

#[test]
fn a_client_that_reconnects_with_last_event_id_gets_exactly_what_it_missed() {
    let redis = RedisServer::start();
    let (_procs, a, b) = two_gateways(&redis, &prefix("events-resume"));
    let first = SseClient::connect(a, None);
    let seen = create_user(a, "seen");
    let events = first.wait_for(1);
    assert_eq!(summary(&events), [("user.created".to_owned(), seen)]);
    let last_id = events[0].id.clone();
    drop(first);

    let missed = [create_user(a, "missed-1"), create_user(b, "missed-2")];
    // Reconnects elsewhere: the other gateway has the same stream.
    let again = SseClient::connect(b, Some(&last_id));
    let after = create_user(a, "live");
    let events = again.wait_for(3);
    assert_eq!(
        summary(&events),
        [
            ("user.created".to_owned(), missed[0].clone()),
            ("user.created".to_owned(), missed[1].clone()),
            ("user.created".to_owned(), after),
        ]
    );
    // A final barrier: one more event arrives alone (nothing was delivered twice).
    let barrier = create_user(b, "barrier");
    let events = again.wait_for(4);
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[3].data["id"], barrier.as_str());
}

#[test]
fn after_redis_restarts_the_readers_deliver_new_events_to_clients_still_connected() {
    let mut redis = RedisServer::start();
    let (_procs, a, b) = two_gateways(&redis, &prefix("events-outage"));
    let on_b = SseClient::connect(b, None);
    let before = create_user(a, "before");
    assert_eq!(
        summary(&on_b.wait_for(1)),
        [("user.created".to_owned(), before)]
    );

    redis.kill();
    redis.restart();
    // Once Redis answers again (empty), a change through A reaches the client on B, which never reconnected.
    // (Ids start again in an empty Redis: the events are told apart by name.)
    poll(Duration::from_secs(20), || {
        let reply = request(
            a,
            "POST",
            "/users",
            Some(&json!({"name": "after", "email": "after@example.com"})),
            &[],
        );
        (reply.status == 201 && get(a, "/health/redis").status == 200).then_some(())
    })
    .expect("no user could be created after Redis came back");
    let events = poll(Duration::from_secs(20), || {
        let events = on_b.events();
        events
            .iter()
            .any(|event| event.data["name"] == "after")
            .then_some(events)
    })
    .unwrap_or_else(|| {
        panic!(
            "the event after the restart never arrived: {:?}",
            on_b.events()
        )
    });
    assert_eq!(events[0].data["name"], "before");
    assert!(
        events.iter().all(|event| event.kind == "user.created"),
        "{events:?}"
    );
}

#[test]
fn without_redis_the_gateway_delivers_its_own_events_and_resumes_from_memory() {
    let demo = start(
        "demo",
        &[
            ("REDIS_URL", format!("redis://127.0.0.1:{}", closed_port())),
            ("REDIS_CONNECT_TIMEOUT_MS", "300".to_owned()),
            ("USER_SERVICE_PORT", "0".to_owned()),
            ("ORDER_SERVICE_PORT", "0".to_owned()),
            ("GATEWAY_PORT", "0".to_owned()),
        ],
    );
    let gateway = demo.address_of("gateway");
    assert!(
        demo.log().contains("SINGLE-INSTANCE MODE"),
        "{}",
        demo.log()
    );
    // Listed in the registry is not enough: the gateway balances over what its own watch has read.
    wait_for_discovery(gateway);

    let client = SseClient::connect(gateway, None);
    assert_eq!(
        get(gateway, "/health").json()["events"]["backend"],
        "memory"
    );
    let first = create_user(gateway, "alan");
    let events = client.wait_for(1);
    assert_eq!(
        summary(&events),
        [("user.created".to_owned(), first.clone())]
    );
    drop(client);

    let missed = write(
        gateway,
        "PUT",
        &format!("/users/{first}"),
        &json!({"name": "Alan T"}),
    );
    let again = SseClient::connect(gateway, Some(&events[0].id));
    let events = again.wait_for(1);
    assert_eq!(summary(&events), [("user.updated".to_owned(), missed)]);
    let live = create_user(gateway, "kurt");
    let events = again.wait_for(2);
    assert_eq!(summary(&events[1..]), [("user.created".to_owned(), live)]);
}

/// The ids the stream holds, oldest first, and the `prev` of its oldest entry.
fn retained(redis: &RedisServer, key: &str) -> (Vec<String>, String) {
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(&mut connection)
        .unwrap();
    let prev = entries
        .first()
        .and_then(|(_, fields)| fields.get("prev").cloned())
        .unwrap_or_default();
    (entries.into_iter().map(|(id, _)| id).collect(), prev)
}

#[test]
fn a_resume_from_beyond_the_redis_window_is_told_so_and_one_inside_it_is_not() {
    let redis = RedisServer::start();
    let prefix = prefix("events-window");
    let key = format!("{prefix}events");
    let (_procs, a, b) = two_gateways(&redis, &prefix);
    let watcher = SseClient::connect(a, None);
    // Enough events that `MAXLEN ~ 1000` trims whole nodes off the stream.
    let total = WINDOW + 150;
    churn(&[a, b], total);
    let all = watcher.wait_for(total);
    assert_eq!(all.len(), total);
    assert!(resets(&all).is_empty(), "{:?}", resets(&all));
    let (kept, prev) = retained(&redis, &key);
    assert!(kept.len() >= WINDOW && kept.len() < total, "{}", kept.len());
    let at = all.len() - kept.len();
    assert_eq!(ids(&all[at..]), kept, "the stream holds the newest events");
    // The oldest entry records the event before it: the last one trimmed.
    assert_eq!(prev, all[at - 1].id);

    // From the last trimmed event: nothing after it is gone, so no reset, just the retained events.
    let boundary = SseClient::connect(b, Some(&all[at - 1].id));
    // From the event before it: one event is gone. Told first, then every retained event.
    let beyond = SseClient::connect(b, Some(&all[at - 2].id));
    // From inside the window: exactly the two missed events.
    let near = SseClient::connect(a, Some(&all[total - 3].id));
    // Not a stream id: told, then every retained event.
    let invalid = SseClient::connect(a, Some("yesterday"));

    let got = boundary.wait_for(kept.len());
    assert_eq!(ids(&got), kept);
    let got = beyond.wait_for(1 + kept.len());
    assert_eq!(got[0].kind, "events.reset");
    assert_eq!(
        got[0].data,
        json!({"reason": "beyond-window", "last_event_id": all[at - 2].id, "oldest": kept[0]})
    );
    // The reset's id is where its replay starts: resuming from it loses nothing.
    assert_eq!(got[0].id, all[at - 1].id);
    assert_eq!(ids(&got[1..]), kept);
    let got = near.wait_for(2);
    assert_eq!(ids(&got), ids(&all[total - 2..]));
    let got = invalid.wait_for(1 + kept.len());
    assert_eq!(
        (got[0].kind.as_str(), &got[0].data),
        (
            "events.reset",
            &json!({"reason": "invalid-id", "last_event_id": "yesterday", "oldest": kept[0]})
        )
    );
    assert_eq!(ids(&got[1..]), kept);

    // The live feed follows, once, and nothing else arrived meanwhile (no duplicate, no second reset).
    let live = create_user(b, "live");
    for (client, before) in [
        (&boundary, kept.len()),
        (&beyond, kept.len() + 1),
        (&near, 2),
        (&invalid, kept.len() + 1),
    ] {
        let got = client.wait_for(before + 1);
        assert_eq!(got.len(), before + 1);
        assert_eq!(got[before].data["id"], live.as_str());
    }
    assert!(resets(&boundary.events()).is_empty());
    assert!(resets(&near.events()).is_empty());
    let live_id = near.events()[2].id.clone();

    // The stream is gone (expired, or Redis was emptied): an id from it cannot be placed.
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("DEL").arg(&key).query(&mut connection).unwrap();
    let gone = SseClient::connect(a, Some(&live_id));
    let got = gone.wait_for(1);
    assert_eq!(
        (got[0].kind.as_str(), got[0].id.as_str(), &got[0].data),
        (
            "events.reset",
            "0-0",
            &json!({"reason": "unknown-id", "last_event_id": live_id, "oldest": null})
        )
    );
    let after = create_user(a, "after");
    let got = gone.wait_for(2);
    assert_eq!(got[1].data["id"], after.as_str());
    // The new stream's first entry starts a new history: an id from before it is unknown too.
    let again = SseClient::connect(b, Some(&live_id));
    let got = again.wait_for(2);
    assert_eq!(got[0].data["reason"], "unknown-id");
    assert_eq!(got[0].data["oldest"], got[1].id.as_str());
    assert_eq!(got[1].data["id"], after.as_str());
}

#[test]
fn without_redis_a_resume_from_beyond_the_memory_ring_is_told_so_and_one_inside_it_is_not() {
    let demo = start(
        "demo",
        &[
            ("REDIS_URL", format!("redis://127.0.0.1:{}", closed_port())),
            ("REDIS_CONNECT_TIMEOUT_MS", "300".to_owned()),
            ("RATE_LIMIT_WRITES", "100000/1m".to_owned()),
            ("USER_SERVICE_PORT", "0".to_owned()),
            ("ORDER_SERVICE_PORT", "0".to_owned()),
            ("GATEWAY_PORT", "0".to_owned()),
        ],
    );
    let gateway = demo.address_of("gateway");
    // Listed in the registry is not enough: the gateway balances over what its own watch has read.
    wait_for_discovery(gateway);
    let watcher = SseClient::connect(gateway, None);
    let total = WINDOW + 20;
    churn(&[gateway], total);
    let all = watcher.wait_for(total);
    assert_eq!(all.len(), total);
    // The ring keeps the newest WINDOW events: the first 20 were evicted.
    let at = total - WINDOW;

    let boundary = SseClient::connect(gateway, Some(&all[at - 1].id));
    let beyond = SseClient::connect(gateway, Some(&all[at - 2].id));
    let near = SseClient::connect(gateway, Some(&all[total - 2].id));
    let got = boundary.wait_for(WINDOW);
    assert_eq!(ids(&got), ids(&all[at..]));
    let got = beyond.wait_for(1 + WINDOW);
    assert_eq!(
        (got[0].kind.as_str(), got[0].id.as_str(), &got[0].data),
        (
            "events.reset",
            all[at - 1].id.as_str(),
            &json!({"reason": "beyond-window", "last_event_id": all[at - 2].id, "oldest": all[at].id})
        )
    );
    assert_eq!(ids(&got[1..]), ids(&all[at..]));
    let got = near.wait_for(1);
    assert_eq!(ids(&got), [all[total - 1].id.as_str()]);

    let live = create_user(gateway, "live");
    for (client, before) in [(&boundary, WINDOW), (&beyond, WINDOW + 1), (&near, 1)] {
        let got = client.wait_for(before + 1);
        assert_eq!(got.len(), before + 1);
        assert_eq!(got[before].data["id"], live.as_str());
    }
    assert!(resets(&boundary.events()).is_empty());
    assert!(resets(&near.events()).is_empty());
}

#[test]
fn on_a_redis_cluster_both_gateways_deliver_every_change_once_and_resume() {
    let cluster = RedisCluster::start();
    let env = vec![
        ("REDIS_CLUSTER_NODES", cluster.urls().join(",")),
        ("REDIS_PREFIX", prefix("events-cluster")),
        ("PORT", "0".to_owned()),
        ("RATE_LIMIT_WRITES", "1000/1m".to_owned()),
    ];
    let (_procs, a, b) = support::two_gateways(&env);
    let on_a = SseClient::connect(a, None);
    let on_b = SseClient::connect(b, None);
    let health = get(b, "/health").json();
    assert_eq!(health["events"]["backend"], "redis-stream", "{health}");

    let mut expected = five_changes(a, b);
    for client in [&on_a, &on_b] {
        let events = client.wait_for(expected.len());
        assert_eq!(summary(&events), expected);
    }
    assert_eq!(on_a.events(), on_b.events());
    let seen = on_a.events()[4].id.clone();
    drop(on_a);

    // A client of A reconnects to B with its Last-Event-ID: exactly what it missed, then the live feed.
    let missed = [create_user(a, "missed-1"), create_user(b, "missed-2")];
    let again = SseClient::connect(b, Some(&seen));
    let live = create_user(a, "live");
    let events = again.wait_for(3);
    assert_eq!(
        summary(&events),
        [
            ("user.created".to_owned(), missed[0].clone()),
            ("user.created".to_owned(), missed[1].clone()),
            ("user.created".to_owned(), live.clone()),
        ]
    );
    let barrier = create_user(b, "barrier");
    let events = again.wait_for(4);
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[3].data["id"], barrier.as_str());
    // The client that stayed saw all of it, once, in order, with the same ids.
    expected.extend(
        [&missed[0], &missed[1], &live, &barrier].map(|id| ("user.created".to_owned(), id.clone())),
    );
    let all = on_b.wait_for(expected.len());
    assert_eq!(summary(&all), expected);
    assert_eq!(all[5..], events[..]);
}
