//! [`RateLimiter`]: decisions on Redis, with local fast paths and a failure policy. Usable without Tower.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_breaker::CircuitBreaker;
use tower_redis_core::guard::{Guard, GuardError};

use crate::decision::{Decision, DecisionSource, PolicyState};
use crate::local::{DenyCache, LocalLimiter};
use crate::policy::{Policy, PolicySet};
use crate::script::{DECIDE, Reply};
use crate::stats::{LimiterStats, Stats};

/// What to do when Redis fails, times out, or its breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Allow the request (availability first).
    FailOpen,
    /// Deny the request (protection first).
    FailClosed,
    /// Decide with a local `governor` limiter per policy, allowing `limit / share` per window in this process
    /// (set `share` to the number of instances, so together they stay near the limit).
    Local {
        /// How many instances share the limit.
        share: u32,
    },
}

/// One named set of policies (a tier), with its local fallback.
#[derive(Debug)]
pub(crate) struct Tier {
    pub(crate) name: String,
    pub(crate) set: PolicySet,
    pub(crate) fallback: Option<LocalLimiter>,
    pub(crate) pre_limiter: Option<LocalLimiter>,
}

pub(crate) struct Inner<C> {
    pub(crate) connection: C,
    pub(crate) prefix: String,
    pub(crate) tiers: Vec<Tier>,
    /// The breaker and the deadline around every Redis call on the request path.
    pub(crate) guard: Guard,
    pub(crate) failure: FailurePolicy,
    pub(crate) local_only: bool,
    pub(crate) deny_cache: Option<DenyCache>,
    pub(crate) stats: Stats,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: crate::metrics::Handles,
}

/// A distributed rate limiter: a cheap, cloneable handle. See the [crate docs](crate).
pub struct RateLimiter<C> {
    pub(crate) inner: Arc<Inner<C>>,
}

impl<C> Clone for RateLimiter<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("prefix", &self.inner.prefix)
            .field(
                "tiers",
                &self
                    .inner
                    .tiers
                    .iter()
                    .map(|tier| &tier.name)
                    .collect::<Vec<_>>(),
            )
            .field("failure", &self.inner.failure)
            .finish_non_exhaustive()
    }
}

/// Why an admin call failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum AdminError {
    /// Redis answered with an error.
    Redis(redis::RedisError),
    /// Redis did not answer within the limiter's timeout.
    Timeout,
    /// No tier has this name.
    UnknownTier(String),
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Redis(error) => write!(f, "redis error: {error}"),
            Self::Timeout => f.write_str("redis did not answer in time"),
            Self::UnknownTier(name) => write!(f, "no tier is named {name:?}"),
        }
    }
}

impl std::error::Error for AdminError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Redis(error) => Some(error),
            _ => None,
        }
    }
}

impl<C> RateLimiter<C>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Whether this limiter is local-only (built without [`RateLimiterBuilder::redis`](crate::RateLimiterBuilder::redis)): it never calls Redis.
    pub fn is_local_only(&self) -> bool {
        self.inner.local_only
    }

    /// The breaker guarding Redis.
    pub fn breaker(&self) -> &CircuitBreaker {
        self.inner.guard.breaker()
    }

    /// The names of the tiers (the first is the default).
    pub fn tiers(&self) -> impl Iterator<Item = &str> {
        self.inner.tiers.iter().map(|tier| tier.name.as_str())
    }

    fn tier(&self, name: Option<&str>) -> Option<&Tier> {
        match name {
            None => self.inner.tiers.first(),
            Some(name) => self.inner.tiers.iter().find(|tier| tier.name == name),
        }
    }

    fn redis_key(&self, key: &str, suffix: &str) -> String {
        // `%`, `{` and `}` escaped: the key stays in its hash tag, and no two keys share a bucket.
        tower_redis_core::key::tagged(&self.inner.prefix, key, suffix)
    }

    /// Decides one request of cost 1 for `key` under the default tier.
    pub async fn check(&self, key: &str) -> Decision {
        self.check_tier(key, None, 1).await
    }

    /// Decides one request of `cost` for `key` under the tier named `tier` (`None` for the default). An unknown
    /// tier falls back to the default one (logged).
    pub async fn check_tier(&self, key: &str, tier: Option<&str>, cost: u32) -> Decision {
        let decision = self.decide(key, tier, cost).await;
        self.record_decision(&decision);
        decision
    }

    async fn decide(&self, key: &str, tier_name: Option<&str>, cost: u32) -> Decision {
        let inner = &*self.inner;
        let tier = match self.tier(tier_name) {
            Some(tier) => tier,
            None => {
                tracing::warn!(tier = ?tier_name, "unknown rate limit tier; using the default tier");
                &inner.tiers[0]
            }
        };
        if let Some(cache) = &inner.deny_cache
            && let Some(left) = cache.denied(key, cost)
        {
            return Decision::without_state(false, DecisionSource::DenyCache, Some(left));
        }
        if let Some(pre) = &tier.pre_limiter
            && let Err(wait) = pre.check(key, cost)
        {
            return Decision::without_state(false, DecisionSource::PreLimiter, Some(wait));
        }
        if inner.local_only {
            return Self::decide_locally(tier, key, cost);
        }
        match inner.guard.call(self.run_script(tier, key, cost)).await {
            Ok(reply) => {
                let retry_after =
                    (!reply.allowed).then(|| Duration::from_millis(reply.retry_after_ms.max(1)));
                if let (Some(cache), Some(retry_after)) = (&inner.deny_cache, retry_after) {
                    cache.remember(key, cost, retry_after);
                }
                Decision {
                    allowed: reply.allowed,
                    source: DecisionSource::Redis,
                    retry_after,
                    blocked: reply.blocked,
                    policies: states(tier.set.policies(), &reply),
                    redis_time_micros: Some(reply.server_time_us),
                }
            }
            Err(GuardError::Open) => self.on_failure(tier, key, cost),
            Err(error) => {
                tracing::warn!(%error, "rate limit decision failed; applying the failure policy");
                self.on_failure(tier, key, cost)
            }
        }
    }

    async fn run_script(
        &self,
        tier: &Tier,
        key: &str,
        cost: u32,
    ) -> Result<Reply, redis::RedisError> {
        let policies = tier.set.policies();
        let mut invocation = DECIDE.key(self.redis_key(key, "!block"));
        for policy in policies {
            invocation.key(self.redis_key(key, policy.name()));
        }
        invocation.arg(cost).arg(policies.len());
        for policy in policies {
            invocation
                .arg(policy.algorithm_kind().code())
                .arg(policy.limit())
                .arg(policy.window_ms())
                .arg(policy.burst_size());
        }
        let mut connection = self.inner.connection.clone();
        let values: Vec<i64> = invocation.invoke_async(&mut connection).await?;
        Reply::decode(&values, policies.len()).ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the rate limit script returned an unexpected reply",
            ))
        })
    }

    /// A local-only limiter's decision: its `governor` limiter (always built, as the failure policy is `Local`).
    fn decide_locally(tier: &Tier, key: &str, cost: u32) -> Decision {
        match tier.fallback.as_ref().map(|local| local.check(key, cost)) {
            Some(Ok(())) | None => Decision::without_state(true, DecisionSource::Local, None),
            Some(Err(wait)) => Decision::without_state(false, DecisionSource::Local, Some(wait)),
        }
    }

    fn on_failure(&self, tier: &Tier, key: &str, cost: u32) -> Decision {
        let retry_after = self
            .inner
            .guard
            .breaker()
            .retry_after()
            .map_or(Duration::from_secs(1), |left| {
                left.max(Duration::from_millis(1))
            });
        match self.inner.failure {
            FailurePolicy::FailOpen => {
                Decision::without_state(true, DecisionSource::FailOpen, None)
            }
            FailurePolicy::FailClosed => {
                Decision::without_state(false, DecisionSource::FailClosed, Some(retry_after))
            }
            FailurePolicy::Local { .. } => match &tier.fallback {
                Some(local) => match local.check(key, cost) {
                    Ok(()) => Decision::without_state(true, DecisionSource::LocalFallback, None),
                    Err(wait) => {
                        Decision::without_state(false, DecisionSource::LocalFallback, Some(wait))
                    }
                },
                None => Decision::without_state(true, DecisionSource::FailOpen, None),
            },
        }
    }

    /// The state of every policy of a tier for `key`, without counting a request.
    ///
    /// # Errors
    ///
    /// [`AdminError`] when Redis fails or is late, or the tier does not exist.
    pub async fn inspect(&self, key: &str, tier: Option<&str>) -> Result<Decision, AdminError> {
        let tier = self
            .tier(tier)
            .ok_or_else(|| AdminError::UnknownTier(tier.unwrap_or_default().to_owned()))?;
        let reply = tokio::time::timeout(
            self.inner.guard.timeout() * 4,
            self.run_script(tier, key, 0),
        )
        .await
        .map_err(|_| AdminError::Timeout)?
        .map_err(AdminError::Redis)?;
        Ok(Decision {
            allowed: !reply.blocked,
            source: DecisionSource::Redis,
            retry_after: reply
                .blocked
                .then(|| Duration::from_millis(reply.retry_after_ms)),
            blocked: reply.blocked,
            policies: states(tier.set.policies(), &reply),
            redis_time_micros: Some(reply.server_time_us),
        })
    }

    /// Forgets everything counted for `key` in every tier, and lifts a block.
    ///
    /// # Errors
    ///
    /// [`AdminError`] when Redis fails or is late.
    pub async fn reset(&self, key: &str) -> Result<(), AdminError> {
        let mut keys = vec![self.redis_key(key, "!block")];
        for tier in &self.inner.tiers {
            for policy in tier.set.policies() {
                let redis_key = self.redis_key(key, policy.name());
                if !keys.contains(&redis_key) {
                    keys.push(redis_key);
                }
            }
        }
        // One DEL per key keeps each command in one slot (a multi-key DEL is fine too: they share the tag).
        let mut connection = self.inner.connection.clone();
        let mut command = redis::cmd("DEL");
        command.arg(&keys);
        let deleted = command.query_async::<i64>(&mut connection);
        tokio::time::timeout(self.inner.guard.timeout() * 4, deleted)
            .await
            .map_err(|_| AdminError::Timeout)?
            .map_err(AdminError::Redis)?;
        if let Some(cache) = &self.inner.deny_cache {
            cache.forget(key);
        }
        Ok(())
    }

    /// Blocks `key` for `duration` in every process: its requests are denied, without counting, until then.
    ///
    /// # Errors
    ///
    /// [`AdminError`] when Redis fails or is late.
    pub async fn block(&self, key: &str, duration: Duration) -> Result<(), AdminError> {
        let millis = u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut connection = self.inner.connection.clone();
        let mut command = redis::cmd("SET");
        command
            .arg(self.redis_key(key, "!block"))
            .arg(1)
            .arg("PX")
            .arg(millis);
        let set = command.query_async::<()>(&mut connection);
        tokio::time::timeout(self.inner.guard.timeout() * 4, set)
            .await
            .map_err(|_| AdminError::Timeout)?
            .map_err(AdminError::Redis)?;
        Ok(())
    }

    /// Counters of decisions by source and outcome, Redis errors and latency, and the deny cache's size.
    pub fn stats(&self) -> LimiterStats {
        self.inner.stats.snapshot(
            self.inner.deny_cache.as_ref().map_or(0, DenyCache::len),
            &self.inner.guard,
            self.inner.local_only,
        )
    }

    pub(crate) fn record_decision(&self, decision: &Decision) {
        self.inner.stats.record(decision);
        #[cfg(feature = "metrics")]
        self.inner.metrics.decision(decision);
    }

    pub(crate) fn record_bypass(&self, source: DecisionSource) {
        self.record_decision(&Decision::without_state(true, source, None));
    }

    pub(crate) fn record_shadow_denial(&self) {
        self.inner.stats.shadow_denial();
    }

    /// The policies of a tier (`None`: the default tier).
    pub fn policies(&self, tier: Option<&str>) -> Option<&[Policy]> {
        self.tier(tier).map(|tier| tier.set.policies())
    }
}

fn states(policies: &[Policy], reply: &Reply) -> Vec<PolicyState> {
    policies
        .iter()
        .zip(&reply.policies)
        .map(|(policy, (remaining, reset_ms))| PolicyState {
            name: Arc::clone(policy.shared_name()),
            limit: policy.limit(),
            window: policy.window(),
            remaining: *remaining,
            reset: Duration::from_millis(*reset_ms),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offline::Offline;
    use std::time::Instant;

    #[tokio::test]
    async fn a_local_only_limiter_decides_in_process_and_never_touches_redis_or_its_breaker() {
        let limiter = RateLimiter::builder()
            .policy(Policy::per_minute("writes", 3).unwrap())
            .build()
            .unwrap();
        assert!(limiter.is_local_only());
        let mut decisions = Vec::new();
        for _ in 0..4 {
            decisions.push(limiter.check("ip:127.0.0.1").await);
        }
        let allowed: Vec<bool> = decisions.iter().map(|decision| decision.allowed).collect();
        assert_eq!(allowed, [true, true, true, false]);
        assert!(
            decisions
                .iter()
                .all(|decision| decision.source == DecisionSource::Local)
        );
        assert!(
            decisions[3]
                .retry_after
                .is_some_and(|wait| wait > Duration::ZERO)
        );
        // Another key has its own quota.
        assert!(limiter.check("ip:127.0.0.2").await.allowed);

        let stats = limiter.stats();
        assert_eq!((stats.allowed, stats.denied), (4, 1));
        assert_eq!((stats.redis_calls, stats.redis_errors), (0, 0));
        assert_eq!(
            stats.redis_breaker, None,
            "no Redis, so no Redis breaker state"
        );
        assert_eq!(limiter.breaker().stats().requests, 0);
    }

    #[tokio::test]
    async fn a_local_only_limiter_answers_admin_calls_with_an_error_at_once() {
        let limiter = RateLimiter::builder()
            .policy(Policy::per_second("burst", 1).unwrap())
            .build()
            .unwrap();
        let started = Instant::now();
        assert!(matches!(
            limiter.reset("k").await,
            Err(AdminError::Redis(_))
        ));
        assert!(matches!(
            limiter.inspect("k", None).await,
            Err(AdminError::Redis(_))
        ));
        assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn a_local_only_limiter_with_another_failure_policy_does_not_build() {
        let error = RateLimiter::builder()
            .policy(Policy::per_second("burst", 1).unwrap())
            .on_redis_failure(FailurePolicy::FailOpen)
            .build()
            .unwrap_err();
        assert_eq!(error.field(), "on_redis_failure");
    }

    #[test]
    fn a_limiter_on_a_connection_is_not_local_only() {
        let limiter = RateLimiter::builder()
            .redis(Offline)
            .policy(Policy::per_second("burst", 1).unwrap())
            .build()
            .unwrap();
        assert!(!limiter.is_local_only());
    }
}
