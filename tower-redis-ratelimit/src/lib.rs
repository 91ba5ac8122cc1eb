//! Distributed rate limiting on Redis for Tower services: sliding-window counter, GCRA and fixed window, several
//! policies per key checked in one round trip, a deny cache and a `governor` pre-limiter in front of Redis, and a
//! failure policy (fail open, fail closed, or a local `governor` limiter) behind a breaker when Redis is slow or
//! gone.
//!
//! The [README](https://docs.rs/crate/tower-redis-ratelimit) has the axum and tonic examples, the Redis key layout,
//! the failure semantics and the metrics.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_redis_ratelimit::{Policy, RateLimiter};
//!
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let limiter = RateLimiter::builder(client.get_connection_manager().await?)
//!     .prefix("api:rl:")
//!     .policy(Policy::per_second("burst", 10)?)
//!     .policy(Policy::per_hour("hourly", 1000)?)
//!     .build()?;
//! let decision = limiter.check("user:42").await;
//! println!("allowed: {} (decided by {:?})", decision.allowed, decision.source);
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

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
mod script;
mod service;
mod stats;

/// A connection to a Sentinel-managed primary that follows failovers (from `tower-breaker`).
#[cfg(feature = "sentinel")]
#[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
pub mod sentinel {
    pub use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};
}

pub use decision::{Decision, DecisionSource, PolicyState};
pub use error::ConfigError;
pub use headers::HeaderStyle;
pub use layer::{DefaultRejection, RateLimitLayer, RateLimitLayerBuilder, Rejection, Selection};
pub use limiter::{AdminError, DEFAULT_TIER, FailurePolicy, RateLimiter, RateLimiterBuilder};
pub use offline::Offline;
pub use policy::{Algorithm, MAX_LIMIT, Policy, PolicySet};
pub use service::{RateLimit, ResponseFuture};
pub use stats::{LimiterStats, SourceStats};

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
