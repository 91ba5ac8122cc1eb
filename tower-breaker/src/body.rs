//! The response body wrapper that classifies a stream at its end (gRPC status in trailers).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_http::classify::ClassifyEos;

use crate::breaker::{Outcome, Permit};
use crate::classifier::IntoOutcome;

struct PendingEos<E> {
    classifier: E,
    permit: Permit,
}

pin_project! {
    /// The body of a response that passed through the breaker. For responses whose outcome is only known at the
    /// end of the stream (gRPC status in trailers), it records the outcome when the trailers arrive, when the
    /// stream ends, or when the body fails; a body dropped before its end counts as configured by `dropped_body`
    /// (ignored by default). Otherwise it only forwards the inner body.
    pub struct ResponseBody<B, E> {
        #[pin]
        inner: B,
        // Boxed: only responses classified at the end of the stream (gRPC with trailers) carry it, and a pointer
        // keeps every other response within 16 bytes of the inner one. A response is moved several times on its
        // way out, and past 128 bytes each move is a `memcpy` call rather than a few register moves (measured:
        // it was a third of the layer's cost per call).
        eos: Option<Box<PendingEos<E>>>,
    }

    impl<B, E> PinnedDrop for ResponseBody<B, E> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(pending) = this.project().eos.take() {
                pending.permit.dropped_body();
            }
        }
    }
}

impl<B, E> ResponseBody<B, E> {
    /// A body with nothing to classify.
    pub(crate) fn plain(inner: B) -> Self {
        Self { inner, eos: None }
    }

    /// A body whose end decides the call's outcome (one allocation: the classifier and the permit).
    pub(crate) fn classified_at_end(inner: B, classifier: E, permit: Permit) -> Self {
        Self {
            inner,
            eos: Some(Box::new(PendingEos { classifier, permit })),
        }
    }
}

impl<B: fmt::Debug, E> fmt::Debug for ResponseBody<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("classifies_at_end", &self.eos.is_some())
            .finish()
    }
}

impl<B: Default, E> Default for ResponseBody<B, E> {
    fn default() -> Self {
        Self::plain(B::default())
    }
}

fn finish<E>(eos: &mut Option<Box<PendingEos<E>>>, trailers: Option<&HeaderMap>)
where
    E: ClassifyEos,
    E::FailureClass: IntoOutcome,
{
    if let Some(pending) = eos.take() {
        let outcome = match pending.classifier.classify_eos(trailers) {
            Ok(()) => Outcome::Success,
            Err(class) => class.into_outcome(),
        };
        pending.permit.record(outcome);
    }
}

impl<B, E> Body for ResponseBody<B, E>
where
    B: Body,
    B::Error: fmt::Display + 'static,
    E: ClassifyEos,
    E::FailureClass: IntoOutcome,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let result = ready!(this.inner.as_mut().poll_frame(cx));
        if this.eos.is_none() {
            return Poll::Ready(result);
        }
        match &result {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    finish(this.eos, Some(trailers));
                } else if this.inner.is_end_stream() {
                    finish(this.eos, None);
                }
            }
            Some(Err(error)) => {
                if let Some(pending) = this.eos.take() {
                    let outcome = pending.classifier.classify_error(error).into_outcome();
                    pending.permit.record(outcome);
                }
            }
            None => finish(this.eos, None),
        }
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
