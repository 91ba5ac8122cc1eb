//! The response body wrapper that classifies a stream at its end (gRPC status in trailers).

use std::any::Any;
use std::cell::RefCell;
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

/// Where a pending classification lives: a box that is emptied when the call's outcome is recorded and then kept
/// for the next response classified at its end on the same thread (see [`SPARE_SLOTS`]).
type Slot<E> = Option<PendingEos<E>>;

/// How many emptied slots a thread keeps for reuse, of every classifier type together.
const SPARE_SLOTS_PER_THREAD: usize = 64;

thread_local! {
    /// Emptied slots of this thread, kept for reuse so that a response classified at its end (every gRPC reply whose
    /// status comes in trailers) costs no allocation once the thread has made one. A slot ends on the thread where
    /// its body ends, which keeps it; a thread whose bodies all end elsewhere allocates.
    static SPARE_SLOTS: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

/// A slot holding `pending`: a spare one of this thread when there is one.
fn fill_slot<E: 'static>(pending: PendingEos<E>) -> Box<Slot<E>> {
    let spare = SPARE_SLOTS
        .try_with(|spare| {
            let mut spare = spare.try_borrow_mut().ok()?;
            let index = spare.iter().rposition(|slot| slot.is::<Slot<E>>())?;
            spare.swap_remove(index).downcast::<Slot<E>>().ok()
        })
        .ok()
        .flatten();
    match spare {
        Some(mut slot) => {
            *slot = Some(pending);
            slot
        }
        None => Box::new(Some(pending)),
    }
}

/// Keeps an emptied slot for reuse (or frees it, when the thread keeps enough or is being torn down).
fn recycle_slot<E: 'static>(slot: Box<Slot<E>>) {
    debug_assert!(slot.is_none());
    // When the slot is not kept, it is dropped here (freed).
    let _ = SPARE_SLOTS.try_with(|spare| {
        if let Ok(mut spare) = spare.try_borrow_mut()
            && spare.len() < SPARE_SLOTS_PER_THREAD
        {
            spare.push(slot);
        }
    });
}

/// Takes the pending classification out of the body's slot, and gives the slot back for reuse.
fn take_pending<E: 'static>(eos: &mut Option<Box<Slot<E>>>) -> Option<PendingEos<E>> {
    let mut slot = eos.take()?;
    let pending = slot.take();
    recycle_slot(slot);
    pending
}

pin_project! {
    /// The body of a response that passed through the breaker. For responses whose outcome is only known at the
    /// end of the stream (gRPC status in trailers), it records the outcome when the trailers arrive, when the
    /// stream ends, or when the body fails; a body dropped before its end counts as configured by `dropped_body`
    /// (ignored by default). Otherwise it only forwards the inner body.
    pub struct ResponseBody<B, E>
    where
        E: 'static,
    {
        #[pin]
        inner: B,
        // Boxed: only responses classified at the end of the stream (gRPC with trailers) carry it, and a pointer
        // keeps every other response within 8 bytes of the inner one. A response is moved several times on its
        // way out, and past 128 bytes each move is a `memcpy` call rather than a few register moves (measured:
        // it was a third of the layer's cost per call). The box is reused (see `SPARE_SLOTS`): no allocation.
        eos: Option<Box<Slot<E>>>,
    }

    impl<B, E> PinnedDrop for ResponseBody<B, E>
    where
        E: 'static,
    {
        fn drop(this: Pin<&mut Self>) {
            if let Some(pending) = take_pending(this.project().eos) {
                pending.permit.dropped_body();
            }
        }
    }
}

impl<B, E: 'static> ResponseBody<B, E> {
    /// A body with nothing to classify.
    pub(crate) fn plain(inner: B) -> Self {
        Self { inner, eos: None }
    }

    /// A body whose end decides the call's outcome.
    pub(crate) fn classified_at_end(inner: B, classifier: E, permit: Permit) -> Self {
        Self {
            inner,
            eos: Some(fill_slot(PendingEos { classifier, permit })),
        }
    }
}

impl<B: fmt::Debug, E: 'static> fmt::Debug for ResponseBody<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("classifies_at_end", &self.eos.is_some())
            .finish()
    }
}

impl<B: Default, E: 'static> Default for ResponseBody<B, E> {
    fn default() -> Self {
        Self::plain(B::default())
    }
}

fn finish<E>(eos: &mut Option<Box<Slot<E>>>, trailers: Option<&HeaderMap>)
where
    E: ClassifyEos + 'static,
    E::FailureClass: IntoOutcome,
{
    if let Some(pending) = take_pending(eos) {
        let outcome = match pending.classifier.classify_eos(trailers) {
            Ok(()) => Outcome::Success,
            Err(class) => class.into_outcome(),
        };
        let hint = (outcome == Outcome::Failure)
            .then(|| crate::hints::from_trailers(trailers))
            .flatten();
        pending.permit.record_hinted(outcome, hint);
    }
}

impl<B, E> Body for ResponseBody<B, E>
where
    B: Body,
    B::Error: fmt::Display + 'static,
    E: ClassifyEos + 'static,
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
                if let Some(pending) = take_pending(this.eos) {
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
