//! Fetch: the call to the origin, revalidating a stored entry with its validators, and the background refresh.

use std::sync::Arc;

use bytes::Buf;
use http::header::{CONTENT_LENGTH, HeaderName, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use crate::body::{CacheBody, Recorder, drain};
use crate::cache::FlightGuard;
use crate::directives::CacheControl;
use crate::entry::{Entry, Facts};
use crate::policy;
use crate::stats::Event;
use crate::status::CacheStatus;

use super::respond::is_hop_by_hop;
use super::store::{Fill, publish};
use super::{Call, Fetched, Origin, OriginBody};

impl Call {
    /// Calls the origin for `key`, validating `candidate` when it has validators, and copies a storable answer
    /// into the cache.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fetch<S, ReqBody, ResBody>(
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

    pub(super) fn tags(
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
    pub(super) fn refresh<S, ReqBody, ResBody>(
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

    pub(super) async fn pass<S, ReqBody, ResBody>(
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
}

/// The stored headers updated from a 304 (RFC 9111 §3.2): its fields replace the stored ones of the same name,
/// except `Content-Length` and the hop-by-hop fields.
pub(super) fn merge_headers(stored: &HeaderMap, update: &HeaderMap) -> HeaderMap {
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

pub(super) fn vary_spec(headers: &HeaderMap) -> String {
    policy::vary_names(headers)
        .unwrap_or_default()
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(",")
}
