//! Export through the `metrics` facade (feature `metrics`). Handles are registered when the limiter is built.

use metrics::Counter;

use crate::decision::{Decision, DecisionSource};

pub(crate) struct Handles {
    /// [source][0 = denied, 1 = allowed]
    decisions: Vec<[Counter; 2]>,
}

impl Handles {
    pub(crate) fn new(name: &str) -> Self {
        let decisions = DecisionSource::ALL
            .iter()
            .map(|source| {
                let counter = |outcome: &'static str| {
                    metrics::counter!(
                        "tower_redis_ratelimit_decisions_total",
                        "limiter" => name.to_owned(),
                        "source" => source.as_str(),
                        "outcome" => outcome
                    )
                };
                [counter("denied"), counter("allowed")]
            })
            .collect();
        Self { decisions }
    }

    pub(crate) fn decision(&self, decision: &Decision) {
        self.decisions[decision.source.index()][usize::from(decision.allowed)].increment(1);
    }
}
