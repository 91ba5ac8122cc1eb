//! [`RateLimitLayer`]: rate limiting for axum routers and routes, hyper services and tonic servers.

use std::fmt;
use std::sync::Arc;

use http::Response;
use tower_layer::Layer;

use crate::decision::Decision;
use crate::headers::HeaderStyle;
use crate::key::{KeyExtractor, RequestParts};
use crate::limiter::RateLimiter;
use crate::service::RateLimit;

/// What the layer does with a request: which tier (`None` for the default) and what it costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Selection<'a> {
    /// The tier's name, as given to [`crate::RateLimiterBuilder::tier`].
    pub tier: Option<&'a str>,
    /// How many units the request takes (default 1). 0 only reads the state.
    pub cost: u32,
}

impl<'a> Selection<'a> {
    /// Tier `tier` (`None`: the default tier), costing `cost` units.
    pub fn new(tier: Option<&'a str>, cost: u32) -> Self {
        Self { tier, cost }
    }
}

impl Default for Selection<'_> {
    fn default() -> Self {
        Self {
            tier: None,
            cost: 1,
        }
    }
}

type Selector = dyn for<'a> Fn(&RequestParts<'a>) -> Selection<'static> + Send + Sync;
type Predicate = dyn for<'a> Fn(&RequestParts<'a>) -> bool + Send + Sync;

/// Builds the response to a denied request. Implemented for closures
/// `Fn(&Decision, bool /* gRPC */) -> Response<B>`; the layer adds the rate-limit fields afterwards.
pub trait Rejection<B>: Send + Sync + 'static {
    /// The response for `decision` (`grpc` tells whether the request was gRPC).
    fn reject(&self, decision: &Decision, grpc: bool) -> Response<B>;
}

impl<B, F> Rejection<B> for F
where
    F: Fn(&Decision, bool) -> Response<B> + Send + Sync + 'static,
{
    fn reject(&self, decision: &Decision, grpc: bool) -> Response<B> {
        self(decision, grpc)
    }
}

/// The built-in rejection: `429 Too Many Requests` with an empty body, or a trailers-only gRPC reply with
/// `grpc-status: 8` (RESOURCE_EXHAUSTED).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultRejection;

impl<B: Default> Rejection<B> for DefaultRejection {
    fn reject(&self, _decision: &Decision, grpc: bool) -> Response<B> {
        let mut response = Response::new(B::default());
        if grpc {
            let headers = response.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", http::HeaderValue::from_static("8"));
            headers.insert(
                "grpc-message",
                http::HeaderValue::from_static("rate%20limit%20exceeded"),
            );
        } else {
            *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
        }
        response
    }
}

pub(crate) struct Shared<C, K, R> {
    pub(crate) limiter: RateLimiter<C>,
    pub(crate) key: Arc<K>,
    pub(crate) select: Option<Arc<Selector>>,
    pub(crate) allow: Option<Arc<Predicate>>,
    pub(crate) shadow: bool,
    pub(crate) deny_without_key: bool,
    pub(crate) headers: HeaderStyle,
    pub(crate) rejection: Arc<R>,
}

impl<C, K, R> Clone for Shared<C, K, R> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            key: Arc::clone(&self.key),
            select: self.select.clone(),
            allow: self.allow.clone(),
            shadow: self.shadow,
            deny_without_key: self.deny_without_key,
            headers: self.headers,
            rejection: Arc::clone(&self.rejection),
        }
    }
}

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
