//! Export through the `metrics` facade (feature `metrics`).
//!
//! Handles are registered once when the breaker is built, labelled `breaker = <name>`, so recording costs no
//! allocation. Install your recorder (for example `metrics-exporter-prometheus`) before building breakers.

use metrics::{Counter, Gauge, Histogram};

use crate::breaker::Outcome;
use crate::state::State;

pub(crate) struct Handles {
    pub(crate) requests: Counter,
    successes: Counter,
    failures: Counter,
    ignored: Counter,
    pub(crate) rejects: Counter,
    pub(crate) timeouts: Counter,
    fallback_successes: Counter,
    fallback_failures: Counter,
    transitions: [Counter; State::COUNT],
    state: Gauge,
    pub(crate) latency: Histogram,
}

impl Handles {
    pub(crate) fn new(name: &str) -> Self {
        let name = name.to_owned();
        let outcome = |outcome: &'static str| metrics::counter!("tower_breaker_calls_total", "breaker" => name.clone(), "outcome" => outcome);
        let fallback = |outcome: &'static str| metrics::counter!("tower_breaker_fallbacks_total", "breaker" => name.clone(), "outcome" => outcome);
        let transitions = [
            State::Closed,
            State::Open,
            State::HalfOpen,
            State::ForcedOpen,
            State::ForcedClosed,
            State::Disabled,
            State::MetricsOnly,
        ]
        .map(|state| {
            metrics::counter!("tower_breaker_transitions_total", "breaker" => name.clone(), "to" => state.as_str())
        });
        Self {
            requests: metrics::counter!("tower_breaker_requests_total", "breaker" => name.clone()),
            successes: outcome("success"),
            failures: outcome("failure"),
            ignored: outcome("ignored"),
            rejects: metrics::counter!("tower_breaker_rejects_total", "breaker" => name.clone()),
            timeouts: metrics::counter!("tower_breaker_timeouts_total", "breaker" => name.clone()),
            fallback_successes: fallback("success"),
            fallback_failures: fallback("failure"),
            transitions,
            state: metrics::gauge!("tower_breaker_state", "breaker" => name.clone()),
            latency: metrics::histogram!("tower_breaker_call_duration_seconds", "breaker" => name),
        }
    }

    /// Handles that record nothing (a breaker built with `export_metrics(false)`).
    pub(crate) fn noop() -> Self {
        Self {
            requests: Counter::noop(),
            successes: Counter::noop(),
            failures: Counter::noop(),
            ignored: Counter::noop(),
            rejects: Counter::noop(),
            timeouts: Counter::noop(),
            fallback_successes: Counter::noop(),
            fallback_failures: Counter::noop(),
            transitions: std::array::from_fn(|_| Counter::noop()),
            state: Gauge::noop(),
            latency: Histogram::noop(),
        }
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        match outcome {
            Outcome::Success => self.successes.increment(1),
            Outcome::Failure => self.failures.increment(1),
            Outcome::Ignored => self.ignored.increment(1),
        }
    }

    pub(crate) fn fallback(&self, succeeded: bool) {
        if succeeded {
            self.fallback_successes.increment(1);
        } else {
            self.fallback_failures.increment(1);
        }
    }

    pub(crate) fn transition(&self, to: State) {
        self.transitions[to.index()].increment(1);
        self.set_state(to);
    }

    /// The state gauge: 0 closed, 1 open, 2 half-open, 3 forced open, 4 forced closed, 5 disabled, 6 metrics-only.
    pub(crate) fn set_state(&self, state: State) {
        self.state.set(state.index() as f64);
    }
}
