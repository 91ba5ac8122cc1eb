//! [`BreakerBuilder`]: a [`BreakerConfig`] plus a clock and transition listeners, validated into a breaker.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

use super::handle::CircuitBreaker;
use super::transitions::{Shared, WindowKind};
use crate::clock::{Clock, ManualClock};
use crate::config::{
    Backoff, BreakerConfig, ConfigError, DroppedBody, OpenDuration, ProbePolicy, Window,
};
use crate::events::{Listener, Transition};
use crate::lease::Handle;
use crate::padded::Padded;
use crate::state::{State, Word};
use crate::stats::{Counters, Latency};
use crate::window::{CountWindow, TimeWindow};

/// Setters that set one [`BreakerConfig`] field to the value given. Each is documented once, on its field, with its
/// default, and links there; the setters below it are the ones that set several fields or wrap the value.
macro_rules! field_setters {
    ($($field:ident: $ty:ty),* $(,)?) => {
        $(
            #[doc = concat!("Sets [`BreakerConfig::", stringify!($field), "`].")]
            pub fn $field(mut self, $field: $ty) -> Self {
                self.config.$field = $field;
                self
            }
        )*
    };
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
    /// The defaults of [`BreakerConfig`], the system clock, no listener, metrics exported.
    pub(super) fn new() -> Self {
        Self {
            config: BreakerConfig::default(),
            clock: None,
            listeners: Vec::new(),
            export_metrics: true,
        }
    }

    field_setters! {
        minimum_calls: u32,
        half_open_permits: u32,
        probe_policy: ProbePolicy,
        half_open_max_wait: Duration,
        latency_sample_every: u32,
        dropped_body: DroppedBody,
    }

    /// Lets a server's hint on the failure that opens the breaker (`Retry-After` on a 503 or 429, gRPC's
    /// `grpc-retry-pushback-ms`) set how long it stays open, clamped to `min..=max` (see
    /// [`BreakerConfig::server_hints`]; 1 s to 60 s by default).
    pub fn server_hints(mut self, min: Duration, max: Duration) -> Self {
        self.config.server_hints = Some(crate::config::HintBounds::new(min, max));
        self
    }

    /// Ignores servers' hints: every opening lasts `open_duration`.
    pub fn ignore_server_hints(mut self) -> Self {
        self.config.server_hints = None;
        self
    }

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

    /// Fail calls that take longer than `timeout` (counted as failures and as timeouts). In the Tower layer the
    /// deadline starts when the service first answers "not ready yet" (usually at once, on the first poll), so a
    /// call answered on its first poll never makes a timer; a response that is ready at the deadline wins.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = Some(timeout);
        self
    }

    /// Replaces the whole configuration, name included (the clock, listeners and metrics export set on the builder
    /// are kept).
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
        BreakerBuilder::new()
    }

    /// A breaker from a complete configuration (for example one deserialized with the `serde` feature).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the setting to change when the configuration cannot work.
    pub fn from_config(config: BreakerConfig) -> Result<Self, ConfigError> {
        Self::builder().config(config).build()
    }
}
