//! The quickstart binary as a user runs it: on memory without Redis, and two instances sharing a real redis-server.

#![allow(clippy::unwrap_used)] // tests fail loudly on a process that misbehaves

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis_fixtures::RedisServer;
use test_support::{get, holds_within};

/// A running quickstart, killed when dropped.
struct Quickstart {
    child: Child,
    address: SocketAddr,
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on a free port (with `REDIS_URL` when given) and reads its address from its output.
fn start(redis_url: Option<&str>) -> Quickstart {
    let mut command = Command::new(env!("CARGO_BIN_EXE_quickstart"));
    command.env("PORT", "0").env_remove("REDIS_URL").stdout(Stdio::piped());
    if let Some(url) = redis_url {
        command.env("REDIS_URL", url);
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let address = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("listening on http://").map(str::to_owned))
        .expect("the quickstart never said where it listens")
        .parse()
        .unwrap();
    Quickstart { child, address }
}

#[tokio::test]
async fn without_redis_it_caches_limits_and_reaches_itself_through_discovery() {
    let app = start(None);
    let first = get(app.address, "/items/1").await;
    assert_eq!((first.status.as_u16(), first.body.as_str()), (200, "item 1\n"));
    assert!(!first.is_hit(), "{}", first.cache_status());
    let second = get(app.address, "/items/1").await;
    assert!(second.is_hit(), "{}", second.cache_status());
    // Discovery's first poll may still be on its way: ask every 200 ms (each ask counts against the rate limit).
    let mut greeting = get(app.address, "/greeting").await;
    for _ in 0..25 {
        if greeting.status.as_u16() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        greeting = get(app.address, "/greeting").await;
    }
    assert_eq!(
        greeting.body,
        format!("hello from {}\n", app.address),
        "through the balancer to itself"
    );
    // 60 a minute per client address, all routes together: the first ones are used, the rest are counted.
    let statuses: Vec<u16> = hellos(app.address, 70).await;
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn two_instances_on_one_redis_share_the_cache() {
    let redis = RedisServer::start();
    let (one, two) = (start(Some(&redis.url())), start(Some(&redis.url())));
    let filled = get(one.address, "/items/7").await;
    assert!(!filled.is_hit(), "{}", filled.cache_status());
    // The second instance never saw /items/7: a hit there is an entry read from Redis.
    let shared = holds_within(Duration::from_secs(5), || async {
        get(two.address, "/items/7").await.is_hit()
    });
    assert!(shared.await, "the second instance reads the first one's entry from Redis");
    assert!(redis.command_calls("evalsha") > 0, "the rate limit decides in Redis");
}

/// The statuses of `count` sequential `GET /hello`.
async fn hellos(address: SocketAddr, count: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..count {
        statuses.push(get(address, "/hello").await.status.as_u16());
    }
    statuses
}
