//! [`HttpCache`]: the tiers, the in-flight fills, invalidation and stats, shared by every layer built from it.
//!
//! One concern per file, each using only this one and the ones before it: `tiers` (reading and storing in memory
//! and Redis), `flights` (fills in flight: coalescing in process and the fill lock across instances),
//! `invalidation` (by key, prefix and tag, owed while Redis is away, across instances) and `builder` (the
//! settings, validated into the shared cache).

mod builder;
mod flights;
mod invalidation;
mod tiers;

pub use builder::CacheBuilder;
pub(crate) use flights::{Flight, FlightGuard};
pub use invalidation::{InvalidateError, Purge};

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio::sync::watch;
use tower_breaker::CircuitBreaker;
use tower_redis_core::guard::Guard;
use tower_redis_core::subscription::Subscription;

use crate::directives::Targets;
use crate::entry::Entry;
use crate::invalidated::Invalidated;
use crate::memory::MemoryTier;
use crate::owed::Owed;
use crate::pending::PendingWrites;
use crate::stats::{CacheStats, Stats, Tier};
use crate::store::Store;

/// The shared cache behind every [`CacheLayer`](crate::CacheLayer) made from it: a bounded memory tier, an optional Redis tier
/// guarded by a circuit breaker, the fills in flight, and the stats. Cloning is an `Arc` bump.
#[derive(Clone)]
pub struct HttpCache {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) memory: Option<MemoryTier>,
    pub(crate) redis: Option<RedisTier>,
    replicas: Vec<RedisTier>,
    flights: DashMap<String, Arc<watch::Sender<Option<Arc<Entry>>>>>,
    /// Every background write from the moment it is queued until it is done: an invalidation waits for the ones
    /// it concerns, so they reach Redis before it deletes (otherwise a write still queued could store an entry just
    /// after the invalidation removed it).
    writes: Arc<PendingWrites>,
    pub(crate) stats: Stats,
    pub(crate) name: String,
    pub(crate) fill_lock: Option<Duration>,
    instance: String,
    /// Invalidations that could not reach Redis, replayed when it answers.
    owed: Owed,
    /// When keys, prefixes and tags were last invalidated: a fill sent before is not stored.
    invalidated: Arc<Invalidated>,
    /// Where background work runs (the Redis writes, refreshes, lock releases, body drains, replays): the
    /// runtime `build` was called in.
    runtime: tokio::runtime::Handle,
    /// The time entries are stamped and judged with.
    pub(crate) clock: CacheClock,
    /// Dropping it stops the subscription.
    listener: Option<Subscription>,
    /// The targeted cache-control fields this cache obeys (RFC 9213).
    pub(crate) targets: Targets,
}

pub(crate) struct RedisTier {
    pub(crate) store: Box<dyn Store>,
    /// The breaker and the deadline of every call to this tier.
    pub(crate) guard: Guard,
}

impl fmt::Debug for HttpCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCache")
            .field("name", &self.inner.name)
            .field("memory", &self.inner.memory)
            .field("redis", &self.inner.redis.is_some())
            .finish()
    }
}

impl HttpCache {
    /// Milliseconds since the Unix epoch, by the cache's clock (the system's, or a manual one in tests).
    pub(crate) fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// Runs `future` in the background on the runtime the cache was built in.
    pub(crate) fn spawn<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        drop(self.inner.runtime.spawn(future));
    }

    /// The breaker guarding Redis, when there is a Redis tier.
    pub fn breaker(&self) -> Option<&CircuitBreaker> {
        self.inner.redis.as_ref().map(|redis| redis.guard.breaker())
    }

    /// Counters, tier usage and the Redis breaker's state.
    pub fn stats(&self) -> CacheStats {
        let memory = self.inner.memory.as_ref().map(|memory| {
            let (bytes, entries) = memory.usage();
            (bytes, entries, memory.capacity())
        });
        let mut stats = self.inner.stats.snapshot(
            memory,
            self.inner
                .redis
                .as_ref()
                .map(|redis| redis.guard.breaker().state()),
            &self
                .inner
                .redis
                .iter()
                .chain(&self.inner.replicas)
                .map(|tier| tier.guard.stats())
                .collect::<Vec<_>>(),
            self.inner.owed.len(),
        );
        stats.subscription = self.inner.listener.as_ref().map(Subscription::stats);
        stats
    }

    /// The Redis key an entry for `key` is stored under (for inspection; see the README's key layout).
    pub fn redis_key(&self, key: &str) -> Option<String> {
        self.inner
            .redis
            .as_ref()
            .map(|redis| redis.store.entry_key(key))
    }

    pub(crate) fn hit(&self, tier: Tier) {
        self.inner.stats.hit(tier);
    }

    pub(crate) fn token(&self) -> String {
        format!("{}-{:016x}", self.inner.instance, rand_u64())
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

/// The wall clock in milliseconds since the Unix epoch.
fn system_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// Where the cache reads the time. Entries carry wall-clock times (instances share them through Redis), so a
/// manual clock is an offset from the wall clock at build time: tests move it with `ManualClock::advance` instead
/// of sleeping for an entry to go stale.
#[derive(Debug, Clone)]
pub(crate) enum CacheClock {
    System,
    Manual {
        base_ms: u64,
        clock: tower_breaker::ManualClock,
    },
}

impl CacheClock {
    pub(crate) fn manual(clock: tower_breaker::ManualClock) -> Self {
        Self::Manual {
            base_ms: system_ms(),
            clock,
        }
    }

    /// Milliseconds since the Unix epoch, by this clock.
    pub(crate) fn now_ms(&self) -> u64 {
        match self {
            Self::System => system_ms(),
            Self::Manual { base_ms, clock } => base_ms
                .saturating_add(u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX)),
        }
    }
}
