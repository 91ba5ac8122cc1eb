//! Store: which responses may be stored, their tags, and the copy into both tiers once the body has streamed
//! through, handed to the requests waiting on it.

use std::sync::Arc;

use bytes::Buf;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;

use crate::body::{CacheBody, Recorder, Sink};
use crate::cache::{FlightGuard, HttpCache};
use crate::entry::{Entry, Facts};
use crate::policy;
use crate::stats::Event;

use super::{Call, Exchange, Fetched};

impl Call {
    /// Decides whether the origin's `response` may be stored; when it may, its body is copied into the cache as
    /// it streams to the client. Otherwise the waiters and other instances are released at once.
    pub(super) fn store<B, E>(
        &self,
        response: Response<B>,
        exchange: &Exchange,
        key: &str,
        guard: Option<FlightGuard>,
        lock: Option<String>,
    ) -> Fetched<B, E>
    where
        B: Body + Send + 'static,
        B::Data: Buf + Send,
    {
        let rules = &self.route.rules;
        let status = response.status();
        let facts = Facts::read(response.headers(), &self.cache.inner.targets);
        let verdict = policy::storable(
            &exchange.request_headers,
            &exchange.request_cc,
            status,
            response.headers(),
            &facts,
            rules,
            exchange.response_time,
        )
        .and_then(|_| {
            // Stale on arrival with nothing to revalidate or serve stale with: nothing worth keeping.
            let keep = policy::keep_for(
                status,
                &facts,
                rules,
                (exchange.request_time, exchange.response_time),
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
                let fill = Fill {
                    cache: self.cache.clone(),
                    key: key.to_owned(),
                    vary: vary_spec(&names),
                    status,
                    headers: head.headers.clone(),
                    request_time: exchange.request_time,
                    response_time: exchange.response_time,
                    selecting: policy::selecting_headers(&exchange.request_headers, &names),
                    rules: rules.clone(),
                    tags: self.tags(key, &exchange.request_headers, &head, &head.headers),
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

    /// The entry's tags: the route's tag header's words, and what its tag function gives.
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
}

/// The names a response varies on (from [`policy::vary_names`]), as the entry's variants are keyed in Redis.
pub(super) fn vary_spec(names: &[HeaderName]) -> String {
    names
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// Hands a stored entry to the requests waiting on this fill.
pub(super) fn publish(guard: Option<&FlightGuard>, entry: &Arc<Entry>) {
    if let Some(guard) = guard {
        guard.publish(entry.clone());
    }
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
            &self.cache.inner.targets,
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
