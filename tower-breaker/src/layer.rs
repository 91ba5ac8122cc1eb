//! [`BreakerLayer`]: puts a [`CircuitBreaker`] in front of a Tower service.

use tower_http::classify::SharedClassifier;
use tower_layer::Layer;

use crate::breaker::CircuitBreaker;
use crate::classifier::{AutoClassifier, GrpcClassifier, HttpClassifier};
use crate::fallback::{FallbackFn, FallbackService, NoFallback};
use crate::service::Breaker;

/// Applies a circuit breaker to an HTTP or gRPC service: on a router, a single route, a hyper service or a tonic
/// `Channel`. Every service it makes shares the one breaker (cloning is an `Arc` bump).
///
/// Rejections are responses, never errors: a `503 Service Unavailable` with `Retry-After`, or for gRPC requests a
/// trailers-only reply with `grpc-status: 14` (UNAVAILABLE); a fallback replaces them. The service's own error type
/// is kept, so axum needs no `HandleErrorLayer`.
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_breaker::{BreakerLayer, CircuitBreaker};
///
/// let breaker = CircuitBreaker::builder().name("users").build()?;
/// let app: Router = Router::new()
///     .route("/users/{id}", get(|| async { "alice" }))
///     .layer(BreakerLayer::new(breaker.clone()));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct BreakerLayer<M = AutoClassifier, F = NoFallback> {
    pub(crate) breaker: CircuitBreaker,
    pub(crate) make_classifier: M,
    pub(crate) fallback: F,
    pub(crate) fallback_on_failure: bool,
}

impl BreakerLayer {
    /// A layer for `breaker`, classifying gRPC requests with the gRPC preset and the rest with the HTTP preset.
    pub fn new(breaker: CircuitBreaker) -> Self {
        Self {
            breaker,
            make_classifier: AutoClassifier::default(),
            fallback: NoFallback,
            fallback_on_failure: false,
        }
    }
}

impl<M, F> BreakerLayer<M, F> {
    /// The breaker, to read its state and stats or control it by hand.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Classifies every response with the HTTP preset (5xx and errors fail; 4xx succeed; 429 ignored).
    pub fn for_http(self) -> BreakerLayer<SharedClassifier<HttpClassifier>, F> {
        self.classifier(SharedClassifier::new(HttpClassifier::default()))
    }

    /// Classifies every response with the gRPC preset (status from headers or trailers).
    pub fn for_grpc(self) -> BreakerLayer<SharedClassifier<GrpcClassifier>, F> {
        self.classifier(SharedClassifier::new(GrpcClassifier::default()))
    }

    /// Uses any tower-http [`MakeClassifier`](tower_http::classify::MakeClassifier) whose failure class implements
    /// [`IntoOutcome`](crate::IntoOutcome), for example `SharedClassifier::new(HttpClassifier::new()
    /// .too_many_requests(Outcome::Failure))` or tower-http's `StatusInRangeAsFailures`.
    pub fn classifier<M2>(self, make_classifier: M2) -> BreakerLayer<M2, F> {
        BreakerLayer {
            breaker: self.breaker,
            make_classifier,
            fallback: self.fallback,
            fallback_on_failure: self.fallback_on_failure,
        }
    }

    /// Answers rejected calls with `fallback(request)` instead of the built-in 503. The closure receives why it
    /// runs and, on a rejection, the request.
    pub fn fallback<G>(self, fallback: G) -> BreakerLayer<M, FallbackFn<G>> {
        BreakerLayer {
            breaker: self.breaker,
            make_classifier: self.make_classifier,
            fallback: FallbackFn(fallback),
            fallback_on_failure: self.fallback_on_failure,
        }
    }

    /// Answers rejected calls with a Tower service taking [`FallbackRequest`](crate::FallbackRequest)s.
    pub fn fallback_service<T>(self, fallback: T) -> BreakerLayer<M, FallbackService<T>> {
        BreakerLayer {
            breaker: self.breaker,
            make_classifier: self.make_classifier,
            fallback: FallbackService(fallback),
            fallback_on_failure: self.fallback_on_failure,
        }
    }

    /// Also runs the fallback when a call fails (a response classified as a failure, or an error) or times out,
    /// instead of passing the failure on. A gRPC failure reported in trailers is only known after the response was
    /// sent, so it cannot be replaced.
    pub fn fallback_on_failure(mut self, enabled: bool) -> Self {
        self.fallback_on_failure = enabled;
        self
    }
}

impl<S, M: Clone, F: Clone> Layer<S> for BreakerLayer<M, F> {
    type Service = Breaker<S, M, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Breaker {
            inner,
            breaker: self.breaker.clone(),
            make_classifier: self.make_classifier.clone(),
            fallback: self.fallback.clone(),
            fallback_on_failure: self.fallback_on_failure,
        }
    }
}
