//! The in-memory tier: a bytes-bounded TinyLFU cache (moka) of the variants stored under each cache key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;

use crate::entry::Entry;

/// Variants beyond this many per key push out the oldest (a `Vary` on a high-cardinality header must not grow
/// without bound).
pub(crate) const MAX_VARIANTS: usize = 16;

/// Everything stored under one cache key: the `Vary` it was stored with and its variants, newest first.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) vary: Arc<str>,
    pub(crate) variants: Vec<Arc<Entry>>,
    /// The tags of every variant, so a tag can be invalidated without Redis.
    tags: Vec<String>,
    /// Whether `tags` is all of them: a variant promoted from Redis has its tags in Redis only.
    tags_known: bool,
    expires_at: Instant,
    weight: u32,
}

struct UntilDeadline;

impl Expiry<Arc<str>, Arc<Slot>> for UntilDeadline {
    fn expire_after_create(
        &self,
        _: &Arc<str>,
        slot: &Arc<Slot>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(slot.expires_at.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        slot: &Arc<Slot>,
        updated_at: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.expires_at.saturating_duration_since(updated_at))
    }
}

#[derive(Clone)]
pub(crate) struct MemoryTier {
    cache: moka::sync::Cache<Arc<str>, Arc<Slot>>,
    capacity: u64,
}

impl std::fmt::Debug for MemoryTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTier")
            .field("capacity", &self.capacity)
            .field("weighted_size", &self.cache.weighted_size())
            .finish()
    }
}

impl MemoryTier {
    pub(crate) fn new(capacity: u64) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|key: &Arc<str>, slot: &Arc<Slot>| {
                slot.weight.saturating_add(key.len() as u32)
            })
            .expire_after(UntilDeadline)
            .build();
        Self { cache, capacity }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<Slot>> {
        self.cache.get(key)
    }

    /// Stores `entry` as a variant of `key` for `keep` from now. A different `Vary` replaces every variant.
    /// `tags` is `None` when they are not known here (an entry promoted from Redis, whose tags live there).
    pub(crate) fn insert(
        &self,
        key: &str,
        vary: &str,
        entry: &Arc<Entry>,
        keep: Duration,
        tags: Option<&[String]>,
    ) {
        let weight = entry.weight();
        if keep.is_zero() || weight as u64 + key.len() as u64 > self.capacity / 2 {
            // Too large to share the tier sensibly; Redis still holds it.
            self.cache.invalidate(key);
            return;
        }
        let expires_at = Instant::now() + keep;
        let key: Arc<str> = Arc::from(key);
        self.cache.entry(key).and_upsert_with(|existing| {
            let mut variants = vec![entry.clone()];
            let mut expires = expires_at;
            let mut all_tags = tags.map(<[String]>::to_vec).unwrap_or_default();
            let mut tags_known = tags.is_some();
            if let Some(existing) = existing.map(|existing| existing.into_value())
                && *existing.vary == *vary
            {
                variants.extend(
                    existing
                        .variants
                        .iter()
                        .filter(|old| old.selecting != entry.selecting)
                        .take(MAX_VARIANTS - 1)
                        .cloned(),
                );
                expires = expires.max(existing.expires_at);
                all_tags.extend(existing.tags.iter().cloned());
                tags_known &= existing.tags_known;
            }
            all_tags.sort();
            all_tags.dedup();
            let weight = variants
                .iter()
                .map(|variant| variant.weight())
                .sum::<usize>();
            Arc::new(Slot {
                vary: Arc::from(vary),
                variants,
                expires_at: expires,
                weight: u32::try_from(weight).unwrap_or(u32::MAX),
                tags: all_tags,
                tags_known,
            })
        });
    }

    pub(crate) fn remove(&self, key: &str) {
        self.cache.invalidate(key);
    }

    pub(crate) fn remove_prefix(&self, prefix: &str) -> usize {
        self.remove_where(|key, _| key.starts_with(prefix))
    }

    pub(crate) fn remove_tag(&self, tag: &str) -> usize {
        self.remove_where(|_, slot| slot.tags.iter().any(|own| own == tag))
    }

    /// Removes every key whose tags are not all known here (promoted from Redis): what a tag invalidation that
    /// could not reach Redis may have missed.
    pub(crate) fn remove_untracked(&self) -> usize {
        self.remove_where(|_, slot| !slot.tags_known)
    }

    /// Marks every variant of `key` stale as of `at` (a soft purge); returns whether the key was held.
    pub(crate) fn mark_stale(&self, key: &str, at: u64) -> bool {
        if !self.cache.contains_key(key) {
            return false;
        }
        self.mark_slot(Arc::from(key), at);
        true
    }

    pub(crate) fn mark_stale_prefix(&self, prefix: &str, at: u64) -> usize {
        self.mark_where(|key, _| key.starts_with(prefix), at)
    }

    pub(crate) fn mark_stale_tag(&self, tag: &str, at: u64) -> usize {
        self.mark_where(|_, slot| slot.tags.iter().any(|own| own == tag), at)
    }

    fn mark_where(&self, marked: impl Fn(&str, &Slot) -> bool, at: u64) -> usize {
        let found = self.keys_where(marked);
        for key in &found {
            self.mark_slot((**key).clone(), at);
        }
        found.len()
    }

    /// Marks the variants of `key` whose request went out by `at`: a fill sent since is newer than the purge and
    /// stays fresh. Done as one atomic update of the key, so a variant inserted meanwhile is neither lost nor marked.
    fn mark_slot(&self, key: Arc<str>, at: u64) {
        self.cache.entry(key).and_compute_with(|current| {
            let Some(current) = current else {
                return moka::ops::compute::Op::Nop;
            };
            let slot = current.into_value();
            moka::ops::compute::Op::Put(Arc::new(Slot {
                vary: slot.vary.clone(),
                variants: slot
                    .variants
                    .iter()
                    .map(|variant| {
                        if variant.request_time <= at {
                            Arc::new(variant.purged(at))
                        } else {
                            variant.clone()
                        }
                    })
                    .collect(),
                tags: slot.tags.clone(),
                tags_known: slot.tags_known,
                expires_at: slot.expires_at,
                weight: slot.weight,
            }))
        });
    }

    /// Removes every key `doomed` selects.
    fn remove_where(&self, doomed: impl Fn(&str, &Slot) -> bool) -> usize {
        let keys = self.keys_where(doomed);
        for key in &keys {
            self.cache.invalidate(&**key);
        }
        keys.len()
    }

    /// The keys `selected` picks: a scan of the tier (invalidations are rare next to lookups).
    fn keys_where(&self, selected: impl Fn(&str, &Slot) -> bool) -> Vec<Arc<Arc<str>>> {
        self.cache
            .iter()
            .filter(|(key, slot)| selected(key, slot))
            .map(|(key, _)| key)
            .collect()
    }

    pub(crate) fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Bytes held now (after moka's pending maintenance has run) and entries.
    pub(crate) fn usage(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.weighted_size(), self.cache.entry_count())
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }
}
