//! [`Cache`]: the request path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf;
use http::header::{
    AGE, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_LOCATION, DATE, ETAG, EXPIRES, HOST,
    HeaderName, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, LOCATION, RANGE,
    TRANSFER_ENCODING, UPGRADE, VARY,
};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use crate::body::{CacheBody, Recorder, Sink, drain};
use crate::cache::{Flight, FlightGuard, HttpCache};
use crate::directives::CacheControl;
use crate::entry::{Entry, Facts};
use crate::policy::{self, Timing, Use};
use crate::route::Route;
use crate::stats::{Event, Tier};
use crate::status::{CacheStatus, Forward};

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
        Box::pin(call.run(inner, request))
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
        self,
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

    /// The key of a request the cache handles: `None` for a range request or one the route bypasses.
    fn cache_key(&self, parts: &Parts) -> Option<String> {
        if parts.headers.contains_key(RANGE)
            || self
                .route
                .bypass
                .as_ref()
                .is_some_and(|bypass| bypass(parts))
        {
            return None;
        }
        self.key(parts)
    }

    /// Step 1: the memory tier answers, or leaves a candidate to revalidate.
    fn lookup_memory(&self, key: &str, parts: &Parts, request_cc: &CacheControl) -> Lookup {
        let rules = &self.route.rules;
        let mut found = Found::default();
        if self.cache.inner.memory.is_some() {
            self.stats().bump(Event::MemoryLookups);
        }
        if let Some(entry) = self.cache.memory_lookup(key, &parts.headers) {
            let timing = Timing::of(&entry, rules, self.cache.now_ms());
            match policy::evaluate(&entry, timing, request_cc, rules) {
                Use::Revalidate { by_request } => {
                    found.by_request = by_request;
                    found.candidate = Some(entry);
                }
                how => {
                    return Lookup::Answer(Answer {
                        entry,
                        tier: Tier::Memory,
                        timing,
                        how,
                    });
                }
            }
        }
        found.vary_miss = found.candidate.is_none() && self.cache.known_vary(key).is_some();
        Lookup::NotAnswered(found)
    }

    /// Step 2: leads the fill of `key` in this process (`Ok(Some)`), or waits for the one in flight, whose entry
    /// may answer this request too (`Err`); `Ok(None)` when the route does not coalesce or the wait did not help.
    async fn coalesce<B>(
        &self,
        key: &str,
        parts: &Parts,
        request_cc: &CacheControl,
    ) -> Result<Option<FlightGuard>, Response<CacheBody<B>>> {
        if !self.route.coalesce {
            return Ok(None);
        }
        match self.cache.flight(key) {
            Flight::Lead(lead) => Ok(Some(lead)),
            Flight::Wait(receiver) => match self.wait(receiver, parts, request_cc).await {
                Some(response) => Err(response),
                None => Ok(None),
            },
        }
    }

    /// Step 3: Redis answers, or its entry becomes the candidate when newer than memory's (`found` is updated).
    async fn lookup_redis(
        &self,
        key: &str,
        parts: &Parts,
        request_cc: &CacheControl,
        found: &mut Found,
    ) -> Option<Answer> {
        if found.by_request || self.cache.inner.redis.is_none() {
            return None;
        }
        let rules = &self.route.rules;
        self.stats().bump(Event::RedisLookups);
        match self.cache.redis_lookup(key, &parts.headers, rules).await {
            Ok(Some(entry)) => {
                let timing = Timing::of(&entry, rules, self.cache.now_ms());
                match policy::evaluate(&entry, timing, request_cc, rules) {
                    Use::Revalidate { .. } => {
                        let newer = found
                            .candidate
                            .as_ref()
                            .is_none_or(|memory| memory.response_time < entry.response_time);
                        if newer {
                            found.candidate = Some(entry);
                        }
                        None
                    }
                    how => Some(Answer {
                        entry,
                        tier: Tier::Redis,
                        timing,
                        how,
                    }),
                }
            }
            Ok(None) => None,
            Err(()) => {
                found.redis_down = true;
                None
            }
        }
    }

    /// The answer to an `only-if-cached` request nothing stored could answer: 504.
    fn only_if_cached<B>(&self, stale: bool) -> Response<CacheBody<B>> {
        let mut status = CacheStatus::forward(if stale {
            Forward::Stale
        } else {
            Forward::UriMiss
        });
        status.detail = Some("only-if-cached");
        let mut response = Response::new(CacheBody::default());
        *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
        response
            .headers_mut()
            .insert(crate::CACHE_STATUS, self.status_header(&status));
        response
    }

    /// Step 4: with a fill lock, the leader of a miss takes the lock (`Ok(Some(token))`), or waits for the
    /// instance holding it, whose entry then answers (`Err`). The lock fails open: `Ok(None)` goes to the origin.
    async fn coalesce_across_instances<B>(
        &self,
        key: &str,
        parts: &Parts,
        request_cc: &CacheControl,
        found: &Found,
        guard: Option<&FlightGuard>,
    ) -> Result<Option<String>, Response<CacheBody<B>>> {
        if found.candidate.is_some() || guard.is_none() || self.cache.inner.fill_lock.is_none() {
            return Ok(None);
        }
        let token = self.cache.token();
        match self.cache.lock(key, &token).await {
            Some(true) => Ok(Some(token)),
            Some(false) => {
                match self
                    .await_other_instance(key, &parts.headers, request_cc)
                    .await
                {
                    Some(entry) => {
                        publish(guard, &entry);
                        let timing = Timing::of(&entry, &self.route.rules, self.cache.now_ms());
                        self.stats().bump(Event::Collapsed);
                        Err(self.hit(&entry, Tier::Redis, parts, timing, true))
                    }
                    None => Ok(None),
                }
            }
            None => Ok(None),
        }
    }

    /// Serves what a tier found: fresh, stale within max-stale, or stale while one refresh runs in the background.
    fn answer<S, ReqBody, ResBody>(
        &self,
        answer: Answer,
        service: S,
        parts: Parts,
        body: ReqBody,
        key: String,
        guard: Option<FlightGuard>,
    ) -> Response<CacheBody<ResBody>>
    where
        S: Origin<ReqBody, ResBody>,
        ReqBody: Send + 'static,
        ResBody: OriginBody,
    {
        let Answer {
            entry,
            tier,
            timing,
            how,
        } = answer;
        match how {
            Use::StaleAllowed => self.stale(&entry, tier, &parts, timing, "max-stale"),
            Use::StaleWhileRevalidate => {
                let response = self.stale(&entry, tier, &parts, timing, "stale-while-revalidate");
                self.refresh(service, parts, body, key, entry, guard);
                response
            }
            Use::Fresh | Use::Revalidate { .. } => self.hit(&entry, tier, &parts, timing, false),
        }
    }

    /// Step 6: the response to the client, from what the origin did (or stale in place of its failure).
    fn respond<B, E>(
        &self,
        fetched: Fetched<B, E>,
        candidate: Option<&Entry>,
        client: &Parts,
        request_cc: &CacheControl,
        mut status: CacheStatus,
    ) -> Result<Response<CacheBody<B>>, E>
    where
        B: Body + Send + 'static,
        B::Data: Buf + Send,
        B::Error: Send,
    {
        let rules = &self.route.rules;
        match fetched {
            Fetched::Revalidated {
                entry,
                stored,
                detail,
            } => {
                status.fwd_status = Some(304);
                status.stored = stored;
                if status.detail.is_none() {
                    status.detail = detail;
                }
                let timing = Timing::of(&entry, rules, self.cache.now_ms());
                status.ttl = Some(timing.ttl_seconds());
                Ok(self.respond_from(&entry, client, timing, status))
            }
            Fetched::Response {
                response,
                stored,
                detail,
                facts,
            } => {
                let mut response = *response;
                status.fwd_status = Some(response.status().as_u16());
                status.stored = stored;
                if stored {
                    // As the origin sent it: its lifetime less its `Age` (the second-granular `Date` would
                    // otherwise take up to a second off a response that just arrived).
                    let timing = Timing {
                        age: facts.age.saturating_mul(1000),
                        lifetime: policy::freshness_lifetime(
                            response.status(),
                            &facts,
                            rules,
                            self.cache.now_ms(),
                        ),
                    };
                    status.ttl = Some(timing.ttl_seconds());
                }
                if status.detail.is_none() {
                    status.detail = detail;
                }
                if policy::not_modified(&client.headers, &client.method, response.status(), &facts)
                {
                    let (head, body) = response.into_parts();
                    if stored {
                        self.cache.spawn(drain(body));
                    }
                    let mut not_modified = not_modified_response(&head.headers);
                    not_modified
                        .headers_mut()
                        .append(crate::CACHE_STATUS, self.status_header(&status));
                    return Ok(not_modified);
                }
                if client.method == Method::HEAD {
                    response = strip_body(&self.cache, response, stored);
                }
                response
                    .headers_mut()
                    .append(crate::CACHE_STATUS, self.status_header(&status));
                Ok(response)
            }
            Fetched::ServerError(response) => {
                if let Some(stale) = self.stale_on_error(candidate, client, request_cc) {
                    return Ok(stale);
                }
                status.fwd_status = Some(response.status().as_u16());
                let mut response = response.map(CacheBody::stream);
                response
                    .headers_mut()
                    .append(crate::CACHE_STATUS, self.status_header(&status));
                Ok(response)
            }
            Fetched::Failed(error) => {
                if let Some(stale) = self.stale_on_error(candidate, client, request_cc) {
                    return Ok(stale);
                }
                Err(error)
            }
            Fetched::TimedOut => {
                if let Some(stale) = self.stale_on_error(candidate, client, request_cc) {
                    return Ok(stale);
                }
                status.detail = Some("origin-timeout");
                let mut response = Response::new(CacheBody::default());
                *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                response
                    .headers_mut()
                    .insert(crate::CACHE_STATUS, self.status_header(&status));
                Ok(response)
            }
        }
    }

    /// The stale entry in place of an origin failure, when stale-if-error allows it.
    fn stale_on_error<B>(
        &self,
        candidate: Option<&Entry>,
        parts: &Parts,
        request_cc: &CacheControl,
    ) -> Option<Response<CacheBody<B>>> {
        let entry = candidate?;
        let rules = &self.route.rules;
        let timing = Timing::of(entry, rules, self.cache.now_ms());
        policy::stale_if_error(entry, timing, request_cc, rules)
            .then(|| self.stale(entry, Tier::Memory, parts, timing, "stale-if-error"))
    }

    fn key(&self, parts: &Parts) -> Option<String> {
        match &self.route.key {
            Some(key) => key(parts),
            None => Some(default_key(parts)),
        }
    }

    /// Waits for another request's fill; `Some` when its entry answers this request too.
    async fn wait<B>(
        &self,
        mut receiver: tokio::sync::watch::Receiver<Option<Arc<Entry>>>,
        parts: &Parts,
        request_cc: &CacheControl,
    ) -> Option<Response<CacheBody<B>>> {
        let filled =
            tokio::time::timeout(self.route.coalesce_wait, receiver.wait_for(Option::is_some))
                .await;
        let entry = match filled {
            Ok(Ok(entry)) => entry.clone()?,
            // The leader gave up (not storable, an error, a cancelled request) or took too long: go ourselves.
            _ => return None,
        };
        if !policy::variant_matches(&entry, &parts.headers) {
            return None;
        }
        let timing = Timing::of(&entry, &self.route.rules, self.cache.now_ms());
        match policy::evaluate(&entry, timing, request_cc, &self.route.rules) {
            Use::Fresh => {
                self.stats().bump(Event::Collapsed);
                Some(self.hit(&entry, Tier::Memory, parts, timing, true))
            }
            Use::StaleAllowed | Use::StaleWhileRevalidate => {
                self.stats().bump(Event::Collapsed);
                Some(self.stale(
                    &entry,
                    Tier::Memory,
                    parts,
                    timing,
                    "stale-while-revalidate",
                ))
            }
            Use::Revalidate { .. } => None,
        }
    }

    /// Polls Redis for the entry another instance is filling, until that instance releases its lock or the lock
    /// would have expired.
    async fn await_other_instance(
        &self,
        key: &str,
        request: &HeaderMap,
        request_cc: &CacheControl,
    ) -> Option<Arc<Entry>> {
        let ttl = self.cache.inner.fill_lock?;
        let deadline = Instant::now() + ttl;
        let mut pause = Duration::from_millis(5);
        while Instant::now() < deadline {
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            match self
                .cache
                .redis_lookup(key, request, &self.route.rules)
                .await
            {
                Ok(Some(entry)) => {
                    let timing = Timing::of(&entry, &self.route.rules, self.cache.now_ms());
                    if matches!(
                        policy::evaluate(&entry, timing, request_cc, &self.route.rules),
                        Use::Fresh | Use::StaleAllowed
                    ) {
                        return Some(entry);
                    }
                }
                Ok(None) => {}
                // The lock fails open: Redis trouble sends us to the origin.
                Err(()) => return None,
            }
            // The holder released its lock without storing what this request needs (another variant, or a
            // response that was not storable): waiting longer cannot help.
            if !self.cache.locked(key).await {
                return None;
            }
        }
        None
    }

    /// Calls the origin for `key`, validating `candidate` when it has validators, and copies a storable answer
    /// into the cache.
    #[allow(clippy::too_many_arguments)]
    async fn fetch<S, ReqBody, ResBody>(
        &self,
        mut service: S,
        mut parts: Parts,
        body: ReqBody,
        key: &str,
        candidate: Option<&Entry>,
        guard: Option<FlightGuard>,
        lock: Option<String>,
    ) -> Fetched<ResBody, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body + Send + 'static,
        ResBody::Data: Buf + Send,
    {
        let rules = &self.route.rules;
        let request_headers = parts.headers.clone();
        let request_cc = CacheControl::parse(&request_headers, true);
        // The client's own validators are answered by the cache; the origin gets ours, so a 304 refreshes the entry.
        parts.headers.remove(IF_NONE_MATCH);
        parts.headers.remove(IF_MODIFIED_SINCE);
        let validating = candidate.filter(|entry| policy::has_validators(&entry.facts));
        if let Some(entry) = validating {
            self.stats().bump(Event::Revalidations);
            if let Some(etag) = &entry.facts.etag {
                parts.headers.insert(IF_NONE_MATCH, etag.clone());
            }
            if let Some(modified) = entry.headers.get(LAST_MODIFIED) {
                parts.headers.insert(IF_MODIFIED_SINCE, modified.clone());
            }
        }
        if parts.method == Method::HEAD {
            // A HEAD cannot fill the entry; ask for the GET the entry is stored from.
            parts.method = Method::GET;
        }
        let request_time = self.cache.now_ms();
        let call = service.call(Request::from_parts(parts, body));
        let result = match self.route.origin_timeout {
            Some(timeout) => match tokio::time::timeout(timeout, call).await {
                Ok(result) => result,
                Err(_) => {
                    self.stats().bump(Event::OriginErrors);
                    return Fetched::TimedOut;
                }
            },
            None => call.await,
        };
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                self.stats().bump(Event::OriginErrors);
                return Fetched::Failed(error);
            }
        };
        let response_time = self.cache.now_ms();
        let status = response.status();
        if status.is_server_error() {
            self.stats().bump(Event::OriginErrors);
            if candidate.is_some() {
                return Fetched::ServerError(response);
            }
        }
        if status == StatusCode::NOT_MODIFIED
            && let Some(entry) = validating
        {
            self.stats().bump(Event::NotModified);
            let (head, _) = response.into_parts();
            let refreshed = Arc::new(Entry::new(
                entry.status,
                merge_headers(&entry.headers, &head.headers),
                entry.body.clone(),
                request_time,
                response_time,
                entry.selecting.clone(),
            ));
            // The 304's fields now describe the response: they may forbid storing it (a `Set-Cookie`, `private`,
            // `no-store`). This client still gets the updated response; nobody else will.
            let verdict = policy::storable(
                &request_headers,
                &request_cc,
                refreshed.status,
                &refreshed.headers,
                &refreshed.facts,
                rules,
                response_time,
            );
            if let Err(reason) = verdict {
                self.stats().bump(Event::NotStored);
                drop(guard);
                return Fetched::Revalidated {
                    entry: refreshed,
                    stored: false,
                    detail: Some(reason),
                };
            }
            let vary = vary_spec(&refreshed.headers);
            let keep = policy::storage_ttl(&refreshed, rules, self.cache.now_ms());
            let tags = self.tags(key, &request_headers, &head, &refreshed.headers);
            self.cache.store(key, &vary, &refreshed, keep, tags, lock);
            publish(guard.as_ref(), &refreshed);
            return Fetched::Revalidated {
                entry: refreshed,
                stored: keep > 0,
                detail: None,
            };
        }

        let facts = Facts::read(response.headers());
        let verdict = policy::storable(
            &request_headers,
            &request_cc,
            status,
            response.headers(),
            &facts,
            rules,
            response_time,
        )
        .and_then(|_| {
            // Stale on arrival with nothing to revalidate or serve stale with: nothing worth keeping.
            let keep = policy::keep_for(
                status,
                &facts,
                rules,
                (request_time, response_time),
                self.cache.now_ms(),
            );
            if keep == 0 {
                Err("stale-on-arrival")
            } else {
                Ok(())
            }
        })
        .and_then(
            |()| match http_body::Body::size_hint(response.body()).upper() {
                Some(size) if size > self.route.max_body as u64 => Err("too-large"),
                _ => Ok(()),
            },
        );
        let (head, body) = response.into_parts();
        match verdict {
            Err(reason) => {
                self.stats().bump(Event::NotStored);
                // Dropping the guard now lets waiters go to the origin themselves; dropping the lock lets other
                // instances do the same.
                drop(guard);
                if let Some(token) = lock {
                    let cache = self.cache.clone();
                    let key = key.to_owned();
                    self.cache
                        .spawn(async move { cache.unlock(&key, &token).await });
                }
                Fetched::Response {
                    response: Box::new(Response::from_parts(head, CacheBody::stream(body))),
                    stored: false,
                    detail: Some(reason),
                    facts,
                }
            }
            Ok(()) => {
                let names = policy::vary_names(&head.headers).unwrap_or_default();
                let vary = names
                    .iter()
                    .map(HeaderName::as_str)
                    .collect::<Vec<_>>()
                    .join(",");
                let fill = Fill {
                    cache: self.cache.clone(),
                    key: key.to_owned(),
                    vary,
                    status,
                    headers: head.headers.clone(),
                    request_time,
                    response_time,
                    selecting: policy::selecting_headers(&request_headers, &names),
                    rules: rules.clone(),
                    tags: self.tags(key, &request_headers, &head, &head.headers),
                    guard,
                    lock,
                };
                let size_hint = http_body::Body::size_hint(&body).exact();
                let recorder = Recorder::new(self.route.max_body, size_hint, Box::new(fill));
                Fetched::Response {
                    response: Box::new(Response::from_parts(head, CacheBody::tee(body, recorder))),
                    stored: true,
                    detail: None,
                    facts,
                }
            }
        }
    }

    fn tags(
        &self,
        key: &str,
        request: &HeaderMap,
        head: &http::response::Parts,
        headers: &HeaderMap,
    ) -> Vec<String> {
        let mut tags = Vec::new();
        if let Some(name) = &self.route.tag_header {
            for line in headers.get_all(name) {
                if let Ok(line) = line.to_str() {
                    tags.extend(line.split_ascii_whitespace().map(str::to_owned));
                }
            }
        }
        if let Some(tag_fn) = &self.route.tags {
            // The tag function sees the request as the key was computed from it.
            let mut request_parts = Request::new(()).into_parts().0;
            request_parts.headers = request.clone();
            if let Ok(uri) = key.parse() {
                request_parts.uri = uri;
            }
            tags.extend(tag_fn(&request_parts, head));
        }
        tags.sort();
        tags.dedup();
        tags
    }

    /// Serves a stale entry in place of the origin and refreshes it in the background, once per key.
    fn refresh<S, ReqBody, ResBody>(
        &self,
        service: S,
        parts: Parts,
        body: ReqBody,
        key: String,
        entry: Arc<Entry>,
        guard: Option<FlightGuard>,
    ) where
        S: Origin<ReqBody, ResBody>,
        ReqBody: Send + 'static,
        ResBody: OriginBody,
    {
        let Some(guard) = guard.or_else(|| self.cache.try_lead(&key)) else {
            return; // Someone is already refreshing this key.
        };
        self.stats().bump(Event::BackgroundRefreshes);
        let call = self.clone();
        self.cache.spawn(async move {
            match call
                .fetch(service, parts, body, &key, Some(&entry), Some(guard), None)
                .await
            {
                Fetched::Response { response, .. } => drain(response.into_body()).await,
                Fetched::Revalidated { .. }
                | Fetched::ServerError(_)
                | Fetched::Failed(_)
                | Fetched::TimedOut => {}
            }
        });
    }

    /// Forwards a request that is never served from the cache. A successful unsafe method invalidates its URL and
    /// the URLs in its `Location` and `Content-Location` (RFC 9111 §4.4).
    async fn forward_method<S, ReqBody, ResBody>(
        self,
        mut service: S,
        request: Request<ReqBody>,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        self.stats().bump(Event::Bypassed);
        let safe = matches!(*request.method(), Method::OPTIONS | Method::TRACE);
        let (parts, body) = request.into_parts();
        if parts.method.as_str() == "PURGE"
            && let Some(authorize) = &self.route.purge
        {
            return Ok(self.purge(authorize(&parts), &parts).await);
        }
        let target = (!safe).then(|| (self.key(&as_get(&parts, None)), parts.clone()));
        let response = service.call(Request::from_parts(parts, body)).await?;
        if let Some((own, parts)) = target
            && (response.status().is_success() || response.status().is_redirection())
        {
            let mut keys: Vec<String> = own.into_iter().collect();
            for name in [LOCATION, CONTENT_LOCATION] {
                if let Some(location) = response
                    .headers()
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    && let Some(uri) = same_origin(&parts, location)
                    && let Some(key) = self.key(&as_get(&parts, Some(uri)))
                {
                    keys.push(key);
                }
            }
            self.invalidate_on_write(keys).await;
        }
        let mut response = response.map(CacheBody::stream);
        response.headers_mut().append(
            crate::CACHE_STATUS,
            self.status_header(&CacheStatus::forward(Forward::Method)),
        );
        Ok(response)
    }

    /// Clears memory now and Redis within its timeout (guarded by the breaker), then tells other instances.
    async fn invalidate_on_write(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let available = self
            .cache
            .inner
            .redis
            .as_ref()
            .is_none_or(|redis| redis.guard.breaker().state() != tower_breaker::State::Open);
        if available {
            let invalidate = self.cache.invalidate(&keys);
            match self
                .cache
                .inner
                .redis
                .as_ref()
                .map(|redis| redis.guard.timeout())
            {
                Some(timeout) => {
                    if let Ok(Err(error)) | Err(error) =
                        tokio::time::timeout(timeout * 2, invalidate)
                            .await
                            .map_err(|_| crate::InvalidateError::Timeout)
                    {
                        tracing::warn!(%error, "could not invalidate in Redis after a write");
                    }
                }
                None => {
                    let _ = invalidate.await;
                }
            }
        } else if let Some(memory) = &self.cache.inner.memory {
            for key in &keys {
                memory.remove(key);
            }
        }
    }

    async fn purge<B>(&self, authorized: bool, parts: &Parts) -> Response<CacheBody<B>> {
        let mut response = Response::new(CacheBody::default());
        let mut status = CacheStatus::forward(Forward::Method);
        if !authorized {
            *response.status_mut() = StatusCode::FORBIDDEN;
            status.detail = Some("purge-forbidden");
        } else if let Some(key) = self.key(&as_get(parts, None)) {
            match self.cache.invalidate(&[key]).await {
                Ok(_) => status.detail = Some("purged"),
                Err(error) => {
                    tracing::warn!(%error, "purge could not reach Redis; the memory tier was cleared");
                    status.detail = Some("purged-memory-only");
                }
            }
        }
        response
            .headers_mut()
            .insert(crate::CACHE_STATUS, self.status_header(&status));
        response
    }

    async fn pass<S, ReqBody, ResBody>(
        &self,
        mut service: S,
        request: Request<ReqBody>,
        status: CacheStatus,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        let mut response = service.call(request).await?.map(CacheBody::stream);
        response
            .headers_mut()
            .append(crate::CACHE_STATUS, self.status_header(&status));
        Ok(response)
    }

    fn hit<B>(
        &self,
        entry: &Entry,
        tier: Tier,
        parts: &Parts,
        timing: Timing,
        collapsed: bool,
    ) -> Response<CacheBody<B>> {
        self.cache.hit(tier);
        let mut status = CacheStatus::hit(timing.ttl_seconds());
        status.collapsed = collapsed;
        self.respond_from(entry, parts, timing, status)
    }

    fn stale<B>(
        &self,
        entry: &Entry,
        tier: Tier,
        parts: &Parts,
        timing: Timing,
        why: &'static str,
    ) -> Response<CacheBody<B>> {
        self.cache.hit(tier);
        self.stats().bump(Event::StaleServed);
        let status = CacheStatus::hit(timing.ttl_seconds()).detail(why);
        self.respond_from(entry, parts, timing, status)
    }

    fn respond_from<B>(
        &self,
        entry: &Entry,
        parts: &Parts,
        timing: Timing,
        status: CacheStatus,
    ) -> Response<CacheBody<B>> {
        let mut response =
            if policy::not_modified(&parts.headers, &parts.method, entry.status, &entry.facts) {
                not_modified_response(&entry.headers)
            } else {
                let mut response = Response::new(if parts.method == Method::HEAD {
                    CacheBody::default()
                } else {
                    CacheBody::full(entry.body.clone())
                });
                *response.status_mut() = entry.status;
                *response.headers_mut() = end_to_end(&entry.headers);
                response
            };
        let age = timing.age / 1000;
        response.headers_mut().insert(AGE, HeaderValue::from(age));
        response
            .headers_mut()
            .append(crate::CACHE_STATUS, self.status_header(&status));
        response
    }
}

fn publish(guard: Option<&FlightGuard>, entry: &Arc<Entry>) {
    if let Some(guard) = guard {
        guard.publish(entry.clone());
    }
}

/// The stored headers minus the hop-by-hop ones (and those `Connection` names), which belong to one connection.
fn end_to_end(stored: &HeaderMap) -> HeaderMap {
    let listed: Vec<HeaderName> = stored
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    // Room for the `Age` and `Cache-Status` added next, so they do not force a rehash.
    let mut headers = HeaderMap::with_capacity(stored.len() + 2);
    for (name, value) in stored {
        if !is_hop_by_hop(name) && !listed.contains(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == http::header::TE
        || name == http::header::TRAILER
        || name == http::header::PROXY_AUTHENTICATE
        || name == http::header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// A 304 carrying the fields RFC 9110 §15.4.5 asks for.
fn not_modified_response<B>(headers: &HeaderMap) -> Response<CacheBody<B>> {
    let mut response = Response::new(CacheBody::default());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    for name in [
        CACHE_CONTROL,
        CONTENT_LOCATION,
        DATE,
        ETAG,
        EXPIRES,
        VARY,
        LAST_MODIFIED,
    ] {
        for value in headers.get_all(&name) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    response
}

/// The stored headers updated from a 304 (RFC 9111 §3.2): its fields replace the stored ones of the same name,
/// except `Content-Length` and the hop-by-hop fields.
fn merge_headers(stored: &HeaderMap, update: &HeaderMap) -> HeaderMap {
    let mut merged = stored.clone();
    for name in update.keys() {
        if name == CONTENT_LENGTH || is_hop_by_hop(name) {
            continue;
        }
        merged.remove(name);
        for value in update.get_all(name) {
            merged.append(name.clone(), value.clone());
        }
    }
    merged
}

fn vary_spec(headers: &HeaderMap) -> String {
    policy::vary_names(headers)
        .unwrap_or_default()
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// A HEAD answered by the GET the origin was asked for: the body is not sent, but is still read into the cache.
fn strip_body<B>(
    cache: &HttpCache,
    response: Response<CacheBody<B>>,
    stored: bool,
) -> Response<CacheBody<B>>
where
    B: Body + Send + 'static,
    B::Data: Buf + Send,
    B::Error: Send,
{
    let (head, body) = response.into_parts();
    if stored {
        cache.spawn(drain(body));
    }
    Response::from_parts(head, CacheBody::default())
}

/// `scheme://authority/path?query`, with the authority from the URI or the `Host` header.
pub(crate) fn default_key(parts: &Parts) -> String {
    let scheme = parts.uri.scheme_str().unwrap_or("http");
    let authority = parts
        .uri
        .authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| parts.headers.get(HOST).and_then(|host| host.to_str().ok()))
        .unwrap_or("");
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let mut key = String::with_capacity(scheme.len() + 3 + authority.len() + path.len());
    key.push_str(scheme);
    key.push_str("://");
    key.extend(authority.chars().map(|c| c.to_ascii_lowercase()));
    key.push_str(path);
    key
}

/// The parts a GET for `uri` (or the request's own URI) would have, for computing its key.
fn as_get(parts: &Parts, uri: Option<http::Uri>) -> Parts {
    let mut get = Request::new(()).into_parts().0;
    get.method = Method::GET;
    get.uri = uri.unwrap_or_else(|| parts.uri.clone());
    get.headers = parts.headers.clone();
    get
}

/// `location` resolved against the request, when it names the same origin (RFC 9111 §4.4 forbids invalidating
/// other hosts' URLs).
fn same_origin(parts: &Parts, location: &str) -> Option<http::Uri> {
    if location.starts_with('/') && !location.starts_with("//") {
        let mut builder = http::Uri::builder();
        if let Some(scheme) = parts.uri.scheme() {
            builder = builder.scheme(scheme.clone());
        }
        if let Some(authority) = parts.uri.authority() {
            builder = builder.authority(authority.clone());
        }
        return builder.path_and_query(location).build().ok();
    }
    let uri: http::Uri = location.parse().ok()?;
    let own = parts
        .uri
        .authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| parts.headers.get(HOST).and_then(|host| host.to_str().ok()))?;
    let theirs = uri.authority()?.as_str();
    if !theirs.eq_ignore_ascii_case(own) {
        return None;
    }
    // Keep the path relative when the request was, so the key function sees what it would for a direct GET.
    if parts.uri.authority().is_none() {
        return uri
            .path_and_query()
            .and_then(|path| path.as_str().parse().ok());
    }
    Some(uri)
}

/// Copies a response into the cache once its body has streamed through.
struct Fill {
    cache: HttpCache,
    key: String,
    vary: String,
    status: StatusCode,
    headers: HeaderMap,
    request_time: u64,
    response_time: u64,
    selecting: Vec<(HeaderName, Option<HeaderValue>)>,
    rules: policy::Rules,
    tags: Vec<String>,
    guard: Option<FlightGuard>,
    lock: Option<String>,
}

impl Sink for Fill {
    fn complete(mut self: Box<Self>, body: bytes::Bytes) {
        let entry = Arc::new(Entry::new(
            self.status,
            std::mem::take(&mut self.headers),
            body,
            self.request_time,
            self.response_time,
            std::mem::take(&mut self.selecting),
        ));
        let keep = policy::storage_ttl(&entry, &self.rules, self.cache.now_ms());
        self.cache.store(
            &self.key,
            &self.vary,
            &entry,
            keep,
            std::mem::take(&mut self.tags),
            self.lock.take(),
        );
        publish(self.guard.as_ref(), &entry);
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        // A fill that never completed releases the other instances at once instead of at the lock's expiry.
        if let Some(token) = self.lock.take() {
            let cache = self.cache.clone();
            let key = std::mem::take(&mut self.key);
            self.cache
                .spawn(async move { cache.unlock(&key, &token).await });
        }
    }
}
