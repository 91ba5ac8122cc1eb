//! A client for another service, found through discovery. From the outside in:
//!
//! 1. a `tower-breaker` [`BreakerLayer`] for the whole service: when too many calls fail it opens and a fallback
//!    answers at once with `503 {"error": "<service> is unavailable", ...}` and `Retry-After`;
//! 2. retries (tower's `Retry`) of requests that were never sent (connection refused: an instance that died
//!    before leaving the registry), and for idempotent methods of any transport error, at most twice;
//! 3. `tower-redis-discovery`'s balancer (power of two choices over peak-EWMA, fail-fast) over the `UP` instances,
//!    each endpoint wrapped in passive health ([`Ejecting`]: two failures in a row take it out of the choice for a
//!    growing backoff, then one probe decides).

use std::error::Error as StdError;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::Full;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_breaker::classify::{
    ClassifiedResponse, ClassifyResponse, NeverClassifyEos, SharedClassifier,
};
use tower_breaker::{
    BreakerLayer, CircuitBreaker, FallbackReason, FallbackRequest, HttpClassifier, NotSuccess,
};
use tower_redis_discovery::{
    BalanceOptions, Discovery, Ejecting, EjectionOptions, HttpEndpoint, Instance, NoEndpoints,
    Unavailable, WatchHandle, WatchStats, balance,
};

use crate::env::HttpClient;

/// The request body type of downstream calls: a buffered body, so a request that was not sent can be sent again.
pub type CallBody = Full<Bytes>;

/// A discovered, balanced, guarded client for one service. Cloning is cheap.
#[derive(Clone)]
pub struct Downstream {
    name: &'static str,
    service: BoxCloneSyncService<Request<CallBody>, Response<Body>, BoxError>,
    breaker: CircuitBreaker,
    watch: WatchHandle,
}

impl std::fmt::Debug for Downstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downstream")
            .field("name", &self.name)
            .field("breaker", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

/// `503` with `{"error": "<service> is unavailable", "reason": ...}`.
pub fn unavailable(service: &str, reason: &str, retry_after: Option<Duration>) -> Response<Body> {
    let body = serde_json::json!({
        "error": format!("{service} is unavailable"),
        "reason": reason,
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(after) = retry_after {
        let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    response
}

impl Downstream {
    /// A client for `name`, balanced over what `discovery` finds, sending through `client`.
    ///
    /// # Errors
    ///
    /// The breaker's configuration error (the settings here are valid, so in practice none).
    pub fn new(
        name: &'static str,
        discovery: Discovery,
        client: HttpClient,
    ) -> Result<Self, tower_breaker::ConfigError> {
        let ejection = EjectionOptions::builder()
            .consecutive_failures(2)
            .base(Duration::from_millis(500))
            .max(Duration::from_secs(10))
            .build()?;
        // A new instance looks faster than any measured one until it has answered, so an instance that joins gets
        // a request at once, whatever the others' latency.
        let options = BalanceOptions::builder()
            .failfast(Duration::from_secs(2))
            .default_rtt(Duration::from_micros(1))
            .build()?;
        let watch = discovery.handle();
        let balanced = balance(
            discovery,
            move |instance: &Instance| {
                Ejecting::new(
                    HttpEndpoint::new(client.clone(), instance),
                    instance,
                    ejection,
                )
            },
            options,
        );
        let breaker = CircuitBreaker::builder()
            .name(name)
            .count_window(20)
            .minimum_calls(10)
            .failure_rate(0.5)
            .open_for(Duration::from_secs(5))
            .call_timeout(Duration::from_secs(5))
            .build()?;
        let fallback = move |request: FallbackRequest<CallBody>| {
            let retry_after = match &request.reason {
                FallbackReason::Rejected(rejected) => rejected.retry_after(),
                _ => None,
            };
            unavailable(name, &request.reason.to_string(), retry_after)
        };
        let service = ServiceBuilder::new()
            .map_response(into_axum_body)
            .layer(
                BreakerLayer::new(breaker.clone())
                    .classifier(SharedClassifier::new(DiscoveryAware::default()))
                    .fallback(fallback),
            )
            .layer(tower::retry::RetryLayer::new(RetryUnsent { left: 2 }))
            .map_response(into_axum_body)
            .service(balanced);
        Ok(Self {
            name,
            service: BoxCloneSyncService::new(service),
            breaker,
            watch,
        })
    }

    /// The service's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// What discovery knows of the service now (instances, polls, hints, whether the registry answers).
    pub fn discovery(&self) -> WatchStats {
        self.watch.stats()
    }

    /// The breaker guarding the service.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Sends `method path` with a JSON `body`. An error (no instance, none reachable) is answered like an open
    /// breaker: `503` with a JSON body naming the service.
    pub async fn call(&self, method: Method, path: &str, body: Option<Bytes>) -> Response<Body> {
        let mut request = Request::new(Full::new(body.unwrap_or_default()));
        *request.method_mut() = method;
        match path.parse() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(_) => {
                return unavailable(self.name, &format!("{path:?} is not a valid path"), None);
            }
        }
        request.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self.service.clone().oneshot(request).await {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(service = self.name, %error, "downstream call failed");
                // No instance known or none ready: discovery is catching up (a registry restarted empty, an
                // instance starting); the client may retry shortly.
                let retry_after = (error.is::<NoEndpoints>() || error.is::<Unavailable>())
                    .then_some(Duration::from_secs(1));
                unavailable(self.name, &describe(&*error), retry_after)
            }
        }
    }
}

/// The HTTP preset, except that discovery's own "no instance" errors ([`NoEndpoints`], [`Unavailable`]) say
/// nothing about the downstream's health and are ignored: a registry that lost its data, or a gap while an
/// instance restarts, must not open the breaker for its whole open duration.
#[derive(Debug, Clone, Copy, Default)]
struct DiscoveryAware(HttpClassifier);

impl ClassifyResponse for DiscoveryAware {
    type FailureClass = NotSuccess;
    type ClassifyEos = NeverClassifyEos<NotSuccess>;

    fn classify_response<B>(
        self,
        response: &Response<B>,
    ) -> ClassifiedResponse<NotSuccess, Self::ClassifyEos> {
        self.0.classify_response(response)
    }

    fn classify_error<E: std::fmt::Display + 'static>(self, error: &E) -> NotSuccess {
        if is_no_instance(error) {
            NotSuccess::Ignored
        } else {
            self.0.classify_error(error)
        }
    }
}

/// Whether `error` is discovery's "no instance" (the balancer's error type is `BoxError`).
fn is_no_instance<E: 'static>(error: &E) -> bool {
    let any: &dyn std::any::Any = error;
    any.downcast_ref::<BoxError>()
        .is_some_and(|error| error.is::<NoEndpoints>() || error.is::<Unavailable>())
}

/// Any response body as axum's.
fn into_axum_body<B>(response: Response<B>) -> Response<Body>
where
    B: axum::body::HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(Body::new)
}

/// A short reason for a failed call.
fn describe(error: &(dyn StdError + 'static)) -> String {
    if error.is::<NoEndpoints>() {
        return "no instance is registered".to_owned();
    }
    if error.is::<Unavailable>() {
        return "no instance is ready".to_owned();
    }
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether the request surely never reached a service: the connection was refused or could not be made.
fn never_sent(error: &(dyn StdError + 'static)) -> bool {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(cause) = current {
        if let Some(client) = cause.downcast_ref::<hyper_util::client::legacy::Error>()
            && client.is_connect()
        {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        current = cause.source();
    }
    false
}

/// Retries requests that were never sent (any method), and idempotent requests after any transport error; never
/// the balancer's own "no instance" answers, and never a response.
#[derive(Debug, Clone, Copy)]
struct RetryUnsent {
    left: u32,
}

impl<Res> tower::retry::Policy<Request<CallBody>, Res, BoxError> for RetryUnsent {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        request: &mut Request<CallBody>,
        result: &mut Result<Res, BoxError>,
    ) -> Option<Self::Future> {
        let Err(error) = result else {
            return None;
        };
        if self.left == 0 || error.is::<NoEndpoints>() || error.is::<Unavailable>() {
            return None;
        }
        let idempotent = matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
        );
        if never_sent(&**error) || idempotent {
            self.left -= 1;
            tracing::debug!(%error, "retrying on another instance");
            Some(std::future::ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, request: &Request<CallBody>) -> Option<Request<CallBody>> {
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        Some(copy)
    }
}

#[cfg(test)]
mod tests {
    use tower::retry::Policy;

    use super::*;

    #[test]
    fn a_refused_connection_counts_as_never_sent() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let boxed: BoxError = Box::new(refused);
        assert!(never_sent(&*boxed));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let boxed: BoxError = Box::new(reset);
        assert!(!never_sent(&*boxed));
    }

    #[test]
    fn a_post_is_retried_only_when_it_was_never_sent() {
        let mut policy = RetryUnsent { left: 2 };
        let mut post = Request::new(Full::new(Bytes::new()));
        *post.method_mut() = Method::POST;
        let mut reset: Result<(), BoxError> = Err(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(policy.retry(&mut post, &mut reset).is_none());
        let mut refused: Result<(), BoxError> = Err(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(policy.retry(&mut post, &mut refused).is_some());
        assert!(policy.retry(&mut post, &mut refused).is_some());
        assert!(
            policy.retry(&mut post, &mut refused).is_none(),
            "two retries at most"
        );
    }

    #[test]
    fn the_balancers_own_failures_are_not_retried() {
        let mut policy = RetryUnsent { left: 2 };
        let mut get = Request::new(Full::new(Bytes::new()));
        let mut none: Result<(), BoxError> = Err(Box::new(std::io::Error::other("x")));
        assert!(policy.retry(&mut get, &mut none).is_some());
        let request = get;
        let copy = Policy::<_, (), BoxError>::clone_request(&mut policy, &request);
        assert!(copy.is_some_and(|copy| copy.method() == Method::GET));
    }
}
