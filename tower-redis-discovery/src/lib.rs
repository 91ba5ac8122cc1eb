//! A service registry on Redis (wire-compatible with HazelJS's discovery registry) or in memory, with heartbeats
//! and TTLs, for Tower load balancing.
//!
//! Register an instance with [`Registration`] (heartbeats, readiness, graceful deregistration) in a [`RedisRegistry`]
//! (HazelJS's layout) or a [`MemoryRegistry`]; watch a service with [`Discovery`] (a `tower::discover` stream that
//! never fails); balance over it with [`balance`] (power of two choices over peak-EWMA, fail-fast) or
//! [`balance_with`] and a [`Strategy`]; add passive health with [`Ejecting`]; list services with [`list_services`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_redis_discovery::{Instance, RedisRegistry, Registration};
//!
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let registry = RedisRegistry::new(client.get_connection_manager().await?);
//! let registration = Registration::start(registry, Instance::new("user-service", "10.0.0.5", 3001));
//! // ... once the server listens:
//! registration.ready();
//! // ... on shutdown: stop new traffic for 2 s, then remove the entry.
//! registration.deregister(Some(std::time::Duration::from_secs(2))).await?;
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! | feature | enables |
//! |---|---|
//! | `metrics` | export through the `metrics` facade |
//! | `cluster` | Redis Cluster connections (redis `cluster-async`) |
//! | `tls-rustls` | `rediss://` through rustls (redis `tokio-rustls-comp`) |
//! | `sentinel` | Sentinel-managed primaries (redis `sentinel`) |
#![cfg_attr(docsrs, feature(doc_cfg))]

mod balance;
mod discover;
mod health;
mod instance;
mod listing;
mod registration;
mod registry;
mod stats;
mod strategy;

/// A connection to a Sentinel-managed primary that follows failovers (from `tower-breaker`).
#[cfg(feature = "sentinel")]
#[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
pub mod sentinel {
    pub use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};
}

pub use balance::{BalanceOptions, Balanced, HttpEndpoint, NoEndpoints, Unavailable, balance};
pub use discover::{Discovery, Filter, WatchOptions};
pub use health::{Ejecting, EjectingFuture, EjectionOptions, HealthSignal};
pub use instance::{Instance, Protocol, Status, iso8601};
pub use listing::{ServiceEntry, ServiceListing, list_services};
pub use registration::Registration;
pub use registry::{
    DEFAULT_MAX_ENTRY_SIZE, Heartbeat, MemoryRegistry, RedisRegistry, Registry, RegistryError,
};
pub use stats::{RegistrationStats, WatchHandle, WatchStats};
pub use strategy::{HashKey, Strategy, balance_with};
pub use tower_redis_core::Subscriber;

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
