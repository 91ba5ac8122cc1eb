//! The shared state machine behind every handle: admission, recording, and the transitions between states.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::error::{RejectReason, Rejected};
use crate::clock::Clock;
use crate::config::{BreakerConfig, OpenDuration, ProbePolicy};
use crate::events::{Listener, Transition, TransitionReason};
use crate::padded::{Lane, Padded, this_thread_stripe};
use crate::state::{Probes, State, Word};
use crate::stats::{BreakerStats, Counters, FallbackStats, Latency, TransitionStats, WindowStats};
use crate::window::{CountWindow, Sample, TimeWindow, Totals};

pub(super) enum WindowKind {
    Count(CountWindow),
    Time(TimeWindow),
}

/// A hook told of a breaker's own openings, with their duration: see
/// [`CircuitBreaker::set_opening_hook`](crate::CircuitBreaker::set_opening_hook).
pub type OpeningHook = std::sync::Arc<dyn Fn(Duration) + Send + Sync>;

/// Everything the clones of a breaker share.
pub(crate) struct Shared {
    pub(super) word: Padded<AtomicU64>,
    pub(super) probes: Padded<AtomicU64>,
    pub(super) consecutive: Padded<AtomicU32>,
    pub(super) window: WindowKind,
    pub(crate) counters: Counters,
    pub(super) latency: Latency,
    /// Openings since the last close: drives the backoff.
    pub(super) streak: AtomicU32,
    pub(super) rng: AtomicU64,
    pub(super) sample_mask: u64,
    pub(super) time_every_call: bool,
    pub(crate) config: BreakerConfig,
    pub(super) clock: Clock,
    pub(super) listeners: Vec<Listener>,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: crate::metrics::Handles,
    /// Told of every local opening (to share it with peers); touched only on transitions.
    pub(super) opening_hook: std::sync::Mutex<Option<OpeningHook>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("name", &self.config.name)
            .field("state", &Word(self.word.0.load(Ordering::Relaxed)).state())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn record_fallback(&self, succeeded: bool) {
        if succeeded {
            Counters::add(&self.counters.fallback_successes);
        } else {
            Counters::add(&self.counters.fallback_failures);
        }
        #[cfg(feature = "metrics")]
        self.metrics.fallback(succeeded);
    }

    pub(super) fn reject(&self, reason: RejectReason, retry_after: Option<Duration>) -> Rejected {
        Counters::add(&self.counters.rejects);
        #[cfg(feature = "metrics")]
        self.metrics.rejects.increment(1);
        Rejected {
            reason,
            retry_after,
        }
    }

    pub(super) fn load(&self) -> Word {
        Word(self.word.0.load(Ordering::Acquire))
    }

    /// Moves `from` (open, or a half-open cycle that timed out) to a fresh half-open cycle. Returns the word to
    /// continue with: the new one, or whatever another thread made it.
    pub(super) fn begin_half_open(&self, from: Word, now: u64, reason: TransitionReason) -> Word {
        let deadline = now.saturating_add(millis(self.config.half_open_max_wait));
        let next = from.next(State::HalfOpen, deadline);
        match self
            .word
            .0
            .compare_exchange(from.0, next.0, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // Only the thread that made the transition writes the fresh tally, so permits are never reset
                // under probes already admitted in this cycle.
                self.probes.0.store(
                    Probes::fresh(next.generation(), self.config.half_open_permits).0,
                    Ordering::Release,
                );
                self.announce(from.state(), State::HalfOpen, reason, None);
                next
            }
            Err(actual) => Word(actual),
        }
    }

    /// Takes one probe permit of `word`'s half-open cycle, if any is left.
    pub(super) fn take_probe(&self, word: Word) -> bool {
        let mut probes = Probes(self.probes.0.load(Ordering::Acquire));
        loop {
            if probes.generation() != word.generation() || probes.permits_left() == 0 {
                return false;
            }
            match self.probes.0.compare_exchange_weak(
                probes.0,
                probes.take_permit().0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => probes = Probes(actual),
            }
        }
    }

    /// Gives a probe permit back (its call was cancelled or its outcome ignored).
    pub(super) fn return_probe(&self, generation: u32) {
        let _ = self
            .probes
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                let probes = Probes(current);
                (probes.generation() == generation).then(|| probes.return_permit().0)
            });
    }

    pub(super) fn record_probe(&self, generation: u32, sample: Sample, hint_ms: Option<u64>) {
        let updated = self
            .probes
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                let probes = Probes(current);
                (probes.generation() == generation)
                    .then(|| probes.with_result(sample.failure, sample.slow).0)
            });
        let Ok(before) = updated else {
            return; // a result from an earlier cycle: it decides nothing now
        };
        let probes = Probes(before).with_result(sample.failure, sample.slow);
        let permits = f64::from(self.config.half_open_permits);
        let (failures, slow, done) = (
            f64::from(probes.failures()),
            f64::from(probes.slow()),
            f64::from(probes.successes() + probes.failures()),
        );
        let remaining = permits - done;
        let rates = (
            self.config.failure_rate_threshold,
            self.config.slow_call_rate_threshold,
        );
        let all_must_succeed =
            self.config.probe_policy == ProbePolicy::AllSucceed || rates == (None, None);
        let (reopen, close) = if all_must_succeed {
            let bad = failures > 0.0 || (rates.1.is_some() && slow > 0.0);
            (bad, !bad && remaining == 0.0)
        } else {
            // A rate that cannot drop below its threshold whatever the remaining probes do reopens now; one that
            // stays below it even if they all fail closes now.
            let reached = |count: f64, threshold: Option<f64>| {
                threshold.is_some_and(|t| count / permits >= t)
            };
            let reopen = reached(failures, rates.0) || reached(slow, rates.1);
            let close =
                !reached(failures + remaining, rates.0) && !reached(slow + remaining, rates.1);
            (reopen, close || (!reopen && remaining == 0.0))
        };
        if !(reopen || close) {
            return;
        }
        let word = self.load();
        if word.state() != State::HalfOpen || word.generation() != generation {
            return;
        }
        if reopen {
            self.open(word, TransitionReason::ProbesFailed, hint_ms);
        } else {
            self.close(word, TransitionReason::ProbesSucceeded);
        }
    }

    /// Closed (or metrics-only / forced-closed) bookkeeping for one success or failure.
    #[inline(always)]
    pub(super) fn record_window(&self, generation: u32, sample: Sample, hint_ms: Option<u64>) {
        let word = self.load();
        if word.generation() != generation || !word.state().records_window() {
            // Admitted under an earlier state: counted in the stats, not in this state's window.
            Counters::add(&self.counters.other_records);
            return;
        }
        let totals = match &self.window {
            WindowKind::Count(window) => window.record(&self.counters.striped, sample),
            WindowKind::Time(window) => {
                let now = self.clock.now_ms();
                if sample == Sample::SUCCESS {
                    // Counted in this thread's stripes only: no cache line shared with other threads.
                    let (stripe, owned) = this_thread_stripe();
                    self.counters
                        .striped
                        .increment_at(stripe, owned, Lane::WindowSuccesses);
                    window.record_success(now, stripe, owned);
                    None
                } else {
                    Counters::add(&self.counters.other_records);
                    window.record(now, sample)
                }
            }
        };
        let consecutive = if sample.failure {
            self.consecutive.0.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            if self.consecutive.0.load(Ordering::Relaxed) != 0 {
                self.consecutive.0.store(0, Ordering::Relaxed);
            }
            0
        };
        if let Some(totals) = totals
            && let Some(reason) = self.trip_reason(totals, consecutive)
        {
            if word.state() == State::Closed {
                self.open(word, reason, hint_ms);
            } else {
                Counters::add(&self.counters.thresholds_crossed);
                tracing::debug!(breaker = %self.config.name, state = %word.state(), ?reason, "threshold crossed; not opening in this state");
            }
        }
    }

    pub(super) fn trip_reason(&self, totals: Totals, consecutive: u32) -> Option<TransitionReason> {
        if self
            .config
            .consecutive_failures
            .is_some_and(|limit| consecutive >= limit)
        {
            return Some(TransitionReason::ConsecutiveFailures { count: consecutive });
        }
        if totals.calls == 0 || totals.calls < u64::from(self.config.minimum_calls) {
            return None;
        }
        let calls = totals.calls as f64;
        let failure_rate = totals.failures as f64 / calls;
        if self
            .config
            .failure_rate_threshold
            .is_some_and(|threshold| failure_rate >= threshold)
        {
            return Some(TransitionReason::FailureRate {
                rate: failure_rate,
                calls: totals.calls,
            });
        }
        let slow_rate = totals.slow as f64 / calls;
        if self
            .config
            .slow_call_rate_threshold
            .is_some_and(|threshold| slow_rate >= threshold)
        {
            return Some(TransitionReason::SlowCallRate {
                rate: slow_rate,
                calls: totals.calls,
            });
        }
        None
    }

    pub(super) fn open_duration_ms(&self, streak: u32) -> u64 {
        match self.config.open_duration {
            OpenDuration::Fixed(duration) => millis(duration),
            OpenDuration::Backoff(backoff) => {
                let exponent = i32::try_from(streak.saturating_sub(1)).unwrap_or(i32::MAX);
                let base = (millis(backoff.initial) as f64 * backoff.multiplier.powi(exponent))
                    .min(millis(backoff.max) as f64);
                let jittered = base * (1.0 - backoff.jitter * self.random_fraction());
                (jittered as u64).max(1)
            }
        }
    }

    /// A number in [0, 1) from a xorshift generator (jitter needs spread, not cryptographic quality).
    pub(super) fn random_fraction(&self) -> f64 {
        let next = self
            .rng
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mut x| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                Some(x)
            })
            .unwrap_or(1);
        (next >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Opens from `from` (closed or half-open). Only the thread whose CAS succeeds announces it.
    /// `hint_ms` is a server's hint on the failure that opens it, used within the configured bounds.
    pub(super) fn open(&self, from: Word, reason: TransitionReason, hint_ms: Option<u64>) {
        let streak = self.streak.load(Ordering::Acquire).saturating_add(1);
        let (open_ms, hinted) = match (hint_ms, self.config.server_hints) {
            (Some(hint), Some(bounds)) => (bounds.clamp_ms(hint), true),
            _ => (self.open_duration_ms(streak), false),
        };
        let now = self.clock.now_ms();
        let next = from.next(State::Open, now.saturating_add(open_ms));
        if self
            .word
            .0
            .compare_exchange(from.0, next.0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            if hinted {
                Counters::add(&self.counters.hinted_openings);
            }
            self.streak.store(streak, Ordering::Release);
            self.announce(from.state(), State::Open, reason, Some(open_ms));
        }
    }

    pub(super) fn open_remotely(&self, open_for: Duration) {
        let now = self.clock.now_ms();
        let until = now.saturating_add(millis(open_for));
        loop {
            let word = self.load();
            let extend = match word.state() {
                State::Closed | State::HalfOpen => true,
                State::Open => word.time_ms() < until,
                _ => false,
            };
            if !extend {
                return;
            }
            let next = word.next(State::Open, until);
            if self
                .word
                .0
                .compare_exchange(word.0, next.0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                if word.state() != State::Open {
                    self.announce(
                        word.state(),
                        State::Open,
                        TransitionReason::Remote,
                        Some(millis(open_for)),
                    );
                }
                return;
            }
        }
    }

    /// Closes from a half-open cycle: a fresh window, no streak.
    pub(super) fn close(&self, from: Word, reason: TransitionReason) {
        // Nothing records into the window while half-open, so emptying it before the switch loses nothing.
        self.reset_window();
        let next = from.next(State::Closed, 0);
        if self
            .word
            .0
            .compare_exchange(from.0, next.0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.streak.store(0, Ordering::Release);
            self.announce(from.state(), State::Closed, reason, None);
        }
    }

    pub(super) fn reset_window(&self) {
        match &self.window {
            WindowKind::Count(window) => window.reset(&self.counters.striped),
            WindowKind::Time(window) => window.reset(),
        }
        self.consecutive.0.store(0, Ordering::Release);
    }

    pub(super) fn set_manual(&self, state: State) {
        if state == State::Closed {
            self.reset_window();
            self.streak.store(0, Ordering::Release);
        }
        let previous = loop {
            let word = self.load();
            let next = word.next(state, 0);
            if self
                .word
                .0
                .compare_exchange(word.0, next.0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break word.state();
            }
        };
        if previous != state || state == State::Closed {
            self.announce(previous, state, TransitionReason::Manual, None);
        }
    }

    pub(super) fn announce(
        &self,
        from: State,
        to: State,
        reason: TransitionReason,
        open_for_millis: Option<u64>,
    ) {
        Counters::add(&self.counters.transitions[to.index()]);
        #[cfg(feature = "metrics")]
        self.metrics.transition(to);
        match to {
            State::Open | State::ForcedOpen => {
                tracing::warn!(breaker = %self.config.name, %from, %to, ?reason, open_for_millis, "circuit breaker opened");
            }
            _ => {
                tracing::info!(breaker = %self.config.name, %from, %to, ?reason, "circuit breaker state changed");
            }
        }
        if to == State::Open && reason != TransitionReason::Remote {
            self.publish_opening(open_for_millis.unwrap_or(0));
        }
        if self.listeners.is_empty() {
            return;
        }
        let transition = Transition {
            breaker: self.config.name.to_string(),
            from,
            to,
            reason,
            open_for_millis,
        };
        for listener in &self.listeners {
            listener(&transition);
        }
    }

    /// Tells the opening hook, if any, of a local opening.
    pub(super) fn publish_opening(&self, open_for_ms: u64) {
        let hook = self
            .opening_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(Duration::from_millis(open_for_ms));
        }
    }

    pub(super) fn retry_after_ms(&self) -> Option<u64> {
        let word = self.load();
        (word.state() == State::Open).then(|| word.time_ms().saturating_sub(self.clock.now_ms()))
    }

    pub(super) fn stats(&self) -> BreakerStats {
        let counters = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Acquire);
        let word = self.load();
        let now = self.clock.now_ms();
        let (window_records, totals) = match &self.window {
            WindowKind::Count(window) => (
                window.recorded(&counters.striped),
                window.totals(&counters.striped),
            ),
            WindowKind::Time(window) => (
                counters.striped.sum(Lane::WindowSuccesses),
                window.totals(now),
            ),
        };
        let failures = load(&counters.failures);
        // Read `requests` last: with calls finishing meanwhile, the sum of outcomes then never exceeds it.
        let successes = (window_records + load(&counters.other_records)).saturating_sub(failures);
        let rate = |count: u64| {
            if totals.calls == 0 {
                0.0
            } else {
                count as f64 / totals.calls as f64
            }
        };
        let transitions = |state: State| load(&counters.transitions[state.index()]);
        BreakerStats {
            name: self.config.name.to_string(),
            state: word.state(),
            successes,
            failures,
            ignored: load(&counters.ignored),
            cancelled: load(&counters.cancelled),
            rejects: load(&counters.rejects),
            timeouts: load(&counters.timeouts),
            slow_calls: load(&counters.slow),
            thresholds_crossed: load(&counters.thresholds_crossed),
            hinted_openings: load(&counters.hinted_openings),
            fallbacks: FallbackStats {
                successes: load(&counters.fallback_successes),
                failures: load(&counters.fallback_failures),
            },
            transitions: TransitionStats {
                closed: transitions(State::Closed),
                opened: transitions(State::Open),
                half_opened: transitions(State::HalfOpen),
                forced_open: transitions(State::ForcedOpen),
                forced_closed: transitions(State::ForcedClosed),
                disabled: transitions(State::Disabled),
                metrics_only: transitions(State::MetricsOnly),
            },
            window: WindowStats {
                calls: totals.calls,
                failures: totals.failures,
                slow_calls: totals.slow,
                failure_rate: rate(totals.failures),
                slow_call_rate: rate(totals.slow),
            },
            consecutive_failures: self.consecutive.0.load(Ordering::Acquire),
            retry_after_millis: self.retry_after_ms(),
            latency: self.latency.summary(),
            requests: counters.striped.sum(Lane::Requests),
        }
    }
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
