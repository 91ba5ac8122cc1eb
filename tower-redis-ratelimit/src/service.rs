//! [`RateLimit`]: the service [`crate::RateLimitLayer`] produces.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::decision::{Decision, DecisionSource};
use crate::headers;
use crate::key::{KeyExtractor, RequestParts};
use crate::rules::{Rejection, Selection, Shared};

/// The response future of [`RateLimit`]: boxed, since a decision may wait for Redis.
pub type ResponseFuture<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

/// A rate-limited service. See [`crate::RateLimitLayer`].
pub struct RateLimit<S, C, K, R> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared<C, K, R>>,
}

impl<S: Clone, C, K, R> Clone for RateLimit<S, C, K, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, C, K, R> fmt::Debug for RateLimit<S, C, K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

impl<S, C, K, R, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, C, K, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    K: KeyExtractor,
    R: Rejection<ResBody>,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Move the service that was made ready into the future; leave a clone behind (tower's advice).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        let parts = RequestParts::new(&request);
        if shared.allow.as_ref().is_some_and(|allow| allow(&parts)) {
            shared.limiter.record_bypass(DecisionSource::AllowList);
            return Box::pin(inner.call(request));
        }
        let key = shared.key.extract(&parts);
        let selection = shared
            .select
            .as_ref()
            .map_or_else(Selection::default, |select| select(&parts));
        let grpc = is_grpc(request.headers());
        Box::pin(async move {
            let decision = match key {
                Some(key) => {
                    shared
                        .limiter
                        .check_tier(&key, selection.tier, selection.cost)
                        .await
                }
                None => {
                    let decision = Decision::without_state(
                        !shared.deny_without_key,
                        DecisionSource::NoKey,
                        None,
                    );
                    shared.limiter.record_decision(&decision);
                    decision
                }
            };
            if !decision.allowed {
                if !shared.shadow {
                    tracing::debug!(source = decision.source.as_str(), "request rate limited");
                    let mut response = shared.rejection.reject(&decision, grpc);
                    headers::write(response.headers_mut(), &decision, shared.headers);
                    return Ok(response);
                }
                shared.limiter.record_shadow_denial();
                tracing::info!(
                    source = decision.source.as_str(),
                    "shadow mode: request would have been rate limited"
                );
            }
            let mut response = inner.call(request).await?;
            if shared.headers.on_allowed {
                headers::write(response.headers_mut(), &decision, shared.headers);
            }
            Ok(response)
        })
    }
}
