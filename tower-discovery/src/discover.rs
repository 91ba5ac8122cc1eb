//! Discovery: a stream of `tower::discover::Change`s for one service, from polling a [`Registry`].
//!
//! A background task reads the service's instances every `interval` (±10 % jitter), keeps those that pass the
//! [`Filter`] (status `UP` by default, like HazelJS's strategies), and sends the difference with the previous set:
//! `Insert(id, instance)` for a new instance or a changed one (when host, port or protocol change, a `Remove` comes
//! first), `Remove(id)` for one that left. A registry error keeps the last good set: the stream never yields an
//! error, because an error from a `Discover` poisons `tower::balance` (and every caller behind its `Buffer`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use rand::Rng;
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tower::discover::Change;
use tower_breaker::pubsub::Subscriber;

use crate::instance::{Instance, Status};
use crate::registry::Registry;
use crate::stats::WatchHandle;

/// Which instances discovery keeps (HazelJS's filter semantics).
#[derive(Debug, Clone, PartialEq, Default)]
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

/// How to watch a service.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Time between two reads of the registry (default 1 s, ±10 % jitter).
    pub interval: Duration,
    /// Which instances to keep.
    pub filter: Filter,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            filter: Filter::up(),
        }
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
    /// Starts watching `service` in `registry`. Must be called inside a Tokio runtime.
    pub fn watch<R: Registry>(
        registry: R,
        service: impl Into<String>,
        options: WatchOptions,
    ) -> Self {
        let (sender, changes) = mpsc::unbounded_channel();
        let hint = Arc::new(Notify::new());
        let handle = WatchHandle {
            service: service.into(),
            counters: Arc::default(),
        };
        let task = tokio::spawn(poll_loop(registry, handle.clone(), options, sender, hint));
        Self {
            changes,
            task,
            handle,
        }
    }

    /// Like [`Discovery::watch`], and also listens on `channel` (a [`crate::RedisRegistry::events_channel`])
    /// through `subscriber` for change hints, so changes arrive within milliseconds instead of at the next poll.
    /// If the subscription fails or drops, polling goes on and the subscription is retried. `subscriber` is a
    /// `redis::Client` or, with the `sentinel` feature, a [`SentinelConnection`](crate::sentinel::SentinelConnection)
    /// (the subscription then follows failovers).
    pub fn watch_with_hints<R: Registry>(
        registry: R,
        service: impl Into<String>,
        options: WatchOptions,
        subscriber: impl Into<Subscriber>,
        channel: String,
    ) -> Self {
        let handle = WatchHandle {
            service: service.into(),
            counters: Arc::default(),
        };
        let (sender, changes) = mpsc::unbounded_channel();
        let hint = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(
            subscriber.into(),
            channel,
            handle.clone(),
            hint.clone(),
        ));
        let watch = handle.clone();
        let task = tokio::spawn(async move {
            let _listener = AbortOnDrop(listener);
            poll_loop(registry, watch, options, sender, hint).await;
        });
        Self {
            changes,
            task,
            handle,
        }
    }

    /// A handle on this watch's counters, usable after the stream has moved into a balancer.
    pub fn handle(&self) -> WatchHandle {
        self.handle.clone()
    }
}

/// Aborts a task when dropped (the hint listener lives as long as the polling task).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn listen(subscriber: Subscriber, channel: String, watch: WatchHandle, hint: Arc<Notify>) {
    let service = &watch.service;
    let mut delay = Duration::from_millis(100);
    loop {
        let subscribed = tokio::time::timeout(Duration::from_secs(2), async {
            let mut pubsub = subscriber.pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        if let Ok(Ok(pubsub)) = subscribed {
            delay = Duration::from_millis(100);
            // Read once now: anything announced while we were not subscribed.
            hint.notify_one();
            let mut messages = pubsub.into_on_message();
            while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                if message.get_payload_bytes() == service.as_bytes() {
                    watch.counters.hint();
                    hint.notify_one();
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
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
    known.retain(|id, _| {
        let keep = fresh_by_id.contains_key(id);
        if !keep {
            changes.push(Change::Remove(id.clone()));
        }
        keep
    });
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

async fn poll_loop<R: Registry>(
    registry: R,
    watch: WatchHandle,
    options: WatchOptions,
    sender: mpsc::UnboundedSender<Change<String, Instance>>,
    hint: Arc<Notify>,
) {
    let service = &watch.service;
    let mut known: HashMap<String, Instance> = HashMap::new();
    let mut failing = false;
    loop {
        let read = registry.instances(service).await;
        watch.counters.poll(service, read.is_ok());
        match read {
            Ok(instances) => {
                if failing {
                    tracing::info!(%service, "registry reachable again");
                    failing = false;
                }
                let kept: Vec<Instance> = instances
                    .into_iter()
                    .filter(|i| options.filter.matches(i))
                    .collect();
                let changes = diff(&mut known, kept);
                let inserts = changes
                    .iter()
                    .filter(|change| matches!(change, Change::Insert(..)))
                    .count();
                watch.counters.changes(
                    service,
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
