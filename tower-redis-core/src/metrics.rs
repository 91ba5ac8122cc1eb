//! The Redis call metrics every crate reports the same way (feature `metrics`), registered once per
//! [`CallRecorder`](crate::guard::CallRecorder).

use std::time::Duration;

use metrics::{Counter, Histogram};

pub(crate) struct CallMetrics {
    ok: Counter,
    pub(crate) error: Counter,
    pub(crate) timeout: Counter,
    pub(crate) rejected: Counter,
    latency: Histogram,
}

impl std::fmt::Debug for CallMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallMetrics").finish_non_exhaustive()
    }
}

impl CallMetrics {
    pub(crate) fn new(client: &str) -> Self {
        let outcome = |outcome: &'static str| metrics::counter!("tower_redis_calls_total", "client" => client.to_owned(), "outcome" => outcome);
        Self {
            ok: outcome("ok"),
            error: outcome("error"),
            timeout: outcome("timeout"),
            rejected: outcome("rejected"),
            latency: metrics::histogram!("tower_redis_call_duration_seconds", "client" => client.to_owned()),
        }
    }

    pub(crate) fn answered(&self, elapsed: Duration) {
        self.ok.increment(1);
        self.latency.record(elapsed.as_secs_f64());
    }
}
