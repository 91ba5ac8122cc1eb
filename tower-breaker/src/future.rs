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
use crate::breaker::{Outcome, Permit};
use crate::classifier::IntoOutcome;
use crate::fallback::{Fallback, FallbackReason, FallbackRequest};
use crate::hints;
use crate::lease::SharedRef;
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
    /// Where the future is. With a `call_timeout`, the deadline is made (and boxed, which keeps the future small for
    /// every call) only when the service does not answer on its first poll: a call answered at once never
    /// allocates it nor registers it with the timer.
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
            breaker: Option<SharedRef>,
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
        C::ClassifyEos: 'static,
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
    C::ClassifyEos: 'static,
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
    C::ClassifyEos: 'static,
    F: Fallback<ReqBody, ResBody, E>,
{
    #[inline(always)]
    pub(crate) fn admitted(future: Fut, admitted: Admitted<C, F>) -> Self {
        Self {
            state: State::Call {
                future,
                sleep: None,
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

    pub(crate) fn fallback(future: F::Future, breaker: Option<SharedRef>) -> Self {
        Self {
            state: State::Fallback { future, breaker },
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
    C::ClassifyEos: 'static,
    C::FailureClass: IntoOutcome,
    F: Fallback<ReqBody, ResBody, E>,
    ResBody: Default,
{
    type Output = Result<Response<ResponseBody<ResBody, C::ClassifyEos>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        match this.state.as_mut().project() {
            StateProj::Call { future, sleep } => {
                // The service first: a call that answers at once never registers its deadline with the timer.
                let Poll::Ready(result) = future.poll(cx) else {
                    if sleep.is_none() {
                        let timeout = this
                            .admitted
                            .as_ref()
                            .and_then(|admitted| admitted.permit.call_timeout());
                        *sleep = timeout.map(|timeout| Box::pin(tokio::time::sleep(timeout)));
                    }
                    let timed_out = sleep
                        .as_mut()
                        .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                    if !timed_out {
                        return Poll::Pending;
                    }
                    let Some(admitted) = this.admitted.take() else {
                        return Poll::Pending;
                    };
                    this.state.set(State::Immediate { response: None });
                    return Self::timed_out(admitted, this.state, cx);
                };
                let Some(admitted) = this.admitted.take() else {
                    return Poll::Pending;
                };
                this.state.set(State::Immediate { response: None });
                Self::answered(result, admitted, this.state, cx)
            }
            StateProj::Immediate { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled again after completing.
                None => Poll::Pending,
            },
            StateProj::Fallback { future, breaker } => {
                let result = ready!(future.poll(cx));
                if let Some(breaker) = breaker.take() {
                    breaker.record_fallback(result.is_ok());
                    breaker.release();
                }
                this.state.set(State::Immediate { response: None });
                Poll::Ready(result.map(|response| response.map(ResponseBody::plain)))
            }
        }
    }
}

type Answer<ResBody, C, E> =
    Poll<Result<Response<ResponseBody<ResBody, <C as ClassifyResponse>::ClassifyEos>>, E>>;

impl<Fut, C, F, ReqBody, ResBody, E> ResponseFuture<Fut, C, F, ReqBody, ResBody, E>
where
    Fut: Future<Output = Result<Response<ResBody>, E>>,
    E: fmt::Display + 'static,
    C: ClassifyResponse,
    C::ClassifyEos: 'static,
    C::FailureClass: IntoOutcome,
    F: Fallback<ReqBody, ResBody, E>,
    ResBody: Default,
{
    /// The service answered: classify, record, and hand the answer on (or run the fallback on a failure). The
    /// answer is returned straight from here, without being moved through an intermediate value: responses are
    /// large and this is the path every call takes.
    #[inline]
    fn answered(
        result: Result<Response<ResBody>, E>,
        admitted: Admitted<C, F>,
        state: Pin<&mut State<Fut, F::Future, Response<ResponseBody<ResBody, C::ClassifyEos>>>>,
        cx: &mut Context<'_>,
    ) -> Answer<ResBody, C, E> {
        let Admitted {
            classifier,
            permit,
            fallback,
            grpc,
        } = admitted;
        match result {
            Ok(response) => match classifier.classify_response(&response) {
                ClassifiedResponse::Ready(classified) => {
                    let outcome =
                        classified.map_or_else(IntoOutcome::into_outcome, |()| Outcome::Success);
                    // A failure may carry the server's hint of how long to stay away.
                    let hint = (outcome == Outcome::Failure)
                        .then(|| hints::from_response(response.status(), response.headers()))
                        .flatten();
                    match fallback {
                        Some(fallback) if outcome == Outcome::Failure => {
                            let breaker = permit.shared_ref();
                            permit.record_hinted(outcome, hint);
                            let reason = FallbackReason::FailureResponse(response.status());
                            Self::run_fallback(fallback, breaker, reason, grpc, state, cx)
                        }
                        _ => {
                            permit.record_hinted(outcome, hint);
                            Poll::Ready(Ok(response.map(ResponseBody::plain)))
                        }
                    }
                }
                ClassifiedResponse::RequiresEos(eos) => Poll::Ready(Ok(
                    response.map(|body| ResponseBody::classified_at_end(body, eos, permit))
                )),
            },
            Err(error) => {
                let outcome = classifier.classify_error(&error).into_outcome();
                match fallback {
                    Some(fallback) if outcome == Outcome::Failure => {
                        let breaker = permit.shared_ref();
                        permit.record(outcome);
                        let reason = FallbackReason::Error(error.to_string());
                        Self::run_fallback(fallback, breaker, reason, grpc, state, cx)
                    }
                    _ => {
                        permit.record(outcome);
                        Poll::Ready(Err(error))
                    }
                }
            }
        }
    }

    /// The call ran past its `call_timeout`.
    #[cold]
    fn timed_out(
        admitted: Admitted<C, F>,
        state: Pin<&mut State<Fut, F::Future, Response<ResponseBody<ResBody, C::ClassifyEos>>>>,
        cx: &mut Context<'_>,
    ) -> Answer<ResBody, C, E> {
        let Admitted {
            permit,
            fallback,
            grpc,
            ..
        } = admitted;
        let breaker = permit.shared_ref();
        let timeout = breaker
            .as_ref()
            .and_then(|breaker| breaker.config.call_timeout)
            .unwrap_or_default();
        permit.timeout();
        match fallback {
            Some(fallback) => Self::run_fallback(
                fallback,
                breaker,
                FallbackReason::Timeout(timeout),
                grpc,
                state,
                cx,
            ),
            None => Poll::Ready(Ok(reject::timeout::<ResBody>(grpc).map(ResponseBody::plain))),
        }
    }

    /// Runs the fallback after a failure or a timeout, polling it once right away: it may be ready.
    #[cold]
    fn run_fallback(
        mut fallback: F,
        breaker: Option<SharedRef>,
        reason: FallbackReason,
        grpc: bool,
        mut state: Pin<&mut State<Fut, F::Future, Response<ResponseBody<ResBody, C::ClassifyEos>>>>,
        cx: &mut Context<'_>,
    ) -> Answer<ResBody, C, E> {
        let future = fallback.run(FallbackRequest {
            reason,
            request: None,
            grpc,
        });
        state.set(State::Fallback { future, breaker });
        let StateProj::Fallback { future, breaker } = state.as_mut().project() else {
            return Poll::Pending;
        };
        let result = ready!(future.poll(cx));
        if let Some(breaker) = breaker.take() {
            breaker.record_fallback(result.is_ok());
            breaker.release();
        }
        state.set(State::Immediate { response: None });
        Poll::Ready(result.map(|response| response.map(ResponseBody::plain)))
    }
}
