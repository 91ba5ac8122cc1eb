//! When each key, prefix and tag was last invalidated here, so that a fill that started before an invalidation
//! does not store its (possibly older) response after it.
//!
//! A request that reaches the origin just before a write, and answers just after the write's invalidation, would
//! otherwise put the old response back for its whole TTL. The fill's request time is compared with the last
//! invalidation of its key, of a prefix of its key, and of each of its tags: invalidated at or after the request
//! was sent, it is served to its client but not stored. Invalidations made by this instance are recorded when they
//! start; those of other instances when their message arrives (so across instances the window is pub/sub delivery).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::owed::Owing;

/// Records older than this are dropped once there are more than [`MAX_RECORDS`]; a fill older than what was dropped
/// is not stored (it cannot be told apart from one that raced an invalidation).
const KEEP_MS: u64 = 60_000;
const MAX_RECORDS: usize = 10_000;

#[derive(Debug, Default)]
struct Records {
    keys: HashMap<String, u64>,
    tags: HashMap<String, u64>,
    prefixes: HashMap<String, u64>,
    /// Every fill sent before this is treated as invalidated (everything was, or its records were dropped).
    horizon_ms: u64,
}

impl Records {
    fn len(&self) -> usize {
        self.keys.len() + self.tags.len() + self.prefixes.len()
    }

    fn prune(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(KEEP_MS);
        self.keys.retain(|_, at| *at >= cutoff);
        self.tags.retain(|_, at| *at >= cutoff);
        self.prefixes.retain(|_, at| *at >= cutoff);
        self.horizon_ms = self.horizon_ms.max(cutoff);
        if self.len() > MAX_RECORDS {
            // Invalidations faster than 10,000 a minute: forget them all, and store no fill sent before now.
            self.keys.clear();
            self.tags.clear();
            self.prefixes.clear();
            self.horizon_ms = now_ms;
        }
    }
}

/// The last invalidations of one cache.
#[derive(Debug, Default)]
pub(crate) struct Invalidated {
    records: Mutex<Records>,
}

impl Invalidated {
    /// Notes an invalidation at `now_ms`.
    pub(crate) fn record(&self, owing: &Owing, now_ms: u64) {
        let mut records = self.lock();
        let note = |map: &mut HashMap<String, u64>, name: &str| {
            let at = map.entry(name.to_owned()).or_insert(now_ms);
            *at = (*at).max(now_ms);
        };
        match owing {
            Owing::Keys(keys) => {
                for key in keys {
                    note(&mut records.keys, key);
                }
            }
            Owing::Prefix(prefix) => note(&mut records.prefixes, prefix),
            Owing::Tag(tag) => note(&mut records.tags, tag),
            Owing::Everything => records.horizon_ms = records.horizon_ms.max(now_ms),
        }
        if records.len() > MAX_RECORDS {
            records.prune(now_ms);
        }
    }

    /// Whether `key` or one of `tags` was invalidated at or after `sent_ms` (when the fill's request was sent).
    pub(crate) fn since(&self, key: &str, tags: &[String], sent_ms: u64) -> bool {
        let records = self.lock();
        let after = |at: Option<&u64>| at.is_some_and(|at| *at >= sent_ms);
        sent_ms <= records.horizon_ms
            || after(records.keys.get(key))
            || tags.iter().any(|tag| after(records.tags.get(tag)))
            || records
                .prefixes
                .iter()
                .any(|(prefix, at)| *at >= sent_ms && key.starts_with(prefix.as_str()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fill_sent_before_an_invalidation_of_its_key_tag_or_prefix_is_not_stored() {
        let invalidated = Invalidated::default();
        let tags = ["user:7".to_owned()];
        assert!(!invalidated.since("/users/7", &tags, 1_000));
        invalidated.record(&Owing::Keys(vec!["/users/7".to_owned()]), 2_000);
        assert!(invalidated.since("/users/7", &tags, 1_999));
        assert!(
            invalidated.since("/users/7", &tags, 2_000),
            "the same ms counts"
        );
        assert!(!invalidated.since("/users/7", &tags, 2_001));
        assert!(!invalidated.since("/users/8", &[], 1_000));

        invalidated.record(&Owing::Tag("user:7".to_owned()), 3_000);
        assert!(invalidated.since("/orders/1", &tags, 2_500));
        assert!(!invalidated.since("/orders/1", &["user:8".to_owned()], 2_500));

        invalidated.record(&Owing::Prefix("/orders/".to_owned()), 4_000);
        assert!(invalidated.since("/orders/2", &[], 3_500));
        assert!(!invalidated.since("/users/9", &[], 3_500));
    }

    #[test]
    fn records_stay_bounded_and_what_was_dropped_is_treated_as_invalidated() {
        let invalidated = Invalidated::default();
        for n in 0..=MAX_RECORDS {
            invalidated.record(&Owing::Tag(format!("t{n}")), 100_000 + n as u64);
        }
        let records = invalidated.lock();
        assert!(records.len() <= MAX_RECORDS);
        let horizon = records.horizon_ms;
        drop(records);
        assert!(horizon > 0);
        assert!(invalidated.since("/untouched", &[], horizon));
        assert!(!invalidated.since("/untouched", &[], 200_000));
    }
}
