//! What a balanced service is and how it fails fast: [`BalanceOptions`], [`Balanced`], and its two errors. No
//! endpoint is an immediate [`NoEndpoints`] error, and no ready endpoint within the fail-fast timeout (default 3 s)
//! is an [`Unavailable`] error, so no request waits forever. The picker and the `balance` functions are in
//! `strategy.rs`, the HTTP endpoint in `endpoint.rs`.

use std::fmt;
use std::time::Duration;

use tower::BoxError;
use tower::util::BoxCloneSyncService;

use tower_redis_core::ConfigError;

/// No instance of the service is known: the request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoEndpoints(());

impl fmt::Display for NoEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no endpoints: discovery knows no instance of this service")
    }
}

impl std::error::Error for NoEndpoints {}

impl NoEndpoints {
    pub(crate) fn new() -> Self {
        Self(())
    }
}

/// Instances are known, but none became ready within the fail-fast timeout: the request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable(());

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unavailable: no endpoint became ready within the fail-fast timeout")
    }
}

impl std::error::Error for Unavailable {}

impl Unavailable {
    pub(crate) fn new() -> Self {
        Self(())
    }
}

/// How to balance: [`BalanceOptions::default`], or [`BalanceOptions::builder`] to change a setting.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct BalanceOptions {
    pub(crate) failfast: Duration,
    pub(crate) default_rtt: Duration,
    pub(crate) decay: Duration,
}

/// Builds [`BalanceOptions`].
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct BalanceOptionsBuilder {
    options: BalanceOptions,
}

impl BalanceOptions {
    /// A builder starting from the defaults.
    pub fn builder() -> BalanceOptionsBuilder {
        BalanceOptionsBuilder {
            options: Self::default(),
        }
    }

    /// How long a request may wait for a ready endpoint.
    pub fn failfast(&self) -> Duration {
        self.failfast
    }

    /// The latency assumed for a new endpoint before it has answered.
    pub fn default_rtt(&self) -> Duration {
        self.default_rtt
    }

    /// How fast the peak-EWMA forgets.
    pub fn decay(&self) -> Duration {
        self.decay
    }
}

impl BalanceOptionsBuilder {
    /// How long a request may wait for a ready endpoint (default 3 s, as linkerd); above zero.
    pub fn failfast(mut self, wait: Duration) -> Self {
        self.options.failfast = wait;
        self
    }

    /// The latency assumed for a new endpoint before it has answered (default 1 ms: optimistic, so a new instance
    /// gets traffic at once; the peak-EWMA jumps to its real latency with its first slow answer).
    pub fn default_rtt(mut self, rtt: Duration) -> Self {
        self.options.default_rtt = rtt;
        self
    }

    /// How fast the peak-EWMA forgets (default 10 s); above zero.
    pub fn decay(mut self, decay: Duration) -> Self {
        self.options.decay = decay;
        self
    }

    /// Validates.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the fail-fast wait or the decay is zero.
    pub fn build(self) -> Result<BalanceOptions, ConfigError> {
        for (field, value) in [
            ("failfast", self.options.failfast),
            ("decay", self.options.decay),
        ] {
            if value.is_zero() {
                return Err(ConfigError::in_component(
                    "balance",
                    field,
                    "must be greater than zero",
                ));
            }
        }
        Ok(self.options)
    }
}

impl Default for BalanceOptions {
    fn default() -> Self {
        Self {
            failfast: Duration::from_secs(3),
            default_rtt: Duration::from_millis(1),
            decay: Duration::from_secs(10),
        }
    }
}

/// A balanced, cloneable service over a discovered set of endpoints. Errors are `BoxError`s you can downcast to
/// [`NoEndpoints`], [`Unavailable`] or the endpoint's own error.
pub type Balanced<Req, Res> = BoxCloneSyncService<Req, Res, BoxError>;
