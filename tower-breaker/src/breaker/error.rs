//! Why a call was refused or failed: [`Rejected`] (with its [`RejectReason`]) and [`CallError`].

use std::fmt;
use std::time::Duration;

/// Why a call was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum RejectReason {
    /// The breaker is open.
    Open,
    /// The breaker is half-open and every probe permit of this cycle is taken.
    HalfOpenFull,
    /// The breaker is held open by hand.
    ForcedOpen,
}

/// A call the breaker did not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rejected {
    pub(super) reason: RejectReason,
    pub(super) retry_after: Option<Duration>,
}

impl Rejected {
    /// Why the call was rejected.
    pub fn reason(&self) -> RejectReason {
        self.reason
    }

    /// How long until the breaker may let calls through again, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self.reason {
            RejectReason::Open => "circuit breaker is open",
            RejectReason::HalfOpenFull => "circuit breaker is half-open and all probes are taken",
            RejectReason::ForcedOpen => "circuit breaker is forced open",
        };
        f.write_str(text)?;
        if let Some(retry_after) = self.retry_after {
            write!(f, "; retry after {} ms", retry_after.as_millis())?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejected {}

/// The error of [`CircuitBreaker::call`](crate::CircuitBreaker::call).
#[derive(Debug)]
#[non_exhaustive]
pub enum CallError<E> {
    /// The breaker rejected the call; the future was not run.
    Rejected(Rejected),
    /// The call ran past the configured `call_timeout` and was dropped.
    Timeout(Duration),
    /// The call itself failed.
    Inner(E),
}

impl<E: fmt::Display> fmt::Display for CallError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(rejected) => rejected.fmt(f),
            Self::Timeout(after) => write!(f, "call timed out after {} ms", after.as_millis()),
            Self::Inner(error) => error.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for CallError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Inner(error) => Some(error),
            Self::Rejected(rejected) => Some(rejected),
            Self::Timeout(_) => None,
        }
    }
}
