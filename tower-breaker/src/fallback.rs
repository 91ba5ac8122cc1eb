//! What runs instead of the service when the breaker rejects a call (and, if asked, when a call fails or times
//! out): a closure ([`crate::BreakerLayer::fallback`]) or a service ([`crate::BreakerLayer::fallback_service`]).

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::breaker::Rejected;

/// Why the fallback runs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FallbackReason {
    /// The breaker rejected the call (open, forced open, or half-open with every probe taken). The request is
    /// handed to the fallback.
    Rejected(Rejected),
    /// The service answered with a response classified as a failure (only with `fallback_on_failure`).
    FailureResponse(StatusCode),
    /// The service returned an error (only with `fallback_on_failure`); its text.
    Error(String),
    /// The call ran past the breaker's call timeout (only with `fallback_on_failure`).
    Timeout(Duration),
}

impl fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(rejected) => rejected.fmt(f),
            Self::FailureResponse(status) => write!(f, "the service answered {status}"),
            Self::Error(error) => write!(f, "the service failed: {error}"),
            Self::Timeout(after) => write!(f, "the call timed out after {} ms", after.as_millis()),
        }
    }
}

/// What a fallback receives: why it runs, and the request when the service never saw it (rejections).
#[derive(Debug)]
pub struct FallbackRequest<ReqBody> {
    /// Why the fallback runs.
    pub reason: FallbackReason,
    /// The original request, on a rejection; `None` after a failure or a timeout (the service consumed it).
    pub request: Option<Request<ReqBody>>,
    /// Whether the request was gRPC (`content-type: application/grpc*`), so a fallback can answer in kind.
    pub grpc: bool,
}

/// A fallback the layer can run. Implemented by [`NoFallback`], [`FallbackFn`] and [`FallbackService`].
pub trait Fallback<ReqBody, ResBody, E>: Clone {
    /// The fallback's future.
    type Future: Future<Output = Result<Response<ResBody>, E>>;

    /// Whether there is a fallback at all.
    fn is_configured(&self) -> bool {
        true
    }

    /// Runs the fallback.
    fn run(&mut self, request: FallbackRequest<ReqBody>) -> Self::Future;
}

/// No fallback: rejections get the layer's own 503 (or gRPC `UNAVAILABLE`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFallback;

impl<ReqBody, ResBody, E> Fallback<ReqBody, ResBody, E> for NoFallback {
    type Future = std::future::Pending<Result<Response<ResBody>, E>>;

    fn is_configured(&self) -> bool {
        false
    }

    fn run(&mut self, _request: FallbackRequest<ReqBody>) -> Self::Future {
        // Never called: the layer checks `is_configured` first.
        std::future::pending()
    }
}

/// A fallback from a closure that builds the response directly.
#[derive(Clone)]
pub struct FallbackFn<F>(pub(crate) F);

impl<F> fmt::Debug for FallbackFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FallbackFn")
    }
}

impl<F, ReqBody, ResBody, E> Fallback<ReqBody, ResBody, E> for FallbackFn<F>
where
    F: Fn(FallbackRequest<ReqBody>) -> Response<ResBody> + Clone,
{
    type Future = std::future::Ready<Result<Response<ResBody>, E>>;

    fn run(&mut self, request: FallbackRequest<ReqBody>) -> Self::Future {
        std::future::ready(Ok((self.0)(request)))
    }
}

/// A fallback from a Tower service taking [`FallbackRequest`]s (for fallbacks that do I/O, like serving a cached
/// copy or calling a secondary backend).
#[derive(Debug, Clone)]
pub struct FallbackService<S>(pub(crate) S);

impl<S, ReqBody, ResBody, E> Fallback<ReqBody, ResBody, E> for FallbackService<S>
where
    S: Service<FallbackRequest<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<E>,
{
    type Future = FallbackServiceFuture<S, FallbackRequest<ReqBody>, E>;

    fn run(&mut self, request: FallbackRequest<ReqBody>) -> Self::Future {
        // Take the service that is ready-to-be-polled and leave a clone behind (tower's advice on cloning).
        let clone = self.0.clone();
        FallbackServiceFuture {
            service: std::mem::replace(&mut self.0, clone),
            request: Some(request),
            future: None,
            _error: PhantomData,
        }
    }
}

pin_project! {
    /// Drives a [`FallbackService`] to readiness, then calls it.
    pub struct FallbackServiceFuture<S, Req, E>
    where
        S: Service<Req>,
    {
        service: S,
        request: Option<Req>,
        #[pin]
        future: Option<S::Future>,
        _error: PhantomData<fn() -> E>,
    }
}

impl<S: Service<Req>, Req, E> fmt::Debug for FallbackServiceFuture<S, Req, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FallbackServiceFuture")
    }
}

impl<S, Req, ResBody, E> Future for FallbackServiceFuture<S, Req, E>
where
    S: Service<Req, Response = Response<ResBody>>,
    S::Error: Into<E>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(future) = this.future.as_mut().as_pin_mut() {
                return future.poll(cx).map_err(Into::into);
            }
            ready!(this.service.poll_ready(cx)).map_err(Into::into)?;
            match this.request.take() {
                Some(request) => this.future.set(Some(this.service.call(request))),
                // Unreachable: the request is taken exactly once, right before the future is set.
                None => return Poll::Pending,
            }
        }
    }
}
