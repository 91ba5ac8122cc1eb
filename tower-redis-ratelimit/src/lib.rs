#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder;
mod decision;
mod error;
mod headers;
pub mod key;
mod layer;
mod limiter;
mod local;
#[cfg(feature = "metrics")]
mod metrics;
mod offline;
mod policy;
mod rules;
mod script;
mod service;
mod stats;

/// A connection to a Sentinel-managed primary that follows failovers (from `tower-redis-core`).
#[cfg(feature = "sentinel")]
#[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
pub mod sentinel {
    pub use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};
}

pub use builder::{DEFAULT_TIER, RateLimiterBuilder};
pub use decision::{Decision, DecisionSource, PolicyState};
pub use error::ConfigError;
pub use headers::HeaderStyle;
pub use layer::RateLimitLayer;
pub use limiter::{AdminError, FailurePolicy, RateLimiter};
pub use offline::Offline;
pub use policy::{Algorithm, MAX_LIMIT, Policy, PolicySet};
pub use rules::{DefaultRejection, Rejection, Selection};
pub use service::{RateLimit, ResponseFuture};
pub use stats::{LimiterStats, SourceStats};
