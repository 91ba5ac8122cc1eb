//! State transition events.

use std::sync::Arc;

use crate::state::State;

/// Why the breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case", tag = "kind"))]
#[non_exhaustive]
pub enum TransitionReason {
    /// The failure rate over the window reached the threshold.
    FailureRate {
        /// The rate that tripped it.
        rate: f64,
        /// Calls in the window.
        calls: u64,
    },
    /// The slow-call rate over the window reached the threshold.
    SlowCallRate {
        /// The rate that tripped it.
        rate: f64,
        /// Calls in the window.
        calls: u64,
    },
    /// Too many failures in a row.
    ConsecutiveFailures {
        /// How many.
        count: u32,
    },
    /// The open period ended; probes may go through.
    OpenElapsed,
    /// The half-open probes met the threshold.
    ProbesSucceeded,
    /// The half-open probes failed.
    ProbesFailed,
    /// The half-open probes did not finish within `half_open_max_wait`; a fresh cycle started.
    ProbeWatchdog,
    /// A call on the [`crate::CircuitBreaker`] handle (force open, reset, ...).
    Manual,
    /// Another process opened its breaker of the same name (the `redis` feature).
    Remote,
}

/// One state change of a breaker.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Transition {
    /// The breaker's name.
    pub breaker: String,
    /// The state it left.
    pub from: State,
    /// The state it entered.
    pub to: State,
    /// Why.
    pub reason: TransitionReason,
    /// When open: how long it stays open, in milliseconds.
    pub open_for_millis: Option<u64>,
}

/// A function called on every transition, on the thread that made it. Keep it short; it must not block.
pub(crate) type Listener = Arc<dyn Fn(&Transition) + Send + Sync>;
