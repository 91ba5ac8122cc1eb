//! A service registry on Redis (wire-compatible with HazelJS's discovery registry) or in memory, with heartbeats
//! and TTLs, for Tower load balancing.
//!
//! **Status: in progress** (issue 6). Available now: the HazelJS instance model ([`Instance`]), the [`Registry`]
//! trait with [`MemoryRegistry`] and [`RedisRegistry`], [`Registration`] (heartbeats, readiness, graceful
//! deregistration) and [`Discovery`] (a `tower::discover` stream of a service's instances, by polling plus a pub/sub
//! hint, that never fails), and [`balance`] (P2C over peak-EWMA with fail-fast) with [`HttpEndpoint`]. Also [`Ejecting`] (passive health) and
//! [`list_services`] for a gateway's `/services`. Still to come: the HazelJS-style strategies, stats and metrics.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_discovery::{Instance, RedisRegistry, Registration};
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

pub use balance::{BalanceOptions, Balanced, HttpEndpoint, NoEndpoints, Unavailable, balance};
pub use discover::{Discovery, Filter, WatchOptions};
pub use health::{Ejecting, EjectingFuture, EjectionOptions, HealthSignal};
pub use instance::{Instance, Protocol, Status, iso8601};
pub use listing::{ServiceEntry, ServiceListing, list_services};
pub use registration::Registration;
pub use registry::{MemoryRegistry, RedisRegistry, Registry, RegistryError};
pub use stats::{RegistrationStats, WatchHandle, WatchStats};
pub use strategy::{HashKey, Strategy, balance_with};

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
