//! Passive health: an endpoint that keeps failing is taken out of the balancer's choice for a backoff, then
//! re-admitted after one successful probe, without waiting for its registry entry to expire.
//!
//! Each endpoint gets a [`tower_breaker::CircuitBreaker`] (consecutive failures, exponential backoff): while it is
//! open the endpoint reports not ready, so power of two choices never picks it; when the backoff ends it lets one
//! probe through. What counts as a failure: a transport error (connection refused, reset, timeout), an HTTP 5xx,
//! or a gRPC `UNAVAILABLE` in the headers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;
use tower_breaker::{Backoff, CircuitBreaker, Permit, ProbePolicy};
use tower_redis_core::ConfigError;

use crate::instance::Instance;

/// When to eject an endpoint, and for how long: [`EjectionOptions::default`], or [`EjectionOptions::builder`] to
/// change a setting.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct EjectionOptions {
    consecutive_failures: u32,
    base: Duration,
    max: Duration,
}

/// Builds [`EjectionOptions`].
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct EjectionOptionsBuilder {
    options: EjectionOptions,
}

impl EjectionOptions {
    /// A builder starting from the defaults.
    pub fn builder() -> EjectionOptionsBuilder {
        EjectionOptionsBuilder {
            options: Self::default(),
        }
    }

    /// Failures in a row that eject an endpoint.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// The first ejection's length.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest ejection.
    pub fn max(&self) -> Duration {
        self.max
    }
}

impl EjectionOptionsBuilder {
    /// Failures in a row that eject an endpoint (default 5); at least 1.
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.options.consecutive_failures = failures;
        self
    }

    /// The first ejection's length (default 1 s); it doubles with each ejection in a row, with jitter. At least
    /// 1 ms.
    pub fn base(mut self, base: Duration) -> Self {
        self.options.base = base;
        self
    }

    /// The longest ejection (default 30 s); at least the first one.
    pub fn max(mut self, max: Duration) -> Self {
        self.options.max = max;
        self
    }

    /// Validates.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when no failure ejects, the first ejection is under 1 ms, or the longest is shorter than the
    /// first.
    pub fn build(self) -> Result<EjectionOptions, ConfigError> {
        let error = |field: &'static str, message: &str| {
            Err(ConfigError::in_component(
                "ejection",
                field,
                message.to_owned(),
            ))
        };
        let options = self.options;
        if options.consecutive_failures == 0 {
            return error("consecutive_failures", "must be at least 1");
        }
        if options.base < Duration::from_millis(1) {
            return error("base", "must be at least 1 ms");
        }
        if options.max < options.base {
            return error(
                "max",
                "must be at least `base`, the first ejection's length",
            );
        }
        Ok(options)
    }
}

impl Default for EjectionOptions {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

/// Wraps one endpoint with passive health. Build it with [`Ejecting::new`] inside the `make` function given to
/// [`balance`](fn@crate::balance).
#[derive(Debug)]
pub struct Ejecting<S> {
    inner: S,
    breaker: CircuitBreaker,
    wake: Option<Pin<Box<Sleep>>>,
}

impl<S> Ejecting<S> {
    /// `inner`, the endpoint of `instance`, with passive health. Its breaker is named after the instance's id (logs,
    /// stats) and exports no `tower_breaker_*` metrics of its own: a label per instance id would grow without bound
    /// as instances come and go. Ejections are counted per service instead, in
    /// `tower_redis_discovery_ejections_total{service}` (feature `metrics`).
    pub fn new(inner: S, instance: &Instance, options: EjectionOptions) -> Self {
        #[cfg(feature = "metrics")]
        let ejections = metrics::counter!(
            "tower_redis_discovery_ejections_total",
            "service" => instance.name.clone()
        );
        let breaker = CircuitBreaker::builder()
            .name(instance.id.clone())
            .export_metrics(false)
            .on_transition(move |transition| {
                #[cfg(feature = "metrics")]
                if transition.to == tower_breaker::State::Open {
                    ejections.increment(1);
                }
                #[cfg(not(feature = "metrics"))]
                let _ = transition;
            })
            .no_failure_rate()
            .consecutive_failures(options.consecutive_failures)
            .open_backoff(Backoff {
                initial: options.base,
                multiplier: 2.0,
                max: options.max,
                jitter: 0.2,
            })
            .half_open_permits(1)
            .probe_policy(ProbePolicy::AllSucceed)
            .build();
        // `EjectionOptions` are validated when built, so these settings always validate; the defaults are the
        // fallback.
        let breaker = breaker.unwrap_or_else(|_| default_breaker());
        Self {
            inner,
            breaker,
            wake: None,
        }
    }

    /// The endpoint's breaker (its state says whether the endpoint is ejected).
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

/// A breaker with the default configuration (which the breaker crate's tests prove valid).
fn default_breaker() -> CircuitBreaker {
    match CircuitBreaker::builder().build() {
        Ok(breaker) => breaker,
        Err(error) => panic!("tower-breaker's default configuration is invalid: {error}"),
    }
}

impl<S: Clone> Clone for Ejecting<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            wake: None,
        }
    }
}

/// What a response says about the endpoint's health.
pub trait HealthSignal {
    /// Whether this response means the endpoint is failing.
    fn is_failure(&self) -> bool;
}

impl<B> HealthSignal for http::Response<B> {
    fn is_failure(&self) -> bool {
        self.status().is_server_error()
            || self
                .headers()
                .get("grpc-status")
                .is_some_and(|status| status.as_bytes() == b"14")
    }
}

impl<S, Req> Service<Req> for Ejecting<S>
where
    S: Service<Req>,
    S::Response: HealthSignal,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = EjectingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if let Some(left) = self.breaker.retry_after().filter(|left| !left.is_zero()) {
            // Ejected: not ready until the backoff ends; then the next call is the probe.
            let wake = self
                .wake
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(left)));
            if wake.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.wake = None;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        // A rejected probe slot (another probe is in flight) still sends the call: the endpoint was ready, and
        // the balancer already chose it; only its outcome goes uncounted.
        EjectingFuture {
            future: self.inner.call(request),
            permit: self.breaker.try_acquire().ok(),
        }
    }
}

pin_project! {
    /// The response future of [`Ejecting`].
    pub struct EjectingFuture<F> {
        #[pin]
        future: F,
        permit: Option<Permit>,
    }
}

impl<F, T, E> Future for EjectingFuture<F>
where
    F: Future<Output = Result<T, E>>,
    T: HealthSignal,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.future.poll(cx));
        if let Some(permit) = this.permit.take() {
            match &result {
                Ok(response) if !response.is_failure() => permit.success(),
                _ => permit.failure(),
            }
        }
        Poll::Ready(result)
    }
}
