//! The limiter against a real redis-server: algorithms, several policies, costs, extremes, TTLs, the deny cache,
//! the admin API, and each failure policy with Redis stopped or not answering.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis_fixtures::RedisServer;
use tower_redis_ratelimit::{
    Algorithm, DecisionSource, FailurePolicy, MAX_LIMIT, Policy, RateLimiter,
};

async fn limiter(server: &RedisServer, policies: Vec<Policy>) -> RateLimiter<ConnectionManager> {
    let mut builder = RateLimiter::builder()
        .redis(server.connection_manager().await)
        .no_deny_cache();
    for policy in policies {
        builder = builder.policy(policy);
    }
    builder.build().unwrap()
}

async fn admitted(limiter: &RateLimiter<ConnectionManager>, key: &str, attempts: usize) -> usize {
    let mut admitted = 0;
    for _ in 0..attempts {
        if limiter.check(key).await.allowed {
            admitted += 1;
        }
    }
    admitted
}

/// Every key in the server has a TTL.
async fn assert_every_key_expires(server: &RedisServer) {
    let mut con = server.multiplexed().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the test wrote no key");
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(ttl > 0, "key {key} has no TTL ({ttl})");
    }
}

async fn evalsha_calls(server: &RedisServer) -> u64 {
    server.command_calls("evalsha")
}

#[tokio::test]
async fn a_sliding_window_admits_the_limit_then_denies_with_a_retry_time() {
    let server = RedisServer::start();
    let limiter = limiter(
        &server,
        vec![Policy::new("api", 5, Duration::from_secs(10)).unwrap()],
    )
    .await;
    assert_eq!(admitted(&limiter, "alice", 8).await, 5);
    let denied = limiter.check("alice").await;
    assert!(!denied.allowed);
    assert_eq!(denied.source, DecisionSource::Redis);
    let retry_after = denied.retry_after.unwrap();
    assert!(
        retry_after > Duration::ZERO && retry_after <= Duration::from_secs(20),
        "{retry_after:?}"
    );
    assert_eq!(denied.policies[0].remaining, 0);
    assert_eq!(
        admitted(&limiter, "bob", 1).await,
        1,
        "keys are independent"
    );
    assert_every_key_expires(&server).await;
}

#[tokio::test]
async fn a_sliding_window_lets_requests_back_in_as_the_previous_window_slides_out() {
    let server = RedisServer::start();
    let limiter = limiter(
        &server,
        vec![Policy::new("api", 4, Duration::from_millis(400)).unwrap()],
    )
    .await;
    assert_eq!(admitted(&limiter, "k", 4).await, 4);
    assert!(!limiter.check("k").await.allowed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !limiter.check("k").await.allowed {
        assert!(Instant::now() < deadline, "never admitted again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn gcra_with_burst_one_spaces_requests_evenly() {
    let server = RedisServer::start();
    let policy = Policy::new("smooth", 10, Duration::from_secs(1))
        .unwrap()
        .algorithm(Algorithm::Gcra);
    let limiter = limiter(&server, vec![policy]).await;
    assert!(limiter.check("k").await.allowed);
    let denied = limiter.check("k").await;
    assert!(!denied.allowed);
    let retry_after = denied.retry_after.unwrap();
    assert!(
        retry_after <= Duration::from_millis(100) && retry_after >= Duration::from_millis(50),
        "{retry_after:?}"
    );
    tokio::time::sleep(retry_after).await;
    assert!(limiter.check("k").await.allowed);
    assert_every_key_expires(&server).await;
}

#[tokio::test]
async fn gcra_with_a_burst_admits_the_burst_at_once() {
    let server = RedisServer::start();
    let policy = Policy::new("bursty", 10, Duration::from_secs(10))
        .unwrap()
        .algorithm(Algorithm::Gcra)
        .burst(4)
        .unwrap();
    let limiter = limiter(&server, vec![policy]).await;
    assert_eq!(admitted(&limiter, "k", 10).await, 4);
}

#[tokio::test]
async fn a_fixed_window_admits_the_limit_per_window() {
    let server = RedisServer::start();
    let policy = Policy::new("fixed", 3, Duration::from_secs(30))
        .unwrap()
        .algorithm(Algorithm::FixedWindow);
    let limiter = limiter(&server, vec![policy]).await;
    assert_eq!(admitted(&limiter, "k", 6).await, 3);
    assert_every_key_expires(&server).await;
}

#[tokio::test]
async fn several_policies_are_checked_together_and_a_denial_consumes_none() {
    let server = RedisServer::start();
    let limiter = limiter(
        &server,
        vec![
            Policy::new("short", 3, Duration::from_secs(10)).unwrap(),
            Policy::new("long", 5, Duration::from_secs(60)).unwrap(),
        ],
    )
    .await;
    assert_eq!(admitted(&limiter, "k", 10).await, 3);
    let state = limiter.inspect("k", None).await.unwrap();
    let remaining: Vec<u64> = state
        .policies
        .iter()
        .map(|policy| policy.remaining)
        .collect();
    assert_eq!(
        remaining,
        vec![0, 2],
        "the seven denials did not count against `long`"
    );
    assert_every_key_expires(&server).await;
}

#[tokio::test]
async fn a_limit_of_one_and_the_largest_limit_work() {
    let server = RedisServer::start();
    for algorithm in [
        Algorithm::SlidingWindow,
        Algorithm::Gcra,
        Algorithm::FixedWindow,
    ] {
        let one = Policy::new("one", 1, Duration::from_secs(60))
            .unwrap()
            .algorithm(algorithm);
        let small = limiter(&server, vec![one]).await;
        assert_eq!(
            admitted(&small, &format!("one-{algorithm:?}"), 3).await,
            1,
            "{algorithm:?}"
        );

        let huge = Policy::new("huge", MAX_LIMIT, Duration::from_secs(60))
            .unwrap()
            .algorithm(algorithm);
        let large = limiter(&server, vec![huge]).await;
        let key = format!("huge-{algorithm:?}");
        assert_eq!(admitted(&large, &key, 50).await, 50, "{algorithm:?}");
        let decision = large.check(&key).await;
        // GCRA with burst 1 has, by design, nothing left to spend at once; the windows count down from the limit.
        if algorithm != Algorithm::Gcra {
            assert!(
                decision.policies[0].remaining > MAX_LIMIT - 100,
                "{algorithm:?}: {decision:?}"
            );
        }
    }
    assert_every_key_expires(&server).await;
}

#[tokio::test]
async fn costs_count_against_the_limit_and_a_cost_above_it_never_passes() {
    let server = RedisServer::start();
    let limiter = limiter(
        &server,
        vec![Policy::new("units", 10, Duration::from_secs(60)).unwrap()],
    )
    .await;
    assert!(limiter.check_tier("k", None, 7).await.allowed);
    assert!(!limiter.check_tier("k", None, 4).await.allowed);
    assert!(limiter.check_tier("k", None, 3).await.allowed);
    assert!(!limiter.check_tier("other", None, 11).await.allowed);
}

#[tokio::test]
async fn keys_with_braces_stay_in_one_hash_tag() {
    let server = RedisServer::start();
    let limiter = limiter(
        &server,
        vec![Policy::new("p", 1, Duration::from_secs(60)).unwrap()],
    )
    .await;
    assert!(limiter.check("a}{b").await.allowed);
    assert!(!limiter.check("a}{b").await.allowed);
    let mut con = server.multiplexed().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys, vec!["rl:{a%7D%7Bb}:p".to_owned()]);
}

#[tokio::test]
async fn a_key_that_looks_escaped_has_its_own_bucket() {
    // Escaping only the braces mapped `a{b` and `a%7Bb` to one Redis key: one client's requests used up the other's.
    let server = RedisServer::start();
    let limiter = limiter(
        &server,
        vec![Policy::new("p", 1, Duration::from_secs(60)).unwrap()],
    )
    .await;
    assert!(limiter.check("a{b").await.allowed);
    assert!(limiter.check("a%7Bb").await.allowed, "a different key");
    assert!(!limiter.check("a{b").await.allowed);
    assert!(!limiter.check("a%7Bb").await.allowed);
    let mut con = server.multiplexed().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    keys.sort();
    assert_eq!(keys, ["rl:{a%257Bb}:p", "rl:{a%7Bb}:p"]);
}

#[tokio::test]
async fn the_deny_cache_answers_repeated_denials_without_redis() {
    let server = RedisServer::start();
    let limiter = RateLimiter::builder()
        .redis(server.connection_manager().await)
        .policy(Policy::new("p", 2, Duration::from_secs(60)).unwrap())
        .build()
        .unwrap();
    for _ in 0..3 {
        limiter.check("flood").await;
    }
    let before = evalsha_calls(&server).await;
    for _ in 0..1_000 {
        let decision = limiter.check("flood").await;
        assert!(!decision.allowed);
        assert_eq!(decision.source, DecisionSource::DenyCache);
        assert!(decision.retry_after.unwrap() > Duration::ZERO);
    }
    assert_eq!(
        evalsha_calls(&server).await,
        before,
        "no Redis call for cached denials"
    );
    assert_eq!(
        limiter.stats().from_source(DecisionSource::DenyCache),
        (0, 1_000)
    );
    // Another key still goes to Redis.
    assert!(limiter.check("calm").await.allowed);
}

#[tokio::test]
async fn the_pre_limiter_denies_locally_before_redis() {
    let server = RedisServer::start();
    let limiter = RateLimiter::builder()
        .redis(server.connection_manager().await)
        .policy(Policy::new("p", 1_000, Duration::from_secs(60)).unwrap())
        .pre_limiter(5, Duration::from_secs(60))
        .build()
        .unwrap();
    limiter.check("warm-up").await; // loads the script (a first EVALSHA fails with NOSCRIPT)
    let before = evalsha_calls(&server).await;
    let mut sources = Vec::new();
    for _ in 0..8 {
        sources.push(limiter.check("k").await.source);
    }
    assert_eq!(&sources[..5], &[DecisionSource::Redis; 5]);
    assert_eq!(&sources[5..], &[DecisionSource::PreLimiter; 3]);
    assert_eq!(evalsha_calls(&server).await - before, 5);
}

#[tokio::test]
async fn admin_calls_inspect_reset_and_block_a_key() {
    let server = RedisServer::start();
    let limiter = limiter(
        &server,
        vec![Policy::new("p", 3, Duration::from_secs(60)).unwrap()],
    )
    .await;
    assert_eq!(admitted(&limiter, "k", 2).await, 2);
    let state = limiter.inspect("k", None).await.unwrap();
    assert_eq!(state.policies[0].remaining, 1);
    assert_eq!(
        admitted(&limiter, "k", 1).await,
        1,
        "inspecting counted nothing"
    );
    limiter.reset("k").await.unwrap();
    assert_eq!(admitted(&limiter, "k", 3).await, 3);

    limiter
        .block("blocked", Duration::from_secs(60))
        .await
        .unwrap();
    let decision = limiter.check("blocked").await;
    assert!(!decision.allowed && decision.blocked);
    assert!(decision.retry_after.unwrap() > Duration::from_secs(50));
    assert!(limiter.inspect("blocked", None).await.unwrap().blocked);
    limiter.reset("blocked").await.unwrap();
    assert!(limiter.check("blocked").await.allowed);
    assert_every_key_expires(&server).await;
}

async fn limiter_with_failure(
    server: &RedisServer,
    failure: FailurePolicy,
) -> RateLimiter<ConnectionManager> {
    RateLimiter::builder()
        .redis(server.connection_manager().await)
        .policy(Policy::new("p", 5, Duration::from_secs(60)).unwrap())
        .redis_timeout(Duration::from_millis(50))
        .on_redis_failure(failure)
        .no_deny_cache()
        .build()
        .unwrap()
}

/// Each failure policy with Redis gone: `FailOpen` allows, `FailClosed` denies, `Local` limits in process; every
/// decision takes at most the timeout (plus scheduling slack) and says which path made it.
#[tokio::test]
async fn with_redis_stopped_each_failure_policy_does_what_it_says_within_its_timeout() {
    let mut server = RedisServer::start();
    let open = limiter_with_failure(&server, FailurePolicy::FailOpen).await;
    let closed = limiter_with_failure(&server, FailurePolicy::FailClosed).await;
    let local = limiter_with_failure(&server, FailurePolicy::Local { share: 1 }).await;
    server.kill();
    for _ in 0..20 {
        let started = Instant::now();
        let decision = open.check("k").await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "took {:?}",
            started.elapsed()
        );
        assert!(decision.allowed);
        assert_eq!(decision.source, DecisionSource::FailOpen);
        let decision = closed.check("k").await;
        assert!(!decision.allowed);
        assert_eq!(decision.source, DecisionSource::FailClosed);
    }
    let mut local_admitted = 0;
    for _ in 0..20 {
        let decision = local.check("k").await;
        assert_eq!(decision.source, DecisionSource::LocalFallback);
        local_admitted += usize::from(decision.allowed);
    }
    assert_eq!(
        local_admitted, 5,
        "the local fallback applies the policy in process"
    );
    assert!(open.stats().redis_errors + open.stats().redis_timeouts > 0);
    assert_eq!(
        open.stats().redis_breaker,
        Some(tower_breaker::State::Open),
        "repeated failures open the breaker"
    );

    // Back on Redis within a second of recovery, without replaying anything.
    server.restart();
    let recovered = Instant::now();
    loop {
        let decision = open.check("fresh").await;
        if decision.source == DecisionSource::Redis {
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(1),
            "still not on Redis after {:?}",
            recovered.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let state = open.inspect("k", None).await.unwrap();
    assert_eq!(
        state.policies[0].remaining, 5,
        "no increment made during the outage was replayed"
    );
}

#[tokio::test]
async fn with_redis_accepting_but_never_answering_each_decision_returns_within_the_timeout() {
    let server = RedisServer::start();
    let open = limiter_with_failure(&server, FailurePolicy::FailOpen).await;
    let closed = limiter_with_failure(&server, FailurePolicy::FailClosed).await;
    assert!(open.check("warm").await.allowed);
    assert!(closed.check("warm").await.allowed);
    let mut admin = server.multiplexed().await;
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3_000)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    for _ in 0..10 {
        let started = Instant::now();
        let decision = open.check("k").await;
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(50 + 100),
            "a decision took {elapsed:?}"
        );
        assert!(decision.allowed);
        assert_eq!(decision.source, DecisionSource::FailOpen);
        let started = Instant::now();
        let decision = closed.check("k").await;
        assert!(started.elapsed() < Duration::from_millis(50 + 100));
        assert!(!decision.allowed);
        assert_eq!(decision.source, DecisionSource::FailClosed);
    }
    assert!(open.stats().redis_timeouts >= 3);
}
