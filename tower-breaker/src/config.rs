//! What a breaker trips on, how long it stays open, and how it probes: [`BreakerConfig`] and its validation.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// The largest count window: one byte per call is kept, so this bounds a breaker's memory at about 1 MiB.
pub const MAX_COUNT_WINDOW: u32 = 1_000_000;
/// The largest number of buckets in a time window.
pub const MAX_TIME_BUCKETS: u32 = 1_000;
/// The largest number of half-open probes per cycle.
pub const MAX_HALF_OPEN_PERMITS: u32 = 1_000;

/// Which recent calls the failure and slow-call rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
pub enum Window {
    /// The last `size` recorded calls (a sliding count window).
    Count {
        /// How many calls the window holds.
        size: u32,
    },
    /// The calls of the last `duration`, kept in `buckets` buckets of `duration / buckets` each. An outcome stops
    /// counting between `duration` and `duration + duration / buckets` after it was recorded.
    Time {
        /// The span of the window.
        #[cfg_attr(feature = "serde", serde(with = "crate::config::duration_serde"))]
        duration: Duration,
        /// How many buckets the span is divided into.
        buckets: u32,
    },
}

/// How long the breaker stays open before it lets probes through.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
pub enum OpenDuration {
    /// Always the same duration.
    Fixed(#[cfg_attr(feature = "serde", serde(with = "crate::config::duration_serde"))] Duration),
    /// Grows with each opening that follows without a close in between.
    Backoff(Backoff),
}

/// The bounds within which a server's own hint sets how long the breaker opens: `Retry-After` on a 503 or a 429,
/// or gRPC's `grpc-retry-pushback-ms`, on the failure that opens it. A hint outside them is clamped to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
#[non_exhaustive]
pub struct HintBounds {
    /// The shortest opening a hint can set.
    #[cfg_attr(feature = "serde", serde(with = "crate::config::duration_serde"))]
    pub min: Duration,
    /// The longest opening a hint can set.
    #[cfg_attr(feature = "serde", serde(with = "crate::config::duration_serde"))]
    pub max: Duration,
}

impl HintBounds {
    /// Hints are clamped to `min..=max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max }
    }

    /// `hint` within the bounds, in ms.
    pub(crate) fn clamp_ms(self, hint_ms: u64) -> u64 {
        let min = u64::try_from(self.min.as_millis()).unwrap_or(u64::MAX);
        let max = u64::try_from(self.max.as_millis()).unwrap_or(u64::MAX);
        hint_ms.clamp(min.min(max), max).max(1)
    }
}

impl Default for HintBounds {
    /// One second to one minute.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// An exponential backoff for [`OpenDuration::Backoff`]: the n-th consecutive opening lasts
/// `initial * multiplier^(n-1)`, at most `max`, then shortened at random by up to `jitter` of itself.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct Backoff {
    /// The first opening's duration.
    #[cfg_attr(feature = "serde", serde(with = "crate::config::duration_serde"))]
    pub initial: Duration,
    /// The factor between consecutive openings (at least 1).
    pub multiplier: f64,
    /// The cap.
    #[cfg_attr(feature = "serde", serde(with = "crate::config::duration_serde"))]
    pub max: Duration,
    /// The fraction (0 to 1) by which a duration may be shortened at random, so that instances that opened together
    /// do not probe together.
    pub jitter: f64,
}

impl Backoff {
    /// An exponential backoff from `initial` to `max`, doubling each time, with 20 % jitter.
    pub const fn exponential(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            multiplier: 2.0,
            max,
            jitter: 0.2,
        }
    }
}

/// How the half-open probes decide between closing and opening again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum ProbePolicy {
    /// Close when the failure (and slow-call) rate over the probes is below the thresholds; open again as soon as
    /// it cannot be (the resilience4j rule). Without a rate threshold this behaves like [`ProbePolicy::AllSucceed`].
    #[default]
    RateBelowThreshold,
    /// Close only when every probe succeeds; open again on the first failure.
    AllSucceed,
}

/// What a breaker does with a response body that is dropped before its end (a client that went away mid-stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum DroppedBody {
    /// Not counted either way (the default: the caller, not the service, ended the call).
    #[default]
    Ignore,
    /// Counted as a success.
    Success,
    /// Counted as a failure.
    Failure,
}

/// The full configuration of a breaker. Build one with [`crate::CircuitBreaker::builder`], or deserialize it (with
/// the `serde` feature) and pass it to [`crate::CircuitBreaker::from_config`], which validates it.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct BreakerConfig {
    /// A name for logs, stats and metric labels.
    pub name: Cow<'static, str>,
    /// The window the rates are computed over. Default: the last 100 calls.
    pub window: Window,
    /// How many calls the window must hold before a rate can trip the breaker. Default: 20.
    pub minimum_calls: u32,
    /// Trip when the failure rate reaches this fraction (0 < rate ≤ 1). Default: 0.5. `None` disables it.
    pub failure_rate_threshold: Option<f64>,
    /// Trip when the slow-call rate reaches this fraction. Default: `None` (off).
    pub slow_call_rate_threshold: Option<f64>,
    /// A call at least this long is slow. Default: 5 s. Only used with `slow_call_rate_threshold`.
    #[cfg_attr(feature = "serde", serde(with = "crate::config::duration_serde"))]
    pub slow_call_duration: Duration,
    /// Trip after this many failures in a row, whatever the window says. Default: `None` (off).
    pub consecutive_failures: Option<u32>,
    /// How long the breaker stays open. Default: 30 s, fixed.
    pub open_duration: OpenDuration,
    /// When the failure that opens the breaker carries a server's hint (`Retry-After` on a 503 or 429, gRPC's
    /// `grpc-retry-pushback-ms`), the opening lasts what the hint says, within these bounds, instead of
    /// `open_duration`. Default: 1 s to 60 s. `None` ignores hints.
    pub server_hints: Option<HintBounds>,
    /// How many probes a half-open cycle admits. Default: 5.
    pub half_open_permits: u32,
    /// How the probes decide. Default: [`ProbePolicy::RateBelowThreshold`].
    pub probe_policy: ProbePolicy,
    /// If a half-open cycle has not decided after this long (its probes hung), a fresh cycle starts with fresh
    /// permits. Default: 60 s.
    #[cfg_attr(feature = "serde", serde(with = "crate::config::duration_serde"))]
    pub half_open_max_wait: Duration,
    /// An optional deadline for each call; a call past it counts as a failure and a timeout. Default: `None`.
    #[cfg_attr(
        feature = "serde",
        serde(with = "crate::config::option_duration_serde")
    )]
    pub call_timeout: Option<Duration>,
    /// One call in this many is timed for the latency summary (a power of two). Every call is timed anyway when
    /// slow-call detection is on. Default: 16.
    pub latency_sample_every: u32,
    /// What a response body dropped before its end counts as. Default: ignored.
    pub dropped_body: DroppedBody,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            name: Cow::Borrowed("default"),
            window: Window::Count { size: 100 },
            minimum_calls: 20,
            failure_rate_threshold: Some(0.5),
            slow_call_rate_threshold: None,
            slow_call_duration: Duration::from_secs(5),
            consecutive_failures: None,
            open_duration: OpenDuration::Fixed(Duration::from_secs(30)),
            server_hints: Some(HintBounds::default()),
            half_open_permits: 5,
            probe_policy: ProbePolicy::RateBelowThreshold,
            half_open_max_wait: Duration::from_secs(60),
            call_timeout: None,
            latency_sample_every: 16,
            dropped_body: DroppedBody::Ignore,
        }
    }
}

/// A configuration that cannot work, with the setting to change. The crates built on this one (the rate limiter, the
/// cache) report their own invalid configurations with it too, naming their component.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    component: &'static str,
    field: &'static str,
    message: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self::in_component("circuit breaker", field, message)
    }

    /// An error in `component`'s configuration (`"rate limit"`, `"cache"`): `field` is the setting to change and
    /// `message` says why.
    pub fn in_component(
        component: &'static str,
        field: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            component,
            field,
            message: message.into(),
        }
    }

    /// The setting that is wrong, as its builder method or config field names it.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What the configuration is for: `"circuit breaker"`, `"rate limit"`, `"cache"`.
    pub fn component(&self) -> &'static str {
        self.component
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} configuration: `{}` {}",
            self.component, self.field, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

fn check_rate(field: &'static str, rate: Option<f64>) -> Result<(), ConfigError> {
    match rate {
        Some(rate) if !(rate > 0.0 && rate <= 1.0) => Err(ConfigError::new(
            field,
            format!("must be a fraction in (0, 1], like 0.5 for 50 %; got {rate}"),
        )),
        _ => Ok(()),
    }
}

impl BreakerConfig {
    /// Checks that the configuration can work, naming the setting to change when it cannot.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for the first setting that is out of range or contradicts another.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_rate("failure_rate_threshold", self.failure_rate_threshold)?;
        check_rate("slow_call_rate_threshold", self.slow_call_rate_threshold)?;
        if self.failure_rate_threshold.is_none()
            && self.slow_call_rate_threshold.is_none()
            && self.consecutive_failures.is_none()
        {
            return Err(ConfigError::new(
                "failure_rate_threshold",
                "is off, and so are `slow_call_rate_threshold` and `consecutive_failures`: the breaker could never \
                 open; enable at least one of them",
            ));
        }
        if self.consecutive_failures == Some(0) {
            return Err(ConfigError::new(
                "consecutive_failures",
                "must be at least 1",
            ));
        }
        if self.minimum_calls == 0 {
            return Err(ConfigError::new("minimum_calls", "must be at least 1"));
        }
        if let Some(bounds) = self.server_hints
            && (bounds.max.is_zero() || bounds.min > bounds.max)
        {
            return Err(ConfigError::new(
                "server_hints",
                format!(
                    "bounds {:?}..={:?} are empty: give a max above zero and a min no larger than it (or None to \
                     ignore hints)",
                    bounds.min, bounds.max
                ),
            ));
        }
        match self.window {
            Window::Count { size } => {
                if size == 0 || size > MAX_COUNT_WINDOW {
                    return Err(ConfigError::new(
                        "window",
                        format!("count size must be between 1 and {MAX_COUNT_WINDOW}; got {size}"),
                    ));
                }
                if self.minimum_calls > size {
                    return Err(ConfigError::new(
                        "minimum_calls",
                        format!(
                            "is {} but the count window holds only {size} calls, so a rate could never trip; make \
                             it at most {size}",
                            self.minimum_calls
                        ),
                    ));
                }
            }
            Window::Time { duration, buckets } => {
                if buckets == 0 || buckets > MAX_TIME_BUCKETS {
                    return Err(ConfigError::new(
                        "window",
                        format!(
                            "time buckets must be between 1 and {MAX_TIME_BUCKETS}; got {buckets}"
                        ),
                    ));
                }
                if duration.as_millis() < u128::from(buckets) {
                    return Err(ConfigError::new(
                        "window",
                        format!(
                            "time duration {duration:?} is shorter than 1 ms per bucket ({buckets} buckets); use a \
                             longer duration or fewer buckets"
                        ),
                    ));
                }
                if duration.as_millis() % u128::from(buckets) != 0 {
                    return Err(ConfigError::new(
                        "window",
                        format!(
                            "time duration {duration:?} does not divide into {buckets} buckets of whole \
                             milliseconds"
                        ),
                    ));
                }
            }
        }
        if self.slow_call_rate_threshold.is_some() && self.slow_call_duration.is_zero() {
            return Err(ConfigError::new(
                "slow_call_duration",
                "must be longer than zero when `slow_call_rate_threshold` is set",
            ));
        }
        match self.open_duration {
            OpenDuration::Fixed(duration) if duration.as_millis() == 0 => {
                return Err(ConfigError::new("open_duration", "must be at least 1 ms"));
            }
            OpenDuration::Backoff(backoff) => {
                if backoff.initial.as_millis() == 0 {
                    return Err(ConfigError::new(
                        "open_duration",
                        "backoff `initial` must be at least 1 ms",
                    ));
                }
                if !(backoff.multiplier >= 1.0 && backoff.multiplier.is_finite()) {
                    return Err(ConfigError::new(
                        "open_duration",
                        format!(
                            "backoff `multiplier` must be a finite number ≥ 1; got {}",
                            backoff.multiplier
                        ),
                    ));
                }
                if backoff.max < backoff.initial {
                    return Err(ConfigError::new(
                        "open_duration",
                        format!(
                            "backoff `max` ({:?}) is below `initial` ({:?})",
                            backoff.max, backoff.initial
                        ),
                    ));
                }
                if !(0.0..=1.0).contains(&backoff.jitter) {
                    return Err(ConfigError::new(
                        "open_duration",
                        format!(
                            "backoff `jitter` must be a fraction in [0, 1]; got {}",
                            backoff.jitter
                        ),
                    ));
                }
            }
            OpenDuration::Fixed(_) => {}
        }
        if self.half_open_permits == 0 || self.half_open_permits > MAX_HALF_OPEN_PERMITS {
            return Err(ConfigError::new(
                "half_open_permits",
                format!(
                    "must be between 1 and {MAX_HALF_OPEN_PERMITS}; got {}",
                    self.half_open_permits
                ),
            ));
        }
        if self.half_open_max_wait.as_millis() == 0 {
            return Err(ConfigError::new(
                "half_open_max_wait",
                "must be at least 1 ms",
            ));
        }
        if self.call_timeout.is_some_and(|timeout| timeout.is_zero()) {
            return Err(ConfigError::new(
                "call_timeout",
                "must be longer than zero (or unset)",
            ));
        }
        if !self.latency_sample_every.is_power_of_two() {
            return Err(ConfigError::new(
                "latency_sample_every",
                format!(
                    "must be a power of two (1, 2, 4, ...); got {}",
                    self.latency_sample_every
                ),
            ));
        }
        Ok(())
    }
}

/// Durations in configuration files: an integer number of milliseconds, or a string such as `"250ms"`, `"5s"`,
/// `"2m"` or `"1h"`. Every crate of the workspace reads its durations this way: use it on a field with
/// `#[serde(with = "tower_breaker::duration_serde")]`.
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub mod duration_serde {
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("milliseconds as an integer, or a string like \"250ms\", \"5s\" or \"2m\"")
        }

        fn visit_u64<E: de::Error>(self, ms: u64) -> Result<Duration, E> {
            Ok(Duration::from_millis(ms))
        }

        fn visit_i64<E: de::Error>(self, ms: i64) -> Result<Duration, E> {
            u64::try_from(ms)
                .map(Duration::from_millis)
                .map_err(|_| E::custom(format!("a duration cannot be negative: {ms}")))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            parse(text).ok_or_else(|| {
                E::custom(format!(
                    "not a duration: {text:?} (use e.g. \"250ms\", \"5s\", \"2m\")"
                ))
            })
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Duration> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit())?;
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().ok()?;
        match unit.trim() {
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            _ => None,
        }
    }

    /// Reads a duration: milliseconds as an integer, or a string with a unit (`ms`, `s`, `m`, `h`).
    ///
    /// # Errors
    ///
    /// The deserializer's error for a negative number or a string that is not a duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// Like `duration_serde`, for an optional duration (`null` or absent means none).
#[cfg(feature = "serde")]
pub(crate) mod option_duration_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    struct Wrapper(#[serde(with = "super::duration_serde")] Duration);

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<Wrapper>::deserialize(deserializer)?.map(|Wrapper(duration)| duration))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_is_valid() {
        assert_eq!(BreakerConfig::default().validate(), Ok(()));
    }

    #[test]
    fn a_rate_above_one_names_the_setting() {
        let config = BreakerConfig {
            failure_rate_threshold: Some(50.0),
            ..BreakerConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert_eq!(error.field(), "failure_rate_threshold");
        assert!(error.to_string().contains("like 0.5 for 50 %"), "{error}");
    }

    #[test]
    fn a_breaker_that_could_never_open_is_refused() {
        let config = BreakerConfig {
            failure_rate_threshold: None,
            ..BreakerConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err().field(),
            "failure_rate_threshold"
        );
    }

    #[test]
    fn minimum_calls_larger_than_the_count_window_is_refused() {
        let config = BreakerConfig {
            window: Window::Count { size: 10 },
            minimum_calls: 11,
            ..BreakerConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert_eq!(error.field(), "minimum_calls");
        assert!(error.to_string().contains("at most 10"), "{error}");
    }

    #[test]
    fn a_time_window_must_divide_into_whole_millisecond_buckets() {
        let config = BreakerConfig {
            window: Window::Time {
                duration: Duration::from_millis(1000),
                buckets: 3,
            },
            ..BreakerConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().field(), "window");
    }

    #[test]
    fn a_backoff_whose_cap_is_below_its_start_is_refused() {
        let config = BreakerConfig {
            open_duration: OpenDuration::Backoff(Backoff::exponential(
                Duration::from_secs(10),
                Duration::from_secs(1),
            )),
            ..BreakerConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().field(), "open_duration");
    }

    #[test]
    fn the_latency_sample_rate_must_be_a_power_of_two() {
        let config = BreakerConfig {
            latency_sample_every: 10,
            ..BreakerConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err().field(),
            "latency_sample_every"
        );
    }
}
