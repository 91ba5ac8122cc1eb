//! One guarded Redis call: a circuit breaker, a deadline, and the counters every Redis-backed layer reports.
//!
//! A layer on the request path must never wait on a Redis that is gone, and never wait longer than its budget on one
//! that is slow. [`Guard::call`] asks the breaker for a permit (an open breaker answers [`GuardError::Open`] at once,
//! with no Redis call), runs the call within the deadline, and reports the outcome to the breaker: a reply is a
//! success, an error a failure, a deadline passed a timeout. The layer then degrades in its own documented way.
//!
//! ```no_run
//! # async fn demo(mut connection: redis::aio::MultiplexedConnection) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tower_redis_core::guard::{Guard, GuardError};
//!
//! let guard = Guard::new(
//!     tower_breaker::CircuitBreaker::builder().name("cache-redis").build()?,
//!     Duration::from_millis(200),
//! )?;
//! match guard.call(redis::cmd("GET").arg("k").query_async::<Option<String>>(&mut connection)).await {
//!     Ok(value) => println!("{value:?}"),
//!     Err(GuardError::Open) => println!("Redis is known to be down: no call made"),
//!     Err(error) => println!("degrading: {error}"),
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tower_breaker::CircuitBreaker;

use crate::ConfigError;

/// Why a guarded call gave no value.
#[derive(Debug)]
#[non_exhaustive]
pub enum GuardError {
    /// The breaker is open: Redis failed repeatedly and is left alone for a while. No call was made.
    Open,
    /// Redis did not answer within the deadline.
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed.
    Redis(redis::RedisError),
}

impl fmt::Display for GuardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open => f.write_str("the breaker guarding Redis is open"),
            Self::Timeout(deadline) => {
                write!(f, "Redis did not answer within {} ms", deadline.as_millis())
            }
            Self::Redis(error) => write!(f, "redis error: {error}"),
        }
    }
}

impl std::error::Error for GuardError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Redis(error) => Some(error),
            _ => None,
        }
    }
}

/// Counters of a [`Guard`] (shared by its clones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct GuardStats {
    /// Calls Redis answered.
    pub calls: u64,
    /// Calls that failed (an error reply or a broken connection).
    pub errors: u64,
    /// Calls that ran past the deadline.
    pub timeouts: u64,
    /// Calls not made because the breaker was open.
    pub rejected: u64,
    /// The mean latency of the answered calls, in microseconds.
    pub mean_micros: u64,
    /// The worst latency of an answered call, in microseconds.
    pub max_micros: u64,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    rejected: AtomicU64,
    micros: AtomicU64,
    max_micros: AtomicU64,
}

/// Counts Redis calls and their latency the one way every crate of the workspace reports them: the counters behind
/// [`GuardStats`] and, with the `metrics` feature, `tower_redis_calls_total{client, outcome}` (`ok`, `error`,
/// `timeout`, `rejected`) and `tower_redis_call_duration_seconds{client}`, registered once here. `client` names
/// the user (a cache, a limiter, a registry): a bounded label. A [`Guard`] has one; code that calls Redis without a
/// breaker (discovery's registry) uses one directly. Cloning is an `Arc` bump.
#[derive(Debug, Clone)]
pub struct CallRecorder {
    counters: Arc<Counters>,
    #[cfg(feature = "metrics")]
    metrics: Arc<crate::metrics::CallMetrics>,
}

impl CallRecorder {
    /// A recorder labelled `client = <client>`.
    pub fn new(client: &str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = client;
        Self {
            counters: Arc::default(),
            #[cfg(feature = "metrics")]
            metrics: Arc::new(crate::metrics::CallMetrics::new(client)),
        }
    }

    /// Runs `call` within `deadline` and records what happened: an answer (with its latency), an error, or a
    /// deadline passed (`Err`, as `tokio::time::timeout` reports it).
    ///
    /// # Errors
    ///
    /// `tokio::time::error::Elapsed` when the deadline passed.
    pub async fn within<T, F>(
        &self,
        deadline: Duration,
        call: F,
    ) -> Result<redis::RedisResult<T>, tokio::time::error::Elapsed>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let result = tokio::time::timeout(deadline, call).await;
        match &result {
            Ok(Ok(_)) => self.answered(started.elapsed()),
            Ok(Err(_)) => self.error(),
            Err(_) => self.timeout(),
        }
        result
    }

    fn answered(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let counters = &self.counters;
        counters.calls.fetch_add(1, Ordering::Relaxed);
        counters.micros.fetch_add(micros, Ordering::Relaxed);
        counters.max_micros.fetch_max(micros, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.answered(elapsed);
    }

    fn error(&self) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.error.increment(1);
    }

    fn timeout(&self) {
        self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.timeout.increment(1);
    }

    /// A call not made because a breaker was open.
    pub fn rejected(&self) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.rejected.increment(1);
    }

    /// The counters.
    pub fn stats(&self) -> GuardStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let calls = load(&self.counters.calls);
        GuardStats {
            calls,
            errors: load(&self.counters.errors),
            timeouts: load(&self.counters.timeouts),
            rejected: load(&self.counters.rejected),
            mean_micros: load(&self.counters.micros).checked_div(calls).unwrap_or(0),
            max_micros: load(&self.counters.max_micros),
        }
    }
}

/// A breaker and a deadline around Redis calls. Cloning is an `Arc` bump. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Guard {
    breaker: CircuitBreaker,
    timeout: Duration,
    recorder: CallRecorder,
}

impl Guard {
    /// Guards calls with `breaker`, each within `timeout`.
    ///
    /// # Errors
    ///
    /// When `timeout` is zero (every call would time out).
    pub fn new(breaker: CircuitBreaker, timeout: Duration) -> Result<Self, ConfigError> {
        if timeout.is_zero() {
            return Err(ConfigError::in_component(
                "redis guard",
                "timeout",
                "must be greater than zero: every Redis call would time out",
            ));
        }
        let recorder = CallRecorder::new(breaker.name());
        Ok(Self {
            breaker,
            timeout,
            recorder,
        })
    }

    /// The breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `call` if the breaker allows, within the deadline, and reports the outcome to the breaker.
    ///
    /// # Errors
    ///
    /// [`GuardError::Open`] without calling when the breaker is open, [`GuardError::Timeout`] past the deadline,
    /// [`GuardError::Redis`] when Redis failed.
    pub async fn call<T, F>(&self, call: F) -> Result<T, GuardError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        self.call_within(self.timeout, call).await
    }

    /// As [`Guard::call`], with another deadline (an administrative call may be given longer).
    ///
    /// # Errors
    ///
    /// As [`Guard::call`].
    pub async fn call_within<T, F>(&self, deadline: Duration, call: F) -> Result<T, GuardError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let Ok(permit) = self.breaker.try_acquire() else {
            self.recorder.rejected();
            return Err(GuardError::Open);
        };
        match self.recorder.within(deadline, call).await {
            Ok(Ok(value)) => {
                permit.success();
                Ok(value)
            }
            Ok(Err(error)) => {
                permit.failure();
                Err(GuardError::Redis(error))
            }
            Err(_) => {
                permit.timeout();
                Err(GuardError::Timeout(deadline))
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> GuardStats {
        self.recorder.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::{Guard, GuardError};
    use std::time::Duration;
    use tower_breaker::{CircuitBreaker, State};

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::builder()
            .name("guard-test")
            .consecutive_failures(2)
            .no_failure_rate()
            .open_for(Duration::from_secs(60))
            .build()
            .unwrap_or_else(|error| panic!("{error}"))
    }

    fn failed() -> redis::RedisResult<u8> {
        Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )))
    }

    #[tokio::test]
    async fn answers_errors_and_timeouts_are_counted_and_reported_to_the_breaker() {
        let guard = Guard::new(breaker(), Duration::from_millis(20))
            .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(guard.call(async { Ok(7) }).await.ok(), Some(7));
        assert!(matches!(
            guard.call(async { failed() }).await,
            Err(GuardError::Redis(_))
        ));
        let slow = guard
            .call(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(1)
            })
            .await;
        assert!(
            matches!(slow, Err(GuardError::Timeout(deadline)) if deadline == Duration::from_millis(20))
        );
        // Two failures in a row: open, and the next call is not made.
        assert_eq!(guard.breaker().state(), State::Open);
        let mut called = false;
        let skipped = guard
            .call(async {
                called = true;
                Ok(1)
            })
            .await;
        assert!(matches!(skipped, Err(GuardError::Open)));
        assert!(!called);
        let stats = guard.stats();
        assert_eq!(
            (stats.calls, stats.errors, stats.timeouts, stats.rejected),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn a_zero_timeout_is_a_configuration_error() {
        let error = Guard::new(breaker(), Duration::ZERO).unwrap_err();
        assert_eq!(error.field(), "timeout");
    }
}
