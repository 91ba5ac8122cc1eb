//! Balancing across discovered instances: power of two choices over peak-EWMA latency (as linkerd does), with
//! fail-fast: no endpoint is an immediate [`NoEndpoints`] error, and no ready endpoint within the fail-fast timeout
//! (default 3 s) is an [`Unavailable`] error. No request waits forever.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use http::Uri;
use http::uri::{Authority, Scheme};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::BoxError;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use crate::discover::Discovery;
use crate::instance::Instance;

/// No instance of the service is known: the request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoEndpoints(());

impl fmt::Display for NoEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no endpoints: discovery knows no instance of this service")
    }
}

impl std::error::Error for NoEndpoints {}

impl NoEndpoints {
    pub(crate) fn new() -> Self {
        Self(())
    }
}

/// Instances are known, but none became ready within the fail-fast timeout: the request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable(());

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unavailable: no endpoint became ready within the fail-fast timeout")
    }
}

impl std::error::Error for Unavailable {}

impl Unavailable {
    pub(crate) fn new() -> Self {
        Self(())
    }
}

/// How to balance.
#[derive(Debug, Clone, Copy)]
pub struct BalanceOptions {
    /// How long a request may wait for a ready endpoint (default 3 s, as linkerd).
    pub failfast: Duration,
    /// The latency assumed for a new endpoint before it has answered (default 1 ms: optimistic, so a new instance
    /// gets traffic at once; the peak-EWMA jumps to its real latency with its first slow answer).
    pub default_rtt: Duration,
    /// How fast the peak-EWMA forgets (default 10 s).
    pub decay: Duration,
    /// How many requests may queue in front of the balancer (default 1024).
    pub buffer: usize,
}

impl Default for BalanceOptions {
    fn default() -> Self {
        Self {
            failfast: Duration::from_secs(3),
            default_rtt: Duration::from_millis(1),
            decay: Duration::from_secs(10),
            buffer: 1024,
        }
    }
}

pin_project! {
    /// Turns discovered instances into endpoint services, and counts them.
    struct Endpoints<F> {
        #[pin]
        discovery: Discovery,
        make: F,
        known: HashSet<String>,
        count: Arc<AtomicUsize>,
    }
}

impl<F, S> Stream for Endpoints<F>
where
    F: Fn(&Instance) -> S,
{
    type Item = Result<Change<String, S>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        match this.discovery.poll_next(cx) {
            Poll::Ready(Some(Ok(Change::Insert(id, instance)))) => {
                if this.known.insert(id.clone()) {
                    this.count.fetch_add(1, Ordering::AcqRel);
                }
                Poll::Ready(Some(Ok(Change::Insert(id, (this.make)(&instance)))))
            }
            Poll::Ready(Some(Ok(Change::Remove(id)))) => {
                if this.known.remove(&id) {
                    this.count.fetch_sub(1, Ordering::AcqRel);
                }
                Poll::Ready(Some(Ok(Change::Remove(id))))
            }
            Poll::Ready(Some(Err(never))) => match never {},
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

/// The failure a [`FailFast`] answers with.
#[derive(Debug, Clone, Copy)]
enum Failing {
    NoEndpoints,
    Unavailable,
}

/// Sits between the buffer and the balancer: when the balancer has no endpoint, or stays not ready past the
/// timeout, it reports ready anyway and fails the call without sending it (linkerd's fail-fast), so callers never
/// wait forever and the buffer is never poisoned by an error from `poll_ready`.
struct FailFast<S> {
    inner: S,
    count: Arc<AtomicUsize>,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    failing: Option<Failing>,
}

impl<S, Req> Service<Req> for FailFast<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = FailFastFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.failing.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(result) => {
                self.sleep = None;
                Poll::Ready(result.map_err(Into::into))
            }
            Poll::Pending => {
                // Polling the balancer drained discovery: an empty set fails at once.
                if self.count.load(Ordering::Acquire) == 0 {
                    self.failing = Some(Failing::NoEndpoints);
                    self.sleep = None;
                    return Poll::Ready(Ok(()));
                }
                let timeout = self.timeout;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_ready() {
                    self.failing = Some(Failing::Unavailable);
                    self.sleep = None;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.failing.take() {
            Some(Failing::NoEndpoints) => FailFastFuture::Failed {
                error: Some(NoEndpoints(()).into()),
            },
            Some(Failing::Unavailable) => FailFastFuture::Failed {
                error: Some(Unavailable(()).into()),
            },
            None => FailFastFuture::Inner {
                future: self.inner.call(request),
            },
        }
    }
}

pin_project! {
    #[project = FailFastProj]
    enum FailFastFuture<F> {
        Inner { #[pin] future: F },
        Failed { error: Option<BoxError> },
    }
}

impl<F, T, E> Future for FailFastFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            FailFastProj::Inner { future } => future.poll(cx).map_err(Into::into),
            FailFastProj::Failed { error } => {
                Poll::Ready(Err(error.take().unwrap_or_else(|| Unavailable(()).into())))
            }
        }
    }
}

/// A balanced, cloneable service over a discovered set of endpoints. Errors are `BoxError`s you can downcast to
/// [`NoEndpoints`], [`Unavailable`] or the endpoint's own error.
pub type Balanced<Req, Res> = BoxCloneSyncService<Req, Res, BoxError>;

/// Balances requests over the instances `discovery` finds, making one endpoint service per instance with `make`:
/// power of two choices over peak-EWMA latency, behind a buffer, with fail-fast. Must be called inside a Tokio
/// runtime.
pub fn balance<Req, S, F>(
    discovery: Discovery,
    make: F,
    options: BalanceOptions,
) -> Balanced<Req, S::Response>
where
    Req: Send + 'static,
    F: Fn(&Instance) -> S + Send + 'static,
    S: Service<Req> + Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    let count = Arc::new(AtomicUsize::new(0));
    let endpoints = Endpoints {
        discovery,
        make,
        known: HashSet::new(),
        count: count.clone(),
    };
    let loaded = PeakEwmaDiscover::new::<Req>(
        Box::pin(endpoints),
        options.default_rtt,
        options.decay,
        CompleteOnResponse::default(),
    );
    let balancer = Balance::new(loaded);
    let failfast = FailFast {
        inner: balancer,
        count,
        timeout: options.failfast,
        sleep: None,
        failing: None,
    };
    let buffered = Buffer::new(failfast, options.buffer.max(1));
    BoxCloneSyncService::new(buffered.map_err(Into::into))
}

/// An endpoint for one instance: sends each request to the instance by rewriting the URI's scheme and authority
/// (the path and query are kept), through a shared client such as hyper-util's.
#[derive(Debug, Clone)]
pub struct HttpEndpoint<C> {
    client: C,
    scheme: Scheme,
    authority: Authority,
}

impl<C> HttpEndpoint<C> {
    /// An endpoint for `instance` using `client`. An instance whose host and port make no valid authority gets
    /// `localhost` instead (its requests then fail like any unreachable endpoint).
    pub fn new(client: C, instance: &Instance) -> Self {
        let authority = format!("{}:{}", instance.host, instance.port)
            .parse()
            .unwrap_or_else(|_| Authority::from_static("localhost"));
        let scheme = if instance.protocol.scheme() == "https" {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        Self {
            client,
            scheme,
            authority,
        }
    }
}

impl<C, B> Service<http::Request<B>> for HttpEndpoint<C>
where
    C: Service<http::Request<B>>,
{
    type Response = C::Response;
    type Error = C::Error;
    type Future = C::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.client.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        self.client.call(request)
    }
}
