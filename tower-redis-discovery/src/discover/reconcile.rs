//! From one read to the next: the changes to send, and self-preservation (which missing instances to keep).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tower::discover::Change;

use crate::instance::Instance;

use super::filter::Filter;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Status;

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
}
