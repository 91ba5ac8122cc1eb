//! Where a breaker reads the time: the system's monotonic clock, or a [`ManualClock`] that tests move by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A clock that only moves when told to, for deterministic tests of open durations and time windows.
///
/// ```
/// use std::time::Duration;
/// use tower_breaker::{CircuitBreaker, ManualClock, State};
///
/// let clock = ManualClock::new();
/// let breaker = CircuitBreaker::builder()
///     .consecutive_failures(1)
///     .open_for(Duration::from_secs(10))
///     .clock(clock.clone())
///     .build()?;
/// breaker.try_acquire()?.failure();
/// assert_eq!(breaker.state(), State::Open);
/// clock.advance(Duration::from_secs(10));
/// let probe = breaker.try_acquire()?; // the first call after the open duration is a probe
/// assert_eq!(breaker.state(), State::HalfOpen);
/// probe.success();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    millis: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let millis = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.millis.fetch_add(millis, Ordering::AcqRel);
    }

    /// How far the clock has been moved since it was made (millisecond resolution). Other crates of the workspace
    /// (the cache) offset their own time by it.
    pub fn elapsed(&self) -> Duration {
        Duration::from_millis(self.millis.load(Ordering::Acquire))
    }
}

/// The clock a breaker uses.
#[derive(Debug, Clone)]
pub(crate) enum Clock {
    System(Instant),
    Manual(ManualClock),
}

impl Clock {
    pub(crate) fn system() -> Self {
        Self::System(Instant::now())
    }

    /// Milliseconds since the breaker was built.
    #[inline]
    pub(crate) fn now_ms(&self) -> u64 {
        match self {
            Self::System(base) => u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX),
            Self::Manual(clock) => clock.millis.load(Ordering::Acquire),
        }
    }

    /// A start point for measuring one call: nanoseconds since the breaker was built (system clock) or the manual
    /// clock's milliseconds. A plain number keeps permits small (they are moved with every call's future).
    #[inline]
    pub(crate) fn start(&self) -> u64 {
        match self {
            Self::System(base) => u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Self::Manual(clock) => clock.millis.load(Ordering::Acquire),
        }
    }

    /// Time since `start` (a value of [`Clock::start`]).
    #[inline]
    pub(crate) fn elapsed(&self, start: u64) -> Duration {
        match self {
            Self::System(base) => {
                let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                Duration::from_nanos(now.saturating_sub(start))
            }
            Self::Manual(clock) => {
                Duration::from_millis(clock.millis.load(Ordering::Acquire).saturating_sub(start))
            }
        }
    }
}
