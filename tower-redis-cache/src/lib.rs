#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod cache;
mod directives;
mod entry;
mod error;
mod invalidated;
mod layer;
mod memory;
mod owed;
mod pending;
mod policy;
mod route;
mod service;
mod stats;
mod status;
mod store;
mod structured;

/// A connection to a Sentinel-managed primary that follows failovers (from `tower-redis-core`).
#[cfg(feature = "sentinel")]
#[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
pub mod sentinel {
    pub use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};
}

pub use body::CacheBody;
pub use cache::{CacheBuilder, HttpCache, InvalidateError, Purge};
pub use error::ConfigError;
pub use layer::CacheLayer;
pub use route::{BypassFn, KeyFn, PurgeFn, TagFn};
pub use service::{Cache, ResponseFuture};
pub use stats::CacheStats;
pub use tower_redis_core::{Subscriber, SubscriptionStats};

/// The `Cache-Status` header name (RFC 9211).
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");
