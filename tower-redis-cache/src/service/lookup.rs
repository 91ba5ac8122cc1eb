//! Lookup: the memory tier, the fill in flight in this process, Redis, and another instance's fill (under its lock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderMap, Response, StatusCode};

use crate::body::CacheBody;
use crate::cache::{Flight, FlightGuard};
use crate::directives::CacheControl;
use crate::entry::Entry;
use crate::policy::{self, Timing, Use};
use crate::stats::{Event, Tier};
use crate::status::{CacheStatus, Forward};

use super::store::publish;
use super::{Answer, Call, Found, Lookup};

impl Call {
    /// The key of a request the cache handles: `None` for one the route bypasses. A range request has the key of
    /// the whole response, which answers it.
    pub(super) fn cache_key(&self, parts: &Parts) -> Option<String> {
        if self
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
    pub(super) fn lookup_memory(
        &self,
        key: &str,
        parts: &Parts,
        request_cc: &CacheControl,
    ) -> Lookup {
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
    pub(super) async fn coalesce<B>(
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
    pub(super) async fn lookup_redis(
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
    pub(super) fn only_if_cached<B>(&self, stale: bool) -> Response<CacheBody<B>> {
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
    pub(super) async fn coalesce_across_instances<B>(
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

    /// Waits for another request's fill; `Some` when its entry answers this request too.
    pub(super) async fn wait<B>(
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
    pub(super) async fn await_other_instance(
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
}
