//! Policies: a limit per window, with the algorithm that enforces it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::ConfigError;

/// The largest limit a policy may have: counts stay exact in Lua's doubles well past it.
pub const MAX_LIMIT: u64 = 1 << 50;

/// How a policy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Algorithm {
    /// Sliding-window counter (the default): the current window's count plus the part of the previous window that
    /// the sliding window still covers, kept in 8 sub-windows and counted conservatively, so no window of the
    /// policy's length ever admits more than the limit. One small hash per key (about 260 bytes).
    #[default]
    SlidingWindow,
    /// GCRA (generic cell rate algorithm): exact and smooth. With burst `b`, `b` requests may go at once, and no
    /// window of the policy's length ever admits more than the limit. One string per key.
    Gcra,
    /// Fixed window aligned to multiples of the window length: the cheapest, but up to twice the limit can pass
    /// around a window boundary.
    FixedWindow,
}

impl Algorithm {
    pub(crate) fn code(self) -> u8 {
        match self {
            Self::SlidingWindow => 1,
            Self::Gcra => 2,
            Self::FixedWindow => 3,
        }
    }
}

/// One limit: at most `limit` requests (or cost units) per `window`, enforced by `algorithm`.
///
/// With the `serde` feature a policy deserializes from `{"name": "api", "limit": 600, "window": "1m"}`, with
/// optional `"algorithm"` (`"sliding_window"`, `"gcra"`, `"fixed_window"`) and `"burst"`; it is validated as
/// [`Policy::new`] and [`Policy::burst`] validate, and unknown fields are errors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "PolicySpec"))]
pub struct Policy {
    name: Arc<str>,
    limit: u64,
    window: Duration,
    algorithm: Algorithm,
    burst: u64,
}

/// What a policy deserializes from, before validation.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySpec {
    name: String,
    limit: u64,
    #[serde(with = "tower_breaker::duration_serde")]
    window: Duration,
    #[serde(default)]
    algorithm: Algorithm,
    #[serde(default)]
    burst: Option<u64>,
}

#[cfg(feature = "serde")]
impl TryFrom<PolicySpec> for Policy {
    type Error = ConfigError;

    fn try_from(spec: PolicySpec) -> Result<Self, ConfigError> {
        let policy = Self::new(spec.name, spec.limit, spec.window)?.algorithm(spec.algorithm);
        match spec.burst {
            Some(burst) => policy.burst(burst),
            None => Ok(policy),
        }
    }
}

impl Policy {
    /// A sliding-window policy named `name` admitting `limit` per `window`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the name is empty or has characters other than letters, digits, `_`, `-` and `.`; when
    /// `limit` is 0 or above [`MAX_LIMIT`]; when `window` is under 1 ms.
    pub fn new(name: impl Into<String>, limit: u64, window: Duration) -> Result<Self, ConfigError> {
        let name = name.into();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(crate::error::config_error(
                "policy name",
                format!(
                    "{name:?} must be non-empty and use only letters, digits, `_`, `-` and `.`"
                ),
            ));
        }
        if limit == 0 || limit > MAX_LIMIT {
            return Err(crate::error::config_error(
                "limit",
                format!(
                    "policy {name:?}: the limit must be between 1 and {MAX_LIMIT}; got {limit}"
                ),
            ));
        }
        if window.as_millis() == 0 {
            return Err(crate::error::config_error(
                "window",
                format!("policy {name:?}: the window must be at least 1 ms; got {window:?}"),
            ));
        }
        Ok(Self {
            name: name.into(),
            limit,
            window,
            algorithm: Algorithm::SlidingWindow,
            burst: 1,
        })
    }

    /// `limit` per second.
    ///
    /// # Errors
    ///
    /// As [`Policy::new`].
    pub fn per_second(name: impl Into<String>, limit: u64) -> Result<Self, ConfigError> {
        Self::new(name, limit, Duration::from_secs(1))
    }

    /// `limit` per minute.
    ///
    /// # Errors
    ///
    /// As [`Policy::new`].
    pub fn per_minute(name: impl Into<String>, limit: u64) -> Result<Self, ConfigError> {
        Self::new(name, limit, Duration::from_secs(60))
    }

    /// `limit` per hour.
    ///
    /// # Errors
    ///
    /// As [`Policy::new`].
    pub fn per_hour(name: impl Into<String>, limit: u64) -> Result<Self, ConfigError> {
        Self::new(name, limit, Duration::from_secs(3600))
    }

    /// Uses `algorithm` instead of the sliding window.
    #[must_use]
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// GCRA: `b` requests may go at once. Default 1 (perfectly smooth). A larger burst keeps every window within the
    /// limit by lowering the sustained rate to `(limit - burst + 1) / window`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when `burst` is 0 or above the limit.
    pub fn burst(mut self, burst: u64) -> Result<Self, ConfigError> {
        if burst == 0 || burst > self.limit {
            return Err(crate::error::config_error(
                "burst",
                format!(
                    "policy {:?}: the burst must be between 1 and the limit {}; got {burst}",
                    self.name, self.limit
                ),
            ));
        }
        self.burst = burst;
        Ok(self)
    }

    /// The policy's name (used in its Redis key and in the `RateLimit` headers).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests (cost units) per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The algorithm.
    pub fn algorithm_kind(&self) -> Algorithm {
        self.algorithm
    }

    /// The GCRA burst.
    pub fn burst_size(&self) -> u64 {
        self.burst
    }

    pub(crate) fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    pub(crate) fn window_ms(&self) -> u64 {
        u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} per {:?} ({:?})",
            self.name, self.limit, self.window, self.algorithm
        )
    }
}

/// Policies checked together, in one script call: a request passes only if every one admits it, and then every
/// one counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    policies: Arc<[Policy]>,
}

impl PolicySet {
    /// A set from `policies`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the set is empty, has more than 16 policies, or two share a name.
    pub fn new(policies: impl IntoIterator<Item = Policy>) -> Result<Self, ConfigError> {
        let policies: Vec<Policy> = policies.into_iter().collect();
        if policies.is_empty() {
            return Err(crate::error::config_error(
                "policies",
                "at least one policy is needed",
            ));
        }
        if policies.len() > 16 {
            return Err(crate::error::config_error(
                "policies",
                "at most 16 policies can be checked together",
            ));
        }
        for (index, policy) in policies.iter().enumerate() {
            if policies[..index]
                .iter()
                .any(|other| other.name == policy.name)
            {
                return Err(crate::error::config_error(
                    "policies",
                    format!(
                        "two policies are named {:?}; names must be unique within a set",
                        policy.name
                    ),
                ));
            }
        }
        Ok(Self {
            policies: policies.into(),
        })
    }

    /// The policies.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }
}

impl From<Policy> for PolicySet {
    fn from(policy: Policy) -> Self {
        Self {
            policies: Arc::from(vec![policy]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "serde")]
    #[test]
    fn a_policy_deserializes_validated_and_unknown_fields_are_errors() {
        let policy: Policy = serde_json::from_str(
            r#"{"name": "api", "limit": 600, "window": "1m", "algorithm": "gcra", "burst": 10}"#,
        )
        .unwrap();
        assert_eq!(
            policy,
            Policy::per_minute("api", 600)
                .unwrap()
                .algorithm(Algorithm::Gcra)
                .burst(10)
                .unwrap()
        );
        let plain: Policy =
            serde_json::from_str(r#"{"name": "p", "limit": 5, "window": 250}"#).unwrap();
        assert_eq!(
            plain,
            Policy::new("p", 5, Duration::from_millis(250)).unwrap()
        );
        for (json, says) in [
            (
                r#"{"name": "p", "limit": 0, "window": "1s"}"#,
                "limit must be between 1",
            ),
            (
                r#"{"name": "", "limit": 1, "window": "1s"}"#,
                "must be non-empty",
            ),
            (
                r#"{"name": "p", "limit": 5, "window": "1s", "burst": 6}"#,
                "burst must be between",
            ),
            (
                r#"{"name": "p", "limit": 5, "window": "soon"}"#,
                "not a duration",
            ),
            (
                r#"{"name": "p", "limit": 5, "window": "1s", "limt": 1}"#,
                "unknown field",
            ),
        ] {
            let error = serde_json::from_str::<Policy>(json)
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{json}: {error}");
        }
    }

    #[test]
    fn names_limits_windows_and_bursts_are_validated() {
        assert!(Policy::per_second("ok-name_1.x", 1).is_ok());
        assert_eq!(
            Policy::per_second("", 1).unwrap_err().field(),
            "policy name"
        );
        assert_eq!(
            Policy::per_second("a b", 1).unwrap_err().field(),
            "policy name"
        );
        assert_eq!(Policy::per_second("zero", 0).unwrap_err().field(), "limit");
        assert_eq!(
            Policy::new("tiny", 1, Duration::from_micros(10))
                .unwrap_err()
                .field(),
            "window"
        );
        let policy = Policy::per_second("b", 10).unwrap();
        assert_eq!(policy.clone().burst(11).unwrap_err().field(), "burst");
        assert_eq!(policy.burst(10).unwrap().burst_size(), 10);
    }

    #[test]
    fn a_set_needs_unique_names() {
        let a = Policy::per_second("a", 1).unwrap();
        assert_eq!(
            PolicySet::new([a.clone(), a.clone()]).unwrap_err().field(),
            "policies"
        );
        assert_eq!(PolicySet::new([]).unwrap_err().field(), "policies");
        assert_eq!(PolicySet::new([a]).unwrap().policies().len(), 1);
    }
}
