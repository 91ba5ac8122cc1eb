//! The polling task: a read every interval (or at a hint), reconciled and sent as changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{Notify, mpsc};
use tower::discover::Change;

use crate::instance::Instance;
use crate::registry::Registry;
use crate::stats::WatchHandle;

use super::filter::Filter;
use super::reconcile::{Preservation, reconcile};

/// How a service is watched: what a [`DiscoveryBuilder`](super::DiscoveryBuilder) collects.
#[derive(Debug, Clone)]
pub(super) struct WatchOptions {
    pub(super) interval: Duration,
    pub(super) filter: Filter,
    pub(super) max_departure_fraction: f64,
    /// `None`: twice the registry's TTL; `Some(Duration::ZERO)`: self-preservation off.
    pub(super) preservation_grace: Option<Duration>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            filter: Filter::up(),
            max_departure_fraction: 0.5,
            preservation_grace: None,
        }
    }
}

/// Reads the service every `interval` (±10 % jitter) or at a hint, and sends what changed, until the stream is
/// dropped.
pub(super) async fn poll_loop<R: Registry>(
    registry: R,
    watch: WatchHandle,
    options: WatchOptions,
    sender: mpsc::UnboundedSender<Change<String, Instance>>,
    hint: Arc<Notify>,
) {
    let service = &watch.service;
    let policy = Preservation {
        max_departure_fraction: options.max_departure_fraction,
        grace: options
            .preservation_grace
            .unwrap_or_else(|| registry.ttl().saturating_mul(2)),
    };
    let mut known: HashMap<String, Instance> = HashMap::new();
    let mut preserved: HashMap<String, Instant> = HashMap::new();
    let mut failing = false;
    loop {
        let read = registry.instances(service).await;
        watch.counters.poll(read.is_ok());
        match read {
            Ok(instances) => {
                if failing {
                    tracing::info!(%service, "registry reachable again");
                    failing = false;
                }
                let was_preserving = !preserved.is_empty();
                let outcome = reconcile(
                    &mut known,
                    &mut preserved,
                    instances,
                    &options.filter,
                    policy,
                    Instant::now(),
                );
                if !was_preserving && !preserved.is_empty() {
                    tracing::warn!(
                        %service,
                        missing = outcome.newly_preserved,
                        known = known.len(),
                        grace = ?policy.grace,
                        "the registry lost most of this service's instances at once; keeping them (self-preservation)"
                    );
                    watch.counters.preservation_entered();
                } else if outcome.newly_preserved > 0 {
                    tracing::debug!(%service, missing = outcome.newly_preserved, "more instances preserved");
                }
                if was_preserving && preserved.is_empty() {
                    tracing::info!(
                        %service,
                        expired = outcome.expired,
                        "self-preservation over: every preserved instance reappeared or its grace ended"
                    );
                }
                watch.counters.preserved(preserved.len());
                let changes = outcome.changes;
                let inserts = changes
                    .iter()
                    .filter(|change| matches!(change, Change::Insert(..)))
                    .count();
                watch.counters.changes(
                    inserts as u64,
                    (changes.len() - inserts) as u64,
                    known.len(),
                );
                for change in changes {
                    if sender.send(change).is_err() {
                        return; // the stream was dropped
                    }
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%service, %error, "registry unreachable; keeping the last known instances");
                    failing = true;
                }
            }
        }
        let wait = options.interval.mul_f64(rand::rng().random_range(0.9..1.1));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = hint.notified() => {}
        }
    }
}
