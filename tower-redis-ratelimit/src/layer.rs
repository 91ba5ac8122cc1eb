//! [`RateLimitLayer`]: rate limiting for axum routers and routes, hyper services and tonic servers.

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::headers::HeaderStyle;
use crate::key::{KeyExtractor, RequestParts};
use crate::limiter::RateLimiter;
use crate::rules::{DefaultRejection, Selection, Shared};
use crate::service::RateLimit;

/// Applies a [`RateLimiter`] to every request, keyed by a [`KeyExtractor`]: `RateLimitLayer::new(limiter, key)`,
/// then the setters below, as tower-http's layers are configured. Cloning is a few `Arc` bumps; every clone and
/// every service it makes shares the limiter.
///
/// A denied request gets `429 Too Many Requests` with `Retry-After` and the `RateLimit` fields (gRPC requests: a
/// trailers-only RESOURCE_EXHAUSTED with the same fields as metadata); the inner service never sees it. The
/// service's error type is kept, so axum needs no `HandleErrorLayer`.
#[must_use]
pub struct RateLimitLayer<C, K, R = DefaultRejection> {
    shared: Shared<C, K, R>,
}

impl<C, K, R> Clone for RateLimitLayer<C, K, R> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<C, K, R> fmt::Debug for RateLimitLayer<C, K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.shared.limiter)
            .field("shadow", &self.shared.shadow)
            .field("headers", &self.shared.headers)
            .finish_non_exhaustive()
    }
}

impl<C, K: KeyExtractor> RateLimitLayer<C, K> {
    /// A layer limiting requests with `limiter`, keyed by `key` (for example `ClientIp::trusted_hops(1)`, or a
    /// closure), with the defaults: every request costs 1 in the default tier, requests without a key pass, the
    /// IETF `RateLimit` fields on denials, and the built-in 429.
    pub fn new(limiter: RateLimiter<C>, key: K) -> Self {
        Self {
            shared: Shared {
                limiter,
                key: Arc::new(key),
                select: None,
                allow: None,
                shadow: false,
                deny_without_key: false,
                headers: HeaderStyle::default(),
                rejection: Arc::new(DefaultRejection),
            },
        }
    }
}

impl<C, K, R> RateLimitLayer<C, K, R> {
    /// The limiter (for its stats and admin calls).
    pub fn limiter(&self) -> &RateLimiter<C> {
        &self.shared.limiter
    }

    /// Chooses the tier and the cost of each request (for example from an authenticated user's plan).
    pub fn select(
        mut self,
        select: impl for<'a> Fn(&RequestParts<'a>) -> Selection<'static> + Send + Sync + 'static,
    ) -> Self {
        self.shared.select = Some(Arc::new(select));
        self
    }

    /// Requests for which `allow` returns `true` bypass the limiter (no Redis call).
    pub fn allow_if(
        mut self,
        allow: impl for<'a> Fn(&RequestParts<'a>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.shared.allow = Some(Arc::new(allow));
        self
    }

    /// Shadow mode: decide and report (stats, metrics, logs, headers), but never reject.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shared.shadow = shadow;
        self
    }

    /// Denies requests whose key cannot be extracted (default: they pass, counted as `no_key`).
    pub fn deny_without_key(mut self, deny: bool) -> Self {
        self.shared.deny_without_key = deny;
        self
    }

    /// Which rate-limit fields to send, and whether on allowed responses too.
    pub fn headers(mut self, style: HeaderStyle) -> Self {
        self.shared.headers = style;
        self
    }

    /// Replaces the 429 (or gRPC RESOURCE_EXHAUSTED) with your own response; the rate-limit fields are added to it.
    pub fn on_reject<R2>(self, rejection: R2) -> RateLimitLayer<C, K, R2> {
        let shared = self.shared;
        RateLimitLayer {
            shared: Shared {
                limiter: shared.limiter,
                key: shared.key,
                select: shared.select,
                allow: shared.allow,
                shadow: shared.shadow,
                deny_without_key: shared.deny_without_key,
                headers: shared.headers,
                rejection: Arc::new(rejection),
            },
        }
    }
}

impl<S, C, K, R> Layer<S> for RateLimitLayer<C, K, R> {
    type Service = RateLimit<S, C, K, R>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            shared: Arc::new(self.shared.clone()),
        }
    }
}
