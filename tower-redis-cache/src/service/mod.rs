//! [`Cache`]: the request path, in its steps: [`lookup`] (the memory tier, the fill in flight here, Redis, another
//! instance's fill), [`fetch`] from the origin, [`revalidate`] a stored entry, [`store`] what may be stored,
//! [`respond`] (with [`range`] answering a range request from a stored 200). [`key`] computes a request's key;
//! [`write`](mod@write) handles the methods the cache never answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::CacheBody;
use crate::cache::HttpCache;
use crate::directives::CacheControl;
use crate::entry::{Entry, Facts};
use crate::policy::{Timing, Use};
use crate::route::Route;
use crate::stats::{Event, Tier};
use crate::status::{CacheStatus, Forward};

mod fetch;
mod key;
mod lookup;
mod range;
mod respond;
mod revalidate;
mod store;
mod write;

use store::publish;

/// The origin service as the request path needs it: it answers in the background too (refreshes, drains), so its
/// future and error are `Send + 'static`. Implemented for every such service.
pub(crate) trait Origin<ReqBody, ResBody>:
    Service<
        Request<ReqBody>,
        Response = Response<ResBody>,
        Future: Send + 'static,
        Error: Send + 'static,
    > + Send
    + 'static
{
}

impl<T, ReqBody, ResBody> Origin<ReqBody, ResBody> for T where
    T: Service<
            Request<ReqBody>,
            Response = Response<ResBody>,
            Future: Send + 'static,
            Error: Send + 'static,
        > + Send
        + 'static
{
}

/// The origin's response body as the cache needs it: it may be copied into the cache while it streams.
pub(crate) trait OriginBody: Body<Data: Buf + Send, Error: Send> + Send + 'static {}

impl<T> OriginBody for T where T: Body<Data: Buf + Send, Error: Send> + Send + 'static {}

/// The future of a [`Cache`] call.
pub type ResponseFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, E>> + Send>>;

/// Caches the responses of `S`; made by [`CacheLayer`](crate::CacheLayer).
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    cache: HttpCache,
    route: Arc<Route>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl<S> Cache<S> {
    pub(crate) fn new(inner: S, cache: HttpCache, route: Arc<Route>) -> Self {
        Self {
            inner,
            cache,
            route,
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Cache<S>
where
    // Named as well as implied by `Origin`, so that `ResBody` is constrained.
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Origin<ReqBody, ResBody> + Clone,
    ReqBody: Send + 'static,
    ResBody: OriginBody,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone takes the place of the service that was driven to readiness, which this call uses.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let call = Call {
            cache: self.cache.clone(),
            route: self.route.clone(),
        };
        Box::pin(async move {
            let mut response = call.run(inner, request).await?;
            // The target fields addressed to this cache go no further (RFC 9213): on hits, misses and passes alike.
            call.cache.inner.targets.strip(response.headers_mut());
            Ok(response)
        })
    }
}

/// One request's view of the cache and its route.
#[derive(Clone)]
struct Call {
    cache: HttpCache,
    route: Arc<Route>,
}

/// What asking the origin produced.
enum Fetched<B, E> {
    /// The origin confirmed the stored entry with a 304; the refreshed entry is stored again unless the 304's
    /// fields forbid it (`detail` says why).
    Revalidated {
        entry: Arc<Entry>,
        stored: bool,
        detail: Option<&'static str>,
    },
    /// A response to pass on, being copied into the cache when `stored`.
    Response {
        response: Box<Response<CacheBody<B>>>,
        stored: bool,
        detail: Option<&'static str>,
        facts: Facts,
    },
    /// The origin answered 5xx while a stale entry could stand in.
    ServerError(Response<B>),
    /// The origin call failed.
    Failed(E),
    /// The origin did not answer within the route's timeout.
    TimedOut,
}

/// What the cache knows of one exchange with the origin, for its storage decisions.
struct Exchange {
    /// The client's request fields (the origin got ours in place of its validators).
    request_headers: HeaderMap,
    request_cc: CacheControl,
    /// When the request went out and the response came back, by the cache's clock (ms since the epoch).
    request_time: u64,
    response_time: u64,
}

/// A stored entry a tier can answer a request with, and how.
struct Answer {
    entry: Arc<Entry>,
    tier: Tier,
    timing: Timing,
    /// `Fresh`, `StaleAllowed` or `StaleWhileRevalidate`.
    how: Use,
}

/// What the lookups found for a request they could not answer.
#[derive(Default)]
struct Found {
    /// A stored entry to revalidate.
    candidate: Option<Arc<Entry>>,
    /// The request's own directives asked for revalidation (Redis is then not asked either).
    by_request: bool,
    /// Other variants of the URL are stored, none for this request.
    vary_miss: bool,
    /// Redis could not be asked.
    redis_down: bool,
}

impl Found {
    /// The `Cache-Status` of the request forwarded to the origin.
    fn status(&self) -> CacheStatus {
        let forward = match (&self.candidate, self.by_request) {
            (Some(_), true) => Forward::Request,
            (Some(_), false) => Forward::Stale,
            (None, _) if self.vary_miss => Forward::VaryMiss,
            (None, _) => Forward::UriMiss,
        };
        let mut status = CacheStatus::forward(forward);
        if self.redis_down {
            status.detail = Some("redis-unavailable");
        }
        status
    }
}

/// What the memory lookup found.
enum Lookup {
    Answer(Answer),
    NotAnswered(Found),
}

impl Call {
    fn stats(&self) -> &crate::stats::Stats {
        &self.cache.inner.stats
    }

    fn status_header(&self, status: &CacheStatus) -> HeaderValue {
        status.header(&self.cache.inner.name)
    }

    /// The request path, in its steps: which requests the cache handles, lookup in memory, coalesce with the fill
    /// in flight, lookup in Redis, coalesce across instances, fetch from the origin (revalidating what is stored,
    /// and storing what may be stored), respond.
    async fn run<S, ReqBody, ResBody>(
        &self,
        service: S,
        request: Request<ReqBody>,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error>
    where
        S: Origin<ReqBody, ResBody> + Clone,
        ReqBody: Send + 'static,
        ResBody: OriginBody,
    {
        let method = request.method().clone();
        if method != Method::GET && method != Method::HEAD {
            return self.forward_method(service, request).await;
        }
        let (parts, body) = request.into_parts();
        let Some(key) = self.cache_key(&parts) else {
            self.stats().bump(Event::Bypassed);
            return self
                .pass(
                    service,
                    Request::from_parts(parts, body),
                    CacheStatus::forward(Forward::Bypass),
                )
                .await;
        };
        let request_cc = CacheControl::parse(&parts.headers, true);

        // 1. Lookup: the memory tier.
        let mut found = match self.lookup_memory(&key, &parts, &request_cc) {
            Lookup::Answer(answer) => {
                return Ok(self.answer(answer, service, parts, body, key, None));
            }
            Lookup::NotAnswered(found) => found,
        };
        // 2. Coalesce: join the fill in flight for this key, or lead one.
        let guard = match self.coalesce(&key, &parts, &request_cc).await {
            Ok(guard) => guard,
            Err(response) => return Ok(response),
        };
        // 3. Lookup: Redis, unless the request insists on the origin anyway.
        if let Some(answer) = self
            .lookup_redis(&key, &parts, &request_cc, &mut found)
            .await
        {
            publish(guard.as_ref(), &answer.entry);
            return Ok(self.answer(answer, service, parts, body, key, guard));
        }
        if request_cc.only_if_cached {
            return Ok(self.only_if_cached(found.candidate.is_some()));
        }
        // 4. Coalesce across instances: wait for another instance's fill instead of calling the origin too.
        let lock = match self
            .coalesce_across_instances(&key, &parts, &request_cc, &found, guard.as_ref())
            .await
        {
            Ok(lock) => lock,
            Err(response) => return Ok(response),
        };
        // 5. Fetch (and revalidate, and store): the origin.
        let status = found.status();
        if found.candidate.is_none() {
            self.stats().bump(Event::Misses);
        }
        let client = parts.clone();
        let fetched = self
            .fetch(
                service,
                parts,
                body,
                &key,
                found.candidate.as_deref(),
                guard,
                lock,
            )
            .await;
        // 6. Respond.
        self.respond(
            fetched,
            found.candidate.as_deref(),
            &client,
            &request_cc,
            status,
        )
    }
}
