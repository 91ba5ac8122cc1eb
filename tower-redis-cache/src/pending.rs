//! The Redis writes queued in the background and not yet done, so that an invalidation waits only for those it
//! concerns.
//!
//! A response is stored in Redis by a background task. An invalidation must not delete before a write queued
//! earlier for one of its entries has landed, or that write would bring the entry back just after. Waiting for
//! *every* queued write made each invalidation as slow as the slowest unrelated store (with Redis replies 100 ms
//! late, a user update through the demo's gateway took 3 s); each queued write is registered here with its key and
//! tags instead, and an invalidation waits for the ones it matches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::owed::Owing;

#[derive(Debug)]
struct Write {
    key: String,
    tags: Vec<String>,
}

/// The queued writes of one cache.
#[derive(Debug, Default)]
pub(crate) struct PendingWrites {
    next: AtomicU64,
    writes: Mutex<HashMap<u64, Write>>,
    done: Notify,
}

/// One queued write; dropping it (the write done, failed, or its task never run) takes it off the list.
#[derive(Debug)]
pub(crate) struct Queued {
    pending: Arc<PendingWrites>,
    id: u64,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.id);
        self.pending.done.notify_waiters();
    }
}

impl PendingWrites {
    /// Registers a write of `key` with `tags`, until the returned guard is dropped.
    pub(crate) fn queue(self: &Arc<Self>, key: &str, tags: &[String]) -> Queued {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Write {
                key: key.to_owned(),
                tags: tags.to_vec(),
            },
        );
        Queued {
            pending: self.clone(),
            id,
        }
    }

    /// Waits until no queued write that `owing` concerns is left, or `limit` has passed.
    pub(crate) async fn settle(&self, owing: &Owing, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let done = self.done.notified();
                tokio::pin!(done);
                // Registered before looking, so a write finishing in between still wakes us.
                done.as_mut().enable();
                if !self.lock().values().any(|write| concerns(owing, write)) {
                    return;
                }
                done.await;
            }
        })
        .await;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Write>> {
        self.writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn concerns(owing: &Owing, write: &Write) -> bool {
    match owing {
        Owing::Keys(keys) => keys.contains(&write.key),
        Owing::Prefix(prefix) => write.key.starts_with(prefix.as_str()),
        Owing::Tag(tag) => write.tags.iter().any(|own| own == tag),
        Owing::Everything => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_invalidation_waits_for_the_writes_it_concerns_only() {
        let pending = Arc::new(PendingWrites::default());
        let user = pending.queue("/users/7", &["user:7".to_owned()]);
        let _other = pending.queue("/orders/9", &["order:9".to_owned()]);
        assert_eq!(pending.len(), 2);

        // Unrelated: returns at once although a write is still queued.
        let started = tokio::time::Instant::now();
        pending
            .settle(
                &Owing::Keys(vec!["/users/8".into()]),
                Duration::from_secs(5),
            )
            .await;
        pending
            .settle(&Owing::Tag("user:8".into()), Duration::from_secs(5))
            .await;
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(user);
        assert_eq!(pending.len(), 1);

        // Related, by key, tag or prefix: waits until that write is done, and no longer.
        for owing in [
            Owing::Keys(vec!["/users/7".into()]),
            Owing::Tag("user:7".into()),
            Owing::Prefix("/users/".into()),
        ] {
            let write = pending.queue("/users/7", &["user:7".to_owned()]);
            let finisher = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(write);
            });
            let started = tokio::time::Instant::now();
            pending.settle(&owing, Duration::from_secs(5)).await;
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_millis(45) && waited < Duration::from_secs(2),
                "{owing:?}: {waited:?}"
            );
            finisher.await.unwrap();
        }
        assert_eq!(pending.len(), 1);

        // Everything concerns the last one; the limit bounds the wait.
        let started = tokio::time::Instant::now();
        pending
            .settle(&Owing::Everything, Duration::from_millis(100))
            .await;
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
