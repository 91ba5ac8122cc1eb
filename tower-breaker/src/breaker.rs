//! The state machine, usable without Tower: [`CircuitBreaker`], [`Permit`] and [`Rejected`].

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::{Clock, ManualClock};
use crate::config::{
    Backoff, BreakerConfig, ConfigError, DroppedBody, OpenDuration, ProbePolicy, Window,
};
use crate::events::{Listener, Transition, TransitionReason};
use crate::lease::{Handle, SharedRef};
use crate::padded::{Lane, Padded, this_thread_stripe};
use crate::state::{Probes, State, Word};
use crate::stats::{BreakerStats, Counters, FallbackStats, Latency, TransitionStats, WindowStats};
use crate::window::{CountWindow, Sample, TimeWindow, Totals};

/// What a finished call counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The call worked.
    Success,
    /// The call failed: it counts towards opening the breaker.
    Failure,
    /// The call says nothing about the service's health (a client error, a cancelled call): not counted.
    Ignored,
}

/// Why a call was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum RejectReason {
    /// The breaker is open.
    Open,
    /// The breaker is half-open and every probe permit of this cycle is taken.
    HalfOpenFull,
    /// The breaker is held open by hand.
    ForcedOpen,
}

/// A call the breaker did not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rejected {
    reason: RejectReason,
    retry_after: Option<Duration>,
}

impl Rejected {
    /// Why the call was rejected.
    pub fn reason(&self) -> RejectReason {
        self.reason
    }

    /// How long until the breaker may let calls through again, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self.reason {
            RejectReason::Open => "circuit breaker is open",
            RejectReason::HalfOpenFull => "circuit breaker is half-open and all probes are taken",
            RejectReason::ForcedOpen => "circuit breaker is forced open",
        };
        f.write_str(text)?;
        if let Some(retry_after) = self.retry_after {
            write!(f, "; retry after {} ms", retry_after.as_millis())?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejected {}

/// The error of [`CircuitBreaker::call`].
#[derive(Debug)]
#[non_exhaustive]
pub enum CallError<E> {
    /// The breaker rejected the call; the future was not run.
    Rejected(Rejected),
    /// The call ran past the configured `call_timeout` and was dropped.
    Timeout(Duration),
    /// The call itself failed.
    Inner(E),
}

impl<E: fmt::Display> fmt::Display for CallError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(rejected) => rejected.fmt(f),
            Self::Timeout(after) => write!(f, "call timed out after {} ms", after.as_millis()),
            Self::Inner(error) => error.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for CallError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Inner(error) => Some(error),
            Self::Rejected(rejected) => Some(rejected),
            Self::Timeout(_) => None,
        }
    }
}

enum WindowKind {
    Count(CountWindow),
    Time(TimeWindow),
}

/// Everything the clones of a breaker share.
pub(crate) struct Shared {
    word: Padded<AtomicU64>,
    probes: Padded<AtomicU64>,
    consecutive: Padded<AtomicU32>,
    window: WindowKind,
    pub(crate) counters: Counters,
    latency: Latency,
    /// Openings since the last close: drives the backoff.
    streak: AtomicU32,
    rng: AtomicU64,
    sample_mask: u64,
    time_every_call: bool,
    pub(crate) config: BreakerConfig,
    clock: Clock,
    listeners: Vec<Listener>,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: crate::metrics::Handles,
    /// Told of every local opening (to share it with peers); touched only on transitions.
    opening_hook: std::sync::Mutex<Option<OpeningHook>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("name", &self.config.name)
            .field("state", &Word(self.word.0.load(Ordering::Relaxed)).state())
            .finish_non_exhaustive()
    }
}

/// A hook told of a breaker's own openings, with their duration: see [`CircuitBreaker::set_opening_hook`].
pub type OpeningHook = std::sync::Arc<dyn Fn(Duration) + Send + Sync>;

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

/// Builds a [`CircuitBreaker`]; every setting has a default (see [`BreakerConfig`]).
#[derive(Clone)]
#[must_use]
pub struct BreakerBuilder {
    config: BreakerConfig,
    clock: Option<ManualClock>,
    listeners: Vec<Listener>,
    export_metrics: bool,
}

impl fmt::Debug for BreakerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerBuilder")
            .field("config", &self.config)
            .field("listeners", &self.listeners.len())
            .finish_non_exhaustive()
    }
}

impl BreakerBuilder {
    /// A name for logs, stats and metric labels.
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Compute rates over the last `size` calls.
    pub fn count_window(mut self, size: u32) -> Self {
        self.config.window = Window::Count { size };
        self
    }

    /// Compute rates over the calls of the last `duration`, in `buckets` buckets.
    pub fn time_window(mut self, duration: Duration, buckets: u32) -> Self {
        self.config.window = Window::Time { duration, buckets };
        self
    }

    /// How many calls the window must hold before a rate can trip the breaker.
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.config.minimum_calls = calls;
        self
    }

    /// Trip when the failure rate reaches `rate` (a fraction: 0.5 is 50 %).
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.config.failure_rate_threshold = Some(rate);
        self
    }

    /// Do not trip on the failure rate (use slow calls or consecutive failures instead).
    pub fn no_failure_rate(mut self) -> Self {
        self.config.failure_rate_threshold = None;
        self
    }

    /// Trip when the share of calls taking at least `slower_than` reaches `rate`. Every call is then timed.
    pub fn slow_call_rate(mut self, rate: f64, slower_than: Duration) -> Self {
        self.config.slow_call_rate_threshold = Some(rate);
        self.config.slow_call_duration = slower_than;
        self
    }

    /// Trip after `count` failures in a row.
    pub fn consecutive_failures(mut self, count: u32) -> Self {
        self.config.consecutive_failures = Some(count);
        self
    }

    /// Stay open for `duration` each time.
    pub fn open_for(mut self, duration: Duration) -> Self {
        self.config.open_duration = OpenDuration::Fixed(duration);
        self
    }

    /// Stay open for a duration that grows with each consecutive opening.
    pub fn open_backoff(mut self, backoff: Backoff) -> Self {
        self.config.open_duration = OpenDuration::Backoff(backoff);
        self
    }

    /// Admit `permits` probes per half-open cycle.
    pub fn half_open_permits(mut self, permits: u32) -> Self {
        self.config.half_open_permits = permits;
        self
    }

    /// How the probes decide between closing and opening again.
    pub fn probe_policy(mut self, policy: ProbePolicy) -> Self {
        self.config.probe_policy = policy;
        self
    }

    /// Start a fresh half-open cycle when probes have not decided after `wait`.
    pub fn half_open_max_wait(mut self, wait: Duration) -> Self {
        self.config.half_open_max_wait = wait;
        self
    }

    /// Fail calls that take longer than `timeout` (counted as failures and as timeouts). In the Tower layer the
    /// deadline starts when the service first answers "not ready yet" (usually at once, on the first poll), so a
    /// call answered on its first poll never makes a timer; a response that is ready at the deadline wins.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = Some(timeout);
        self
    }

    /// Time one call in `every` (a power of two) for the latency summary.
    pub fn latency_sample_every(mut self, every: u32) -> Self {
        self.config.latency_sample_every = every;
        self
    }

    /// What a response body dropped before its end counts as.
    pub fn dropped_body(mut self, outcome: DroppedBody) -> Self {
        self.config.dropped_body = outcome;
        self
    }

    /// Replaces the whole configuration (names and listeners set on the builder are kept).
    pub fn config(mut self, config: BreakerConfig) -> Self {
        self.config = config;
        self
    }

    /// Use a clock moved by hand (tests).
    pub fn clock(mut self, clock: ManualClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Whether this breaker exports `tower_breaker_*` through the `metrics` facade (feature `metrics`; default
    /// `true`). Turn it off for breakers made per instance or per key (passive health per endpoint, say), whose
    /// names would make the `breaker` label grow without bound; report them at the level of their group instead.
    pub fn export_metrics(mut self, export: bool) -> Self {
        self.export_metrics = export;
        self
    }

    /// Call `listener` on every state transition, on the thread that makes it. It must not block.
    pub fn on_transition(mut self, listener: impl Fn(&Transition) + Send + Sync + 'static) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Validates the configuration and builds the breaker.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the setting to change when the configuration cannot work.
    pub fn build(self) -> Result<CircuitBreaker, ConfigError> {
        let shared = self.shared()?;
        Ok(CircuitBreaker {
            shared: Handle::counted(shared),
        })
    }

    /// Builds a breaker that lives as long as the process (the usual case: one breaker per downstream, made at
    /// start-up). Its state is never freed, and in exchange cloning the handle touches no reference count and a
    /// permit needs no lease of its thread (see `lease.rs`). Do not use it for breakers made and dropped at run
    /// time: each one would stay in memory.
    ///
    /// # Errors
    ///
    /// As [`BreakerBuilder::build`].
    pub fn build_static(self) -> Result<CircuitBreaker, ConfigError> {
        let shared = self.shared()?;
        Ok(CircuitBreaker {
            shared: Handle::Static(Box::leak(Box::new(shared))),
        })
    }

    fn shared(self) -> Result<Shared, ConfigError> {
        self.config.validate()?;
        let config = self.config;
        let window = match config.window {
            Window::Count { size } => WindowKind::Count(CountWindow::new(size)),
            Window::Time { duration, buckets } => WindowKind::Time(TimeWindow::new(
                u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                buckets,
            )),
        };
        let clock = self.clock.map_or_else(Clock::system, Clock::Manual);
        let seed = {
            let address = std::ptr::from_ref(&config).addr() as u64;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos() as u64);
            (address ^ nanos) | 1
        };
        let shared = Shared {
            word: Padded(AtomicU64::new(Word::new(State::Closed, 0, 0).0)),
            probes: Padded(AtomicU64::new(0)),
            consecutive: Padded(AtomicU32::new(0)),
            window,
            counters: Counters::default(),
            latency: Latency::default(),
            streak: AtomicU32::new(0),
            rng: AtomicU64::new(seed),
            sample_mask: u64::from(config.latency_sample_every - 1),
            time_every_call: config.slow_call_rate_threshold.is_some(),
            #[cfg(feature = "metrics")]
            metrics: if self.export_metrics {
                crate::metrics::Handles::new(&config.name)
            } else {
                crate::metrics::Handles::noop()
            },
            config,
            clock,
            listeners: self.listeners,
            opening_hook: std::sync::Mutex::new(None),
        };
        #[cfg(feature = "metrics")]
        shared.metrics.set_state(State::Closed);
        Ok(shared)
    }
}

impl CircuitBreaker {
    /// A builder with the defaults of [`BreakerConfig`].
    pub fn builder() -> BreakerBuilder {
        BreakerBuilder {
            config: BreakerConfig::default(),
            clock: None,
            listeners: Vec::new(),
            export_metrics: true,
        }
    }

    /// A breaker from a complete configuration (for example one deserialized with the `serde` feature).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the setting to change when the configuration cannot work.
    pub fn from_config(config: BreakerConfig) -> Result<Self, ConfigError> {
        Self::builder().config(config).build()
    }

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
    /// [`TransitionReason::Remote`](crate::TransitionReason::Remote), and it is not passed to the opening hook.
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

    fn reject(&self, reason: RejectReason, retry_after: Option<Duration>) -> Rejected {
        Counters::add(&self.counters.rejects);
        #[cfg(feature = "metrics")]
        self.metrics.rejects.increment(1);
        Rejected {
            reason,
            retry_after,
        }
    }

    fn load(&self) -> Word {
        Word(self.word.0.load(Ordering::Acquire))
    }

    /// Moves `from` (open, or a half-open cycle that timed out) to a fresh half-open cycle. Returns the word to
    /// continue with: the new one, or whatever another thread made it.
    fn begin_half_open(&self, from: Word, now: u64, reason: TransitionReason) -> Word {
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
    fn take_probe(&self, word: Word) -> bool {
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
    fn return_probe(&self, generation: u32) {
        let _ = self
            .probes
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                let probes = Probes(current);
                (probes.generation() == generation).then(|| probes.return_permit().0)
            });
    }

    fn record_probe(&self, generation: u32, sample: Sample) {
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
            self.open(word, TransitionReason::ProbesFailed);
        } else {
            self.close(word, TransitionReason::ProbesSucceeded);
        }
    }

    /// Closed (or metrics-only / forced-closed) bookkeeping for one success or failure.
    #[inline(always)]
    fn record_window(&self, generation: u32, sample: Sample) {
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
                self.open(word, reason);
            } else {
                Counters::add(&self.counters.thresholds_crossed);
                tracing::debug!(breaker = %self.config.name, state = %word.state(), ?reason, "threshold crossed; not opening in this state");
            }
        }
    }

    fn trip_reason(&self, totals: Totals, consecutive: u32) -> Option<TransitionReason> {
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

    fn open_duration_ms(&self, streak: u32) -> u64 {
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
    fn random_fraction(&self) -> f64 {
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
    fn open(&self, from: Word, reason: TransitionReason) {
        let streak = self.streak.load(Ordering::Acquire).saturating_add(1);
        let open_ms = self.open_duration_ms(streak);
        let now = self.clock.now_ms();
        let next = from.next(State::Open, now.saturating_add(open_ms));
        if self
            .word
            .0
            .compare_exchange(from.0, next.0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.streak.store(streak, Ordering::Release);
            self.announce(from.state(), State::Open, reason, Some(open_ms));
        }
    }

    fn open_remotely(&self, open_for: Duration) {
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
    fn close(&self, from: Word, reason: TransitionReason) {
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

    fn reset_window(&self) {
        match &self.window {
            WindowKind::Count(window) => window.reset(&self.counters.striped),
            WindowKind::Time(window) => window.reset(),
        }
        self.consecutive.0.store(0, Ordering::Release);
    }

    fn set_manual(&self, state: State) {
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

    fn announce(
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
    fn publish_opening(&self, open_for_ms: u64) {
        let hook = self
            .opening_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(Duration::from_millis(open_for_ms));
        }
    }

    fn retry_after_ms(&self) -> Option<u64> {
        let word = self.load();
        (word.state() == State::Open).then(|| word.time_ms().saturating_sub(self.clock.now_ms()))
    }

    fn stats(&self) -> BreakerStats {
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

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    /// Closed, forced closed or metrics-only: recorded in the window.
    Window,
    /// A half-open probe.
    Probe,
    /// Disabled: counted only.
    Untracked,
}

/// Permission to make one call. Report how it went with [`Permit::success`], [`Permit::failure`],
/// [`Permit::ignore`], [`Permit::timeout`] or [`Permit::record`]; a permit dropped without a report counts as a
/// cancelled call (ignored, and a half-open probe permit is given back).
#[derive(Debug)]
#[must_use = "report the call's outcome on the permit; dropping it counts the call as cancelled"]
pub struct Permit {
    /// Taken when the outcome is reported (or the permit dropped): `None` means the permit is spent.
    shared: Option<SharedRef>,
    generation: u32,
    kind: PermitKind,
    /// When the call started ([`Clock::start`]); read only when `sampled` or every call is timed.
    start: u64,
    sampled: bool,
}

impl Permit {
    /// The call succeeded.
    #[inline(always)]
    pub fn success(self) {
        self.record(Outcome::Success);
    }

    /// The call failed.
    #[inline]
    pub fn failure(self) {
        self.record(Outcome::Failure);
    }

    /// The call's outcome says nothing about the service's health.
    #[inline]
    pub fn ignore(self) {
        self.record(Outcome::Ignored);
    }

    /// The call ran past its deadline: a failure, also counted as a timeout.
    pub fn timeout(mut self) {
        if let Some(shared) = &self.shared {
            Counters::add(&shared.counters.timeouts);
            #[cfg(feature = "metrics")]
            shared.metrics.timeouts.increment(1);
        }
        self.finish(Outcome::Failure);
    }

    /// Reports the call's outcome.
    #[inline(always)]
    pub fn record(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    /// The state of the breaker that granted this permit (`None` once spent).
    pub(crate) fn shared_ref(&self) -> Option<SharedRef> {
        self.shared.clone()
    }

    /// The breaker's `call_timeout` (`None` once the permit is spent).
    pub(crate) fn call_timeout(&self) -> Option<Duration> {
        self.shared
            .as_ref()
            .and_then(|shared| shared.config.call_timeout)
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.kind == PermitKind::Probe
    }

    /// The breaker generation the permit was granted in. Every transition starts a new generation (it wraps after
    /// about two million), so permits with the same generation belong to the same closed period or probe cycle.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Reports what a body dropped before its end counts as (configured by `dropped_body`).
    pub(crate) fn dropped_body(mut self) {
        let Some(shared) = &self.shared else {
            return;
        };
        match shared.config.dropped_body {
            DroppedBody::Ignore => {} // dropped below: cancelled
            DroppedBody::Success => self.finish(Outcome::Success),
            DroppedBody::Failure => self.finish(Outcome::Failure),
        }
    }

    #[inline(always)]
    fn finish(&mut self, outcome: Outcome) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        // The common case, kept in the caller: an untimed success in a recording state.
        if outcome == Outcome::Success
            && self.kind == PermitKind::Window
            && !self.sampled
            && !shared.time_every_call
        {
            #[cfg(feature = "metrics")]
            shared.metrics.outcome(outcome);
            shared.record_window(self.generation, Sample::SUCCESS);
        } else {
            self.finish_otherwise(&shared, outcome);
        }
        shared.release();
    }

    #[inline(never)]
    fn finish_otherwise(&self, shared: &Shared, outcome: Outcome) {
        #[cfg(feature = "metrics")]
        shared.metrics.outcome(outcome);
        let latency =
            (self.sampled || shared.time_every_call).then(|| shared.clock.elapsed(self.start));
        if self.sampled
            && let Some(latency) = latency
        {
            shared.latency.record(latency);
            #[cfg(feature = "metrics")]
            shared.metrics.latency.record(latency.as_secs_f64());
        }
        let failure = match outcome {
            Outcome::Ignored => {
                Counters::add(&shared.counters.ignored);
                if self.kind == PermitKind::Probe {
                    shared.return_probe(self.generation);
                }
                return;
            }
            Outcome::Failure => {
                Counters::add(&shared.counters.failures);
                true
            }
            Outcome::Success => false,
        };
        let slow = shared.time_every_call
            && latency.is_some_and(|latency| latency >= shared.config.slow_call_duration);
        if slow {
            Counters::add(&shared.counters.slow);
        }
        let sample = Sample { failure, slow };
        match self.kind {
            PermitKind::Window => shared.record_window(self.generation, sample),
            PermitKind::Probe => {
                Counters::add(&shared.counters.other_records);
                shared.record_probe(self.generation, sample);
            }
            PermitKind::Untracked => Counters::add(&shared.counters.other_records),
        }
    }

    /// A permit dropped unreported: a cancelled call, ignored, and a probe's permit is given back.
    #[cold]
    fn cancel(&self, shared: &Shared) {
        Counters::add(&shared.counters.ignored);
        Counters::add(&shared.counters.cancelled);
        #[cfg(feature = "metrics")]
        shared.metrics.outcome(Outcome::Ignored);
        if self.kind == PermitKind::Probe {
            shared.return_probe(self.generation);
        }
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            self.cancel(&shared);
            shared.release();
        }
    }
}
