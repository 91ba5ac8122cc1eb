//! Respond: the response a client gets, from a stored entry or the origin's, with `Age` and `Cache-Status`.

use bytes::Buf;
use http::header::{
    AGE, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_LOCATION, CONTENT_RANGE, DATE, ETAG,
    EXPIRES, HeaderName, HeaderValue, LAST_MODIFIED, TRANSFER_ENCODING, UPGRADE, VARY,
};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body::Body;

use crate::body::{CacheBody, drain};
use crate::cache::{FlightGuard, HttpCache};
use crate::directives::CacheControl;
use crate::entry::Entry;
use crate::policy::{self, Disconnected, Timing, Use};

use super::range::{self, Ranged};
use crate::stats::{Event, Tier};
use crate::status::CacheStatus;

use super::{Answer, Call, Fetched, Origin, OriginBody};

impl Call {
    /// Serves what a tier found: fresh, stale within max-stale, or stale while one refresh runs in the background.
    pub(super) fn answer<S, ReqBody, ResBody>(
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
    pub(super) fn respond<B, E>(
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
                match self.disconnected(candidate, client, request_cc, status, "origin-unreachable")
                {
                    Some(response) => Ok(response),
                    None => Err(error),
                }
            }
            Fetched::TimedOut => {
                if let Some(response) =
                    self.disconnected(candidate, client, request_cc, status, "origin-timeout")
                {
                    return Ok(response);
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
    pub(super) fn stale_on_error<B>(
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

    /// What answers in place of an origin that could not be reached (`why` says how: unreachable or timed out):
    /// the stale entry where stale-if-error or the route's bound allows it, a 504 where the entry's directives
    /// forbid serving it stale (RFC 9111 §4.2.4), and `None` (the origin's failure goes on) without an entry or
    /// when it is too stale.
    fn disconnected<B>(
        &self,
        candidate: Option<&Entry>,
        parts: &Parts,
        request_cc: &CacheControl,
        mut status: CacheStatus,
        why: &'static str,
    ) -> Option<Response<CacheBody<B>>> {
        let entry = candidate?;
        let rules = &self.route.rules;
        let timing = Timing::of(entry, rules, self.cache.now_ms());
        match policy::disconnected(entry, timing, request_cc, rules) {
            Disconnected::StaleIfError => {
                Some(self.stale(entry, Tier::Memory, parts, timing, "stale-if-error"))
            }
            Disconnected::Unreachable => Some(self.stale(entry, Tier::Memory, parts, timing, why)),
            Disconnected::Forbidden(directive) => {
                status.detail = Some(directive);
                let mut response = Response::new(CacheBody::default());
                *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                response
                    .headers_mut()
                    .insert(crate::CACHE_STATUS, self.status_header(&status));
                Some(response)
            }
            Disconnected::TooStale => None,
        }
    }

    pub(super) fn hit<B>(
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

    pub(super) fn stale<B>(
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

    pub(super) fn respond_from<B>(
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
                match range::select(&parts.headers, &parts.method, entry) {
                    Ranged::Whole => {
                        let mut response = Response::new(if parts.method == Method::HEAD {
                            CacheBody::default()
                        } else {
                            CacheBody::full(entry.body.clone())
                        });
                        *response.status_mut() = entry.status;
                        *response.headers_mut() = end_to_end(&entry.headers);
                        response
                    }
                    Ranged::Partial { first, last } => partial(entry, first, last),
                    Ranged::Unsatisfiable => {
                        let mut response = Response::new(CacheBody::default());
                        *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                        // Digits and ASCII only, so the conversion cannot fail.
                        if let Ok(value) =
                            HeaderValue::try_from(format!("bytes */{}", entry.body.len()))
                        {
                            response.headers_mut().insert(CONTENT_RANGE, value);
                        }
                        response
                    }
                }
            };
        let age = timing.age / 1000;
        response.headers_mut().insert(AGE, HeaderValue::from(age));
        response
            .headers_mut()
            .append(crate::CACHE_STATUS, self.status_header(&status));
        response
    }
}

/// The bytes `first..=last` of a stored 200 as a 206: its end-to-end headers, the range's `Content-Range` and
/// `Content-Length`.
fn partial<B>(entry: &Entry, first: u64, last: u64) -> Response<CacheBody<B>> {
    let length = entry.body.len();
    // `select` only gives ranges inside the body; clamp anyway, so no index can pass its end.
    let start = usize::try_from(first).unwrap_or(length).min(length);
    let end = usize::try_from(last)
        .map_or(length, |last| last.saturating_add(1))
        .min(length);
    let body = entry.body.slice(start..end.max(start));
    let mut headers = end_to_end(&entry.headers);
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    if let Ok(value) = HeaderValue::try_from(format!("bytes {first}-{last}/{length}")) {
        headers.insert(CONTENT_RANGE, value);
    }
    let mut response = Response::new(CacheBody::full(body));
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    *response.headers_mut() = headers;
    response
}

/// The stored headers minus the hop-by-hop ones (and those `Connection` names), which belong to one connection.
pub(super) fn end_to_end(stored: &HeaderMap) -> HeaderMap {
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

pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
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
pub(super) fn not_modified_response<B>(headers: &HeaderMap) -> Response<CacheBody<B>> {
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

/// A HEAD answered by the GET the origin was asked for: the body is not sent, but is still read into the cache.
pub(super) fn strip_body<B>(
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
