//! Fetch: the call to the origin (with our validators when an entry is stored), handed on to revalidation or
//! storage; the background refresh; and the requests passed through untouched.

use std::sync::Arc;

use bytes::Buf;
use http::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, RANGE};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use crate::body::{CacheBody, drain};
use crate::cache::FlightGuard;
use crate::directives::CacheControl;
use crate::entry::Entry;
use crate::stats::Event;
use crate::status::CacheStatus;

use super::{Call, Exchange, Fetched, Origin, OriginBody};

impl Call {
    /// Calls the origin for `key`, validating `candidate` when it has validators; a 304 goes on to
    /// [`revalidated`](Self::revalidated), any other answer to [`store`](Self::store).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fetch<S, ReqBody, ResBody>(
        &self,
        mut service: S,
        mut parts: Parts,
        body: ReqBody,
        key: &str,
        candidate: Option<&Entry>,
        guard: Option<FlightGuard>,
        lock: Option<String>,
    ) -> Fetched<ResBody, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body + Send + 'static,
        ResBody::Data: Buf + Send,
    {
        let request_headers = parts.headers.clone();
        let request_cc = CacheControl::parse(&request_headers, true);
        // The client's own validators are answered by the cache; the origin gets ours, so a 304 refreshes the entry.
        parts.headers.remove(IF_NONE_MATCH);
        parts.headers.remove(IF_MODIFIED_SINCE);
        let validating = self.validate(candidate, &mut parts.headers);
        let head = parts.method == Method::HEAD;
        if head {
            // A HEAD cannot fill the entry; ask for the GET the entry is stored from.
            parts.method = Method::GET;
        }
        if head || candidate.is_some() {
            // A HEAD has no range (RFC 9110 §14.2), and refreshing a stored entry asks for the whole response (a
            // 206 could not replace it; the range is answered from the refreshed entry). A range request on a miss
            // keeps its range: the whole response may be far larger than the client wants.
            parts.headers.remove(RANGE);
            parts.headers.remove(IF_RANGE);
        }
        let request_time = self.cache.now_ms();
        let call = service.call(Request::from_parts(parts, body));
        let result = match self.route.origin_timeout {
            Some(timeout) => match tokio::time::timeout(timeout, call).await {
                Ok(result) => result,
                Err(_) => {
                    self.stats().bump(Event::OriginErrors);
                    return Fetched::TimedOut;
                }
            },
            None => call.await,
        };
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                self.stats().bump(Event::OriginErrors);
                return Fetched::Failed(error);
            }
        };
        let exchange = Exchange {
            request_headers,
            request_cc,
            request_time,
            response_time: self.cache.now_ms(),
        };
        let status = response.status();
        if status.is_server_error() {
            self.stats().bump(Event::OriginErrors);
            if candidate.is_some() {
                return Fetched::ServerError(response);
            }
        }
        if status == StatusCode::NOT_MODIFIED
            && let Some(entry) = validating
        {
            let (head, _) = response.into_parts();
            return self.revalidated(entry, &head, &exchange, key, guard, lock);
        }
        self.store(response, &exchange, key, guard, lock)
    }

    /// Serves a stale entry in place of the origin and refreshes it in the background, once per key.
    pub(super) fn refresh<S, ReqBody, ResBody>(
        &self,
        service: S,
        parts: Parts,
        body: ReqBody,
        key: String,
        entry: Arc<Entry>,
        guard: Option<FlightGuard>,
    ) where
        S: Origin<ReqBody, ResBody>,
        ReqBody: Send + 'static,
        ResBody: OriginBody,
    {
        let Some(guard) = guard.or_else(|| self.cache.try_lead(&key)) else {
            return; // Someone is already refreshing this key.
        };
        self.stats().bump(Event::BackgroundRefreshes);
        let call = self.clone();
        self.cache.spawn(async move {
            match call
                .fetch(service, parts, body, &key, Some(&entry), Some(guard), None)
                .await
            {
                Fetched::Response { response, .. } => drain(response.into_body()).await,
                Fetched::Revalidated { .. }
                | Fetched::ServerError(_)
                | Fetched::Failed(_)
                | Fetched::TimedOut => {}
            }
        });
    }

    pub(super) async fn pass<S, ReqBody, ResBody>(
        &self,
        mut service: S,
        request: Request<ReqBody>,
        status: CacheStatus,
    ) -> Result<Response<CacheBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        let mut response = service.call(request).await?.map(CacheBody::stream);
        response
            .headers_mut()
            .append(crate::CACHE_STATUS, self.status_header(&status));
        Ok(response)
    }
}
