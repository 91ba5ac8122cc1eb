//! Counters, the latency summary, and the [`BreakerStats`] snapshot.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::padded::{Padded, STRIPES, Striped, add_to_stripe, this_thread_stripe};
use crate::state::State;

/// The breaker's counters. The ones every call writes (requests, and successes recorded in the window) are
/// striped per thread; the others change only on failures, rejections and the like.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) striped: Striped,
    pub(crate) failures: AtomicU64,
    pub(crate) ignored: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) rejects: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) slow: AtomicU64,
    /// Outcomes recorded outside the striped window counts (failures and slow calls of the time window, probes,
    /// stale, disabled). With the window's own total this gives the success count without a counter written by
    /// every success.
    pub(crate) other_records: AtomicU64,
    pub(crate) fallback_successes: AtomicU64,
    pub(crate) fallback_failures: AtomicU64,
    pub(crate) thresholds_crossed: AtomicU64,
    pub(crate) hinted_openings: AtomicU64,
    pub(crate) transitions: [AtomicU64; State::COUNT],
}

impl Counters {
    #[inline]
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

// Latency buckets: two per power of two of microseconds, from 1 µs to about 71 minutes.
const LATENCY_BUCKETS: usize = 64;

fn bucket_of(micros: u64) -> usize {
    if micros < 2 {
        return usize::try_from(micros).unwrap_or(0);
    }
    let power = 63 - micros.leading_zeros();
    let half = (micros >> (power - 1)) & 1;
    usize::try_from(2 * u64::from(power) + half)
        .unwrap_or(LATENCY_BUCKETS - 1)
        .min(LATENCY_BUCKETS - 1)
}

/// The largest value of a bucket, used as the estimate for the quantiles that fall in it.
fn bucket_upper(index: usize) -> u64 {
    if index < 2 {
        return index as u64;
    }
    let power = (index / 2) as u32;
    let half = (index % 2) as u64;
    (1u64 << power) + (half + 1) * (1u64 << (power - 1)) - 1
}

/// A fixed-size latency histogram (about 12 % relative error), written without locks. Each thread writes a stripe
/// of its own (allocated on its first timed call), so timed calls on different cores never write the same cache
/// line; a summary adds the stripes up.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    stripes: [OnceLock<Box<Padded<LatencyStripe>>>; STRIPES],
}

#[derive(Debug)]
struct LatencyStripe {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_micros: AtomicU64,
    max_micros: AtomicU64,
}

impl Default for LatencyStripe {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
        }
    }
}

impl Latency {
    pub(crate) fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let (index, owned) = this_thread_stripe();
        let stripe = &self.stripes[index].get_or_init(Box::default).0;
        add_to_stripe(&stripe.buckets[bucket_of(micros)], 1, owned);
        add_to_stripe(&stripe.sum_micros, micros, owned);
        if micros > stripe.max_micros.load(Ordering::Relaxed) {
            stripe.max_micros.fetch_max(micros, Ordering::Relaxed);
        }
    }

    pub(crate) fn summary(&self) -> LatencySummary {
        let stripes: Vec<&LatencyStripe> = self
            .stripes
            .iter()
            .filter_map(|stripe| stripe.get().map(|stripe| &stripe.0))
            .collect();
        let counts: Vec<u64> = (0..LATENCY_BUCKETS)
            .map(|bucket| {
                stripes
                    .iter()
                    .map(|stripe| stripe.buckets[bucket].load(Ordering::Relaxed))
                    .sum()
            })
            .collect();
        let sum: u64 = stripes
            .iter()
            .map(|stripe| stripe.sum_micros.load(Ordering::Relaxed))
            .fold(0, u64::saturating_add);
        let max = stripes
            .iter()
            .map(|stripe| stripe.max_micros.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let samples: u64 = counts.iter().sum();
        let quantile = |q: f64| -> u64 {
            if samples == 0 {
                return 0;
            }
            let rank = ((samples as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (index, count) in counts.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return bucket_upper(index);
                }
            }
            bucket_upper(LATENCY_BUCKETS - 1)
        };
        LatencySummary {
            samples,
            mean_micros: sum.checked_div(samples).unwrap_or(0),
            p50_micros: quantile(0.5).min(max),
            p90_micros: quantile(0.9).min(max),
            p99_micros: quantile(0.99).min(max),
            max_micros: max,
        }
    }
}

/// A summary of sampled call latencies, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct LatencySummary {
    /// How many calls were timed (one in `latency_sample_every`, or every call with slow-call detection on).
    pub samples: u64,
    /// Mean latency.
    pub mean_micros: u64,
    /// Median (upper bound of its histogram bucket, at most the maximum).
    pub p50_micros: u64,
    /// 90th percentile.
    pub p90_micros: u64,
    /// 99th percentile.
    pub p99_micros: u64,
    /// The slowest timed call.
    pub max_micros: u64,
}

/// How often the fallback ran, by its own outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct FallbackStats {
    /// Fallback calls that produced a response.
    pub successes: u64,
    /// Fallback calls that failed.
    pub failures: u64,
}

/// How many times the breaker entered each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct TransitionStats {
    /// Into [`State::Closed`].
    pub closed: u64,
    /// Into [`State::Open`].
    pub opened: u64,
    /// Into [`State::HalfOpen`].
    pub half_opened: u64,
    /// Into [`State::ForcedOpen`].
    pub forced_open: u64,
    /// Into [`State::ForcedClosed`].
    pub forced_closed: u64,
    /// Into [`State::Disabled`].
    pub disabled: u64,
    /// Into [`State::MetricsOnly`].
    pub metrics_only: u64,
}

/// What the current window holds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct WindowStats {
    /// Calls in the window.
    pub calls: u64,
    /// Failures in the window.
    pub failures: u64,
    /// Slow calls in the window.
    pub slow_calls: u64,
    /// `failures / calls` (0 when empty).
    pub failure_rate: f64,
    /// `slow_calls / calls` (0 when empty).
    pub slow_call_rate: f64,
}

/// A snapshot of a breaker's state and counters; serialize it for a stats endpoint.
///
/// At rest (no call in flight) `requests == successes + failures + ignored + rejects` holds exactly. `timeouts` are
/// also counted in `failures`, `cancelled` in `ignored`, and slow calls in `successes` or `failures`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct BreakerStats {
    /// The breaker's name.
    pub name: String,
    /// Its state now.
    pub state: State,
    /// Calls offered to the breaker (admitted or rejected).
    pub requests: u64,
    /// Calls that succeeded.
    pub successes: u64,
    /// Calls that failed (timeouts included).
    pub failures: u64,
    /// Calls whose outcome was ignored (cancelled calls included).
    pub ignored: u64,
    /// Calls cancelled before they finished (dropped futures or bodies).
    pub cancelled: u64,
    /// Calls rejected without reaching the service.
    pub rejects: u64,
    /// Calls that ran past the call timeout.
    pub timeouts: u64,
    /// Calls slower than the slow-call duration (only counted with slow-call detection on).
    pub slow_calls: u64,
    /// Times a threshold was crossed while the breaker could not open (metrics-only or forced closed).
    pub thresholds_crossed: u64,
    /// Openings whose duration a server's hint set (`Retry-After`, `grpc-retry-pushback-ms`).
    pub hinted_openings: u64,
    /// Fallback runs.
    pub fallbacks: FallbackStats,
    /// State transitions.
    pub transitions: TransitionStats,
    /// The current window.
    pub window: WindowStats,
    /// Failures in a row right now.
    pub consecutive_failures: u32,
    /// When open: milliseconds until probes are let through.
    pub retry_after_millis: Option<u64>,
    /// Sampled call latencies.
    pub latency: LatencySummary,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_microsecond_value_lands_in_a_bucket_whose_bounds_contain_it() {
        for micros in [
            0u64,
            1,
            2,
            3,
            4,
            5,
            7,
            8,
            100,
            1_000,
            12_345,
            1 << 20,
            (1 << 31) + 5,
        ] {
            let index = bucket_of(micros);
            assert!(
                bucket_upper(index) >= micros,
                "{micros} above bucket {index}"
            );
            if index > 0 {
                assert!(
                    bucket_upper(index - 1) < micros,
                    "{micros} below bucket {index}"
                );
            }
        }
    }

    #[test]
    fn the_summary_reports_quantiles_within_a_bucket() {
        let latency = Latency::default();
        for micros in 1..=100u64 {
            latency.record(Duration::from_micros(micros * 10));
        }
        let summary = latency.summary();
        assert_eq!(summary.samples, 100);
        assert_eq!(summary.mean_micros, 505);
        assert_eq!(summary.max_micros, 1_000);
        assert!((500..=640).contains(&summary.p50_micros), "{summary:?}");
        assert!((990..=1_000).contains(&summary.p99_micros), "{summary:?}");
    }
}
