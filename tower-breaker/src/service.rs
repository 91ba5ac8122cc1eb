//! [`Breaker`]: the service [`crate::BreakerLayer`] produces.

use std::fmt;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_http::classify::MakeClassifier;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::breaker::CircuitBreaker;
use crate::classifier::{IntoOutcome, is_grpc};
use crate::fallback::{Fallback, FallbackReason, FallbackRequest};
use crate::future::{Admitted, ResponseFuture};
use crate::reject;

/// A service guarded by a circuit breaker. See [`crate::BreakerLayer`].
#[derive(Debug, Clone)]
pub struct Breaker<S, M, F> {
    pub(crate) inner: S,
    pub(crate) breaker: CircuitBreaker,
    pub(crate) make_classifier: M,
    pub(crate) fallback: F,
    pub(crate) fallback_on_failure: bool,
}

impl<S, M, F> Breaker<S, M, F> {
    /// The breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, M, F, ReqBody, ResBody> Service<Request<ReqBody>> for Breaker<S, M, F>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: fmt::Display + 'static,
    M: MakeClassifier,
    M::ClassifyEos: 'static,
    M::FailureClass: IntoOutcome,
    F: Fallback<ReqBody, ResBody, S::Error>,
    ResBody: Default,
{
    type Response = Response<ResponseBody<ResBody, M::ClassifyEos>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, M::Classifier, F, ReqBody, ResBody, S::Error>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The breaker decides per call, in `call`: a rejection is a response, never an error from here.
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.breaker.try_acquire() {
            Ok(permit) => {
                let classifier = self.make_classifier.make_classifier(&request);
                let timeout = self.breaker.config().call_timeout;
                let fallback = (self.fallback_on_failure && self.fallback.is_configured())
                    .then(|| self.fallback.clone());
                // Only a timeout or a fallback needs to know how to answer; skip the header lookup otherwise.
                let grpc = (timeout.is_some() || fallback.is_some()) && is_grpc(request.headers());
                // Built in place: the inner future is large (it holds the request) and moving it costs a copy.
                ResponseFuture::admitted(
                    self.inner.call(request),
                    Admitted {
                        classifier,
                        permit,
                        fallback,
                        grpc,
                    },
                )
            }
            Err(rejected) => {
                let grpc = is_grpc(request.headers());
                tracing::trace!(breaker = %self.breaker.name(), %rejected, "call rejected");
                if self.fallback.is_configured() {
                    let future = self.fallback.run(FallbackRequest {
                        reason: FallbackReason::Rejected(rejected),
                        request: Some(request),
                        grpc,
                    });
                    ResponseFuture::fallback(future, Some(self.breaker.shared_ref()))
                } else {
                    ResponseFuture::immediate(reject::rejection(&rejected, grpc))
                }
            }
        }
    }
}
