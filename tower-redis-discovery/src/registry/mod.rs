//! The [`Registry`] trait and its two implementations: [`MemoryRegistry`] and [`RedisRegistry`] (HazelJS's wire
//! format).

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::instance::{Instance, Status};

mod builder;
mod entry;
mod memory;
mod redis_registry;

pub use builder::{DEFAULT_MAX_ENTRY_SIZE, RedisRegistryBuilder};
pub use memory::MemoryRegistry;
pub use redis_registry::RedisRegistry;

/// Why a registry call failed. Registry errors never take a service down: [`crate::Registration`] retries, and
/// discovery keeps the last good set.
#[derive(Debug)]
#[non_exhaustive]
pub enum RegistryError {
    /// Redis answered with an error.
    Redis(redis::RedisError),
    /// Redis did not answer in time.
    Timeout,
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Redis(error) => write!(f, "registry redis error: {error}"),
            Self::Timeout => f.write_str("the registry did not answer in time"),
        }
    }
}

impl std::error::Error for RegistryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Redis(error) => Some(error),
            Self::Timeout => None,
        }
    }
}

impl From<redis::RedisError> for RegistryError {
    fn from(error: redis::RedisError) -> Self {
        Self::Redis(error)
    }
}

/// What a heartbeat found in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Heartbeat {
    /// The entry was there: its status and `lastHeartbeat` were refreshed, fields written by others kept.
    Refreshed,
    /// The entry was missing (it expired, or the registry lost its data): it was written again in full.
    Recreated,
    /// The stored entry differed from the registered instance where it matters (host, port, protocol, name,
    /// metadata, tags, zone, health check), did not decode, or was not a string: it was rewritten in full from the
    /// registered instance, so a forged or corrupted address heals within one heartbeat.
    Healed,
}

/// A service registry: instances register and heartbeat; clients list them.
pub trait Registry: Clone + Send + Sync + 'static {
    /// How long an entry lives without a heartbeat.
    fn ttl(&self) -> Duration;

    /// Writes `instance` (creating or replacing it) with the registry's TTL.
    fn register(
        &self,
        instance: &Instance,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Refreshes `instance`: sets `lastHeartbeat` to now and the given status, keeps fields written by others, and
    /// re-creates the whole entry from `instance` if it is missing (expired, or lost by the registry); the answer
    /// says which.
    fn heartbeat(
        &self,
        instance: &Instance,
        status: Status,
    ) -> impl Future<Output = Result<Heartbeat, RegistryError>> + Send;

    /// Removes the instance (a missing entry is fine).
    fn deregister(
        &self,
        instance: &Instance,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Every instance of `service` that has not expired, whatever its status.
    fn instances(
        &self,
        service: &str,
    ) -> impl Future<Output = Result<Vec<Instance>, RegistryError>> + Send;

    /// The names of the services with a registration.
    fn services(&self) -> impl Future<Output = Result<Vec<String>, RegistryError>> + Send;

    /// Tells watchers that `service` changed, so they read it now instead of at their next poll (a hint: HazelJS
    /// ignores it, and a lost hint only delays a change by one poll).
    fn announce(&self, service: &str) -> impl Future<Output = Result<(), RegistryError>> + Send {
        let _ = service;
        std::future::ready(Ok(()))
    }
}
