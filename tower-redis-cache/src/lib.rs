//! `tower-redis-cache`: HTTP shared caching (RFC 9111) for Tower services, with Redis as the shared tier and a
//! bounded in-memory tier in front.
//!
//! The layer behaves as a shared cache between clients and your service: freshness from `s-maxage`, `max-age` and
//! `Expires`; `Vary` with several variants per URL; revalidation with `If-None-Match`/`If-Modified-Since`;
//! `stale-while-revalidate` and `stale-if-error`; coalescing of concurrent misses (in-process, and optionally
//! across instances through a Redis lock); invalidation by unsafe methods, by key, prefix and tag, across
//! instances; `Age` and `Cache-Status` (RFC 9211) on every response. Redis is guarded by a circuit breaker and a
//! timeout: when it is slow or gone the layer serves from memory or passes through, and never fails a request.
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tower_redis_cache::Cache;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let cache = Cache::builder()
//!     .redis(client.get_connection_manager().await?)
//!     .subscribe(client) // invalidations reach every instance's memory tier
//!     .prefix("users-api:cache:")
//!     .build()?;
//! let app: Router = Router::new()
//!     .route("/users/{id}", get(|| async { ([("cache-control", "max-age=60")], "user") }))
//!     .layer(cache.layer().stale_if_error(Duration::from_secs(300)));
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
mod service;
mod stats;
mod status;
mod store;

/// A connection to a Sentinel-managed primary that follows failovers (from `tower-breaker`).
#[cfg(feature = "sentinel")]
#[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
pub mod sentinel {
    pub use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};
}

pub use body::CacheBody;
pub use cache::{Cache, CacheBuilder, InvalidateError};
pub use error::ConfigError;
pub use layer::{BypassFn, CacheLayer, KeyFn, PurgeFn, TagFn};
pub use service::{CacheService, ResponseFuture};
pub use stats::CacheStats;
pub use tower_redis_core::Subscriber;

/// The `Cache-Status` header name (RFC 9211).
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
