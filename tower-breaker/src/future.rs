//! The layer's response future.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

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
    /// A fallback to run on a failure or a timeout; `None` unless configured.
    pub(crate) fallback: Option<F>,
    pub(crate) grpc: bool,
}

pin_project! {
    /// Where the future is. The deadline is boxed (only calls with a `call_timeout` pay for it), which keeps the
    /// future small: it is moved on every call.
    #[project = StateProj]
    enum State<Fut, FF, R> {
        Call {
            #[pin]
            future: Fut,
            sleep: Option<Pin<Box<Sleep>>>,
        },
        Fallback {
            #[pin]
            future: FF,
            breaker: Option<CircuitBreaker>,
        },
        Immediate {
            response: Option<R>,
        },
    }
}

pin_project! {
    /// Response future of [`crate::Breaker`].
    pub struct ResponseFuture<Fut, C, F, ReqBody, ResBody, E>
    where
        C: ClassifyResponse,
        F: Fallback<ReqBody, ResBody, E>,
    {
        #[pin]
        state: State<Fut, F::Future, Response<ResponseBody<ResBody, C::ClassifyEos>>>,
        admitted: Option<Admitted<C, F>>,
        _types: PhantomData<fn(ReqBody) -> E>,
    }
}

impl<Fut, C, F, ReqBody, ResBody, E> fmt::Debug for ResponseFuture<Fut, C, F, ReqBody, ResBody, E>
where
    C: ClassifyResponse,
    F: Fallback<ReqBody, ResBody, E>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Call { .. } => "calling",
            State::Fallback { .. } => "in fallback",
            State::Immediate { .. } => "answering",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
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
            state: State::Call {
                future,
                sleep: sleep.map(Box::pin),
            },
            admitted: Some(admitted),
            _types: PhantomData,
        }
    }

    pub(crate) fn immediate(response: Response<ResBody>) -> Self {
        Self {
            state: State::Immediate {
                response: Some(response.map(ResponseBody::plain)),
            },
            admitted: None,
            _types: PhantomData,
        }
    }

    pub(crate) fn fallback(future: F::Future, breaker: CircuitBreaker) -> Self {
        Self {
            state: State::Fallback {
                future,
                breaker: Some(breaker),
            },
            admitted: None,
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
        let (result, admitted) = match this.state.as_mut().project() {
            StateProj::Immediate { response } => {
                return match response.take() {
                    Some(response) => Poll::Ready(Ok(response)),
                    // Polled again after completing.
                    None => Poll::Pending,
                };
            }
            StateProj::Fallback { future, breaker } => {
                let result = ready!(future.poll(cx));
                if let Some(breaker) = breaker.take() {
                    breaker.record_fallback(result.is_ok());
                }
                this.state.set(State::Immediate { response: None });
                return Poll::Ready(result.map(|response| response.map(ResponseBody::plain)));
            }
            StateProj::Call { future, sleep } => {
                let timed_out = sleep
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                let result = if timed_out {
                    None
                } else {
                    Some(ready!(future.poll(cx)))
                };
                let Some(admitted) = this.admitted.take() else {
                    return Poll::Pending;
                };
                (result, admitted)
            }
        };
        let Admitted {
            classifier,
            permit,
            fallback,
            grpc,
        } = admitted;
        // Only the fallback path needs a handle of its own (the permit is consumed by its report).
        let breaker = fallback.as_ref().map(|_| permit.breaker());
        let reason = match result {
            None => {
                let timeout = permit.breaker().config().call_timeout.unwrap_or_default();
                permit.timeout();
                FallbackReason::Timeout(timeout)
            }
            Some(Ok(response)) => match classifier.classify_response(&response) {
                ClassifiedResponse::RequiresEos(eos) => {
                    this.state.set(State::Immediate { response: None });
                    return Poll::Ready(Ok(
                        response.map(|body| ResponseBody::classified_at_end(body, eos, permit))
                    ));
                }
                ClassifiedResponse::Ready(result) => {
                    let outcome =
                        result.map_or_else(IntoOutcome::into_outcome, |()| Outcome::Success);
                    permit.record(outcome);
                    if outcome != Outcome::Failure || fallback.is_none() {
                        this.state.set(State::Immediate { response: None });
                        return Poll::Ready(Ok(response.map(ResponseBody::plain)));
                    }
                    FallbackReason::FailureResponse(response.status())
                }
            },
            Some(Err(error)) => {
                let outcome = classifier.classify_error(&error).into_outcome();
                permit.record(outcome);
                if outcome != Outcome::Failure || fallback.is_none() {
                    this.state.set(State::Immediate { response: None });
                    return Poll::Ready(Err(error));
                }
                FallbackReason::Error(error.to_string())
            }
        };
        match fallback {
            Some(mut fallback) => {
                let future = fallback.run(FallbackRequest {
                    reason,
                    request: None,
                    grpc,
                });
                this.state.set(State::Fallback { future, breaker });
                // Poll the fallback right away: it may be ready.
                let StateProj::Fallback { future, breaker } = this.state.as_mut().project() else {
                    return Poll::Pending;
                };
                let result = ready!(future.poll(cx));
                if let Some(breaker) = breaker.take() {
                    breaker.record_fallback(result.is_ok());
                }
                this.state.set(State::Immediate { response: None });
                Poll::Ready(result.map(|response| response.map(ResponseBody::plain)))
            }
            // Only a timeout gets here without a fallback.
            None => {
                this.state.set(State::Immediate { response: None });
                Poll::Ready(Ok(reject::timeout::<ResBody>(grpc).map(ResponseBody::plain)))
            }
        }
    }
}
