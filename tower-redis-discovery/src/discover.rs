//! Discovery: a stream of `tower::discover::Change`s for one service, from polling a [`Registry`].
//!
//! A background task reads the service's instances every `interval` (±10 % jitter), keeps those that pass the
//! [`Filter`] (status `UP` by default, like HazelJS's strategies), and sends the difference with the previous set:
//! `Insert(id, instance)` for a new instance or a changed one (when host, port or protocol change, a `Remove` comes
//! first), `Remove(id)` for one that left. A registry error keeps the last good set: the stream never yields an
//! error, because an error from a `Discover` poisons `tower::balance` (and every caller behind its `Buffer`).
//!
//! Self-preservation (as Eureka's, or Envoy's panic threshold): a read that finds the service empty, or that misses
//! more than [`DiscoveryBuilder::max_departure_fraction`] of the serving instances at once, is taken as a registry that
//! lost its data (a restart without persistence, a `FLUSHALL`, a partition that let every entry expire), not as a
//! mass departure. The missing instances stay (no `Remove`) until they reappear or the grace period ends.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_core::Stream;
use rand::Rng;
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tower::discover::Change;
use tower_redis_core::subscription::{Listener, Subscription, SubscriptionConfig};
use tower_redis_core::{ConfigError, Subscriber};

use crate::instance::{Instance, Status};
use crate::registry::Registry;
use crate::stats::{WatchCounters, WatchHandle};

/// Which instances discovery keeps (HazelJS's filter semantics): [`Filter::up`] or [`Filter::any`], then the
/// setters.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct Filter {
    /// Keep only this status (`None`: any). Default: `Some(Status::Up)`.
    pub status: Option<Status>,
    /// Keep only this zone.
    pub zone: Option<String>,
    /// Keep only instances that have every one of these tags.
    pub tags: Vec<String>,
    /// Keep only instances whose metadata has each of these keys with an equal value.
    pub metadata: Map<String, Value>,
}

impl Filter {
    /// Instances with status `UP` (the default).
    pub fn up() -> Self {
        Self {
            status: Some(Status::Up),
            ..Self::default()
        }
    }

    /// Instances of any status.
    pub fn any() -> Self {
        Self::default()
    }

    /// Keeps only instances in `zone`.
    #[must_use]
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Keeps only instances that have `tag` (as well as every tag given before).
    #[must_use]
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Keeps only instances whose metadata has `key` equal to `value` (as well as the pairs given before).
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Whether `instance` passes.
    pub fn matches(&self, instance: &Instance) -> bool {
        self.status.is_none_or(|status| instance.status == status)
            && self
                .zone
                .as_ref()
                .is_none_or(|zone| instance.zone.as_ref() == Some(zone))
            && self.tags.iter().all(|tag| instance.tags.contains(tag))
            && self
                .metadata
                .iter()
                .all(|(key, value)| instance.metadata.get(key) == Some(value))
    }
}

/// How a service is watched: what a [`DiscoveryBuilder`] collects.
#[derive(Debug, Clone)]
pub(crate) struct WatchOptions {
    interval: Duration,
    filter: Filter,
    max_departure_fraction: f64,
    /// `None`: twice the registry's TTL; `Some(Duration::ZERO)`: self-preservation off.
    preservation_grace: Option<Duration>,
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

/// Builds a [`Discovery`]: [`Discovery::builder`], then [`registry`](Self::registry),
/// [`service`](Self::service) and the settings. A builder without a registry can be kept and reused as a preset
/// (it is `Clone`).
#[derive(Clone)]
#[must_use]
pub struct DiscoveryBuilder<R> {
    registry: R,
    service: Option<String>,
    options: WatchOptions,
    preservation_off: bool,
    hints: Option<(Subscriber, String)>,
}

impl<R> fmt::Debug for DiscoveryBuilder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryBuilder")
            .field("service", &self.service)
            .field("options", &self.options)
            .field("hints", &self.hints.as_ref().map(|(_, channel)| channel))
            .finish_non_exhaustive()
    }
}

impl<R> DiscoveryBuilder<R> {
    /// The registry to read (a [`crate::RedisRegistry`], a [`crate::MemoryRegistry`], or your own [`Registry`]).
    pub fn registry<R2: Registry>(self, registry: R2) -> DiscoveryBuilder<R2> {
        DiscoveryBuilder {
            registry,
            service: self.service,
            options: self.options,
            preservation_off: self.preservation_off,
            hints: self.hints,
        }
    }

    /// The service to watch (HazelJS's `name`).
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// Time between two reads of the registry (default 1 s, ±10 % jitter).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.options.interval = interval;
        self
    }

    /// Which instances to keep (default [`Filter::up`]).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.options.filter = filter;
        self
    }

    /// Self-preservation threshold (default 0.5, in `(0, 1]`): when one read loses more than this fraction of the
    /// serving instances (they are missing from the registry, not merely changed status), or reads the service
    /// empty, the registry is taken to have lost its data and the missing instances are kept (no `Remove`) until
    /// they reappear or the [grace](Self::preservation_grace) ends. Fewer departures are removed at once. `1.0`
    /// preserves only on an empty read.
    pub fn max_departure_fraction(mut self, fraction: f64) -> Self {
        self.options.max_departure_fraction = fraction;
        self
    }

    /// How long a preserved instance is kept when it does not reappear (default twice the registry's TTL,
    /// [`Registry::ttl`]); above zero.
    pub fn preservation_grace(mut self, grace: Duration) -> Self {
        self.options.preservation_grace = Some(grace);
        self
    }

    /// Turns self-preservation off: every departure is removed at once, even a read that finds the service empty.
    pub fn without_self_preservation(mut self) -> Self {
        self.preservation_off = true;
        self
    }

    /// Also listens on `channel` (a [`crate::RedisRegistry::events_channel`]) through `subscriber` for change
    /// hints, so changes arrive within milliseconds instead of at the next poll. If the subscription fails or
    /// drops, polling goes on and the subscription is retried. `subscriber` is a `redis::Client` or, with the
    /// `sentinel` feature, a [`SentinelConnection`](crate::sentinel::SentinelConnection) (the subscription then
    /// follows failovers).
    pub fn hints(mut self, subscriber: impl Into<Subscriber>, channel: impl Into<String>) -> Self {
        self.hints = Some((subscriber.into(), channel.into()));
        self
    }
}

fn config_error(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::in_component("discovery", field, message)
}

impl<R: Registry> DiscoveryBuilder<R> {
    /// Validates and starts watching.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the service is missing or empty, the interval or the grace is zero, the departure
    /// fraction is not in `(0, 1]`, or it is called outside a Tokio runtime (the watch is a background task).
    pub fn build(self) -> Result<Discovery, ConfigError> {
        let service = match self.service {
            Some(service) if !service.is_empty() => service,
            _ => {
                return Err(config_error(
                    "service",
                    "name the service to watch: `.service(\"users\")`",
                ));
            }
        };
        if self.options.interval.is_zero() {
            return Err(config_error("interval", "must be greater than zero"));
        }
        let fraction = self.options.max_departure_fraction;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(config_error(
                "max_departure_fraction",
                format!("must be in (0, 1] (1.0 preserves only on an empty read); got {fraction}"),
            ));
        }
        if self.options.preservation_grace == Some(Duration::ZERO) {
            return Err(config_error(
                "preservation_grace",
                "must be greater than zero; to turn self-preservation off, call `.without_self_preservation()`",
            ));
        }
        let mut options = self.options;
        if self.preservation_off {
            options.preservation_grace = Some(Duration::ZERO);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            config_error(
                "runtime",
                "build the discovery inside a Tokio runtime (in `#[tokio::main]` or `Runtime::block_on`): it \
                 polls the registry in a background task",
            )
        })?;
        let handle = WatchHandle {
            counters: Arc::new(WatchCounters::new(&service)),
            service,
        };
        let (sender, changes) = mpsc::unbounded_channel();
        let hint = Arc::new(Notify::new());
        let watch = handle.clone();
        let registry = self.registry;
        let task = match self.hints {
            None => runtime.spawn(poll_loop(registry, watch, options, sender, hint)),
            Some((subscriber, channel)) => {
                let hints = Hints {
                    watch: handle.clone(),
                    hint: hint.clone(),
                };
                runtime.spawn(async move {
                    // Lives as long as the polling task.
                    let _listener = Subscription::spawn(
                        subscriber,
                        vec![channel],
                        SubscriptionConfig::default(),
                        hints,
                    )
                    .inspect_err(|error| {
                        tracing::warn!(%error, "discovery: no change hints; polling only");
                    });
                    poll_loop(registry, watch, options, sender, hint).await;
                })
            }
        };
        Ok(Discovery {
            changes,
            task,
            handle,
        })
    }
}

/// A `tower::discover::Discover` of a service's instances (a stream of `Change<String, Instance>` that never
/// fails). Map the instances to services (`Change::Insert(id, make_client(instance))`) to feed a balancer. Dropping
/// it stops the polling task.
#[derive(Debug)]
pub struct Discovery {
    changes: mpsc::UnboundedReceiver<Change<String, Instance>>,
    task: JoinHandle<()>,
    handle: WatchHandle,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for Discovery {
    type Item = Result<Change<String, Instance>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.changes.poll_recv(cx) {
            Poll::Ready(Some(change)) => Poll::Ready(Some(Ok(change))),
            // The task only ends when the stream is dropped; a closed channel is a stream that has no more news,
            // which tower's balancer treats like an idle source.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

impl Discovery {
    /// A builder with the defaults: a read every second (±10 % jitter), `UP` instances only, self-preservation
    /// past half the serving instances for twice the registry's TTL, no change hints.
    ///
    /// ```no_run
    /// # async fn demo(registry: tower_redis_discovery::MemoryRegistry) -> Result<(), tower_redis_discovery::ConfigError> {
    /// use std::time::Duration;
    /// use tower_redis_discovery::Discovery;
    ///
    /// let users = Discovery::builder()
    ///     .registry(registry)
    ///     .service("users")
    ///     .interval(Duration::from_millis(500))
    ///     .build()?;
    /// # let _ = users; Ok(()) }
    /// ```
    pub fn builder() -> DiscoveryBuilder<()> {
        DiscoveryBuilder {
            registry: (),
            service: None,
            options: WatchOptions::default(),
            preservation_off: false,
            hints: None,
        }
    }

    /// A handle on this watch's counters, usable after the stream has moved into a balancer.
    pub fn handle(&self) -> WatchHandle {
        self.handle.clone()
    }
}

/// What the hint subscription does: wake the poller when its service is named.
struct Hints {
    watch: WatchHandle,
    hint: Arc<Notify>,
}

impl Listener for Hints {
    fn subscribed(
        &mut self,
        _client: &redis::Client,
    ) -> impl std::future::Future<Output = ()> + Send {
        // Read once now: anything announced while we were not subscribed.
        self.hint.notify_one();
        std::future::ready(())
    }

    fn message(&mut self, message: &redis::Msg) {
        if message.get_payload_bytes() == self.watch.service.as_bytes() {
            self.watch.counters.hint();
            self.hint.notify_one();
        }
    }
}

/// The changes that turn `known` into `fresh`, and the update of `known`.
pub(crate) fn diff(
    known: &mut HashMap<String, Instance>,
    fresh: Vec<Instance>,
) -> Vec<Change<String, Instance>> {
    let mut changes = Vec::new();
    let mut fresh_by_id: HashMap<String, Instance> =
        fresh.into_iter().map(|i| (i.id.clone(), i)).collect();
    let mut gone: Vec<String> = Vec::new();
    known.retain(|id, _| {
        let keep = fresh_by_id.contains_key(id);
        if !keep {
            gone.push(id.clone());
        }
        keep
    });
    gone.sort();
    changes.extend(gone.into_iter().map(Change::Remove));
    let mut ids: Vec<String> = fresh_by_id.keys().cloned().collect();
    ids.sort();
    for id in ids {
        let Some(instance) = fresh_by_id.remove(&id) else {
            continue;
        };
        match known.get(&id) {
            None => {
                changes.push(Change::Insert(id.clone(), instance.clone()));
                known.insert(id, instance);
            }
            Some(old) if same_endpoint(old, &instance) && same_routing(old, &instance) => {}
            Some(old) => {
                if !same_endpoint(old, &instance) {
                    changes.push(Change::Remove(id.clone()));
                }
                changes.push(Change::Insert(id.clone(), instance.clone()));
                known.insert(id, instance);
            }
        }
    }
    changes
}

fn same_endpoint(a: &Instance, b: &Instance) -> bool {
    a.host == b.host && a.port == b.port && a.protocol == b.protocol
}

/// Whether what balancing uses is unchanged (heartbeat timestamps do not count).
fn same_routing(a: &Instance, b: &Instance) -> bool {
    a.status == b.status && a.zone == b.zone && a.tags == b.tags && a.metadata == b.metadata
}

/// When self-preservation holds instances back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Preservation {
    /// More than this fraction of the serving instances missing in one read (or an empty read) is a registry problem.
    pub(crate) max_departure_fraction: f64,
    /// How long a missing instance is kept.
    pub(crate) grace: Duration,
}

/// What one read changes.
#[derive(Debug, Default)]
pub(crate) struct Reconciled {
    /// The changes to send.
    pub(crate) changes: Vec<Change<String, Instance>>,
    /// Instances that went missing in this read and are now preserved.
    pub(crate) newly_preserved: usize,
    /// Preserved instances whose grace ended in this read (removed).
    pub(crate) expired: usize,
}

/// Turns one successful read of the registry into changes, with self-preservation.
///
/// `known` is what the stream has handed out (the serving set, preserved instances included); `preserved` maps the
/// ids held back to the end of their grace. `read` is every instance the registry returned, whatever its status.
/// An instance that is in `read` but fails `filter` (it went `DOWN`, say) is removed at once: that is news from the
/// instance, not a loss of data. An instance missing from `read` is a departure; if the read is empty, or more
/// than `policy.max_departure_fraction` of `known` departed in this read, they are preserved until they reappear
/// or `now` passes their grace.
pub(crate) fn reconcile(
    known: &mut HashMap<String, Instance>,
    preserved: &mut HashMap<String, Instant>,
    read: Vec<Instance>,
    filter: &Filter,
    policy: Preservation,
    now: Instant,
) -> Reconciled {
    let present: std::collections::HashSet<&str> = read.iter().map(|i| i.id.as_str()).collect();
    // Back in the registry (with any status): no longer preserved; the diff below takes it from here.
    preserved.retain(|id, _| !present.contains(id.as_str()));
    let mut departed: Vec<String> = known
        .keys()
        .filter(|id| !present.contains(id.as_str()) && !preserved.contains_key(*id))
        .cloned()
        .collect();
    departed.sort();
    let mut newly_preserved = 0;
    if !departed.is_empty() && !policy.grace.is_zero() {
        let sharp = departed.len() as f64 > policy.max_departure_fraction * known.len() as f64;
        if present.is_empty() || sharp {
            newly_preserved = departed.len();
            for id in departed {
                preserved.insert(id, now + policy.grace);
            }
        }
    }
    let before = preserved.len();
    preserved.retain(|_, until| *until > now);
    let expired = before - preserved.len();
    let mut fresh: Vec<Instance> = read.into_iter().filter(|i| filter.matches(i)).collect();
    fresh.extend(preserved.keys().filter_map(|id| known.get(id).cloned()));
    Reconciled {
        changes: diff(known, fresh),
        newly_preserved,
        expired,
    }
}

async fn poll_loop<R: Registry>(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(id: &str, port: u16, status: Status) -> Instance {
        let mut instance = Instance::new("svc", "10.0.0.1", port);
        instance.id = id.to_owned();
        instance.status = status;
        instance
    }

    fn describe(changes: &[Change<String, Instance>]) -> Vec<String> {
        changes
            .iter()
            .map(|change| match change {
                Change::Insert(id, instance) => format!("+{id}:{}", instance.port),
                Change::Remove(id) => format!("-{id}"),
            })
            .collect()
    }

    #[test]
    fn a_diff_inserts_new_removes_gone_and_replaces_moved_instances() {
        let mut known = HashMap::new();
        let first = diff(
            &mut known,
            vec![at("a", 1, Status::Up), at("b", 2, Status::Up)],
        );
        assert_eq!(describe(&first), vec!["+a:1", "+b:2"]);
        assert!(
            diff(
                &mut known,
                vec![at("a", 1, Status::Up), at("b", 2, Status::Up)]
            )
            .is_empty()
        );
        let mut heartbeat = at("a", 1, Status::Up);
        heartbeat.last_heartbeat = "later".to_owned();
        assert!(
            diff(&mut known, vec![heartbeat, at("b", 2, Status::Up)]).is_empty(),
            "heartbeats change nothing"
        );
        let moved = diff(&mut known, vec![at("a", 9, Status::Up)]);
        assert_eq!(describe(&moved), vec!["-b", "-a", "+a:9"]);
    }

    const POLICY: Preservation = Preservation {
        max_departure_fraction: 0.5,
        grace: Duration::from_secs(60),
    };

    /// A watch's state, and one read after another into it.
    struct Watch {
        known: HashMap<String, Instance>,
        preserved: HashMap<String, Instant>,
        start: Instant,
    }

    impl Watch {
        fn new() -> Self {
            Self {
                known: HashMap::new(),
                preserved: HashMap::new(),
                start: Instant::now(),
            }
        }

        /// Reads `instances` `after` the start; the changes as `+id:port` / `-id`.
        fn read(&mut self, instances: Vec<Instance>, after: Duration) -> Vec<String> {
            let outcome = reconcile(
                &mut self.known,
                &mut self.preserved,
                instances,
                &Filter::up(),
                POLICY,
                self.start + after,
            );
            describe(&outcome.changes)
        }

        fn preserved(&self) -> Vec<String> {
            let mut ids: Vec<String> = self.preserved.keys().cloned().collect();
            ids.sort();
            ids
        }
    }

    fn up(ids: &[&str]) -> Vec<Instance> {
        ids.iter()
            .enumerate()
            .map(|(port, id)| at(id, port as u16 + 1, Status::Up))
            .collect()
    }

    #[test]
    fn an_empty_read_removes_nothing_and_preserves_every_serving_instance() {
        let mut watch = Watch::new();
        watch.read(up(&["a", "b", "c"]), Duration::ZERO);
        assert_eq!(
            watch.read(Vec::new(), Duration::from_secs(1)),
            Vec::<String>::new()
        );
        assert_eq!(watch.preserved(), vec!["a", "b", "c"]);
        assert_eq!(watch.known.len(), 3);
    }

    #[test]
    fn an_empty_read_preserves_even_a_single_instance() {
        let mut watch = Watch::new();
        watch.read(up(&["a"]), Duration::ZERO);
        assert_eq!(
            watch.read(Vec::new(), Duration::from_secs(1)),
            Vec::<String>::new()
        );
        assert_eq!(watch.preserved(), vec!["a"]);
    }

    #[test]
    fn losing_more_than_the_fraction_in_one_read_preserves_the_missing_instances() {
        let mut watch = Watch::new();
        watch.read(up(&["a", "b", "c", "d"]), Duration::ZERO);
        // Three of four (75 % > 50 %) gone at once.
        assert_eq!(
            watch.read(up(&["a"]), Duration::from_secs(1)),
            Vec::<String>::new()
        );
        assert_eq!(watch.preserved(), vec!["b", "c", "d"]);
    }

    #[test]
    fn departures_up_to_the_fraction_are_removed_at_once() {
        let mut watch = Watch::new();
        watch.read(up(&["a", "b", "c", "d"]), Duration::ZERO);
        // Two of four is exactly 50 %: not more than the fraction.
        assert_eq!(
            watch.read(up(&["a", "b"]), Duration::from_secs(1)),
            vec!["-c", "-d"]
        );
        assert!(watch.preserved.is_empty());
        assert_eq!(watch.read(up(&["a"]), Duration::from_secs(2)), vec!["-b"]);
    }

    #[test]
    fn a_status_change_is_news_from_the_instance_and_removes_at_once() {
        let mut watch = Watch::new();
        watch.read(up(&["a", "b"]), Duration::ZERO);
        let down = vec![at("a", 1, Status::Down), at("b", 2, Status::OutOfService)];
        assert_eq!(watch.read(down, Duration::from_secs(1)), vec!["-a", "-b"]);
        assert!(watch.preserved.is_empty());
        assert!(watch.known.is_empty());
    }

    #[test]
    fn preserved_instances_that_reappear_are_no_longer_preserved_and_cause_no_change() {
        let mut watch = Watch::new();
        watch.read(up(&["a", "b"]), Duration::ZERO);
        watch.read(Vec::new(), Duration::from_secs(1));
        assert_eq!(
            watch.read(up(&["a"]), Duration::from_secs(2)),
            Vec::<String>::new()
        );
        assert_eq!(watch.preserved(), vec!["b"]);
        assert_eq!(
            watch.read(up(&["a", "b"]), Duration::from_secs(3)),
            Vec::<String>::new()
        );
        assert!(watch.preserved.is_empty());
    }

    #[test]
    fn a_preserved_instance_that_reappears_down_is_removed() {
        let mut watch = Watch::new();
        watch.read(up(&["a"]), Duration::ZERO);
        watch.read(Vec::new(), Duration::from_secs(1));
        let back_down = vec![at("a", 1, Status::Down)];
        assert_eq!(watch.read(back_down, Duration::from_secs(2)), vec!["-a"]);
        assert!(watch.preserved.is_empty());
    }

    #[test]
    fn preserved_instances_are_removed_when_their_grace_ends() {
        let mut watch = Watch::new();
        watch.read(up(&["a", "b"]), Duration::ZERO);
        watch.read(Vec::new(), Duration::from_secs(1));
        // Grace 60 s from the read that lost them (t = 1 s): still kept at 60 s, removed at 61 s.
        assert_eq!(
            watch.read(Vec::new(), Duration::from_secs(60)),
            Vec::<String>::new()
        );
        assert_eq!(
            watch.read(Vec::new(), Duration::from_secs(61)),
            vec!["-a", "-b"]
        );
        assert!(watch.preserved.is_empty());
        assert!(watch.known.is_empty());
    }

    #[test]
    fn new_instances_are_inserted_while_others_are_preserved() {
        let mut watch = Watch::new();
        watch.read(up(&["a", "b"]), Duration::ZERO);
        let replacement = vec![at("c", 7, Status::Up)];
        assert_eq!(
            watch.read(replacement, Duration::from_secs(1)),
            vec!["+c:7"]
        );
        assert_eq!(watch.preserved(), vec!["a", "b"]);
        assert_eq!(watch.known.len(), 3);
    }

    #[test]
    fn a_zero_grace_turns_self_preservation_off() {
        let mut known = HashMap::new();
        let mut preserved = HashMap::new();
        let off = Preservation {
            grace: Duration::ZERO,
            ..POLICY
        };
        let now = Instant::now();
        reconcile(
            &mut known,
            &mut preserved,
            up(&["a", "b"]),
            &Filter::up(),
            off,
            now,
        );
        let outcome = reconcile(
            &mut known,
            &mut preserved,
            Vec::new(),
            &Filter::up(),
            off,
            now,
        );
        assert_eq!(describe(&outcome.changes), vec!["-a", "-b"]);
        assert!(preserved.is_empty());
    }

    #[test]
    fn a_fraction_of_one_preserves_only_on_an_empty_read() {
        let mut known = HashMap::new();
        let mut preserved = HashMap::new();
        let empty_only = Preservation {
            max_departure_fraction: 1.0,
            ..POLICY
        };
        let now = Instant::now();
        reconcile(
            &mut known,
            &mut preserved,
            up(&["a", "b", "c", "d"]),
            &Filter::up(),
            empty_only,
            now,
        );
        let shrunk = reconcile(
            &mut known,
            &mut preserved,
            up(&["a"]),
            &Filter::up(),
            empty_only,
            now,
        );
        assert_eq!(describe(&shrunk.changes), vec!["-b", "-c", "-d"]);
        let empty = reconcile(
            &mut known,
            &mut preserved,
            Vec::new(),
            &Filter::up(),
            empty_only,
            now,
        );
        assert!(empty.changes.is_empty());
        assert_eq!(preserved.len(), 1);
    }

    #[test]
    fn the_filter_has_hazeljs_semantics() {
        let mut instance = at("a", 1, Status::Up);
        instance.zone = Some("eu".to_owned());
        instance.tags = vec!["api".to_owned(), "v2".to_owned()];
        instance.metadata.insert("tier".to_owned(), "gold".into());
        assert!(Filter::up().matches(&instance));
        assert!(!Filter::up().matches(&at("b", 1, Status::Starting)));
        let mut filter = Filter::up();
        filter.zone = Some("eu".to_owned());
        filter.tags = vec!["v2".to_owned()];
        filter.metadata.insert("tier".to_owned(), "gold".into());
        assert!(filter.matches(&instance));
        filter.tags.push("v3".to_owned());
        assert!(!filter.matches(&instance), "every listed tag is required");
    }
}
