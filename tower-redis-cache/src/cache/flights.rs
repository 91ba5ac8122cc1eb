//! Fills in flight: one origin call per key per process (coalescing), and optionally one across instances (a short
//! Redis lock that fails open).

use std::sync::Arc;

use dashmap::mapref::entry::Entry as MapEntry;
use tokio::sync::watch;

use super::HttpCache;
use crate::entry::Entry;

/// Where a fill stands: the leader publishes the entry it ends with; waiters see the channel close when the leader
/// gives up (uncacheable response, error, cancelled request).
pub(crate) enum Flight {
    Lead(FlightGuard),
    Wait(watch::Receiver<Option<Arc<Entry>>>),
}

/// Held by the request filling a key; dropping it ends the flight.
pub(crate) struct FlightGuard {
    cache: HttpCache,
    key: String,
    sender: Arc<watch::Sender<Option<Arc<Entry>>>>,
}

impl FlightGuard {
    pub(crate) fn publish(&self, entry: Arc<Entry>) {
        self.sender.send_replace(Some(entry));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.cache
            .inner
            .flights
            .remove_if(&self.key, |_, sender| Arc::ptr_eq(sender, &self.sender));
    }
}

impl HttpCache {
    /// Joins the fill in flight for `key`, or starts one.
    pub(crate) fn flight(&self, key: &str) -> Flight {
        match self.inner.flights.entry(key.to_owned()) {
            MapEntry::Occupied(occupied) => Flight::Wait(occupied.get().subscribe()),
            MapEntry::Vacant(vacant) => {
                let sender = Arc::new(watch::Sender::new(None));
                vacant.insert(sender.clone());
                Flight::Lead(FlightGuard {
                    cache: self.clone(),
                    key: key.to_owned(),
                    sender,
                })
            }
        }
    }

    /// Starts a flight only when none is running (a background refresh).
    pub(crate) fn try_lead(&self, key: &str) -> Option<FlightGuard> {
        match self.flight(key) {
            Flight::Lead(guard) => Some(guard),
            Flight::Wait(_) => None,
        }
    }

    /// Tries the cross-instance fill lock; `None` when it is not configured or Redis is unavailable.
    pub(crate) async fn lock(&self, key: &str, token: &str) -> Option<bool> {
        let ttl = self.inner.fill_lock?;
        let redis = self.inner.redis.as_ref()?;
        self.redis_call(
            redis,
            redis.store.lock(key, token, crate::policy::millis(ttl)),
        )
        .await
        .ok()
    }

    /// Whether another instance still holds the fill lock (`false` when Redis cannot say: the lock fails open).
    pub(crate) async fn locked(&self, key: &str) -> bool {
        match &self.inner.redis {
            Some(redis) => self
                .redis_call(redis, redis.store.locked(key))
                .await
                .unwrap_or(false),
            None => false,
        }
    }

    pub(crate) async fn unlock(&self, key: &str, token: &str) {
        if let Some(redis) = &self.inner.redis {
            let _ = self.redis_call(redis, redis.store.unlock(key, token)).await;
        }
    }
}
