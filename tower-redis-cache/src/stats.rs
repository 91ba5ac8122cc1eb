//! Counters and the [`CacheStats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tower_breaker::State;

/// Where a hit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Memory,
    Redis,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) memory_hits: AtomicU64,
    pub(crate) redis_hits: AtomicU64,
    pub(crate) memory_lookups: AtomicU64,
    pub(crate) redis_lookups: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) revalidations: AtomicU64,
    pub(crate) not_modified: AtomicU64,
    pub(crate) background_refreshes: AtomicU64,
    pub(crate) collapsed: AtomicU64,
    pub(crate) bypassed: AtomicU64,
    pub(crate) stores: AtomicU64,
    pub(crate) not_stored: AtomicU64,
    pub(crate) origin_errors: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) undecodable: AtomicU64,
    pub(crate) redis_errors: AtomicU64,
    pub(crate) redis_timeouts: AtomicU64,
    pub(crate) redis_skipped: AtomicU64,
    redis_calls: AtomicU64,
    redis_micros: AtomicU64,
    redis_max_micros: AtomicU64,
}

impl Stats {
    pub(crate) fn hit(&self, tier: Tier) {
        match tier {
            Tier::Memory => &self.memory_hits,
            Tier::Redis => &self.redis_hits,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn redis_latency(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.redis_calls.fetch_add(1, Ordering::Relaxed);
        self.redis_micros.fetch_add(micros, Ordering::Relaxed);
        self.redis_max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(
        &self,
        memory: Option<(u64, u64, u64)>,
        breaker: Option<State>,
    ) -> CacheStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let ratio = |hits: u64, lookups: u64| {
            if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            }
        };
        let calls = load(&self.redis_calls);
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
            redis_mean_micros: self
                .redis_micros
                .load(Ordering::Relaxed)
                .checked_div(calls)
                .unwrap_or(0),
            redis_max_micros: load(&self.redis_max_micros),
            memory_bytes,
            memory_entries,
            memory_capacity,
            redis_breaker: breaker,
        }
    }
}

/// A snapshot of a cache's counters since it was built.
#[derive(Debug, Clone, Serialize)]
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
}
