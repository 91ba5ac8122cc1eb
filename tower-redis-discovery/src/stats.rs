//! Counters for watches and registrations, their [`WatchStats`] and [`RegistrationStats`] snapshots, and their
//! export through the `metrics` facade (feature `metrics`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::instance::Status;

/// The `metrics` handles of one watch, registered once when it is built (labelled `service`).
#[cfg(feature = "metrics")]
struct WatchMetrics {
    polls_ok: metrics::Counter,
    polls_error: metrics::Counter,
    inserts: metrics::Counter,
    removes: metrics::Counter,
    instances: metrics::Gauge,
    preservations: metrics::Counter,
    preserved: metrics::Gauge,
}

#[derive(Default)]
pub(crate) struct WatchCounters {
    polls: AtomicU64,
    poll_failures: AtomicU64,
    inserts: AtomicU64,
    removes: AtomicU64,
    instances: AtomicU64,
    hints: AtomicU64,
    reachable: AtomicBool,
    preservations: AtomicU64,
    preserved: AtomicU64,
    #[cfg(feature = "metrics")]
    metrics: Option<WatchMetrics>,
}

impl std::fmt::Debug for WatchCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchCounters")
            .field("polls", &self.polls)
            .field("poll_failures", &self.poll_failures)
            .finish_non_exhaustive()
    }
}

impl WatchCounters {
    /// Counters for a watch of `service`, with their metric handles.
    pub(crate) fn new(service: &str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = service;
        Self {
            #[cfg(feature = "metrics")]
            metrics: Some(WatchMetrics {
                polls_ok: metrics::counter!("tower_redis_discovery_polls_total", "service" => service.to_owned(), "outcome" => "ok"),
                polls_error: metrics::counter!("tower_redis_discovery_polls_total", "service" => service.to_owned(), "outcome" => "error"),
                inserts: metrics::counter!("tower_redis_discovery_changes_total", "service" => service.to_owned(), "kind" => "insert"),
                removes: metrics::counter!("tower_redis_discovery_changes_total", "service" => service.to_owned(), "kind" => "remove"),
                instances: metrics::gauge!("tower_redis_discovery_instances", "service" => service.to_owned()),
                preservations: metrics::counter!("tower_redis_discovery_preservations_total", "service" => service.to_owned()),
                preserved: metrics::gauge!("tower_redis_discovery_preserved_instances", "service" => service.to_owned()),
            }),
            ..Self::default()
        }
    }

    pub(crate) fn poll(&self, ok: bool) {
        if ok {
            self.polls.fetch_add(1, Ordering::Relaxed);
        } else {
            self.poll_failures.fetch_add(1, Ordering::Relaxed);
        }
        self.reachable.store(ok, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            if ok {
                &metrics.polls_ok
            } else {
                &metrics.polls_error
            }
            .increment(1);
        }
    }

    pub(crate) fn changes(&self, inserts: u64, removes: u64, instances: usize) {
        self.inserts.fetch_add(inserts, Ordering::Relaxed);
        self.removes.fetch_add(removes, Ordering::Relaxed);
        self.instances.store(instances as u64, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.inserts.increment(inserts);
            metrics.removes.increment(removes);
            metrics.instances.set(instances as f64);
        }
    }

    pub(crate) fn preservation_entered(&self) {
        self.preservations.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.preservations.increment(1);
        }
    }

    pub(crate) fn preserved(&self, preserved: usize) {
        self.preserved.store(preserved as u64, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.preserved.set(preserved as f64);
        }
    }

    pub(crate) fn hint(&self) {
        self.hints.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads the counters of one [`Discovery`](crate::Discovery), also after the stream has moved into a balancer.
#[derive(Debug, Clone)]
pub struct WatchHandle {
    pub(crate) service: String,
    pub(crate) counters: Arc<WatchCounters>,
}

impl WatchHandle {
    /// A snapshot of the watch's counters.
    pub fn stats(&self) -> WatchStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let counters = &self.counters;
        WatchStats {
            service: self.service.clone(),
            polls: load(&counters.polls),
            poll_failures: load(&counters.poll_failures),
            inserts: load(&counters.inserts),
            removes: load(&counters.removes),
            instances: load(&counters.instances),
            hints: load(&counters.hints),
            registry_reachable: counters.reachable.load(Ordering::Relaxed),
            preservations: load(&counters.preservations),
            preserved: load(&counters.preserved),
        }
    }
}

/// What one watch has seen.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct WatchStats {
    /// The watched service.
    pub service: String,
    /// Successful reads of the registry.
    pub polls: u64,
    /// Failed reads (the last good set was kept).
    pub poll_failures: u64,
    /// Instances that appeared (or changed where they listen).
    pub inserts: u64,
    /// Instances that went away (or stopped matching the filter).
    pub removes: u64,
    /// Instances known now.
    pub instances: u64,
    /// Change hints received through pub/sub.
    pub hints: u64,
    /// Whether the last read of the registry succeeded.
    pub registry_reachable: bool,
    /// Times self-preservation started: a read found the service empty or sharply shrunk, and the missing
    /// instances were kept.
    pub preservations: u64,
    /// Instances kept now by self-preservation (missing from the registry, still handed out; counted in
    /// `instances`).
    pub preserved: u64,
}

#[derive(Default)]
pub(crate) struct RegistrationCounters {
    heartbeats: AtomicU64,
    failures: AtomicU64,
    consecutive_failures: AtomicU64,
    recreations: AtomicU64,
    heals: AtomicU64,
    /// `tower_redis_discovery_heartbeats_total{service, outcome}`, registered once.
    #[cfg(feature = "metrics")]
    metrics: Option<[metrics::Counter; 2]>,
}

impl std::fmt::Debug for RegistrationCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrationCounters")
            .field("heartbeats", &self.heartbeats)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl RegistrationCounters {
    /// Counters for a registration in `service`, with their metric handles.
    pub(crate) fn new(service: &str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = service;
        Self {
            #[cfg(feature = "metrics")]
            metrics: Some(["error", "ok"].map(|outcome| {
                metrics::counter!("tower_redis_discovery_heartbeats_total", "service" => service.to_owned(), "outcome" => outcome)
            })),
            ..Self::default()
        }
    }

    pub(crate) fn heartbeat(&self, ok: bool) {
        if ok {
            self.heartbeats.fetch_add(1, Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        }
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics[usize::from(ok)].increment(1);
        }
    }
    pub(crate) fn recreated(&self) {
        self.recreations.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn healed(&self) {
        self.heals.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, id: &str, status: Status) -> RegistrationStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RegistrationStats {
            id: id.to_owned(),
            status,
            heartbeats: load(&self.heartbeats),
            failures: load(&self.failures),
            consecutive_failures: load(&self.consecutive_failures),
            recreations: load(&self.recreations),
            heals: load(&self.heals),
        }
    }
}

/// How one [`Registration`](crate::Registration) is doing.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct RegistrationStats {
    /// The instance id.
    pub id: String,
    /// The status the heartbeats report.
    pub status: Status,
    /// Successful writes (the registration and every heartbeat).
    pub heartbeats: u64,
    /// Failed writes.
    pub failures: u64,
    /// Failed writes since the last success (0 when registered and healthy).
    pub consecutive_failures: u64,
    /// Heartbeats that found the entry missing (expired, or lost by the registry) and wrote it again in full.
    pub recreations: u64,
    /// Heartbeats that found the stored entry changed by someone else where it matters (host, port, ...), or not
    /// decodable, and rewrote it in full.
    pub heals: u64,
}
