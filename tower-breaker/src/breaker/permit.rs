//! [`Permit`]: permission to make one call, and the [`Outcome`] reported on it.

use std::time::Duration;

use super::transitions::Shared;
use crate::config::DroppedBody;
use crate::lease::SharedRef;
use crate::stats::Counters;
use crate::window::Sample;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PermitKind {
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
    pub(super) shared: Option<SharedRef>,
    pub(super) generation: u32,
    pub(super) kind: PermitKind,
    /// When the call started ([`Clock::start`](crate::clock::Clock::start)); read only when `sampled` or every call is timed.
    pub(super) start: u64,
    pub(super) sampled: bool,
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
        self.finish(Outcome::Failure, None);
    }

    /// Reports the call's outcome.
    #[inline(always)]
    pub fn record(mut self, outcome: Outcome) {
        self.finish(outcome, None);
    }

    /// Reports a failure with the server's hint of when to come back (a `Retry-After`, a
    /// `grpc-retry-pushback-ms`): if this failure opens the breaker, the opening lasts that long, within
    /// [`BreakerConfig::server_hints`](crate::BreakerConfig::server_hints). The HTTP and gRPC layers read the hints
    /// themselves; this is for callers of the core API.
    pub fn failure_with_hint(mut self, retry_after: Duration) {
        let hint = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
        self.finish(Outcome::Failure, Some(hint));
    }

    /// [`record`](Self::record), with a server's hint that counts only when `outcome` is a failure.
    pub(crate) fn record_hinted(mut self, outcome: Outcome, hint: Option<Duration>) {
        let hint = hint.map(|hint| u64::try_from(hint.as_millis()).unwrap_or(u64::MAX));
        self.finish(outcome, hint.filter(|_| outcome == Outcome::Failure));
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
            DroppedBody::Success => self.finish(Outcome::Success, None),
            DroppedBody::Failure => self.finish(Outcome::Failure, None),
        }
    }

    #[inline(always)]
    fn finish(&mut self, outcome: Outcome, hint_ms: Option<u64>) {
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
            shared.record_window(self.generation, Sample::SUCCESS, None);
        } else {
            self.finish_otherwise(&shared, outcome, hint_ms);
        }
        shared.release();
    }

    #[inline(never)]
    fn finish_otherwise(&self, shared: &Shared, outcome: Outcome, hint_ms: Option<u64>) {
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
            PermitKind::Window => shared.record_window(self.generation, sample, hint_ms),
            PermitKind::Probe => {
                Counters::add(&shared.counters.other_records);
                shared.record_probe(self.generation, sample, hint_ms);
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
