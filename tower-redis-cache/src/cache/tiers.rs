//! The two tiers: lookups in memory and in Redis (primary and replicas, through their guards), and stores.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tower_redis_core::guard::GuardError;

use super::{HttpCache, RedisTier};
use crate::entry::Entry;
use crate::policy::variant_matches;
use crate::stats::Event;
use crate::store::{PLAIN_FIELD, Write};

impl HttpCache {
    /// The entry for this request from the memory tier.
    pub(crate) fn memory_lookup(&self, key: &str, request: &HeaderMap) -> Option<Arc<Entry>> {
        let memory = self.inner.memory.as_ref()?;
        let slot = memory.get(key)?;
        slot.variants
            .iter()
            .find(|entry| variant_matches(entry, request))
            .cloned()
    }

    /// The `Vary` the memory tier last saw for this key, to read the right variant from Redis in one round trip.
    pub(crate) fn known_vary(&self, key: &str) -> Option<Arc<str>> {
        Some(self.inner.memory.as_ref()?.get(key)?.vary.clone())
    }

    /// Stores a complete entry in the memory tier now and in Redis in the background.
    pub(crate) fn store(
        &self,
        key: &str,
        vary: &str,
        entry: &Arc<Entry>,
        keep_ms: u64,
        tags: Vec<String>,
        lock: Option<String>,
    ) {
        if self.inner.invalidated.since(key, &tags, entry.request_time) {
            // Sent before an invalidation of its key or tags: it may hold what was invalidated.
            self.inner.stats.bump(Event::NotStored);
            tracing::debug!(
                key,
                "not storing a response whose request was sent before an invalidation"
            );
            if let Some(token) = lock {
                let cache = self.clone();
                let key = key.to_owned();
                self.spawn(async move { cache.unlock(&key, &token).await });
            }
            return;
        }
        self.inner.stats.bump(Event::Stores);
        let keep = Duration::from_millis(keep_ms);
        if let Some(memory) = &self.inner.memory {
            memory.insert(key, vary, entry, keep, Some(&tags));
        }
        if self.inner.redis.is_none() || keep_ms == 0 {
            if let Some(token) = lock {
                let cache = self.clone();
                let key = key.to_owned();
                self.spawn(async move { cache.unlock(&key, &token).await });
            }
            return;
        }
        let write = Write {
            key: key.to_owned(),
            vary: vary.to_owned(),
            field: variant_field(&entry.selecting),
            bytes: entry.encode(),
            ttl_ms: keep_ms,
            now_ms: self.now_ms(),
            tags,
        };
        let cache = self.clone();
        let key = key.to_owned();
        // Registered now, not when the task runs: an invalidation that starts before the task does still waits
        // for it.
        let queued = self.inner.writes.queue(&key, &write.tags);
        self.spawn(async move {
            let _queued = queued;
            cache.write(write).await;
            // Other instances waiting on our fill lock find the entry now; release it for the next fill.
            if let Some(token) = lock {
                cache.unlock(&key, &token).await;
            }
        });
    }

    pub(super) async fn write(&self, write: Write) {
        {
            let cache = self;
            let Some(redis) = &cache.inner.redis else {
                return;
            };
            // Writes may carry large bodies: allow them a few timeouts before calling Redis unreachable.
            let deadline = redis.guard.timeout() * 4;
            match redis
                .guard
                .call_within(deadline, redis.store.write(write))
                .await
            {
                Ok(()) => {}
                Err(GuardError::Open) => cache.inner.stats.bump(Event::RedisSkipped),
                Err(GuardError::Timeout(_)) => {
                    cache.inner.stats.bump(Event::RedisTimeouts);
                    tracing::warn!("storing a response in Redis timed out");
                }
                Err(error) => {
                    cache.inner.stats.bump(Event::RedisErrors);
                    tracing::warn!(%error, "could not store a response in Redis");
                }
            }
        }
    }

    /// Reads the variant for this request from Redis (a replica first, when there are any): `Ok(None)` on a miss,
    /// `Err(())` when Redis failed, timed out or its breaker is open (the caller goes on without it).
    pub(crate) async fn redis_lookup(
        &self,
        key: &str,
        request: &HeaderMap,
        rules: &crate::policy::Rules,
    ) -> Result<Option<Arc<Entry>>, ()> {
        let Some(redis) = &self.inner.redis else {
            return Ok(None);
        };
        if self.inner.owed.any() {
            // Redis may still hold what an owed invalidation deletes: a miss, answered by the origin.
            self.inner.stats.bump(Event::OwedBypasses);
            return Ok(None);
        }
        let replicas = &self.inner.replicas;
        let mut found = None;
        if !replicas.is_empty() {
            use rand::Rng;
            let replica = &replicas[rand::rng().random_range(0..replicas.len())];
            if let Ok(Some(hit)) = self.read_from(replica, key, request).await {
                self.inner.stats.bump(Event::ReplicaHits);
                found = Some(hit);
            } else {
                // A miss may only be lag, and a failed replica is the primary's job: ask the primary.
                self.inner.stats.bump(Event::ReplicaFallbacks);
            }
        }
        let (entry, vary) = match found {
            Some(hit) => hit,
            None => match self.read_from(redis, key, request).await? {
                Some(hit) => hit,
                None => return Ok(None),
            },
        };
        // Redis may not have taken an invalidation this instance knows of yet (a soft purge marks Redis after
        // memory; a replica lags): an entry whose request went out before it is stale from now on, so it can
        // neither answer fresh nor replace the marked copy in memory.
        let entry = if self.inner.invalidated.since(key, &[], entry.request_time) {
            Arc::new(entry.purged(self.now_ms()))
        } else {
            entry
        };
        if let Some(memory) = &self.inner.memory {
            // Promote for as long as it stays useful; the Redis TTL already bounds it.
            let keep = crate::policy::storage_ttl(&entry, rules, self.now_ms()).max(1);
            // Tags live in Redis for this entry; a tag invalidation reaches it through the keys it resolves to.
            memory.insert(key, &vary, &entry, Duration::from_millis(keep), None);
        }
        Ok(Some(entry))
    }

    /// One tier's answer: the entry for this request's variant and the `Vary` it was stored with.
    async fn read_from(
        &self,
        tier: &RedisTier,
        key: &str,
        request: &HeaderMap,
    ) -> Result<Option<(Arc<Entry>, String)>, ()> {
        let guess_vary = self.known_vary(key);
        let guess_field = guess_vary
            .as_deref()
            .map_or_else(|| PLAIN_FIELD.to_owned(), |vary| field_for(vary, request));
        let read = self
            .redis_call(tier, tier.store.read(key, &guess_field))
            .await?;
        let Some(vary) = read.vary else {
            return Ok(None);
        };
        let field = field_for(&vary, request);
        let bytes = if field == guess_field {
            read.entry.clone()
        } else {
            self.redis_call(tier, tier.store.read_field(key, &field))
                .await?
        };
        let Some(bytes) = bytes else { return Ok(None) };
        let Some(entry) = Entry::decode(bytes, &self.inner.targets) else {
            self.inner.stats.bump(Event::Undecodable);
            tracing::debug!(
                key,
                "an entry in Redis did not decode; treating it as a miss"
            );
            return Ok(None);
        };
        if !variant_matches(&entry, request) {
            return Ok(None);
        }
        // A soft purge's mark covers the variants whose request went out by then; a fill sent since is newer.
        let entry = match read.purged {
            Some(at) if entry.request_time <= at => entry.purged(at),
            _ => entry,
        };
        Ok(Some((Arc::new(entry), vary)))
    }

    pub(super) async fn redis_call<T>(
        &self,
        redis: &RedisTier,
        call: crate::store::BoxFuture<'_, redis::RedisResult<T>>,
    ) -> Result<T, ()> {
        match redis.guard.call(call).await {
            Ok(value) => Ok(value),
            Err(GuardError::Open) => {
                self.inner.stats.bump(Event::RedisSkipped);
                Err(())
            }
            Err(GuardError::Timeout(deadline)) => {
                self.inner.stats.bump(Event::RedisTimeouts);
                tracing::warn!(
                    timeout_ms = deadline.as_millis(),
                    "Redis read timed out; going on without the shared tier"
                );
                Err(())
            }
            Err(error) => {
                self.inner.stats.bump(Event::RedisErrors);
                tracing::warn!(%error, "Redis read failed; going on without the shared tier");
                Err(())
            }
        }
    }
}

/// The hash field of the variant `request` selects under `vary` (comma-separated lowercase names).
pub(crate) fn field_for(vary: &str, request: &HeaderMap) -> String {
    if vary.is_empty() {
        return PLAIN_FIELD.to_owned();
    }
    let selecting: Vec<_> = vary
        .split(',')
        .filter_map(|name| http::HeaderName::from_bytes(name.as_bytes()).ok())
        .map(|name| {
            let value = crate::policy::selecting_value(request, &name);
            (name, value)
        })
        .collect();
    variant_field(&selecting)
}

/// A stable name for a variant: FNV-1a over the selecting headers. Collisions only cost a miss, because the entry
/// keeps the selecting values and is checked on every read.
pub(crate) fn variant_field(selecting: &[(http::HeaderName, Option<http::HeaderValue>)]) -> String {
    if selecting.is_empty() {
        return PLAIN_FIELD.to_owned();
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (name, value) in selecting {
        feed(name.as_str().as_bytes());
        match value {
            Some(value) => {
                feed(b"=");
                feed(value.as_bytes());
            }
            None => feed(b"!"),
        }
        feed(b"\n");
    }
    format!("v{hash:016x}")
}
