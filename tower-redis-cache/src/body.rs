//! [`CacheBody`]: a stored body, the origin's body passed through, or the origin's body copied into the cache as
//! it streams to the client.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// Receives the copy of a body once it has streamed through completely.
pub(crate) trait Sink: Send {
    fn complete(self: Box<Self>, body: Bytes);
}

/// Copies a body up to a limit; gives up (and drops the sink, which ends its fill) past the limit, on trailers or on
/// an error.
pub(crate) struct Recorder {
    buffer: BytesMut,
    limit: usize,
    sink: Box<dyn Sink>,
}

impl Recorder {
    pub(crate) fn new(limit: usize, size_hint: Option<u64>, sink: Box<dyn Sink>) -> Self {
        let capacity =
            size_hint.map_or(0, |size| usize::try_from(size).unwrap_or(limit).min(limit));
        Self {
            buffer: BytesMut::with_capacity(capacity),
            limit,
            sink,
        }
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind<B> {
        Full { data: Option<Bytes> },
        Stream { #[pin] body: B },
        Tee { #[pin] body: B, recorder: Option<Recorder> },
    }
}

pin_project! {
    /// The body of a response that went through the cache.
    pub struct CacheBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

impl<B> std::fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Full { .. } => "Full",
            Kind::Stream { .. } => "Stream",
            Kind::Tee { .. } => "Tee",
        };
        f.debug_struct("CacheBody").field("kind", &kind).finish()
    }
}

impl<B> Default for CacheBody<B> {
    fn default() -> Self {
        Self::full(Bytes::new())
    }
}

impl<B> CacheBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn stream(body: B) -> Self {
        Self {
            kind: Kind::Stream { body },
        }
    }
}

impl<B: Body> CacheBody<B> {
    /// Streams `body` through and hands a copy to `recorder`'s sink when it ends within the limit.
    pub(crate) fn tee(body: B, recorder: Recorder) -> Self {
        if body.is_end_stream() {
            // Nothing will ever be polled: the copy is complete now.
            recorder.sink.complete(Bytes::new());
            return Self::stream(body);
        }
        Self {
            kind: Kind::Tee {
                body,
                recorder: Some(recorder),
            },
        }
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProjection::Full { data } => {
                Poll::Ready(data.take().map(|data| Ok(Frame::data(data))))
            }
            KindProjection::Stream { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|frame| {
                    frame.map(|frame| {
                        frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
                    })
                }))
            }
            KindProjection::Tee { mut body, recorder } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                let frame = match frame {
                    None => {
                        if let Some(recorder) = recorder.take() {
                            recorder.sink.complete(recorder.buffer.freeze());
                        }
                        return Poll::Ready(None);
                    }
                    Some(Err(error)) => {
                        *recorder = None;
                        return Poll::Ready(Some(Err(error)));
                    }
                    Some(Ok(frame)) => {
                        frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
                    }
                };
                match frame.data_ref() {
                    Some(data) => {
                        if let Some(copy) = recorder {
                            if copy.buffer.len() + data.len() > copy.limit {
                                *recorder = None;
                            } else {
                                copy.buffer.extend_from_slice(data);
                            }
                        }
                    }
                    // Trailers cannot be stored with the entry: do not store a response that has them.
                    None => *recorder = None,
                }
                if body.is_end_stream()
                    && let Some(recorder) = recorder.take()
                {
                    recorder.sink.complete(recorder.buffer.freeze());
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Stream { body } | Kind::Tee { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
            Kind::Stream { body } | Kind::Tee { body, .. } => body.size_hint(),
        }
    }
}

/// Polls a body to its end, so a tee completes its copy when nobody reads the response (a background refresh, or
/// a client answered with 304 while the full response is stored).
pub(crate) async fn drain<B>(body: B)
where
    B: Body,
    B::Data: Buf,
{
    let mut body = std::pin::pin!(body);
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if frame.is_err() {
            return;
        }
    }
}
