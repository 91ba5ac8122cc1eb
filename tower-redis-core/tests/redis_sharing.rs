//! Openings shared across processes through a real Redis (`sharing::RedisSharing`).

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis_fixtures::RedisServer;
use test_support::wait_for;
use tower_breaker::{CircuitBreaker, State, TransitionReason};
use tower_redis_core::sharing::RedisSharing;

const ROUNDS: usize = 20;

fn unix_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

fn breaker(name: &str) -> CircuitBreaker {
    CircuitBreaker::builder()
        .name(name.to_owned())
        .consecutive_failures(1)
        .open_for(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn share(breaker: &CircuitBreaker, url: &str, prefix: &str) -> RedisSharing {
    let client = redis::Client::open(url).unwrap();
    let publisher = client.get_connection_manager().await.unwrap();
    RedisSharing::builder()
        .breaker(breaker)
        .redis(publisher)
        .subscribe(client)
        .prefix(prefix)
        .build()
        .unwrap()
}

/// The second process of `an_opening_reaches_a_second_process_within_50_ms`, run by that test as a child.
#[tokio::test]
#[ignore = "run as a child process by an_opening_reaches_a_second_process_within_50_ms"]
async fn peer_process() {
    let Ok(url) = std::env::var("PEER_REDIS_URL") else {
        return;
    };
    let (sender, mut openings) = tokio::sync::mpsc::unbounded_channel();
    let breaker = CircuitBreaker::builder()
        .name("payments")
        .consecutive_failures(1)
        .on_transition(move |transition| {
            if transition.reason == TransitionReason::Remote {
                let _ = sender.send(unix_micros());
            }
        })
        .build()
        .unwrap();
    let sharing = share(&breaker, &url, "peer-test:").await;
    wait_for("subscribed", Duration::from_secs(10), || {
        sharing.stats().connected
    })
    .await;
    println!("READY");
    for _ in 0..ROUNDS {
        let at = openings.recv().await.unwrap();
        println!("OPENED {at}");
        breaker.reset();
        println!("RESET");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opening_reaches_a_second_process_within_50_ms() {
    let server = RedisServer::start();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "peer_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("PEER_REDIS_URL", server.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut next_line = async |prefix: &str| loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.recv())
            .await
            .expect("the peer process went quiet")
            .expect("the peer process exited early");
        // The test harness may print "test peer_process ... " before the first line on the same line.
        if let Some(index) = line.find(prefix) {
            return line[index + prefix.len()..].trim().to_owned();
        }
    };
    next_line("READY").await;

    let breaker = breaker("payments");
    let sharing = share(&breaker, &server.url(), "peer-test:").await;
    wait_for("subscribed", Duration::from_secs(10), || {
        sharing.stats().connected
    })
    .await;
    let mut latencies_ms = Vec::new();
    for _ in 0..ROUNDS {
        let opened_at = unix_micros();
        breaker.try_acquire().unwrap().failure();
        assert_eq!(breaker.state(), State::Open);
        let seen_at: u128 = next_line("OPENED").await.parse().unwrap();
        latencies_ms.push((seen_at.saturating_sub(opened_at)) as f64 / 1000.0);
        next_line("RESET").await;
        breaker.reset();
    }
    let _ = child.wait();
    latencies_ms.sort_by(f64::total_cmp);
    let worst = latencies_ms[latencies_ms.len() - 1];
    println!(
        "opening propagation over {ROUNDS} rounds: median {:.2} ms, worst {worst:.2} ms",
        latencies_ms[ROUNDS / 2]
    );
    assert!(
        worst < 50.0,
        "an opening took {worst:.2} ms to reach the peer process: {latencies_ms:?}"
    );
    // The peer can see the last opening before the reply to its PUBLISH reaches this process and is counted.
    wait_for(
        "every opening counted as published",
        Duration::from_secs(10),
        || sharing.stats().published == ROUNDS as u64,
    )
    .await;
}

#[tokio::test]
async fn an_opening_published_while_a_peer_was_away_reaches_it_when_it_connects() {
    let server = RedisServer::start();
    let first = breaker("inventory");
    let first_sharing = share(&first, &server.url(), "late:").await;
    wait_for("subscribed", Duration::from_secs(10), || {
        first_sharing.stats().connected
    })
    .await;
    first.try_acquire().unwrap().failure();
    wait_for("published", Duration::from_secs(10), || {
        first_sharing.stats().published == 1
    })
    .await;

    let late = breaker("inventory");
    let late_sharing = share(&late, &server.url(), "late:").await;
    wait_for("the late peer opened", Duration::from_secs(10), || {
        late.state() == State::Open
    })
    .await;
    let retry_after = late.stats().retry_after_millis.unwrap();
    assert!(
        (25_000..=30_000).contains(&retry_after),
        "opened until the same deadline: {retry_after} ms left"
    );
    assert_eq!(late_sharing.stats().received, 1);
    // Another name in the same Redis is not affected.
    let other = breaker("shipping");
    let other_sharing = share(&other, &server.url(), "late:").await;
    wait_for(
        "the other name's subscription is up",
        Duration::from_secs(10),
        || other_sharing.stats().connected,
    )
    .await;
    // Subscribed, it reads its own key (never written): it stays closed for as long as we look.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(other.state(), State::Closed);
}

#[tokio::test]
async fn no_redis_command_runs_on_the_request_path() {
    let server = RedisServer::start();
    let breaker = breaker("catalog");
    let sharing = share(&breaker, &server.url(), "quiet:").await;
    wait_for("subscribed", Duration::from_secs(10), || {
        sharing.stats().connected
    })
    .await;
    let mut admin = server.multiplexed().await;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();
    for _ in 0..10_000 {
        breaker.try_acquire().unwrap().success();
    }
    breaker.try_acquire().unwrap().failure(); // one opening
    for _ in 0..10_000 {
        assert!(breaker.try_acquire().is_err());
    }
    wait_for("published", Duration::from_secs(10), || {
        sharing.stats().published == 1
    })
    .await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin)
        .await
        .unwrap();
    let calls = |command: &str| -> u64 {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!((calls("publish"), calls("set")), (1, 1), "{info}");
    let total: u64 = info
        .lines()
        .filter_map(|line| {
            line.split_once(":calls=")
                .and_then(|(_, rest)| rest.split(',').next()?.parse::<u64>().ok())
        })
        .sum();
    // PUBLISH + SET, plus this test's own CONFIG RESETSTAT is not counted after the reset; INFO counts itself after.
    assert!(
        total <= 3,
        "20,001 calls made {total} Redis commands:\n{info}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_fails_no_call_and_sharing_resumes_when_it_returns() {
    let mut server = RedisServer::start();
    let url = server.url();
    let local = breaker("search");
    let peer = breaker("search");
    let local_sharing = share(&local, &url, "outage:").await;
    let peer_sharing = share(&peer, &url, "outage:").await;
    wait_for("both subscribed", Duration::from_secs(10), || {
        local_sharing.stats().connected && peer_sharing.stats().connected
    })
    .await;

    server.kill();
    wait_for("the subscription noticed", Duration::from_secs(10), || {
        !local_sharing.stats().connected
    })
    .await;
    // Every decision is local: calls keep flowing, an opening is still local.
    for _ in 0..1_000 {
        local.try_acquire().unwrap().success();
    }
    local.try_acquire().unwrap().failure();
    assert_eq!(local.state(), State::Open);
    assert!(local.try_acquire().is_err());
    wait_for(
        "the failed publish was counted",
        Duration::from_secs(10),
        || local_sharing.stats().errors > 0,
    )
    .await;
    assert_eq!(
        peer.state(),
        State::Closed,
        "the peer cannot hear it with Redis gone"
    );

    server.restart();
    wait_for("both re-subscribed", Duration::from_secs(10), || {
        local_sharing.stats().connected && peer_sharing.stats().connected
    })
    .await;
    local.reset();
    local.try_acquire().unwrap().failure();
    wait_for(
        "the peer opened after recovery",
        Duration::from_secs(10),
        || peer.state() == State::Open,
    )
    .await;
}

#[tokio::test]
async fn a_crafted_opening_is_cut_to_max_open_and_garbage_is_ignored() {
    let server = RedisServer::start();
    let peer = breaker("crafted");
    let client = redis::Client::open(server.url()).unwrap();
    let sharing = RedisSharing::builder()
        .breaker(&peer)
        .redis(client.get_connection_manager().await.unwrap())
        .subscribe(client)
        .prefix("crafted:")
        .max_open(Duration::from_secs(10))
        .build()
        .unwrap();
    wait_for("subscribed", Duration::from_secs(10), || {
        sharing.stats().connected
    })
    .await;
    let mut connection = server.connection_manager().await;
    let long = format!(r#"{{"origin":"{}","open_for_ms":1}}"#, "x".repeat(2048));
    for payload in [
        "not json",
        r#"{"origin":"elsewhere"}"#,
        r#"{"origin":"elsewhere","open_for_ms":-5}"#,
        long.as_str(),
        r#"{"origin":"elsewhere","open_for_ms":18446744073709551615}"#,
    ] {
        redis::cmd("PUBLISH")
            .arg("crafted:crafted:openings")
            .arg(payload)
            .query_async::<i64>(&mut connection)
            .await
            .unwrap();
    }
    wait_for(
        "the last, valid opening applied",
        Duration::from_secs(10),
        || peer.state() == State::Open,
    )
    .await;
    assert_eq!(sharing.stats().received, 1, "only the valid payload counts");
    let retry_after = peer.stats().retry_after_millis.unwrap();
    assert!(
        (9_000..=10_000).contains(&retry_after),
        "u64::MAX ms is cut to max_open: {retry_after} ms left"
    );
}

#[tokio::test]
async fn an_invalid_sharing_config_is_an_error_that_names_the_setting() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let publisher = client.get_connection_manager().await.unwrap();
    let breaker = breaker("invalid");
    let complete = || {
        RedisSharing::builder()
            .breaker(&breaker)
            .redis(publisher.clone())
            .subscribe(client.clone())
    };
    for (sharing, setting) in [
        (complete().redis_timeout(Duration::ZERO), "redis_timeout"),
        (
            complete().max_reconnect_delay(Duration::ZERO),
            "max_reconnect_delay",
        ),
        (complete().max_open(Duration::ZERO), "max_open"),
        (
            RedisSharing::builder()
                .redis(publisher.clone())
                .subscribe(client.clone()),
            "breaker",
        ),
        (
            RedisSharing::builder()
                .breaker(&breaker)
                .redis(publisher.clone()),
            "subscribe",
        ),
    ] {
        let error = sharing.build().unwrap_err();
        assert_eq!(error.field(), setting, "{error}");
    }
    assert!(complete().build().is_ok());
}

#[tokio::test]
async fn a_half_open_subscription_is_replaced_and_catches_up_on_the_opening_it_missed() {
    let server = RedisServer::start();
    let proxy = redis_fixtures::FaultProxy::in_front_of(&server);
    let local = breaker("half-open");
    let local_sharing = share(&local, &server.url(), "half-open:").await;
    let peer = breaker("half-open");
    let peer_client = proxy.client_for(&server);
    let peer_sharing = RedisSharing::builder()
        .breaker(&peer)
        .redis(server.connection_manager().await)
        .subscribe(peer_client)
        .prefix("half-open:")
        .build()
        .unwrap();
    wait_for("both subscribed", Duration::from_secs(10), || {
        local_sharing.stats().connected && peer_sharing.stats().connected
    })
    .await;

    // The peer's subscription hangs for good: no FIN, no RST. The opening published now never reaches it on the
    // channel; the PING (every 5 s, 2 s to answer) notices, and the new subscription reads the key.
    proxy.half_open();
    local.try_acquire().unwrap().failure();
    wait_for("published", Duration::from_secs(10), || {
        local_sharing.stats().published == 1
    })
    .await;
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    while peer.state() != State::Open {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the peer never heard of the opening (its subscription stayed half-open)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(peer_sharing.stats().received, 1);
}
