#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod breaker;
mod classifier;
mod clock;
mod config;
mod events;
mod fallback;
mod future;
mod hints;
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
#[cfg(feature = "serde")]
pub use config::duration_serde;
pub use config::{
    Backoff, BreakerConfig, ConfigError, DroppedBody, HintBounds, MAX_COUNT_WINDOW,
    MAX_HALF_OPEN_PERMITS, MAX_TIME_BUCKETS, OpenDuration, ProbePolicy, Window,
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
