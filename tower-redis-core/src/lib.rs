//! Redis plumbing shared by the workspace's Redis crates (`tower-redis-cache`, `tower-redis-ratelimit`,
//! `tower-redis-discovery`):
//!
//! - [`healing`]: a connection that replaces itself after commands in a row with no reply (half-open, stalled),
//!   with backoff and jitter so a slow Redis gets no reconnect storm;
//! - [`tcp`]: keepalive and `TCP_USER_TIMEOUT` on the connections we open;
//! - [`subscription`]: one pub/sub subscription loop that resubscribes with backoff, follows a Sentinel failover and
//!   notices a silent subscription with a periodic `PING`;
//! - [`guard`]: one guarded Redis call (a breaker, a deadline, the counters), used on every request path;
//! - [`key`]: the hash-tag escape that keeps a multi-key script in one Cluster slot without collisions;
//! - [`sharing`]: a breaker's openings shared with its peers through Redis pub/sub and a key (through the
//!   breaker's public hooks; `tower-breaker` itself has no Redis dependency);
//! - [`pubsub::Subscriber`] and, with the `sentinel` feature, [`sentinel::SentinelConnection`]: where
//!   subscriptions connect, and a connection that follows Sentinel failovers;
//! - [`ConfigError`]: the workspace's one configuration error (defined by `tower-breaker`, which every crate uses).
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod guard;
pub mod healing;
pub mod key;
pub mod pubsub;
#[cfg(feature = "sentinel")]
#[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
pub mod sentinel;
pub mod sharing;
pub mod subscription;
pub mod tcp;

pub use guard::{Guard, GuardError, GuardStats};
pub use healing::{HealingConfig, HealingConnection, HealingStats};
pub use pubsub::Subscriber;
pub use subscription::{Subscription, SubscriptionConfig, SubscriptionStats};
pub use tower_breaker::ConfigError;

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
