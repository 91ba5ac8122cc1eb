#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod balance;
mod discover;
mod endpoint;
mod health;
mod instance;
mod listing;
mod registration;
mod registry;
mod stats;
mod strategy;

/// A connection to a Sentinel-managed primary that follows failovers (from `tower-redis-core`).
#[cfg(feature = "sentinel")]
#[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
pub mod sentinel {
    pub use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};
}

pub use balance::{BalanceOptions, BalanceOptionsBuilder, Balanced, NoEndpoints, Unavailable};
pub use discover::{Discovery, DiscoveryBuilder, Filter};
pub use endpoint::HttpEndpoint;
pub use health::{Ejecting, EjectingFuture, EjectionOptions, EjectionOptionsBuilder, HealthSignal};
pub use instance::{Instance, Protocol, Status, iso8601};
pub use listing::{ServiceEntry, ServiceListing, list_services};
pub use registration::Registration;
pub use registry::{
    DEFAULT_MAX_ENTRY_SIZE, Heartbeat, MemoryRegistry, RedisRegistry, RedisRegistryBuilder,
    Registry, RegistryError,
};
pub use stats::{RegistrationStats, WatchHandle, WatchStats};
pub use strategy::{HashKey, Strategy, balance, balance_with};
pub use tower_redis_core::{ConfigError, Subscriber};
