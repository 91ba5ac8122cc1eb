//! [`RateLimiterBuilder`]: a limiter's settings, validated into a [`RateLimiter`].

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_breaker::CircuitBreaker;
use tower_redis_core::guard::Guard;

use crate::error::ConfigError;
use crate::limiter::{FailurePolicy, Inner, RateLimiter, Tier};
use crate::local::{DenyCache, LocalLimiter};
use crate::offline::Offline;
use crate::policy::{Policy, PolicySet};
use crate::stats::Stats;

/// Builds a [`RateLimiter`]. Every setting but the policies has a default.
#[must_use]
pub struct RateLimiterBuilder<C> {
    connection: C,
    /// No `.redis(..)` yet: decide in process.
    local_only: bool,
    settings: Settings,
}

/// Everything but the connection, carried over as is when [`RateLimiterBuilder::redis`] changes its type.
struct Settings {
    prefix: String,
    tiers: Vec<(String, Vec<Policy>)>,
    redis_timeout: Duration,
    failure: Option<FailurePolicy>,
    deny_cache: Option<usize>,
    pre_limiter: Option<(u64, Duration)>,
    breaker: Option<CircuitBreaker>,
    name: Cow<'static, str>,
}

impl<C> fmt::Debug for RateLimiterBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiterBuilder")
            .field("prefix", &self.settings.prefix)
            .field("tiers", &self.settings.tiers)
            .field("redis_timeout", &self.settings.redis_timeout)
            .field("failure", &self.settings.failure)
            .field("local_only", &self.local_only)
            .finish_non_exhaustive()
    }
}

/// The default tier's name.
pub const DEFAULT_TIER: &str = "default";

impl<C> RateLimiterBuilder<C> {
    /// A name for logs, stats and metric labels (default `ratelimit`).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// The key prefix (namespace) of every Redis key, for example `auth:rl:` (default `rl:`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
        self
    }

    /// Adds a policy to the default tier (several policies are checked together: say 10/s and 1000/h).
    pub fn policy(mut self, policy: Policy) -> Self {
        match self
            .settings
            .tiers
            .iter_mut()
            .find(|(name, _)| name == DEFAULT_TIER)
        {
            Some((_, policies)) => policies.push(policy),
            None => self
                .settings
                .tiers
                .insert(0, (DEFAULT_TIER.to_owned(), vec![policy])),
        }
        self
    }

    /// Adds a named tier with its own policies (for example `"free"` and `"pro"`), chosen per request.
    pub fn tier(
        mut self,
        name: impl Into<String>,
        policies: impl IntoIterator<Item = Policy>,
    ) -> Self {
        self.settings
            .tiers
            .push((name.into(), policies.into_iter().collect()));
        self
    }

    /// The deadline of each Redis call (default 50 ms). Past it, the failure policy decides.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.settings.redis_timeout = timeout;
        self
    }

    /// What to do when Redis fails (default [`FailurePolicy::FailOpen`]; a local-only limiter, built without
    /// [`redis`](Self::redis), decides with `FailurePolicy::Local { share: 1 }` and accepts no other).
    pub fn on_redis_failure(mut self, policy: FailurePolicy) -> Self {
        self.settings.failure = Some(policy);
        self
    }

    /// Decides on Redis through `connection` (a `ConnectionManager`, a `MultiplexedConnection`, a cluster
    /// connection, a `HealingConnection`, a `SentinelConnection`, ...). Without it the limiter is local-only.
    pub fn redis<C2>(self, connection: C2) -> RateLimiterBuilder<C2>
    where
        C2: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    {
        RateLimiterBuilder {
            connection,
            local_only: false,
            settings: self.settings,
        }
    }

    /// Keeps up to `capacity` denied keys in memory, denying them locally until their retry time (default on,
    /// 100 000 keys).
    pub fn deny_cache(mut self, capacity: usize) -> Self {
        self.settings.deny_cache = Some(capacity);
        self
    }

    /// Turns the deny cache off: every request asks Redis.
    pub fn no_deny_cache(mut self) -> Self {
        self.settings.deny_cache = None;
        self
    }

    /// A local `governor` shield in front of Redis: at most `limit` per `window` per key in this process; above
    /// it, requests are denied without a Redis call.
    pub fn pre_limiter(mut self, limit: u64, window: Duration) -> Self {
        self.settings.pre_limiter = Some((limit, window));
        self
    }

    /// Guards Redis with this breaker instead of the default one (opens after 3 failures in a row, probes after
    /// 500 ms, so the limiter is back on Redis within a second of recovery).
    pub fn breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.settings.breaker = Some(breaker);
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when there is no policy, a tier repeats a name or is empty, the timeout is zero, or a
    /// local limiter's quota cannot be built.
    pub fn build(self) -> Result<RateLimiter<C>, ConfigError> {
        if self.settings.tiers.is_empty() {
            return Err(crate::error::config_error(
                "policies",
                "add at least one policy, e.g. `.policy(Policy::per_minute(\"api\", 600)?)`",
            ));
        }
        if self.settings.redis_timeout.is_zero() {
            return Err(crate::error::config_error(
                "redis_timeout",
                "the Redis timeout must be above zero",
            ));
        }
        let failure = match self.settings.failure {
            Some(failure) => failure,
            None if self.local_only => FailurePolicy::Local { share: 1 },
            None => FailurePolicy::FailOpen,
        };
        if self.settings.prefix.contains(['{', '}']) {
            return Err(crate::error::config_error(
                "prefix",
                "must not contain `{` or `}`: the limiter puts the request key in a Cluster hash tag",
            ));
        }
        if let FailurePolicy::Local { share: 0 } = failure {
            return Err(crate::error::config_error(
                "on_redis_failure",
                "the local share must be at least 1",
            ));
        }
        if self.local_only && !matches!(failure, FailurePolicy::Local { .. }) {
            return Err(crate::error::config_error(
                "on_redis_failure",
                "a limiter built without `.redis(connection)` is local-only: it decides with its local limiter, \
                 so the failure policy must be `FailurePolicy::Local` (or give it a Redis connection)",
            ));
        }
        let mut tiers: Vec<Tier> = Vec::with_capacity(self.settings.tiers.len());
        for (name, policies) in self.settings.tiers {
            if tiers.iter().any(|tier| tier.name == name) {
                return Err(crate::error::config_error(
                    "tier",
                    format!("tier {name:?} is defined twice"),
                ));
            }
            let set = PolicySet::new(policies)?;
            let fallback = match failure {
                FailurePolicy::Local { share } => {
                    Some(LocalLimiter::for_policies(set.policies(), share)?)
                }
                _ => None,
            };
            let pre_limiter = match self.settings.pre_limiter {
                Some((limit, window)) => Some(LocalLimiter::for_policies(
                    &[Policy::new("pre", limit, window)?],
                    1,
                )?),
                None => None,
            };
            tiers.push(Tier {
                name,
                set,
                fallback,
                pre_limiter,
            });
        }
        let breaker = match self.settings.breaker {
            Some(breaker) => breaker,
            None => CircuitBreaker::builder()
                .name(format!("{}-redis", self.settings.name))
                .consecutive_failures(3)
                .no_failure_rate()
                .open_for(Duration::from_millis(500))
                .half_open_permits(1)
                .half_open_max_wait(Duration::from_secs(2))
                .build()
                .map_err(|error| crate::error::config_error("breaker", error.to_string()))?,
        };
        Ok(RateLimiter {
            inner: Arc::new(Inner {
                connection: self.connection,
                prefix: self.settings.prefix,
                tiers,
                guard: Guard::new(breaker, self.settings.redis_timeout)?,
                failure,
                local_only: self.local_only,
                deny_cache: self.settings.deny_cache.map(DenyCache::new),
                stats: Stats::default(),
                #[cfg(feature = "metrics")]
                metrics: crate::metrics::Handles::new(&self.settings.name),
            }),
        })
    }
}

impl RateLimiter<Offline> {
    /// A builder. Give it a Redis connection with [`redis`](RateLimiterBuilder::redis) for a distributed limiter;
    /// without one it is local-only, for a single instance or a run without Redis: every decision is made in this
    /// process by a `governor` limiter per policy (the same one [`FailurePolicy::Local`] uses), with source
    /// [`DecisionSource::Local`](crate::DecisionSource::Local). A local-only limiter never calls Redis and involves no breaker; the admin calls
    /// (`inspect`, `reset`, `block`) need Redis and return an error, and a failure policy other than
    /// `FailurePolicy::Local` is a [`ConfigError`] at build time.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_ratelimit::{DecisionSource, Policy, RateLimiter};
    ///
    /// let limiter = RateLimiter::builder().policy(Policy::per_second("burst", 2)?).build()?;
    /// assert!(limiter.check("k").await.allowed);
    /// assert!(limiter.check("k").await.allowed);
    /// let third = limiter.check("k").await;
    /// assert!(!third.allowed);
    /// assert_eq!(third.source, DecisionSource::Local);
    /// # Ok(()) }
    /// ```
    pub fn builder() -> RateLimiterBuilder<Offline> {
        RateLimiterBuilder {
            connection: Offline,
            local_only: true,
            settings: Settings {
                prefix: "rl:".to_owned(),
                tiers: Vec::new(),
                redis_timeout: Duration::from_millis(50),
                failure: None,
                deny_cache: Some(100_000),
                pre_limiter: None,
                breaker: None,
                name: Cow::Borrowed("ratelimit"),
            },
        }
    }
}
