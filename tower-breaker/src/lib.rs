//! A lock-free circuit breaker for Tower services, with fallback, for HTTP and gRPC.
//!
//! The README (below, on docs.rs) holds the full picture: axum and tonic examples, classification, fallback, stats,
//! metrics, sharing through Redis and defaults. In short:
//!
//! - [`CircuitBreaker`] is the state machine. It works without Tower: [`CircuitBreaker::call`] wraps any future, and
//!   [`CircuitBreaker::try_acquire`] hands out a [`Permit`] to report an outcome on.
//! - Trip models: failure rate and slow-call rate over a sliding count window (the last N calls) or time window
//!   (B buckets over W), with a minimum number of calls; consecutive failures. The open duration is fixed or a
//!   backoff.
//! - Half-open admits exactly `half_open_permits` probes per cycle however many callers race; a cancelled probe
//!   gives its permit back; a watchdog starts a fresh cycle if probes never report. Results of calls admitted under
//!   an earlier state are not counted in the new one.
//! - The closed path is one atomic load and one atomic add to admit, and one atomic add to record a success: no lock
//!   and no allocation.
//!
//! ```
//! use std::time::Duration;
//! use tower_breaker::{CircuitBreaker, State};
//!
//! let breaker = CircuitBreaker::builder()
//!     .name("inventory")
//!     .count_window(20)
//!     .minimum_calls(10)
//!     .failure_rate(0.5)
//!     .open_for(Duration::from_secs(5))
//!     .build()?;
//!
//! for _ in 0..10 {
//!     breaker.try_acquire()?.failure();
//! }
//! assert_eq!(breaker.state(), State::Open);
//! assert!(breaker.try_acquire().is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod breaker;
mod classifier;
mod clock;
mod config;
mod events;
mod fallback;
mod future;
mod layer;
mod lease;
#[cfg(feature = "metrics")]
mod metrics;
mod padded;
mod reject;
mod service;
mod state;
mod stats;
mod window;

pub use body::ResponseBody;
pub use breaker::{
    BreakerBuilder, CallError, CircuitBreaker, OpeningHook, Outcome, Permit, RejectReason, Rejected,
};
pub use classifier::{
    AutoClassifier, AutoEosClassifier, AutoResponseClassifier, GrpcClassifier, GrpcEosClassifier,
    HttpClassifier, IntoOutcome, NotSuccess,
};
pub use clock::ManualClock;
pub use config::{
    Backoff, BreakerConfig, ConfigError, DroppedBody, MAX_COUNT_WINDOW, MAX_HALF_OPEN_PERMITS,
    MAX_TIME_BUCKETS, OpenDuration, ProbePolicy, Window,
};
pub use events::{Transition, TransitionReason};
pub use fallback::{
    Fallback, FallbackFn, FallbackReason, FallbackRequest, FallbackService, FallbackServiceFuture,
    NoFallback,
};
pub use future::ResponseFuture;
pub use layer::BreakerLayer;
pub use service::Breaker;
pub use state::State;
pub use stats::{BreakerStats, FallbackStats, LatencySummary, TransitionStats, WindowStats};
/// tower-http's classification traits and classifiers, re-exported so you name the same version.
pub use tower_http::classify;

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
