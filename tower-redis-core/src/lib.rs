#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod guard;
pub mod healing;
pub mod key;
#[cfg(feature = "metrics")]
mod metrics;
pub mod pubsub;
#[cfg(feature = "sentinel")]
#[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
pub mod sentinel;
pub mod sharing;
pub mod subscription;
pub mod tcp;
pub mod topology;

pub use guard::{CallRecorder, Guard, GuardError, GuardStats};
pub use healing::{HealingConfig, HealingConnection, HealingStats};
pub use pubsub::Subscriber;
pub use subscription::{Subscription, SubscriptionConfig, SubscriptionStats};
pub use topology::Topology;
pub use tower_breaker::ConfigError;
