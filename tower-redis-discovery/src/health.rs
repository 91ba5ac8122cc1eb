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

/// When to eject an endpoint, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct EjectionOptions {
    /// Failures in a row that eject an endpoint (default 5).
    pub consecutive_failures: u32,
    /// The first ejection's length (default 1 s); it doubles with each ejection in a row, with jitter.
    pub base: Duration,
    /// The longest ejection (default 30 s).
    pub max: Duration,
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
/// [`crate::balance`].
#[derive(Debug)]
pub struct Ejecting<S> {
    inner: S,
    breaker: CircuitBreaker,
    wake: Option<Pin<Box<Sleep>>>,
}

impl<S> Ejecting<S> {
    /// `inner` with passive health; `name` labels its breaker (logs, stats).
    pub fn new(inner: S, name: impl Into<String>, options: EjectionOptions) -> Self {
        let breaker = CircuitBreaker::builder()
            .name(name.into())
            .no_failure_rate()
            .consecutive_failures(options.consecutive_failures.max(1))
            .open_backoff(Backoff {
                initial: options.base.max(Duration::from_millis(1)),
                multiplier: 2.0,
                max: options.max.max(options.base).max(Duration::from_millis(1)),
                jitter: 0.2,
            })
            .half_open_permits(1)
            .probe_policy(ProbePolicy::AllSucceed)
            .build();
        // The settings above are clamped into range, so they always validate; the defaults are the fallback.
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
