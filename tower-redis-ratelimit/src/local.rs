//! The local paths: the deny cache, and `governor` limiters (the pre-limiter shield and the failure fallback).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ConfigError;
use crate::policy::Policy;

/// Keys known to be denied until a moment, so repeated requests are denied without a Redis call.
#[derive(Debug)]
pub(crate) struct DenyCache {
    entries: DashMap<String, (Instant, u32)>,
    capacity: usize,
}

impl DenyCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: DashMap::new(),
            capacity,
        }
    }

    /// The time left for `key` if it is denied for requests of at least `cost`.
    pub(crate) fn denied(&self, key: &str, cost: u32) -> Option<Duration> {
        let now = Instant::now();
        let entry = self.entries.get(key)?;
        let (until, denied_cost) = *entry;
        drop(entry);
        if until <= now {
            self.entries.remove_if(key, |_, (until, _)| *until <= now);
            return None;
        }
        (cost >= denied_cost).then(|| until - now)
    }

    /// Remembers that `key` is denied for requests of `cost` or more for `retry_after`.
    pub(crate) fn remember(&self, key: &str, cost: u32, retry_after: Duration) {
        if self.entries.len() >= self.capacity {
            let now = Instant::now();
            self.entries.retain(|_, (until, _)| *until > now);
            if self.entries.len() >= self.capacity {
                return; // full of live entries: those keys will simply ask Redis
            }
        }
        self.entries
            .insert(key.to_owned(), (Instant::now() + retry_after, cost));
    }

    pub(crate) fn forget(&self, key: &str) {
        self.entries.remove(key);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A per-key `governor` limiter for each policy of a set.
#[derive(Debug)]
pub(crate) struct LocalLimiter {
    limiters: Vec<DefaultKeyedRateLimiter<String>>,
    decisions: AtomicU64,
}

/// Turns "`limit` per `window`" into a governor quota with the whole limit as burst.
pub(crate) fn quota(limit: u64, window: Duration) -> Result<Quota, ConfigError> {
    let limit32 = u32::try_from(limit)
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| {
            crate::error::config_error(
                "local limit",
                format!("must be between 1 and {}; got {limit}", u32::MAX),
            )
        })?;
    let period = window / limit32.get();
    let period = period.max(Duration::from_nanos(1));
    Quota::with_period(period)
        .map(|quota| quota.allow_burst(limit32))
        .ok_or_else(|| {
            crate::error::config_error("local limit", "the period per request must be above zero")
        })
}

impl LocalLimiter {
    /// One governor limiter per policy, each allowing `policy.limit() / share` per window (at least 1).
    pub(crate) fn for_policies(policies: &[Policy], share: u32) -> Result<Self, ConfigError> {
        let limiters = policies
            .iter()
            .map(|policy| {
                let limit = (policy.limit() / u64::from(share.max(1))).max(1);
                Ok(RateLimiter::keyed(quota(limit, policy.window())?))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(Self {
            limiters,
            decisions: AtomicU64::new(0),
        })
    }

    /// Whether every policy admits `cost` for `key`; on a denial, the longest wait.
    ///
    /// Like the Redis script, all policies must admit; unlike it, a policy that admitted keeps the cells it took
    /// when a later one denies (governor has no rollback); the fallback is an approximation by nature.
    pub(crate) fn check(&self, key: &str, cost: u32) -> Result<(), Duration> {
        // Keyed state grows with distinct keys; drop idle ones now and then.
        if self.decisions.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            for limiter in &self.limiters {
                limiter.retain_recent();
            }
        }
        let Some(cost) = NonZeroU32::new(cost) else {
            return Ok(());
        };
        let key = key.to_owned();
        let mut wait = None::<Duration>;
        for limiter in &self.limiters {
            match limiter.check_key_n(&key, cost) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let this = not_until.wait_time_from(governor::clock::Clock::now(
                        &governor::clock::DefaultClock::default(),
                    ));
                    wait = Some(wait.map_or(this, |w| w.max(this)));
                }
                // More than the burst can ever allow.
                Err(_) => wait = Some(Duration::from_secs(1)),
            }
        }
        wait.map_or(Ok(()), Err)
    }
}
