//! Revalidate: our validators on the request to the origin, and a stored entry refreshed by its 304 (RFC 9111
//! §4.3), stored again unless the 304's fields forbid it.

use std::sync::Arc;

use http::HeaderMap;
use http::header::{CONTENT_LENGTH, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};

use crate::cache::FlightGuard;
use crate::entry::Entry;
use crate::policy;
use crate::stats::Event;

use super::respond::is_hop_by_hop;
use super::store::{publish, vary_spec};
use super::{Call, Exchange, Fetched};

impl Call {
    /// Puts `candidate`'s validators on the request to the origin, when it has any; returns the entry validated.
    pub(super) fn validate<'a>(
        &self,
        candidate: Option<&'a Entry>,
        request: &mut HeaderMap,
    ) -> Option<&'a Entry> {
        let entry = candidate.filter(|entry| policy::has_validators(&entry.facts))?;
        self.stats().bump(Event::Revalidations);
        if let Some(etag) = &entry.facts.etag {
            request.insert(IF_NONE_MATCH, etag.clone());
        }
        if let Some(modified) = entry.headers.get(LAST_MODIFIED) {
            request.insert(IF_MODIFIED_SINCE, modified.clone());
        }
        Some(entry)
    }

    /// The origin confirmed `entry` with a 304 (`head`): the entry with the 304's fields, stored again when they
    /// allow it.
    pub(super) fn revalidated<B, E>(
        &self,
        entry: &Entry,
        head: &http::response::Parts,
        exchange: &Exchange,
        key: &str,
        guard: Option<FlightGuard>,
        lock: Option<String>,
    ) -> Fetched<B, E> {
        let rules = &self.route.rules;
        self.stats().bump(Event::NotModified);
        let refreshed = Arc::new(Entry::new(
            entry.status,
            merge_headers(&entry.headers, &head.headers),
            entry.body.clone(),
            exchange.request_time,
            exchange.response_time,
            entry.selecting.clone(),
            &self.cache.inner.targets,
        ));
        // The 304's fields now describe the response: they may forbid storing it (a `Set-Cookie`, `private`,
        // `no-store`). This client still gets the updated response; nobody else will.
        let verdict = policy::storable(
            &exchange.request_headers,
            &exchange.request_cc,
            refreshed.status,
            &refreshed.headers,
            &refreshed.facts,
            rules,
            exchange.response_time,
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
        let vary = vary_spec(&policy::vary_names(&refreshed.headers).unwrap_or_default());
        let keep = policy::storage_ttl(&refreshed, rules, self.cache.now_ms());
        let tags = self.tags(key, &exchange.request_headers, head, &refreshed.headers);
        self.cache.store(key, &vary, &refreshed, keep, tags, lock);
        publish(guard.as_ref(), &refreshed);
        Fetched::Revalidated {
            entry: refreshed,
            stored: keep > 0,
            detail: None,
        }
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
