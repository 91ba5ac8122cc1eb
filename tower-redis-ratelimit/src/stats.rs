//! Counters and the [`LimiterStats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use tower_breaker::State;
use tower_redis_core::guard::Guard;

use crate::decision::{Decision, DecisionSource};

#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// [source][0 = denied, 1 = allowed]
    decisions: [[AtomicU64; 2]; DecisionSource::ALL.len()],
    shadow_denials: AtomicU64,
}

impl Stats {
    pub(crate) fn record(&self, decision: &Decision) {
        self.decisions[decision.source.index()][usize::from(decision.allowed)]
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn shadow_denial(&self) {
        self.shadow_denials.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(
        &self,
        deny_cache_entries: usize,
        guard: &Guard,
        local_only: bool,
    ) -> LimiterStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let by_source = DecisionSource::ALL
            .iter()
            .zip(&self.decisions)
            .map(|(source, counts)| SourceStats {
                source: *source,
                allowed: load(&counts[1]),
                denied: load(&counts[0]),
            })
            .filter(|stats| stats.allowed + stats.denied > 0)
            .collect::<Vec<_>>();
        let redis = guard.stats();
        LimiterStats {
            allowed: by_source.iter().map(|stats| stats.allowed).sum(),
            denied: by_source.iter().map(|stats| stats.denied).sum(),
            by_source,
            shadow_denials: load(&self.shadow_denials),
            redis_errors: redis.errors,
            redis_timeouts: redis.timeouts,
            redis_calls: redis.calls,
            redis_mean_micros: redis.mean_micros,
            redis_max_micros: redis.max_micros,
            deny_cache_entries,
            redis_breaker: (!local_only).then(|| guard.breaker().state()),
        }
    }
}

/// Decisions made by one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct SourceStats {
    /// The path.
    pub source: DecisionSource,
    /// Requests it allowed.
    pub allowed: u64,
    /// Requests it denied.
    pub denied: u64,
}

/// A snapshot of a limiter's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct LimiterStats {
    /// Requests allowed, by any path.
    pub allowed: u64,
    /// Requests denied, by any path (shadow-mode denials included: they were decided, then let through).
    pub denied: u64,
    /// Decisions by path (paths that decided nothing are left out).
    pub by_source: Vec<SourceStats>,
    /// Denials that shadow mode let through.
    pub shadow_denials: u64,
    /// Redis calls that failed.
    pub redis_errors: u64,
    /// Redis calls that ran past the timeout.
    pub redis_timeouts: u64,
    /// Redis calls that answered.
    pub redis_calls: u64,
    /// Their mean latency.
    pub redis_mean_micros: u64,
    /// Their worst latency.
    pub redis_max_micros: u64,
    /// Keys in the deny cache.
    pub deny_cache_entries: usize,
    /// The state of the breaker guarding Redis; `None` for a local-only limiter, which has no Redis (as the
    /// cache's `CacheStats::redis_breaker` is `None` without a Redis tier).
    pub redis_breaker: Option<State>,
}

impl LimiterStats {
    /// Decisions made by `source` as (allowed, denied).
    pub fn from_source(&self, source: DecisionSource) -> (u64, u64) {
        self.by_source
            .iter()
            .find(|stats| stats.source == source)
            .map_or((0, 0), |stats| (stats.allowed, stats.denied))
    }
}
