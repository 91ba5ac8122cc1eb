//! Accuracy across processes: four processes, each with many concurrent clients, share one limit on a real Redis
//! (a single node, and a 3-master Cluster). Every admitted request's Redis timestamp is collected, and every sliding
//! window of the policy's length is checked.
//!
//! - GCRA never admits more than the limit in any window.
//! - The sliding-window counter admits at most 1 % more than the limit in any window (by construction it admits no
//!   more than the limit: the previous window is kept in sub-windows and counted conservatively), from the first
//!   request on, including the first windows of a key that turns hot mid-window.
//! - The fixed window is the contrast: about twice the limit passes around a boundary.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use redis_fixtures::{RedisCluster, RedisServer};
use tower_redis_ratelimit::{Algorithm, Policy, RateLimiter};

const PROCESSES: usize = 4;
const TASKS: usize = 12;
const LIMIT: u64 = 40;
const WINDOW_MS: u64 = 1_000;
const RUN_MS: u64 = 4_500;

/// One worker process: `TASKS` concurrent clients hammering one key until the run ends; prints each admitted
/// request's Redis time, then the number of Redis errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by the accuracy tests"]
async fn accuracy_worker() {
    let Ok(target) = std::env::var("ACCURACY_TARGET") else {
        return;
    };
    let algorithm = match std::env::var("ACCURACY_ALGORITHM").unwrap().as_str() {
        "gcra" => Algorithm::Gcra,
        "fixed" => Algorithm::FixedWindow,
        _ => Algorithm::SlidingWindow,
    };
    let policy = Policy::new("shared", LIMIT, Duration::from_millis(WINDOW_MS))
        .unwrap()
        .algorithm(algorithm);
    let prefix = std::env::var("ACCURACY_PREFIX").unwrap();
    let times = if let Some(nodes) = target.strip_prefix("cluster:") {
        let nodes: Vec<String> = nodes.split(',').map(str::to_owned).collect();
        let connection = redis::cluster::ClusterClient::builder(nodes)
            .response_timeout(Duration::from_secs(2))
            .build()
            .unwrap()
            .get_async_connection()
            .await
            .unwrap();
        run(RateLimiter::builder().redis(connection), policy, prefix).await
    } else {
        let connection = redis::Client::open(target.as_str())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        run(RateLimiter::builder().redis(connection), policy, prefix).await
    };
    let (times, errors) = times;
    for time in times {
        println!("ADMITTED {time}");
    }
    println!("ERRORS {errors}");
}

async fn run<C>(
    builder: tower_redis_ratelimit::RateLimiterBuilder<C>,
    policy: Policy,
    prefix: String,
) -> (Vec<u64>, u64)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    // No deny cache: every request asks Redis, the hardest case for accuracy.
    let limiter = builder
        .prefix(prefix)
        .policy(policy)
        .no_deny_cache()
        .redis_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(RUN_MS);
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let limiter = limiter.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = Vec::new();
            while Instant::now() < deadline {
                let decision = limiter.check("hot").await;
                if decision.allowed {
                    admitted.push(decision.redis_time_micros.unwrap());
                }
                // Many clients, each sending again soon after an answer: a steady overload of the limit.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            admitted
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let stats = limiter.stats();
    (all, stats.redis_errors + stats.redis_timeouts)
}

/// Runs `PROCESSES` workers against `target` and returns every admitted request's Redis time, sorted.
fn run_workers(target: &str, algorithm: &str, prefix: &str) -> Vec<u64> {
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "accuracy_worker",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env("ACCURACY_TARGET", target)
                .env("ACCURACY_ALGORITHM", algorithm)
                .env("ACCURACY_PREFIX", prefix)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut times = Vec::new();
    for mut child in children {
        let stdout = child.stdout.take().unwrap();
        let mut errors = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(index) = line.find("ADMITTED ") {
                times.push(line[index + 9..].trim().parse::<u64>().unwrap());
            } else if let Some(index) = line.find("ERRORS ") {
                errors = Some(line[index + 7..].trim().parse::<u64>().unwrap());
            }
        }
        assert!(child.wait().unwrap().success());
        assert_eq!(
            errors,
            Some(0),
            "a worker saw Redis errors (CROSSSLOT, NOSCRIPT, timeouts...)"
        );
    }
    times.sort_unstable();
    times
}

/// The most requests admitted in any window of `WINDOW_MS` that starts at or after `from` (µs).
fn max_in_any_window(times: &[u64], from: u64) -> u64 {
    let window = WINDOW_MS * 1_000;
    let start = times.partition_point(|&time| time < from);
    let mut most = 0;
    let mut right = start;
    for left in start..times.len() {
        while right < times.len() && times[right] < times[left] + window {
            right += 1;
        }
        most = most.max((right - left) as u64);
    }
    most
}

fn check_all(target: &str, prefix: &str) {
    let gcra = run_workers(target, "gcra", &format!("{prefix}gcra:"));
    assert!(
        gcra.len() as u64 >= LIMIT * 3,
        "too few admissions to judge: {}",
        gcra.len()
    );
    let gcra_max = max_in_any_window(&gcra, 0);

    let sliding = run_workers(target, "sliding", &format!("{prefix}sliding:"));
    let first = sliding[0];
    let steady_from = (first / (WINDOW_MS * 1_000) + 2) * WINDOW_MS * 1_000;
    let sliding_steady = max_in_any_window(&sliding, steady_from);
    let sliding_all = max_in_any_window(&sliding, 0);

    let fixed = run_workers(target, "fixed", &format!("{prefix}fixed:"));
    let fixed_max = max_in_any_window(&fixed, 0);

    println!(
        "{target}: limit {LIMIT} per {WINDOW_MS} ms, {PROCESSES} processes x {TASKS} clients; most admitted in any \
         window: GCRA {gcra_max} ({} admitted), sliding counter {sliding_all} ({sliding_steady} once steady, {} \
         admitted), fixed window {fixed_max}",
        gcra.len(),
        sliding.len()
    );
    assert!(
        gcra_max <= LIMIT,
        "GCRA admitted {gcra_max} in one window (limit {LIMIT})"
    );
    assert!(
        sliding_all as f64 <= LIMIT as f64 * 1.01,
        "the sliding counter admitted {sliding_all} in one window (limit {LIMIT}; {sliding_steady} once steady)"
    );
    assert!(
        sliding.len() as u64 >= LIMIT * 3,
        "the sliding counter should still admit about the limit per window: {} in {RUN_MS} ms",
        sliding.len()
    );
    assert!(
        fixed_max as f64 >= LIMIT as f64 * 1.5,
        "the fixed window should show its boundary burst: {fixed_max}"
    );
}

#[test]
fn processes_sharing_one_limit_on_a_single_node_stay_within_it() {
    let server = RedisServer::start();
    check_all(&server.url(), "acc:");
}

#[test]
fn processes_sharing_one_limit_on_a_cluster_stay_within_it_without_crossslot_or_noscript() {
    let cluster = RedisCluster::start();
    let target = format!("cluster:{}", cluster.urls().join(","));
    check_all(&target, "acc:");
    // The script was loaded on the slot owner only when first needed; flush it everywhere and run again.
    for index in 0..3 {
        let mut con = cluster.node_client(index).get_connection().unwrap();
        let () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut con).unwrap();
    }
    let gcra = run_workers(&target, "gcra", "acc2:gcra:");
    assert!(max_in_any_window(&gcra, 0) <= LIMIT);
}
