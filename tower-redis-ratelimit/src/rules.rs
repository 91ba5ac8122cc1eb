//! What a [`RateLimitLayer`](crate::RateLimitLayer) and its services apply to every request: the limiter, the key,
//! the tier and cost ([`Selection`]), the exemption, the headers and the response to a denied request
//! ([`Rejection`]).

use std::sync::Arc;

use http::Response;

use crate::decision::Decision;
use crate::headers::HeaderStyle;
use crate::key::RequestParts;
use crate::limiter::RateLimiter;

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

pub(crate) type Selector = dyn for<'a> Fn(&RequestParts<'a>) -> Selection<'static> + Send + Sync;
pub(crate) type Predicate = dyn for<'a> Fn(&RequestParts<'a>) -> bool + Send + Sync;

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
