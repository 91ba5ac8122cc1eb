//! [`MemoryRegistry`]: the registry of one process, with Redis's expiry.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant as Clock};

use crate::instance::{Instance, Status, iso8601};

use super::{Heartbeat, Registry, RegistryError};

#[derive(Debug, Default)]
struct MemoryState {
    instances: HashMap<String, (Instance, Clock)>,
}

/// An in-memory registry for one process (tests, single-instance mode). Entries expire after the TTL like
/// Redis's.
#[derive(Debug, Clone)]
pub struct MemoryRegistry {
    state: Arc<Mutex<MemoryState>>,
    ttl: Duration,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new(Duration::from_secs(90))
    }
}

impl MemoryRegistry {
    /// An empty registry whose entries expire `ttl` after their last write.
    pub fn new(ttl: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(MemoryState::default())),
            ttl,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryState) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Clock::now();
        state.instances.retain(|_, (_, expires)| *expires > now);
        f(&mut state)
    }
}

impl Registry for MemoryRegistry {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn register(&self, instance: &Instance) -> Result<(), RegistryError> {
        let expires = Clock::now() + self.ttl;
        self.with(|state| {
            state
                .instances
                .insert(instance.id.clone(), (instance.clone(), expires));
        });
        Ok(())
    }

    async fn heartbeat(
        &self,
        instance: &Instance,
        status: Status,
    ) -> Result<Heartbeat, RegistryError> {
        let expires = Clock::now() + self.ttl;
        let now = iso8601(std::time::SystemTime::now());
        Ok(self.with(|state| {
            let mut outcome = Heartbeat::Refreshed;
            let entry = state
                .instances
                .entry(instance.id.clone())
                .or_insert_with(|| {
                    outcome = Heartbeat::Recreated;
                    (instance.clone(), expires)
                });
            entry.0.status = status;
            entry.0.last_heartbeat = now;
            entry.1 = expires;
            outcome
        }))
    }

    async fn deregister(&self, instance: &Instance) -> Result<(), RegistryError> {
        self.with(|state| state.instances.remove(&instance.id));
        Ok(())
    }

    async fn instances(&self, service: &str) -> Result<Vec<Instance>, RegistryError> {
        Ok(self.with(|state| {
            let mut found: Vec<Instance> = state
                .instances
                .values()
                .filter(|(instance, _)| instance.name == service)
                .map(|(instance, _)| instance.clone())
                .collect();
            found.sort_by(|a, b| a.id.cmp(&b.id));
            found
        }))
    }

    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self.with(|state| {
            state
                .instances
                .values()
                .map(|(instance, _)| instance.name.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        }))
    }
}
