//! Counters and the [`CacheStats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use tower_breaker::State;
use tower_redis_core::{GuardStats, SubscriptionStats};

/// Where a hit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Memory,
    Redis,
}

/// Something the cache counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    MemoryLookups,
    RedisLookups,
    Misses,
    StaleServed,
    Revalidations,
    NotModified,
    BackgroundRefreshes,
    Collapsed,
    Bypassed,
    Stores,
    NotStored,
    OriginErrors,
    Invalidations,
    Undecodable,
    RedisErrors,
    RedisTimeouts,
    RedisSkipped,
    ReplicaHits,
    ReplicaFallbacks,
    InvalidationsOwed,
    InvalidationsReplayed,
    OwedBypasses,
}

impl Event {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    const ALL: [Self; 22] = [
        Self::MemoryLookups,
        Self::RedisLookups,
        Self::Misses,
        Self::StaleServed,
        Self::Revalidations,
        Self::NotModified,
        Self::BackgroundRefreshes,
        Self::Collapsed,
        Self::Bypassed,
        Self::Stores,
        Self::NotStored,
        Self::OriginErrors,
        Self::Invalidations,
        Self::Undecodable,
        Self::RedisErrors,
        Self::RedisTimeouts,
        Self::RedisSkipped,
        Self::ReplicaHits,
        Self::ReplicaFallbacks,
        Self::InvalidationsOwed,
        Self::InvalidationsReplayed,
        Self::OwedBypasses,
    ];

    /// The `event` label of the `metrics` counter.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::MemoryLookups => "memory_lookups",
            Self::RedisLookups => "redis_lookups",
            Self::Misses => "misses",
            Self::StaleServed => "stale_served",
            Self::Revalidations => "revalidations",
            Self::NotModified => "not_modified",
            Self::BackgroundRefreshes => "background_refreshes",
            Self::Collapsed => "collapsed",
            Self::Bypassed => "bypassed",
            Self::Stores => "stores",
            Self::NotStored => "not_stored",
            Self::OriginErrors => "origin_errors",
            Self::Invalidations => "invalidations",
            Self::Undecodable => "undecodable",
            Self::RedisErrors => "redis_errors",
            Self::RedisTimeouts => "redis_timeouts",
            Self::RedisSkipped => "redis_skipped",
            Self::ReplicaHits => "replica_hits",
            Self::ReplicaFallbacks => "replica_fallbacks",
            Self::InvalidationsOwed => "invalidations_owed",
            Self::InvalidationsReplayed => "invalidations_replayed",
            Self::OwedBypasses => "owed_bypasses",
        }
    }
}

/// The `metrics` handles, registered once when the cache is built.
#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Handles {
    events: Vec<metrics::Counter>,
    memory_hits: metrics::Counter,
    redis_hits: metrics::Counter,
}

#[cfg(feature = "metrics")]
impl Handles {
    fn new(name: &str) -> Self {
        let counter = |event: &'static str| metrics::counter!("tower_redis_cache_events_total", "cache" => name.to_owned(), "event" => event);
        Self {
            events: Event::ALL
                .iter()
                .map(|event| counter(event.name()))
                .collect(),
            memory_hits: counter("memory_hits"),
            redis_hits: counter("redis_hits"),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    #[cfg(feature = "metrics")]
    handles: Option<Handles>,
    pub(crate) memory_hits: AtomicU64,
    pub(crate) redis_hits: AtomicU64,
    memory_lookups: AtomicU64,
    redis_lookups: AtomicU64,
    misses: AtomicU64,
    stale_served: AtomicU64,
    revalidations: AtomicU64,
    not_modified: AtomicU64,
    background_refreshes: AtomicU64,
    collapsed: AtomicU64,
    bypassed: AtomicU64,
    stores: AtomicU64,
    not_stored: AtomicU64,
    origin_errors: AtomicU64,
    invalidations: AtomicU64,
    undecodable: AtomicU64,
    redis_errors: AtomicU64,
    redis_timeouts: AtomicU64,
    redis_skipped: AtomicU64,
    replica_hits: AtomicU64,
    replica_fallbacks: AtomicU64,
    invalidations_owed: AtomicU64,
    invalidations_replayed: AtomicU64,
    owed_bypasses: AtomicU64,
}

impl Stats {
    pub(crate) fn named(name: &str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = name;
        Self {
            #[cfg(feature = "metrics")]
            handles: Some(Handles::new(name)),
            ..Self::default()
        }
    }

    pub(crate) fn bump(&self, event: Event) {
        let counter = match event {
            Event::MemoryLookups => &self.memory_lookups,
            Event::RedisLookups => &self.redis_lookups,
            Event::Misses => &self.misses,
            Event::StaleServed => &self.stale_served,
            Event::Revalidations => &self.revalidations,
            Event::NotModified => &self.not_modified,
            Event::BackgroundRefreshes => &self.background_refreshes,
            Event::Collapsed => &self.collapsed,
            Event::Bypassed => &self.bypassed,
            Event::Stores => &self.stores,
            Event::NotStored => &self.not_stored,
            Event::OriginErrors => &self.origin_errors,
            Event::Invalidations => &self.invalidations,
            Event::Undecodable => &self.undecodable,
            Event::RedisErrors => &self.redis_errors,
            Event::RedisTimeouts => &self.redis_timeouts,
            Event::RedisSkipped => &self.redis_skipped,
            Event::ReplicaHits => &self.replica_hits,
            Event::ReplicaFallbacks => &self.replica_fallbacks,
            Event::InvalidationsOwed => &self.invalidations_owed,
            Event::InvalidationsReplayed => &self.invalidations_replayed,
            Event::OwedBypasses => &self.owed_bypasses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            handles.events[event as usize].increment(1);
        }
    }

    pub(crate) fn hit(&self, tier: Tier) {
        match tier {
            Tier::Memory => &self.memory_hits,
            Tier::Redis => &self.redis_hits,
        }
        .fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            match tier {
                Tier::Memory => &handles.memory_hits,
                Tier::Redis => &handles.redis_hits,
            }
            .increment(1);
        }
    }

    pub(crate) fn snapshot(
        &self,
        memory: Option<(u64, u64, u64)>,
        breaker: Option<State>,
        redis: &[GuardStats],
        owed: usize,
    ) -> CacheStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let ratio = |hits: u64, lookups: u64| {
            if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            }
        };
        // The latency of the answered Redis calls, over the primary and the replicas: what their guards measured.
        let calls: u64 = redis.iter().map(|guard| guard.calls).sum();
        let micros: u64 = redis
            .iter()
            .map(|guard| guard.mean_micros.saturating_mul(guard.calls))
            .fold(0, u64::saturating_add);
        let max_micros = redis
            .iter()
            .map(|guard| guard.max_micros)
            .max()
            .unwrap_or(0);
        let (memory_bytes, memory_entries, memory_capacity) = memory.unwrap_or_default();
        CacheStats {
            memory_hits: load(&self.memory_hits),
            redis_hits: load(&self.redis_hits),
            misses: load(&self.misses),
            memory_hit_ratio: ratio(load(&self.memory_hits), load(&self.memory_lookups)),
            redis_hit_ratio: ratio(load(&self.redis_hits), load(&self.redis_lookups)),
            stale_served: load(&self.stale_served),
            revalidations: load(&self.revalidations),
            not_modified: load(&self.not_modified),
            background_refreshes: load(&self.background_refreshes),
            collapsed: load(&self.collapsed),
            bypassed: load(&self.bypassed),
            stores: load(&self.stores),
            not_stored: load(&self.not_stored),
            origin_errors: load(&self.origin_errors),
            invalidations: load(&self.invalidations),
            undecodable: load(&self.undecodable),
            redis_errors: load(&self.redis_errors),
            redis_timeouts: load(&self.redis_timeouts),
            redis_skipped: load(&self.redis_skipped),
            replica_hits: load(&self.replica_hits),
            replica_fallbacks: load(&self.replica_fallbacks),
            invalidations_owed: load(&self.invalidations_owed),
            invalidations_replayed: load(&self.invalidations_replayed),
            owed_bypasses: load(&self.owed_bypasses),
            owed_now: owed as u64,
            redis_mean_micros: micros.checked_div(calls).unwrap_or(0),
            redis_max_micros: max_micros,
            memory_bytes,
            memory_entries,
            memory_capacity,
            redis_breaker: breaker,
            subscription: None,
        }
    }
}

/// A snapshot of a cache's counters since it was built.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct CacheStats {
    /// Responses served from the memory tier.
    pub memory_hits: u64,
    /// Responses served from Redis.
    pub redis_hits: u64,
    /// Cacheable requests that found nothing usable and went to the origin.
    pub misses: u64,
    /// Memory hits over memory lookups.
    pub memory_hit_ratio: f64,
    /// Redis hits over Redis lookups (those the memory tier could not answer).
    pub redis_hit_ratio: f64,
    /// Stale responses served (stale-while-revalidate, stale-if-error, a request's max-stale).
    pub stale_served: u64,
    /// Conditional requests sent to the origin to validate a stored response.
    pub revalidations: u64,
    /// Revalidations the origin answered with 304.
    pub not_modified: u64,
    /// Background refreshes started by stale-while-revalidate.
    pub background_refreshes: u64,
    /// Requests answered by another request's origin call.
    pub collapsed: u64,
    /// Requests passed through without a lookup (unsafe methods, bypass predicates, ranges).
    pub bypassed: u64,
    /// Responses stored.
    pub stores: u64,
    /// Origin responses that were not storable.
    pub not_stored: u64,
    /// Origin calls that failed, timed out or answered 5xx.
    pub origin_errors: u64,
    /// Invalidation calls.
    pub invalidations: u64,
    /// Redis values that did not decode (counted as misses).
    pub undecodable: u64,
    /// Redis calls that failed.
    pub redis_errors: u64,
    /// Redis calls that timed out.
    pub redis_timeouts: u64,
    /// Redis calls skipped because the breaker was open.
    pub redis_skipped: u64,
    /// Redis hits answered by a read replica.
    pub replica_hits: u64,
    /// Replica reads that missed or failed and went to the primary.
    pub replica_fallbacks: u64,
    /// Invalidations that could not reach Redis (down, stalled, or its breaker open) and were owed: replayed once
    /// it answers; until then this instance reads nothing from Redis.
    pub invalidations_owed: u64,
    /// Owed invalidations that reached Redis later.
    pub invalidations_replayed: u64,
    /// Redis lookups skipped (answered as misses) because invalidations were owed.
    pub owed_bypasses: u64,
    /// Invalidations owed right now.
    pub owed_now: u64,
    /// Mean latency of successful Redis reads, in µs.
    pub redis_mean_micros: u64,
    /// Slowest successful Redis read, in µs.
    pub redis_max_micros: u64,
    /// Bytes in the memory tier.
    pub memory_bytes: u64,
    /// Keys in the memory tier.
    pub memory_entries: u64,
    /// The memory tier's bound in bytes (0: no memory tier).
    pub memory_capacity: u64,
    /// The state of the breaker guarding Redis (`None` without a Redis tier).
    pub redis_breaker: Option<State>,
    /// The invalidation subscription's counters (`None` without [`subscribe`](crate::CacheBuilder::subscribe)):
    /// `connected` says whether other instances' invalidations reach this one now.
    pub subscription: Option<SubscriptionStats>,
}
