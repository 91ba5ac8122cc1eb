//! [`CircuitBreaker`]: the cheap, cloneable handle users hold (calls, permits, state, stats, manual control).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::error::{CallError, RejectReason, Rejected};
use super::permit::{Outcome, Permit, PermitKind};
use super::transitions::OpeningHook;
use crate::config::BreakerConfig;
use crate::events::TransitionReason;
use crate::lease::{Handle, SharedRef};
use crate::padded::{Lane, this_thread_stripe};
use crate::state::{State, Word};
use crate::stats::BreakerStats;

/// A circuit breaker: a cheap, cloneable handle to one shared state machine.
///
/// Use it directly around any future with [`CircuitBreaker::call`], or take a [`Permit`] with
/// [`CircuitBreaker::try_acquire`] and report the outcome yourself, or put it in front of a Tower service with
/// [`crate::BreakerLayer`]. The same handle reads the state and stats and controls the breaker by hand.
///
/// ```
/// use tower_breaker::{CallError, CircuitBreaker};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let breaker = CircuitBreaker::builder().name("payments").consecutive_failures(3).build()?;
/// let result: Result<u32, CallError<std::io::Error>> = breaker.call(async { Ok(42) }).await;
/// assert_eq!(result.ok(), Some(42));
/// assert_eq!(breaker.stats().successes, 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    pub(crate) shared: Handle,
}

impl CircuitBreaker {
    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &BreakerConfig {
        &self.shared.config
    }

    /// The current state. An open breaker whose open period has ended reports [`State::Open`] until the next call
    /// turns it half-open.
    pub fn state(&self) -> State {
        Word(self.shared.word.0.load(Ordering::Acquire)).state()
    }

    /// Asks to make one call. On `Ok`, make the call and report its outcome on the [`Permit`] (dropping it unreported
    /// counts as cancelled). On `Err`, do not make the call.
    ///
    /// # Errors
    ///
    /// [`Rejected`] when the breaker is open, forced open, or half-open with every probe permit taken.
    #[inline(always)]
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let shared = &*self.shared;
        let (stripe, owned) = this_thread_stripe();
        let request = shared
            .counters
            .striped
            .increment_at(stripe, owned, Lane::Requests);
        #[cfg(feature = "metrics")]
        shared.metrics.requests.increment(1);
        let sampled = request & shared.sample_mask == 0;
        let word = Word(shared.word.0.load(Ordering::Acquire));
        // The closed path stays in the caller (it is a few instructions); every other state goes out of line.
        if word.state().records_window() {
            return Ok(self.permit(stripe, PermitKind::Window, word.generation(), sampled));
        }
        self.acquire_otherwise(stripe, word, sampled)
    }

    /// [`CircuitBreaker::try_acquire`] in every state but the recording ones.
    #[inline(never)]
    fn acquire_otherwise(
        &self,
        stripe: usize,
        mut word: Word,
        sampled: bool,
    ) -> Result<Permit, Rejected> {
        let shared = &*self.shared;
        loop {
            match word.state() {
                State::Closed | State::ForcedClosed | State::MetricsOnly => {
                    return Ok(self.permit(stripe, PermitKind::Window, word.generation(), sampled));
                }
                State::Disabled => {
                    return Ok(self.permit(
                        stripe,
                        PermitKind::Untracked,
                        word.generation(),
                        sampled,
                    ));
                }
                State::ForcedOpen => return Err(shared.reject(RejectReason::ForcedOpen, None)),
                State::Open => {
                    let now = shared.clock.now_ms();
                    if now < word.time_ms() {
                        let retry_after = Duration::from_millis(word.time_ms() - now);
                        return Err(shared.reject(RejectReason::Open, Some(retry_after)));
                    }
                    word = shared.begin_half_open(word, now, TransitionReason::OpenElapsed);
                }
                State::HalfOpen => {
                    if shared.take_probe(word) {
                        return Ok(self.permit(
                            stripe,
                            PermitKind::Probe,
                            word.generation(),
                            sampled,
                        ));
                    }
                    let now = shared.clock.now_ms();
                    if now < word.time_ms() {
                        let retry_after = Duration::from_millis((word.time_ms() - now).min(1_000));
                        return Err(shared.reject(RejectReason::HalfOpenFull, Some(retry_after)));
                    }
                    // The watchdog: this cycle's probes never reported; start a fresh one.
                    word = shared.begin_half_open(word, now, TransitionReason::ProbeWatchdog);
                }
            }
        }
    }

    #[inline(always)]
    fn permit(&self, stripe: usize, kind: PermitKind, generation: u32, sampled: bool) -> Permit {
        let shared = &self.shared;
        let start = if sampled || shared.time_every_call {
            shared.clock.start()
        } else {
            0
        };
        Permit {
            shared: Some(shared.lease(stripe)),
            generation,
            kind,
            start,
            sampled,
        }
    }

    /// Runs `future` if the breaker admits it: `Ok` counts as a success and `Err` as a failure. With a
    /// `call_timeout`, a call past it is dropped and counts as a failure and a timeout.
    ///
    /// # Errors
    ///
    /// [`CallError::Rejected`] without running the future, [`CallError::Timeout`], or the future's own error.
    pub async fn call<F, T, E>(&self, future: F) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        self.call_classified(future, |result| match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        })
        .await
    }

    /// Like [`CircuitBreaker::call`], with `classify` deciding what the result counts as (for example, a "not found"
    /// error as [`Outcome::Ignored`]).
    ///
    /// # Errors
    ///
    /// [`CallError::Rejected`] without running the future, [`CallError::Timeout`], or the future's own error.
    pub async fn call_classified<F, T, E>(
        &self,
        future: F,
        classify: impl FnOnce(&Result<T, E>) -> Outcome,
    ) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire().map_err(CallError::Rejected)?;
        let result = match self.shared.config.call_timeout {
            Some(timeout) => match tokio::time::timeout(timeout, future).await {
                Ok(result) => result,
                Err(_) => {
                    permit.timeout();
                    return Err(CallError::Timeout(timeout));
                }
            },
            None => future.await,
        };
        permit.record(classify(&result));
        result.map_err(CallError::Inner)
    }

    /// Holds the breaker open, rejecting every call, until [`CircuitBreaker::reset`] or another manual state.
    pub fn force_open(&self) {
        self.shared.set_manual(State::ForcedOpen);
    }

    /// Holds the breaker closed: calls go through and are recorded, but nothing trips it.
    pub fn force_closed(&self) {
        self.shared.set_manual(State::ForcedClosed);
    }

    /// Switches the breaker off: calls go through and only the counters are kept.
    pub fn disable(&self) {
        self.shared.set_manual(State::Disabled);
    }

    /// Records and reports threshold crossings but never rejects.
    pub fn metrics_only(&self) {
        self.shared.set_manual(State::MetricsOnly);
    }

    /// Back to normal operation: closed, with an empty window and no failure streak. Counters are kept.
    pub fn reset(&self) {
        self.shared.set_manual(State::Closed);
    }

    /// Opens the breaker for `open_for` because a peer opened its own: the hook for sharing openings across
    /// processes (`tower-redis-core`'s `RedisSharing` calls it). Only a closed, half-open or open breaker is affected
    /// (manual states win); a later deadline wins over an earlier one. The transition's reason is
    /// [`TransitionReason::Remote`], and it is not passed to the opening hook.
    pub fn open_remotely(&self, open_for: Duration) {
        self.shared.open_remotely(open_for);
    }

    /// Sets (or with `None` removes) the hook told of every opening this breaker makes by itself (not those from
    /// [`CircuitBreaker::open_remotely`]), with the open duration: the other half of sharing openings. It runs on
    /// the request path that caused the opening, so it must not block: hand the opening to a task (for example
    /// with `try_send` on a bounded channel).
    pub fn set_opening_hook(&self, hook: Option<OpeningHook>) {
        *self
            .shared
            .opening_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hook;
    }

    /// When open: how long until probes are let through. One atomic load and one clock read, so it can be asked
    /// on every call (unlike [`CircuitBreaker::stats`], which builds a whole snapshot).
    pub fn retry_after(&self) -> Option<Duration> {
        self.shared.retry_after_ms().map(Duration::from_millis)
    }

    /// A snapshot of the state and counters. Exact at rest; while calls run, counters are read one by one.
    pub fn stats(&self) -> BreakerStats {
        self.shared.stats()
    }

    /// Counts a fallback run and its outcome (the Tower layer calls this for you).
    pub fn record_fallback(&self, succeeded: bool) {
        self.shared.record_fallback(succeeded);
    }

    /// A reference to the state that keeps it alive, for a fallback's future.
    pub(crate) fn shared_ref(&self) -> SharedRef {
        self.shared.lease(this_thread_stripe().0)
    }
}
