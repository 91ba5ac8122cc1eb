//! Replica reads on a real Redis Cluster (3 masters, one replica each): the cache takes a cluster connection whose
//! client routes reads to replicas (`ClusterClientBuilder::read_routing_strategy(RandomReplicaStrategy)`, the
//! non-deprecated form of `read_from_replicas()` in redis 1.8). Hits written by one instance are read from the
//! replicas by another, writes go to the masters, and a replica killed under load fails no request.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get as get_route;
use redis::cluster_async::ClusterConnection;
use redis::cluster_read_routing::RandomReplicaStrategy;
use redis_fixtures::RedisCluster;
use support::{Calls, get, serve, stored_in_redis};
use tower_redis_cache::{CacheLayer, HttpCache};

/// Paths per shard: enough that every master and every replica has work.
const PATHS_PER_SHARD: usize = 4;

fn origin(calls: &Calls) -> Router {
    let calls = calls.clone();
    Router::new().route(
        "/items/{n}",
        get_route(move |Path(n): Path<String>| {
            let calls = calls.clone();
            async move {
                let call = calls.bump();
                (
                    [("cache-control", "max-age=60")],
                    format!("item {n} from origin call {call}"),
                )
            }
        }),
    )
}

/// A cluster connection whose reads go to a random replica of the key's shard.
async fn replica_reading_connection(cluster: &RedisCluster) -> ClusterConnection {
    cluster
        .client_builder()
        .read_routing_strategy(RandomReplicaStrategy)
        .build()
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

/// The master (0, 1 or 2) whose slot range holds `key`.
fn shard_of(cluster: &RedisCluster, key: &str) -> usize {
    let mut node = cluster.node_client(0).get_connection().unwrap();
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut node)
        .unwrap();
    match slot {
        0..=5460 => 0,
        5461..=10922 => 1,
        _ => 2,
    }
}

/// `PATHS_PER_SHARD` paths whose cache entries live in each master's slot range, shard by shard.
fn paths_by_shard(cluster: &RedisCluster, cache: &HttpCache) -> [Vec<String>; 3] {
    let mut shards: [Vec<String>; 3] = Default::default();
    let mut n = 0;
    while shards.iter().any(|paths| paths.len() < PATHS_PER_SHARD) {
        n += 1;
        let path = format!("/items/{n}");
        let shard = shard_of(
            cluster,
            &cache.redis_key(&format!("http://test{path}")).unwrap(),
        );
        if shards[shard].len() < PATHS_PER_SHARD {
            shards[shard].push(path);
        }
    }
    shards
}

/// Calls of `command` on a node, counting calls the node refused before running them (`rejected_calls`, e.g. a
/// write refused by a replica with READONLY) as well as those it ran.
fn calls_including_rejected(cluster: &RedisCluster, index: usize, command: &str) -> u64 {
    let mut con = cluster.node_client(index).get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut con)
        .unwrap();
    let prefix = format!("cmdstat_{command}:");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |fields| {
            fields
                .split(',')
                .filter_map(|field| field.split_once('='))
                .filter(|(name, _)| *name == "calls" || *name == "rejected_calls")
                .map(|(_, value)| value.parse::<u64>().unwrap())
                .sum()
        })
}

/// How many times a node answered READONLY (a write sent to a replica), from `INFO errorstats`.
fn readonly_errors(cluster: &RedisCluster, index: usize) -> u64 {
    let mut con = cluster.node_client(index).get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query(&mut con)
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("errorstat_READONLY:count="))
        .map_or(0, |count| count.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_the_hits_masters_the_writes_and_a_dead_replica_fails_nothing() {
    let started = Instant::now();
    let mut cluster = RedisCluster::start_with_replicas();
    let cluster_up = started.elapsed();
    let (masters, replicas) = ([0, 1, 2], [3, 4, 5]);
    let calls = Calls::default();
    // Instance one fills; instance two has no memory tier, so each of its hits is one read of Redis.
    // A generous Redis timeout: a slow call on this busy machine must not pass for a failure caused by the kill.
    let one = HttpCache::builder()
        .redis(replica_reading_connection(&cluster).await)
        .prefix("rr:")
        .redis_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let two = HttpCache::builder()
        .redis(replica_reading_connection(&cluster).await)
        .prefix("rr:")
        .redis_timeout(Duration::from_secs(2))
        .memory_capacity(0)
        .build()
        .unwrap();
    let a = serve(origin(&calls).layer(CacheLayer::new(one.clone()))).await;
    let b = serve(origin(&calls).layer(CacheLayer::new(two.clone()))).await;
    let shards = paths_by_shard(&cluster, &one);
    let paths: Vec<String> = shards.iter().flatten().cloned().collect();

    // Fill through instance one: the scripts that write run on the masters only.
    cluster.reset_stats();
    let mut bodies: HashMap<String, String> = HashMap::new();
    for path in &paths {
        let reply = get(a, path).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(!reply.is_hit(), "{path}: {}", reply.cache_status());
        bodies.insert(path.clone(), reply.body);
    }
    assert_eq!(calls.get(), paths.len());
    // EXISTS is a read, so this also waits until each entry reached its shard's replica.
    let checker = replica_reading_connection(&cluster).await;
    for path in &paths {
        let key = one.redis_key(&format!("http://test{path}")).unwrap();
        assert!(stored_in_redis(&checker, &key).await, "{path} replicated");
    }
    let written: u64 = masters
        .iter()
        .map(|&node| cluster.command_calls(node, "evalsha"))
        .sum();
    // One script for the entry and one for the key index, per path.
    assert!(
        written >= 2 * paths.len() as u64,
        "evalsha on masters: {written}"
    );
    // Replicas run the scripts' effects (HSET, PEXPIRE, ...) from their master's stream, never a script itself,
    // and refused no write.
    for node in replicas {
        assert_eq!(
            calls_including_rejected(&cluster, node, "evalsha"),
            0,
            "replica {node}"
        );
        assert_eq!(
            calls_including_rejected(&cluster, node, "eval"),
            0,
            "replica {node}"
        );
        assert_eq!(readonly_errors(&cluster, node), 0, "replica {node}");
    }
    // Instance one's lookups before filling were reads: replicas too.
    for node in masters {
        assert_eq!(cluster.command_calls(node, "hmget"), 0, "master {node}");
    }

    // Instance two, with a fresh (no) memory tier, serves every path from Redis, read on the replicas.
    cluster.reset_stats();
    for _ in 0..3 {
        for path in &paths {
            let reply = get(b, path).await;
            assert_eq!(reply.status, StatusCode::OK);
            assert!(reply.is_hit(), "{path}: {}", reply.cache_status());
            assert_eq!(&reply.body, &bodies[path], "{path}");
        }
    }
    assert_eq!(calls.get(), paths.len(), "no origin call");
    assert_eq!(two.stats().redis_hits, 3 * paths.len() as u64);
    for (shard, node) in replicas.into_iter().enumerate() {
        assert_eq!(
            cluster.command_calls(node, "hmget"),
            3 * shards[shard].len() as u64,
            "replica {node} serves its shard's hits"
        );
    }
    for node in masters {
        assert_eq!(
            cluster.command_calls(node, "hmget"),
            0,
            "master {node} serves no hit"
        );
    }

    // Load on instance two from four tasks; one replica dies in the middle: not the one of the shard holding the
    // key index, which the invalidation at the end reads.
    let index_shard = shard_of(&cluster, "rr:index");
    let victim = (index_shard + 1) % 3;
    cluster.reset_stats();
    let baseline = two.stats().redis_hits;
    let stop = Arc::new(AtomicBool::new(false));
    let bodies = Arc::new(bodies);
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let (stop, bodies, paths) = (stop.clone(), bodies.clone(), paths.clone());
            tokio::spawn(async move {
                let mut replies = Vec::new();
                let mut i = worker;
                while !stop.load(Ordering::Relaxed) {
                    let path = &paths[i % paths.len()];
                    let reply = get(b, path).await;
                    replies.push((path.clone(), reply));
                    i += 1;
                }
                replies.into_iter().for_each(|(path, reply)| {
                    assert_eq!(reply.status, StatusCode::OK, "{path}");
                    assert!(reply.is_hit(), "{path}: {}", reply.cache_status());
                    assert_eq!(reply.body, bodies[&path], "{path}");
                });
            })
        })
        .collect();
    // The load is on, the victim serving its share of it, before the kill.
    test_support::wait_for(
        "load on the victim replica",
        Duration::from_secs(10),
        || {
            two.stats().redis_hits - baseline > 20
                && cluster.command_calls(replicas[victim], "hmget") > 0
        },
    )
    .await;
    let before_kill = two.stats().redis_hits - baseline;
    let replica_reads_before_kill = cluster.command_calls(replicas[victim], "hmget");
    cluster.kill_replica(victim);
    let killed = two.stats().redis_hits;
    // The load goes on for a while under the fault: every request in this window must succeed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let stats = two.stats();
    let after_kill = stats.redis_hits - killed;
    assert!(
        replica_reads_before_kill > 0 && before_kill > 20 && after_kill > 20,
        "load ran on both sides of the kill: {replica_reads_before_kill} replica reads and {before_kill} hits \
         before, {after_kill} after"
    );
    assert_eq!(
        calls.get(),
        paths.len(),
        "no request fell back to the origin"
    );
    assert_eq!(
        (stats.redis_errors, stats.redis_timeouts, stats.misses),
        (0, 0, 0),
        "{stats:?}"
    );
    assert!(
        stats.redis_max_micros < 1_000_000,
        "no Redis call stalled: {stats:?}"
    );
    // With its replica gone, the victim's shard is read from its master; the others still from their replicas.
    for shard in 0..3 {
        let (master, replica) = (masters[shard], replicas[shard]);
        if shard == victim {
            assert!(
                cluster.command_calls(master, "hmget") > 0,
                "master {master}"
            );
        } else {
            assert_eq!(cluster.command_calls(master, "hmget"), 0, "master {master}");
            assert!(
                cluster.command_calls(replica, "hmget") > 0,
                "replica {replica}"
            );
        }
    }

    // An invalidation reads the key index (a ZSCAN inside a script) on the index's master, never on a replica that
    // may lag behind a key stored moments ago; the deletes go to the masters too.
    cluster.reset_stats();
    assert_eq!(
        one.invalidate_prefix("http://test/items/").await.unwrap(),
        paths.len() as u64
    );
    for node in replicas
        .into_iter()
        .filter(|&node| node != replicas[victim])
    {
        assert_eq!(cluster.command_calls(node, "zscan"), 0, "replica {node}");
    }
    assert_eq!(cluster.command_calls(masters[index_shard], "zscan"), 1);
    let masters_deleted: u64 = masters
        .iter()
        .map(|&node| cluster.command_calls(node, "del"))
        .sum();
    assert!(masters_deleted > 0);
    for node in replicas
        .into_iter()
        .filter(|&node| node != replicas[victim])
    {
        assert_eq!(readonly_errors(&cluster, node), 0, "replica {node}");
    }
    eprintln!(
        "cluster replica reads: cluster up in {cluster_up:?}; {} hits during the load ({before_kill} before the \
         kill), slowest Redis call {} µs; whole test {:?}",
        stats.redis_hits - baseline,
        stats.redis_max_micros,
        started.elapsed()
    );
}
