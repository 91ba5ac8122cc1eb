//! Store: a response copied into both tiers once its body has streamed through, and handed to the waiters.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use crate::body::Sink;
use crate::cache::{FlightGuard, HttpCache};
use crate::entry::Entry;
use crate::policy;

/// Hands a stored entry to the requests waiting on this fill.
pub(super) fn publish(guard: Option<&FlightGuard>, entry: &Arc<Entry>) {
    if let Some(guard) = guard {
        guard.publish(entry.clone());
    }
}

/// Copies a response into the cache once its body has streamed through.
pub(super) struct Fill {
    pub(super) cache: HttpCache,
    pub(super) key: String,
    pub(super) vary: String,
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) request_time: u64,
    pub(super) response_time: u64,
    pub(super) selecting: Vec<(HeaderName, Option<HeaderValue>)>,
    pub(super) rules: policy::Rules,
    pub(super) tags: Vec<String>,
    pub(super) guard: Option<FlightGuard>,
    pub(super) lock: Option<String>,
}

impl Sink for Fill {
    fn complete(mut self: Box<Self>, body: bytes::Bytes) {
        let entry = Arc::new(Entry::new(
            self.status,
            std::mem::take(&mut self.headers),
            body,
            self.request_time,
            self.response_time,
            std::mem::take(&mut self.selecting),
        ));
        let keep = policy::storage_ttl(&entry, &self.rules, self.cache.now_ms());
        self.cache.store(
            &self.key,
            &self.vary,
            &entry,
            keep,
            std::mem::take(&mut self.tags),
            self.lock.take(),
        );
        publish(self.guard.as_ref(), &entry);
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        // A fill that never completed releases the other instances at once instead of at the lock's expiry.
        if let Some(token) = self.lock.take() {
            let cache = self.cache.clone();
            let key = std::mem::take(&mut self.key);
            self.cache
                .spawn(async move { cache.unlock(&key, &token).await });
        }
    }
}
