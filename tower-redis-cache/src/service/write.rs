//! Requests the cache never answers: unsafe methods, which invalidate what they change (RFC 9111 §4.4), and `PURGE`.

use http::header::{CONTENT_LOCATION, LOCATION};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use tower_service::Service;

use crate::Purge;
use crate::body::CacheBody;
use crate::stats::Event;
use crate::status::{CacheStatus, Forward};

use super::Call;
use super::key::as_get;
use super::key::same_origin;

/// The request field that makes a `PURGE` soft.
const SOFT_PURGE: http::HeaderName = http::HeaderName::from_static("soft-purge");

impl Call {
    /// Forwards a request that is never served from the cache. A successful unsafe method invalidates its URL and
    /// the URLs in its `Location` and `Content-Location` (RFC 9111 §4.4).
    pub(super) async fn forward_method<S, ReqBody, ResBody>(
        &self,
        mut service: S,
        request: Request<ReqBody>,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        self.stats().bump(Event::Bypassed);
        let safe = matches!(*request.method(), Method::OPTIONS | Method::TRACE);
        let (parts, body) = request.into_parts();
        if parts.method.as_str() == "PURGE"
            && let Some(authorize) = &self.route.purge
        {
            return Ok(self.purge(authorize(&parts), &parts).await);
        }
        let target = (!safe).then(|| (self.key(&as_get(&parts, None)), parts.clone()));
        let response = service.call(Request::from_parts(parts, body)).await?;
        if let Some((own, parts)) = target
            && (response.status().is_success() || response.status().is_redirection())
        {
            let mut keys: Vec<String> = own.into_iter().collect();
            for name in [LOCATION, CONTENT_LOCATION] {
                if let Some(location) = response
                    .headers()
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    && let Some(uri) = same_origin(&parts, location)
                    && let Some(key) = self.key(&as_get(&parts, Some(uri)))
                {
                    keys.push(key);
                }
            }
            self.invalidate_on_write(keys).await;
        }
        let mut response = response.map(CacheBody::stream);
        response.headers_mut().append(
            crate::CACHE_STATUS,
            self.status_header(&CacheStatus::forward(Forward::Method)),
        );
        Ok(response)
    }

    /// Clears memory now and Redis within its timeout (guarded by the breaker), then tells other instances.
    pub(super) async fn invalidate_on_write(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let available = self
            .cache
            .inner
            .redis
            .as_ref()
            .is_none_or(|redis| redis.guard.breaker().state() != tower_breaker::State::Open);
        if available {
            let invalidate = self.cache.invalidate(&keys);
            match self
                .cache
                .inner
                .redis
                .as_ref()
                .map(|redis| redis.guard.timeout())
            {
                Some(timeout) => {
                    if let Ok(Err(error)) | Err(error) =
                        tokio::time::timeout(timeout * 2, invalidate)
                            .await
                            .map_err(|_| crate::InvalidateError::Timeout)
                    {
                        tracing::warn!(%error, "could not invalidate in Redis after a write");
                    }
                }
                None => {
                    let _ = invalidate.await;
                }
            }
        } else if let Some(memory) = &self.cache.inner.memory {
            for key in &keys {
                memory.remove(key);
            }
        }
    }

    pub(super) async fn purge<B>(&self, authorized: bool, parts: &Parts) -> Response<CacheBody<B>> {
        let mut response = Response::new(CacheBody::default());
        let mut status = CacheStatus::forward(Forward::Method);
        if !authorized {
            *response.status_mut() = StatusCode::FORBIDDEN;
            status.detail = Some("purge-forbidden");
        } else if let Some(key) = self.key(&as_get(parts, None)) {
            // `Soft-Purge: 1` marks the entry stale instead of deleting it.
            let soft = parts
                .headers
                .get(SOFT_PURGE)
                .is_some_and(|value| value.as_bytes() == b"1");
            let purge = if soft { Purge::Soft } else { Purge::Hard };
            match self.cache.invalidate_with(&[key], purge).await {
                Ok(_) if soft => status.detail = Some("soft-purged"),
                Ok(_) => status.detail = Some("purged"),
                Err(error) => {
                    tracing::warn!(%error, "purge could not reach Redis; the memory tier was purged, and Redis is owed it");
                    status.detail = Some("purged-memory-only");
                }
            }
        }
        response
            .headers_mut()
            .insert(crate::CACHE_STATUS, self.status_header(&status));
        response
    }
}
