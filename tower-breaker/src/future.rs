//! The layer's response future.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_http::classify::{ClassifiedResponse, ClassifyResponse};

use crate::body::ResponseBody;
use crate::breaker::{CircuitBreaker, Outcome, Permit};
use crate::classifier::IntoOutcome;
use crate::fallback::{Fallback, FallbackReason, FallbackRequest};
use crate::reject;

/// What a call needs after the service answers, when it was admitted.
pub(crate) struct Admitted<C, F> {
    pub(crate) classifier: C,
    pub(crate) permit: Permit,
    /// A fallback to run on a failure or a timeout, with the handle to count it; `None` unless configured.
    pub(crate) fallback: Option<(F, CircuitBreaker)>,
    pub(crate) grpc: bool,
    pub(crate) timeout: Duration,
}

pin_project! {
    /// Response future of [`crate::Breaker`].
    pub struct ResponseFuture<Fut, C, F, ReqBody, ResBody, E>
    where
        C: ClassifyResponse,
        F: Fallback<ReqBody, ResBody, E>,
    {
        #[pin]
        inner: Option<Fut>,
        #[pin]
        sleep: Option<Sleep>,
        #[pin]
        fallback_future: Option<F::Future>,
        admitted: Option<Admitted<C, F>>,
        immediate: Option<Response<ResponseBody<ResBody, C::ClassifyEos>>>,
        fallback_breaker: Option<CircuitBreaker>,
        _types: PhantomData<fn(ReqBody) -> E>,
    }
}

impl<Fut, C, F, ReqBody, ResBody, E> fmt::Debug for ResponseFuture<Fut, C, F, ReqBody, ResBody, E>
where
    C: ClassifyResponse,
    F: Fallback<ReqBody, ResBody, E>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("calling", &self.inner.is_some())
            .field("in_fallback", &self.fallback_future.is_some())
            .finish_non_exhaustive()
    }
}

impl<Fut, C, F, ReqBody, ResBody, E> ResponseFuture<Fut, C, F, ReqBody, ResBody, E>
where
    C: ClassifyResponse,
    F: Fallback<ReqBody, ResBody, E>,
{
    pub(crate) fn admitted(future: Fut, sleep: Option<Sleep>, admitted: Admitted<C, F>) -> Self {
        Self {
            inner: Some(future),
            sleep,
            fallback_future: None,
            admitted: Some(admitted),
            immediate: None,
            fallback_breaker: None,
            _types: PhantomData,
        }
    }

    pub(crate) fn immediate(response: Response<ResBody>) -> Self {
        Self {
            inner: None,
            sleep: None,
            fallback_future: None,
            admitted: None,
            immediate: Some(response.map(ResponseBody::plain)),
            fallback_breaker: None,
            _types: PhantomData,
        }
    }

    pub(crate) fn fallback(future: F::Future, breaker: CircuitBreaker) -> Self {
        Self {
            inner: None,
            sleep: None,
            fallback_future: Some(future),
            admitted: None,
            immediate: None,
            fallback_breaker: Some(breaker),
            _types: PhantomData,
        }
    }
}

impl<Fut, C, F, ReqBody, ResBody, E> Future for ResponseFuture<Fut, C, F, ReqBody, ResBody, E>
where
    Fut: Future<Output = Result<Response<ResBody>, E>>,
    E: fmt::Display + 'static,
    C: ClassifyResponse,
    C::FailureClass: IntoOutcome,
    F: Fallback<ReqBody, ResBody, E>,
    ResBody: Default,
{
    type Output = Result<Response<ResponseBody<ResBody, C::ClassifyEos>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(response) = this.immediate.take() {
                return Poll::Ready(Ok(response));
            }
            if let Some(future) = this.fallback_future.as_mut().as_pin_mut() {
                let result = ready!(future.poll(cx));
                this.fallback_future.set(None);
                if let Some(breaker) = this.fallback_breaker.take() {
                    breaker.record_fallback(result.is_ok());
                }
                return Poll::Ready(result.map(|response| response.map(ResponseBody::plain)));
            }
            let Some(future) = this.inner.as_mut().as_pin_mut() else {
                // Polled again after completing.
                return Poll::Pending;
            };
            let timed_out = this
                .sleep
                .as_mut()
                .as_pin_mut()
                .is_some_and(|sleep| sleep.poll(cx).is_ready());
            let result = if timed_out {
                None
            } else {
                Some(ready!(future.poll(cx)))
            };
            this.inner.set(None);
            this.sleep.set(None);
            let Some(admitted) = this.admitted.take() else {
                return Poll::Pending;
            };
            let Admitted {
                classifier,
                permit,
                fallback,
                grpc,
                timeout,
            } = admitted;
            let reason = match result {
                None => {
                    permit.timeout();
                    FallbackReason::Timeout(timeout)
                }
                Some(Ok(response)) => match classifier.classify_response(&response) {
                    ClassifiedResponse::RequiresEos(eos) => {
                        return Poll::Ready(Ok(
                            response.map(|body| ResponseBody::classified_at_end(body, eos, permit))
                        ));
                    }
                    ClassifiedResponse::Ready(result) => {
                        let outcome =
                            result.map_or_else(IntoOutcome::into_outcome, |()| Outcome::Success);
                        permit.record(outcome);
                        if outcome != Outcome::Failure || fallback.is_none() {
                            return Poll::Ready(Ok(response.map(ResponseBody::plain)));
                        }
                        FallbackReason::FailureResponse(response.status())
                    }
                },
                Some(Err(error)) => {
                    let outcome = classifier.classify_error(&error).into_outcome();
                    permit.record(outcome);
                    if outcome != Outcome::Failure || fallback.is_none() {
                        return Poll::Ready(Err(error));
                    }
                    FallbackReason::Error(error.to_string())
                }
            };
            match fallback {
                Some((mut fallback, breaker)) => {
                    let future = fallback.run(FallbackRequest {
                        reason,
                        request: None,
                        grpc,
                    });
                    this.fallback_future.set(Some(future));
                    *this.fallback_breaker = Some(breaker);
                }
                // Only a timeout gets here without a fallback.
                None => {
                    return Poll::Ready(Ok(
                        reject::timeout::<ResBody>(grpc).map(ResponseBody::plain)
                    ));
                }
            }
        }
    }
}
