//! What the limiter decided, and which path decided it.

use std::sync::Arc;
use std::time::Duration;

/// Which path made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum DecisionSource {
    /// The Redis script (one round trip).
    Redis,
    /// The local deny cache: Redis said the key is blocked until a time that has not come yet (no Redis call).
    DenyCache,
    /// The local pre-limiter in front of Redis (no Redis call).
    PreLimiter,
    /// Redis failed or its breaker is open, and the failure policy is to allow.
    FailOpen,
    /// Redis failed or its breaker is open, and the failure policy is to deny.
    FailClosed,
    /// Redis failed or its breaker is open, and the local fallback limiter decided.
    LocalFallback,
    /// A local-only limiter (built without `.redis(connection)`, no Redis) decided.
    Local,
    /// The request is on the allow-list (no limit, no Redis call).
    AllowList,
    /// No key could be extracted and the layer lets such requests through.
    NoKey,
}

impl DecisionSource {
    /// Every source, in a fixed order (stats and metrics index by it).
    pub(crate) const ALL: [Self; 9] = [
        Self::Redis,
        Self::DenyCache,
        Self::PreLimiter,
        Self::FailOpen,
        Self::FailClosed,
        Self::LocalFallback,
        Self::Local,
        Self::AllowList,
        Self::NoKey,
    ];

    /// This source's position in [`DecisionSource::ALL`].
    pub(crate) fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|known| *known == self)
            .unwrap_or(0)
    }

    /// The source's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::DenyCache => "deny_cache",
            Self::PreLimiter => "pre_limiter",
            Self::FailOpen => "fail_open",
            Self::FailClosed => "fail_closed",
            Self::LocalFallback => "local_fallback",
            Self::Local => "local",
            Self::AllowList => "allow_list",
            Self::NoKey => "no_key",
        }
    }
}

/// One policy's state after a decision, for the `RateLimit` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PolicyState {
    /// The policy's name.
    pub name: Arc<str>,
    /// Its limit.
    pub limit: u64,
    /// Its window.
    pub window: Duration,
    /// What is left in the window after this request.
    pub remaining: u64,
    /// Time until the quota is restored (the end of the current window, or the time a GCRA bucket needs to refill).
    pub reset: Duration,
}

/// A rate-limit decision.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// Whether the request may go through.
    pub allowed: bool,
    /// Which path decided.
    pub source: DecisionSource,
    /// When denied: how long until a request of the same cost could pass.
    pub retry_after: Option<Duration>,
    /// Whether the key is blocked by hand ([`crate::RateLimiter::block`]).
    pub blocked: bool,
    /// Per-policy state, when known (Redis decisions).
    pub policies: Vec<PolicyState>,
    /// When Redis made the decision, by Redis's clock (microseconds since the Unix epoch); `None` for local paths.
    pub redis_time_micros: Option<u64>,
}

impl Decision {
    pub(crate) fn without_state(
        allowed: bool,
        source: DecisionSource,
        retry_after: Option<Duration>,
    ) -> Self {
        Self {
            allowed,
            source,
            retry_after,
            blocked: false,
            policies: Vec::new(),
            redis_time_micros: None,
        }
    }
}
