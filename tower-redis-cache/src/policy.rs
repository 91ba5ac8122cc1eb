//! RFC 9111 shared-cache decisions: what may be stored, for how long it is fresh, its age, and whether a stored
//! response satisfies a request.

use std::time::Duration;

use http::header::{
    AUTHORIZATION, HeaderName, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, SET_COOKIE, VARY,
};
use http::{HeaderMap, Method, StatusCode};

use crate::directives::{CacheControl, Seconds, split_list};
use crate::entry::{Entry, Facts, http_date};

/// How responses without explicit freshness are treated, and the other per-route choices the policy reads.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// A lifetime for storable responses that carry no freshness information.
    pub(crate) default_ttl: Option<Duration>,
    /// A lifetime that replaces whatever the response says (except that `no-cache` stays zero).
    pub(crate) ttl_override: Option<Duration>,
    /// Heuristic freshness from `Last-Modified` (10 % of its age, capped).
    pub(crate) heuristic: Option<Duration>,
    /// Store responses that set cookies.
    pub(crate) allow_set_cookie: bool,
    /// stale-while-revalidate when the response gives none.
    pub(crate) stale_while_revalidate: Option<Duration>,
    /// stale-if-error when the response gives none.
    pub(crate) stale_if_error: Option<Duration>,
    /// How long an entry with validators is kept past its freshness, for revalidation.
    pub(crate) keep_for_revalidation: Duration,
    /// The most staleness a stored response may have to stand in for an unreachable origin (RFC 9111 §4.2.4);
    /// zero turns it off.
    pub(crate) stale_if_unreachable: Duration,
}

/// The default of [`Rules::stale_if_unreachable`]: ten minutes, as long as entries with validators are already
/// kept for revalidation.
pub(crate) const STALE_IF_UNREACHABLE: Duration = Duration::from_secs(600);

impl Default for Rules {
    fn default() -> Self {
        Self {
            default_ttl: None,
            ttl_override: None,
            heuristic: None,
            allow_set_cookie: false,
            stale_while_revalidate: None,
            stale_if_error: None,
            keep_for_revalidation: Duration::from_secs(600),
            stale_if_unreachable: STALE_IF_UNREACHABLE,
        }
    }
}

/// Status codes a cache may reuse without explicit freshness (RFC 9110 §15.1), minus 206: a partial response is
/// never stored as if it were complete (ranges are answered from a stored 200).
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Why a response is not stored (the `detail` of `Cache-Status`).
pub(crate) type NotStored = &'static str;

/// Whether the response to a GET may be stored, and its freshness lifetime in ms when it may.
pub(crate) fn storable(
    request: &HeaderMap,
    request_cc: &CacheControl,
    status: StatusCode,
    response: &HeaderMap,
    facts: &Facts,
    rules: &Rules,
    response_time: u64,
) -> Result<u64, NotStored> {
    let cc = &facts.cc;
    if request_cc.no_store {
        return Err("request-no-store");
    }
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Err("status");
    }
    if cc.no_store {
        return Err("no-store");
    }
    if cc.private {
        return Err("private");
    }
    if request.contains_key(AUTHORIZATION)
        && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate)
    {
        return Err("authorization");
    }
    if response.contains_key(SET_COOKIE) && !rules.allow_set_cookie {
        return Err("set-cookie");
    }
    if vary_names(response).is_err() {
        return Err("vary-star");
    }
    if response.len() > usize::from(crate::entry::MAX_HEADERS) {
        // It would be written, then read back as a miss every time.
        return Err("too-many-headers");
    }
    let explicit = cc.s_maxage.is_some() || cc.max_age.is_some() || facts.expires.is_some();
    let lifetime = freshness_lifetime(status, facts, rules, response_time);
    let configured = rules.ttl_override.is_some()
        || (heuristically_cacheable(status)
            && (rules.default_ttl.is_some() || rules.heuristic.is_some()));
    if explicit || configured {
        return Ok(lifetime);
    }
    // Without a lifetime, a no-cache or public response is still worth storing when it can be revalidated: every
    // reuse asks the origin first, and a 304 saves the body.
    if (cc.no_cache || cc.public) && heuristically_cacheable(status) && has_validators(facts) {
        return Ok(0);
    }
    Err("no-freshness")
}

pub(crate) fn has_validators(facts: &Facts) -> bool {
    facts.etag.is_some() || facts.last_modified.is_some()
}

/// The freshness lifetime in ms (RFC 9111 §4.2.1), with the route's configuration applied.
pub(crate) fn freshness_lifetime(
    status: StatusCode,
    facts: &Facts,
    rules: &Rules,
    response_time: u64,
) -> u64 {
    let cc = &facts.cc;
    if cc.no_cache {
        return 0;
    }
    if let Some(ttl) = rules.ttl_override {
        return millis(ttl);
    }
    if let Some(seconds) = cc.s_maxage {
        return seconds.or(0).saturating_mul(1000);
    }
    if let Some(seconds) = cc.max_age {
        return seconds.or(0).saturating_mul(1000);
    }
    if let Some(expires) = facts.expires {
        let date = facts.date.unwrap_or(response_time);
        return expires.map_or(0, |expires| expires.saturating_sub(date));
    }
    if !heuristically_cacheable(status) {
        return 0;
    }
    if let (Some(cap), Some(last_modified)) = (rules.heuristic, facts.last_modified) {
        let date = facts.date.unwrap_or(response_time);
        return (date.saturating_sub(last_modified) / 10).min(millis(cap));
    }
    rules.default_ttl.map_or(0, millis)
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The current age in ms (RFC 9111 §4.2.3).
pub(crate) fn current_age(entry: &Entry, now: u64) -> u64 {
    age_at(&entry.facts, entry.request_time, entry.response_time, now)
}

/// The age at `now` of a response with these facts, requested at `request_time` and received at `response_time`.
pub(crate) fn age_at(facts: &Facts, request_time: u64, response_time: u64, now: u64) -> u64 {
    let date = facts.date.unwrap_or(response_time);
    let apparent_age = response_time.saturating_sub(date);
    let response_delay = response_time.saturating_sub(request_time);
    let corrected_age_value = facts
        .age
        .saturating_mul(1000)
        .saturating_add(response_delay);
    let corrected_initial_age = apparent_age.max(corrected_age_value);
    let resident_time = now.saturating_sub(response_time);
    corrected_initial_age.saturating_add(resident_time)
}

/// How a stored response may be used for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// Fresh enough for this request.
    Fresh,
    /// Stale, but the request's max-stale accepts it.
    StaleAllowed,
    /// Stale within stale-while-revalidate: serve it and refresh in the background.
    StaleWhileRevalidate,
    /// Must be validated with the origin first. `by_request` when the request's directives asked for it.
    Revalidate { by_request: bool },
}

/// What a stored entry's timing looks like now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) age: u64,
    pub(crate) lifetime: u64,
}

impl Timing {
    pub(crate) fn of(entry: &Entry, rules: &Rules, now: u64) -> Self {
        let mut lifetime =
            freshness_lifetime(entry.status, &entry.facts, rules, entry.response_time);
        if let Some(purged_at) = entry.purged_at {
            // Soft-purged: its freshness ended when the purge came (it is as stale as the time since).
            lifetime = lifetime.min(current_age(entry, purged_at));
        }
        Self {
            age: current_age(entry, now),
            lifetime,
        }
    }

    pub(crate) fn staleness(self) -> u64 {
        self.age.saturating_sub(self.lifetime)
    }

    /// Remaining freshness in whole seconds, rounded down, so negative as soon as it is stale (`Cache-Status:
    /// ttl`, RFC 9211 §2.5).
    pub(crate) fn ttl_seconds(self) -> i64 {
        let lifetime = i64::try_from(self.lifetime).unwrap_or(i64::MAX);
        let age = i64::try_from(self.age).unwrap_or(i64::MAX);
        let remaining = lifetime.saturating_sub(age).div_euclid(1000);
        // Stale from the moment the age reaches the lifetime (fresh only while lifetime > age); a response with no
        // lifetime at all (no-cache) reports 0.
        if age >= lifetime && lifetime > 0 {
            remaining.min(-1)
        } else {
            remaining
        }
    }
}

/// Whether serving stale is forbidden without revalidation (must-revalidate, proxy-revalidate, s-maxage).
pub(crate) fn must_revalidate(facts: &Facts) -> bool {
    let cc = &facts.cc;
    cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some()
}

pub(crate) fn evaluate(
    entry: &Entry,
    timing: Timing,
    request_cc: &CacheControl,
    rules: &Rules,
) -> Use {
    if request_cc.no_cache {
        return Use::Revalidate { by_request: true };
    }
    // `max-age=0` is how clients ask for revalidation (a reload), even for a response stored this millisecond.
    if let Some(max_age) = request_cc.max_age
        && (timing.age > max_age.or(0).saturating_mul(1000) || max_age.or(0) == 0)
    {
        return Use::Revalidate { by_request: true };
    }
    if timing.age < timing.lifetime {
        let left = timing.lifetime - timing.age;
        match request_cc.min_fresh {
            Some(min_fresh) if left < min_fresh.or(u64::MAX / 1000).saturating_mul(1000) => {
                return Use::Revalidate { by_request: true };
            }
            _ => return Use::Fresh,
        }
    }
    if entry.facts.cc.no_cache && timing.lifetime == 0 {
        return Use::Revalidate { by_request: false };
    }
    if must_revalidate(&entry.facts) {
        return Use::Revalidate { by_request: false };
    }
    let staleness = timing.staleness();
    match request_cc.max_stale {
        Some(None) => return Use::StaleAllowed,
        Some(Some(Seconds::Valid(seconds))) if staleness <= seconds.saturating_mul(1000) => {
            return Use::StaleAllowed;
        }
        _ => {}
    }
    let stale_while_revalidate = window(
        entry.facts.cc.stale_while_revalidate,
        rules.stale_while_revalidate,
    );
    // No window, no stale serving: not even in the millisecond the entry expires (or is soft-purged).
    if stale_while_revalidate > 0 && staleness <= stale_while_revalidate {
        return Use::StaleWhileRevalidate;
    }
    Use::Revalidate { by_request: false }
}

/// Whether a stale entry may answer in place of an origin error (stale-if-error from the response, the request
/// or the configuration).
pub(crate) fn stale_if_error(
    entry: &Entry,
    timing: Timing,
    request_cc: &CacheControl,
    rules: &Rules,
) -> bool {
    if forbids_stale(&entry.facts).is_some() {
        return false;
    }
    let allowed = window(entry.facts.cc.stale_if_error, rules.stale_if_error)
        .max(window(request_cc.stale_if_error, None));
    timing.staleness() <= allowed && allowed > 0
}

/// What a stale entry may do when the origin cannot be reached (refused, reset, closed before answering, timed
/// out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disconnected {
    /// Stand in, as stale-if-error allows.
    StaleIfError,
    /// Stand in, within the route's bound for an unreachable origin.
    Unreachable,
    /// Never: the named response directive forbids serving it stale (RFC 9111 §4.2.4), so the answer is a 504.
    Forbidden(&'static str),
    /// Too stale for either.
    TooStale,
}

/// Whether a stored entry may answer in place of an unreachable origin, and why.
pub(crate) fn disconnected(
    entry: &Entry,
    timing: Timing,
    request_cc: &CacheControl,
    rules: &Rules,
) -> Disconnected {
    if let Some(directive) = forbids_stale(&entry.facts) {
        return Disconnected::Forbidden(directive);
    }
    if stale_if_error(entry, timing, request_cc, rules) {
        return Disconnected::StaleIfError;
    }
    let bound = millis(rules.stale_if_unreachable);
    if bound > 0 && timing.staleness() <= bound {
        Disconnected::Unreachable
    } else {
        Disconnected::TooStale
    }
}

/// The response directive that forbids serving this response stale without revalidation, if any.
fn forbids_stale(facts: &Facts) -> Option<&'static str> {
    let cc = &facts.cc;
    if cc.must_revalidate {
        Some("must-revalidate")
    } else if cc.proxy_revalidate {
        Some("proxy-revalidate")
    } else if cc.s_maxage.is_some() {
        Some("s-maxage")
    } else if cc.no_cache {
        Some("no-cache")
    } else {
        None
    }
}

fn window(directive: Option<Seconds>, configured: Option<Duration>) -> u64 {
    match directive {
        Some(Seconds::Valid(seconds)) => seconds.saturating_mul(1000),
        Some(Seconds::Invalid) => 0,
        None => configured.map_or(0, millis),
    }
}

/// How long, in ms from now, an entry should be kept in the tiers: its freshness plus what it may still be used for
/// once stale.
pub(crate) fn storage_ttl(entry: &Entry, rules: &Rules, now: u64) -> u64 {
    keep_for(
        entry.status,
        &entry.facts,
        rules,
        (entry.request_time, entry.response_time),
        now,
    )
}

/// [`storage_ttl`] for a response not yet made into an entry; `times` are its request and response times.
pub(crate) fn keep_for(
    status: StatusCode,
    facts: &Facts,
    rules: &Rules,
    times: (u64, u64),
    now: u64,
) -> u64 {
    let timing = Timing {
        age: age_at(facts, times.0, times.1, now),
        lifetime: freshness_lifetime(status, facts, rules, times.1),
    };
    let remaining = timing.lifetime.saturating_sub(timing.age);
    let cc = &facts.cc;
    let mut extra = if forbids_stale(facts).is_some() {
        0
    } else {
        window(cc.stale_while_revalidate, rules.stale_while_revalidate)
            .max(window(cc.stale_if_error, rules.stale_if_error))
    };
    // Kept to stand in for an unreachable origin, unless it arrived stale: such an entry would be written on every
    // request only for outages.
    if remaining > 0 && forbids_stale(facts).is_none() {
        extra = extra.max(millis(rules.stale_if_unreachable));
    }
    if has_validators(facts) {
        extra = extra.max(millis(rules.keep_for_revalidation));
    }
    remaining.saturating_add(extra)
}

/// The header names a response's `Vary` lists, lowercased, in order, without repeats; `Err` for `Vary: *`.
pub(crate) fn vary_names(response: &HeaderMap) -> Result<Vec<HeaderName>, ()> {
    let mut names: Vec<HeaderName> = Vec::new();
    for line in response.get_all(VARY) {
        let Ok(line) = line.to_str() else {
            return Err(());
        };
        for item in split_list(line) {
            if item == "*" {
                return Err(());
            }
            // A name that is not a valid field name can never match a request: treat it like `*`.
            let name = HeaderName::from_bytes(item.as_bytes()).map_err(|_| ())?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
}

/// A request's value of a selecting header: its lines joined, with the whitespace around commas normalised.
pub(crate) fn selecting_value(request: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut lines = request.get_all(name).iter();
    let first = lines.next()?;
    let mut joined: Vec<u8> = Vec::with_capacity(first.len());
    for line in std::iter::once(first).chain(lines) {
        for part in line.as_bytes().split(|byte| *byte == b',') {
            let part = part.trim_ascii();
            if !part.is_empty() {
                if !joined.is_empty() {
                    joined.push(b',');
                }
                joined.extend_from_slice(part);
            }
        }
    }
    HeaderValue::from_bytes(&joined).ok()
}

pub(crate) fn selecting_headers(
    request: &HeaderMap,
    names: &[HeaderName],
) -> Vec<(HeaderName, Option<HeaderValue>)> {
    names
        .iter()
        .map(|name| (name.clone(), selecting_value(request, name)))
        .collect()
}

/// Whether `entry` was produced for a request that selects the same variant as `request` (RFC 9111 §4.1).
pub(crate) fn variant_matches(entry: &Entry, request: &HeaderMap) -> bool {
    entry
        .selecting
        .iter()
        .all(|(name, value)| selecting_value(request, name).as_ref() == value.as_ref())
}

/// Whether the client's conditional headers are satisfied by this stored 200 response (RFC 9110 §13.2.2: a
/// `304 Not Modified` answers it).
pub(crate) fn not_modified(
    request: &HeaderMap,
    method: &Method,
    status: StatusCode,
    facts: &Facts,
) -> bool {
    if status != StatusCode::OK || !(method == Method::GET || method == Method::HEAD) {
        return false;
    }
    let mut if_none_match = request.get_all(IF_NONE_MATCH).iter().peekable();
    if if_none_match.peek().is_some() {
        let Some(etag) = facts.etag.as_ref().and_then(|etag| etag.to_str().ok()) else {
            return false;
        };
        let ours = weak_opaque(etag);
        return if_none_match.any(|line| {
            line.to_str().is_ok_and(|line| {
                split_list(line).any(|tag| tag == "*" || weak_opaque(tag) == ours)
            })
        });
    }
    match (
        request.get(IF_MODIFIED_SINCE).and_then(http_date),
        facts.last_modified,
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// The opaque part of an entity tag, for weak comparison.
fn weak_opaque(tag: &str) -> &str {
    let tag = tag.trim();
    tag.strip_prefix("W/").unwrap_or(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directives::Targets;
    use bytes::Bytes;

    fn entry(lines: &[(&str, &str)], request_time: u64, response_time: u64) -> Entry {
        let mut headers = HeaderMap::new();
        for (name, value) in lines {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        Entry::new(
            StatusCode::OK,
            headers,
            Bytes::new(),
            request_time,
            response_time,
            Vec::new(),
            &Targets::default(),
        )
    }

    fn check(lines: &[(&str, &str)], request: &[(&str, &str)]) -> Result<u64, NotStored> {
        let e = entry(lines, 0, 0);
        let mut req = HeaderMap::new();
        for (name, value) in request {
            req.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let request_cc = CacheControl::parse(&req, true);
        storable(
            &req,
            &request_cc,
            e.status,
            &e.headers,
            &e.facts,
            &Rules::default(),
            0,
        )
    }

    #[test]
    fn stores_only_with_freshness_and_never_private_no_store_cookies_or_authorized() {
        assert_eq!(check(&[("cache-control", "max-age=60")], &[]), Ok(60_000));
        assert_eq!(
            check(&[("cache-control", "max-age=60, s-maxage=5")], &[]),
            Ok(5_000)
        );
        assert_eq!(check(&[], &[]), Err("no-freshness"));
        assert_eq!(
            check(&[("cache-control", "private, max-age=60")], &[]),
            Err("private")
        );
        assert_eq!(
            check(&[("cache-control", "no-store, max-age=60")], &[]),
            Err("no-store")
        );
        assert_eq!(
            check(
                &[("cache-control", "max-age=60")],
                &[("cache-control", "no-store")]
            ),
            Err("request-no-store")
        );
        assert_eq!(
            check(
                &[
                    ("cache-control", "public, max-age=60"),
                    ("set-cookie", "a=b")
                ],
                &[]
            ),
            Err("set-cookie")
        );
        assert_eq!(
            check(
                &[("cache-control", "max-age=60")],
                &[("authorization", "Bearer x")]
            ),
            Err("authorization")
        );
        assert_eq!(
            check(
                &[("cache-control", "max-age=60, public")],
                &[("authorization", "Bearer x")]
            ),
            Ok(60_000)
        );
        assert_eq!(
            check(&[("cache-control", "max-age=60"), ("vary", "*")], &[]),
            Err("vary-star")
        );
        let mut lines = vec![("cache-control", "max-age=60")];
        lines.resize(usize::from(crate::entry::MAX_HEADERS), ("x-a", "1"));
        assert_eq!(check(&lines, &[]), Ok(60_000));
        lines.push(("x-a", "1"));
        assert_eq!(check(&lines, &[]), Err("too-many-headers"));
        assert_eq!(
            check(&[("cache-control", "no-cache"), ("etag", "\"a\"")], &[]),
            Ok(0)
        );
        assert_eq!(
            check(&[("cache-control", "no-cache")], &[]),
            Err("no-freshness")
        );
    }

    #[test]
    fn expires_counts_from_date_and_invalid_expires_is_already_stale() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let expires = "Sun, 06 Nov 1994 08:50:37 GMT";
        assert_eq!(
            check(&[("date", date), ("expires", expires)], &[]),
            Ok(60_000)
        );
        assert_eq!(check(&[("expires", "0")], &[]), Ok(0));
        assert_eq!(
            check(&[("expires", expires), ("cache-control", "max-age=5")], &[]),
            Ok(5_000),
            "max-age wins over Expires"
        );
        assert_eq!(check(&[("cache-control", "max-age=oops")], &[]), Ok(0));
    }

    #[test]
    fn cache_status_ttl_is_negative_as_soon_as_the_response_is_stale() {
        let timing = |age, lifetime| Timing { age, lifetime };
        assert_eq!(timing(500, 60_000).ttl_seconds(), 59);
        assert_eq!(timing(1_300, 1_000).ttl_seconds(), -1);
        assert_eq!(
            timing(1_000, 1_000).ttl_seconds(),
            -1,
            "stale at exactly its lifetime"
        );
        assert_eq!(timing(999, 1_000).ttl_seconds(), 0);
        assert_eq!(timing(3_000, 1_000).ttl_seconds(), -2);
    }

    #[test]
    fn age_follows_rfc_9111_4_2_3() {
        // Sent at 1 s, received at 3 s with Age: 10 from upstream, now 8 s: 10 + 2 (delay) + 5 (resident).
        let e = entry(&[("age", "10")], 1_000, 3_000);
        assert_eq!(current_age(&e, 8_000), 17_000);
    }

    #[test]
    fn request_directives_decide_how_a_stale_or_fresh_entry_is_used() {
        let rules = Rules::default();
        let e = entry(
            &[("cache-control", "max-age=10, stale-while-revalidate=5")],
            0,
            0,
        );
        let at = |seconds: u64| Timing::of(&e, &rules, seconds * 1000);
        let req = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("cache-control", HeaderValue::from_str(value).unwrap());
            CacheControl::parse(&headers, true)
        };
        assert_eq!(evaluate(&e, at(5), &req(""), &rules), Use::Fresh);
        assert_eq!(
            evaluate(&e, at(5), &req("no-cache"), &rules),
            Use::Revalidate { by_request: true }
        );
        assert_eq!(
            evaluate(&e, at(5), &req("max-age=4"), &rules),
            Use::Revalidate { by_request: true }
        );
        assert_eq!(
            evaluate(&e, at(5), &req("min-fresh=6"), &rules),
            Use::Revalidate { by_request: true }
        );
        assert_eq!(
            evaluate(&e, at(12), &req(""), &rules),
            Use::StaleWhileRevalidate
        );
        assert_eq!(
            evaluate(&e, at(16), &req(""), &rules),
            Use::Revalidate { by_request: false }
        );
        assert_eq!(
            evaluate(&e, at(16), &req("max-stale=6"), &rules),
            Use::StaleAllowed
        );
        assert_eq!(
            evaluate(&e, at(16), &req("max-stale"), &rules),
            Use::StaleAllowed
        );
        assert_eq!(
            evaluate(&e, at(16), &req("max-stale=5"), &rules),
            Use::Revalidate { by_request: false }
        );

        let strict = entry(
            &[(
                "cache-control",
                "max-age=10, must-revalidate, stale-while-revalidate=50",
            )],
            0,
            0,
        );
        let timing = Timing::of(&strict, &rules, 12_000);
        assert_eq!(
            evaluate(&strict, timing, &req("max-stale"), &rules),
            Use::Revalidate { by_request: false }
        );
        assert!(!stale_if_error(&strict, timing, &req(""), &rules));

        // no-cache forbids reuse without validation, stale-if-error included (RFC 9111 §5.2.2.4).
        let no_cache = entry(
            &[
                ("cache-control", "no-cache, stale-if-error=600"),
                ("etag", "\"a\""),
            ],
            0,
            0,
        );
        let timing = Timing::of(&no_cache, &rules, 12_000);
        assert!(!stale_if_error(&no_cache, timing, &req(""), &rules));
        let allowed = entry(&[("cache-control", "max-age=10, stale-if-error=600")], 0, 0);
        let timing = Timing::of(&allowed, &rules, 12_000);
        assert!(stale_if_error(&allowed, timing, &req(""), &rules));
    }

    #[test]
    fn vary_selects_variants_with_normalised_values() {
        let mut response = HeaderMap::new();
        response.append(
            VARY,
            HeaderValue::from_static("Accept-Encoding, accept-language"),
        );
        response.append(VARY, HeaderValue::from_static("accept-encoding"));
        let names = vary_names(&response).unwrap();
        assert_eq!(names, ["accept-encoding", "accept-language"]);

        let mut first = HeaderMap::new();
        first.append("accept-encoding", HeaderValue::from_static("gzip,  br"));
        let mut e = entry(&[], 0, 0);
        e.selecting = selecting_headers(&first, &names);
        let mut second = HeaderMap::new();
        second.append("accept-encoding", HeaderValue::from_static("gzip"));
        second.append("accept-encoding", HeaderValue::from_static("br"));
        assert!(variant_matches(&e, &second));
        second.insert("accept-language", HeaderValue::from_static("fr"));
        assert!(
            !variant_matches(&e, &second),
            "a header absent from the stored request must be absent"
        );
    }

    #[test]
    fn client_conditionals_use_weak_comparison_and_if_none_match_wins() {
        let e = entry(
            &[
                ("etag", "W/\"v1\""),
                ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ],
            0,
            0,
        );
        let conditional = |name: &'static str, value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            not_modified(&headers, &Method::GET, StatusCode::OK, &e.facts)
        };
        assert!(conditional("if-none-match", "\"v0\", \"v1\""));
        assert!(conditional("if-none-match", "*"));
        assert!(!conditional("if-none-match", "\"v2\""));
        assert!(conditional(
            "if-modified-since",
            "Sun, 06 Nov 1994 08:49:37 GMT"
        ));
        assert!(!conditional(
            "if-modified-since",
            "Sun, 06 Nov 1994 08:49:36 GMT"
        ));
    }
}
