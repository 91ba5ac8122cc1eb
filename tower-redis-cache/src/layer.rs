//! [`CacheLayer`]: the per-route settings, applied with `.layer(...)`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::request::Parts;
use tower_layer::Layer;

use crate::cache::HttpCache;
use crate::route::Route;
use crate::service::Cache;

/// Caches the responses of the services it wraps in a [`HttpCache`].
///
/// Build one per route with `CacheLayer::new(cache)` and adjust it with the setters below, as tower-http's layers
/// are configured; every layer made from one cache shares its tiers.
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use tower_redis_cache::{CacheLayer, HttpCache};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_redis_cache::ConfigError> {
/// let cache = HttpCache::builder().build()?; // add `.redis(connection)` for the shared tier
/// let app: Router = Router::new()
///     .route("/users/{id}", get(|| async { ([("cache-control", "max-age=60")], "user") }))
///     .route(
///         "/feed",
///         get(|| async { "feed" }).layer(CacheLayer::new(cache.clone()).default_ttl(Duration::from_secs(5))),
///     )
///     .layer(CacheLayer::new(cache).stale_while_revalidate(Duration::from_secs(30)));
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct CacheLayer {
    cache: HttpCache,
    route: Arc<Route>,
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("cache", &self.cache)
            .field("rules", &self.route.rules)
            .field("max_body", &self.route.max_body)
            .field("coalesce", &self.route.coalesce)
            .finish_non_exhaustive()
    }
}

impl CacheLayer {
    /// A layer with the default settings.
    pub fn new(cache: HttpCache) -> Self {
        Self {
            cache,
            route: Arc::new(Route::default()),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Route)) -> Self {
        change(Arc::make_mut(&mut self.route));
        self
    }

    /// A freshness lifetime for storable responses that give none (no `max-age`, `s-maxage` or `Expires`). Off by
    /// default: standards mode stores only what the origin says may be stored.
    pub fn default_ttl(self, ttl: Duration) -> Self {
        self.with(|route| route.rules.default_ttl = Some(ttl))
    }

    /// A freshness lifetime that replaces the response's own (`no-store`, `private` and `no-cache` are still
    /// honoured).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|route| route.rules.ttl_override = Some(ttl))
    }

    /// Heuristic freshness (RFC 9111 §4.2.2) for responses with `Last-Modified` and no explicit lifetime: 10 % of
    /// the time since the last modification, at most `cap`.
    pub fn heuristic_freshness(self, cap: Duration) -> Self {
        self.with(|route| route.rules.heuristic = Some(cap))
    }

    /// How long a stale response may be served while one background request refreshes it, when the response's
    /// `stale-while-revalidate` does not say.
    pub fn stale_while_revalidate(self, window: Duration) -> Self {
        self.with(|route| route.rules.stale_while_revalidate = Some(window))
    }

    /// How long a stale response may be served when the origin fails (5xx, a timeout, a connection error), when
    /// the response's `stale-if-error` does not say.
    pub fn stale_if_error(self, window: Duration) -> Self {
        self.with(|route| route.rules.stale_if_error = Some(window))
    }

    /// The most staleness a stored response may have to answer in place of an origin that cannot be reached: the
    /// service returned an error (a refused or reset connection, one closed before the response) or did not
    /// answer within [`origin_timeout`](Self::origin_timeout). RFC 9111 §4.2.4 lets a disconnected cache do so.
    /// Ten minutes by default; `Duration::ZERO` turns it off. The response is marked `Cache-Status: hit; ttl=-N;
    /// detail=origin-unreachable` (or `origin-timeout`). A response with `must-revalidate`, `proxy-revalidate`,
    /// `s-maxage` or `no-cache` is never served stale: the client gets a `504` whose `Cache-Status` names the
    /// directive. A 5xx answer is not "unreachable": only `stale-if-error` covers it. Entries are kept this long
    /// past their freshness (in memory and in Redis) so they are there to stand in.
    pub fn stale_if_unreachable(self, max_staleness: Duration) -> Self {
        self.with(|route| route.rules.stale_if_unreachable = max_staleness)
    }

    /// How long a response with validators is kept once stale, so it can be revalidated with a conditional request
    /// (10 minutes by default).
    pub fn keep_for_revalidation(self, keep: Duration) -> Self {
        self.with(|route| route.rules.keep_for_revalidation = keep)
    }

    /// Stores responses that carry `Set-Cookie` (never by default: one user's cookie would reach everyone).
    pub fn allow_set_cookie(self, allow: bool) -> Self {
        self.with(|route| route.rules.allow_set_cookie = allow)
    }

    /// Bodies larger than this stream through uncached and are never buffered whole (8 MiB by default).
    pub fn max_body_size(self, bytes: usize) -> Self {
        self.with(|route| route.max_body = bytes)
    }

    /// Computes cache keys with `key` instead of `scheme://authority/path?query`.
    pub fn key_fn(self, key: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static) -> Self {
        self.with(|route| route.key = Some(Arc::new(key)))
    }

    /// Passes requests for which `bypass` is true straight to the service, without a lookup.
    pub fn bypass(self, bypass: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.with(|route| route.bypass = Some(Arc::new(bypass)))
    }

    /// Adds tags to stored responses, for [`HttpCache::invalidate_tag`].
    pub fn tags(
        self,
        tags: impl Fn(&Parts, &http::response::Parts) -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.with(|route| route.tags = Some(Arc::new(tags)))
    }

    /// The response header whose space-separated values tag a stored response (`Surrogate-Key` by default);
    /// `None` reads no header.
    pub fn tag_header(self, header: Option<HeaderName>) -> Self {
        self.with(|route| route.tag_header = header)
    }

    /// Turns off in-process coalescing of concurrent misses (on by default).
    pub fn coalesce(self, on: bool) -> Self {
        self.with(|route| route.coalesce = on)
    }

    /// How long a request waits for another request's fill of the same key before calling the origin itself
    /// (5 s by default).
    pub fn coalesce_wait(self, wait: Duration) -> Self {
        self.with(|route| route.coalesce_wait = wait)
    }

    /// Gives the origin this long to answer; past it a stale response is served where stale-if-error or
    /// [`stale_if_unreachable`](Self::stale_if_unreachable) allows, and otherwise the client gets
    /// `504 Gateway Timeout`.
    pub fn origin_timeout(self, timeout: Duration) -> Self {
        self.with(|route| route.origin_timeout = Some(timeout))
    }

    /// Lets `PURGE` requests invalidate their URL when `authorize` accepts them (403 otherwise). Off by default:
    /// without it a `PURGE` is forwarded like any unknown method. With `Soft-Purge: 1` the purge is soft
    /// ([`Purge::Soft`](crate::Purge::Soft)): the entry is marked stale instead of deleted.
    pub fn purge(self, authorize: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.with(|route| route.purge = Some(Arc::new(authorize)))
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache::new(inner, self.cache.clone(), self.route.clone())
    }
}
