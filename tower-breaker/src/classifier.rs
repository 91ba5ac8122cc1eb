//! What a response or an error counts as: presets for HTTP and gRPC, built on tower-http's
//! [`classify`](tower_http::classify) traits, so any tower-http classifier works too.
//!
//! A classifier's failure class must say whether a non-success is a failure or is ignored ([`IntoOutcome`]); the
//! presets here use [`NotSuccess`], and tower-http's own failure classes count as failures.

use std::fmt;

use http::{HeaderMap, Request, Response, StatusCode};
use tower_http::classify::{
    ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcCode, GrpcFailureClass, MakeClassifier,
    NeverClassifyEos, ServerErrorsFailureClass, StatusInRangeFailureClass,
};

use crate::breaker::Outcome;

/// What a response that is not a success counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSuccess {
    /// A failure: counts towards opening the breaker.
    Failure,
    /// Says nothing about the service's health.
    Ignored,
}

impl fmt::Display for NotSuccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Failure => "failure",
            Self::Ignored => "ignored",
        })
    }
}

/// Turns a classifier's failure class into an [`Outcome`].
pub trait IntoOutcome {
    /// What this failure class counts as.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for NotSuccess {
    fn into_outcome(self) -> Outcome {
        match self {
            Self::Failure => Outcome::Failure,
            Self::Ignored => Outcome::Ignored,
        }
    }
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl IntoOutcome for ServerErrorsFailureClass {
    fn into_outcome(self) -> Outcome {
        Outcome::Failure
    }
}

impl IntoOutcome for StatusInRangeFailureClass {
    fn into_outcome(self) -> Outcome {
        Outcome::Failure
    }
}

impl IntoOutcome for GrpcFailureClass {
    fn into_outcome(self) -> Outcome {
        Outcome::Failure
    }
}

/// The HTTP preset: 5xx responses and transport errors are failures; 4xx responses are successes (the service
/// answered); 429 is ignored unless configured otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpClassifier {
    too_many_requests: Outcome,
    client_errors: Outcome,
}

impl Default for HttpClassifier {
    fn default() -> Self {
        Self {
            too_many_requests: Outcome::Ignored,
            client_errors: Outcome::Success,
        }
    }
}

impl HttpClassifier {
    /// The preset.
    pub fn new() -> Self {
        Self::default()
    }

    /// What a `429 Too Many Requests` counts as (default: ignored; a failure makes the breaker back off from a
    /// throttling upstream).
    #[must_use]
    pub fn too_many_requests(mut self, outcome: Outcome) -> Self {
        self.too_many_requests = outcome;
        self
    }

    /// What other 4xx responses count as (default: success).
    #[must_use]
    pub fn client_errors(mut self, outcome: Outcome) -> Self {
        self.client_errors = outcome;
        self
    }

    fn classify_status(self, status: StatusCode) -> Result<(), NotSuccess> {
        let outcome = if status.is_server_error() {
            Outcome::Failure
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            self.too_many_requests
        } else if status.is_client_error() {
            self.client_errors
        } else {
            Outcome::Success
        };
        outcome_result(outcome)
    }
}

fn outcome_result(outcome: Outcome) -> Result<(), NotSuccess> {
    match outcome {
        Outcome::Success => Ok(()),
        Outcome::Failure => Err(NotSuccess::Failure),
        Outcome::Ignored => Err(NotSuccess::Ignored),
    }
}

impl ClassifyResponse for HttpClassifier {
    type FailureClass = NotSuccess;
    type ClassifyEos = NeverClassifyEos<NotSuccess>;

    fn classify_response<B>(
        self,
        res: &Response<B>,
    ) -> ClassifiedResponse<NotSuccess, Self::ClassifyEos> {
        ClassifiedResponse::Ready(self.classify_status(res.status()))
    }

    fn classify_error<E: fmt::Display + 'static>(self, _error: &E) -> NotSuccess {
        NotSuccess::Failure
    }
}

fn code_bit(code: GrpcCode) -> u32 {
    let code = code as i32;
    1u32.checked_shl(u32::try_from(code).unwrap_or(31))
        .unwrap_or(0)
}

/// The gRPC preset: the status comes from the headers of a trailers-only reply, otherwise from the trailers at the
/// end of the stream (the response body is wrapped to see them). Unavailable, DeadlineExceeded, Internal, Unknown,
/// ResourceExhausted and DataLoss are failures; Cancelled is ignored; other codes are successes (the service
/// answered). A stream that ends without a status counts as Unknown; a non-200 HTTP status is mapped the way tonic
/// maps it (429, 502, 503, 504 are Unavailable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcClassifier {
    failures: u32,
    ignored: u32,
}

impl Default for GrpcClassifier {
    fn default() -> Self {
        let failures = [
            GrpcCode::Unknown,
            GrpcCode::DeadlineExceeded,
            GrpcCode::ResourceExhausted,
            GrpcCode::Internal,
            GrpcCode::Unavailable,
            GrpcCode::DataLoss,
        ]
        .into_iter()
        .fold(0, |mask, code| mask | code_bit(code));
        Self {
            failures,
            ignored: code_bit(GrpcCode::Cancelled),
        }
    }
}

impl GrpcClassifier {
    /// The preset.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `code` as a failure.
    #[must_use]
    pub fn with_failure(mut self, code: GrpcCode) -> Self {
        self.failures |= code_bit(code);
        self.ignored &= !code_bit(code);
        self
    }

    /// Counts `code` as a success.
    #[must_use]
    pub fn with_success(mut self, code: GrpcCode) -> Self {
        self.failures &= !code_bit(code);
        self.ignored &= !code_bit(code);
        self
    }

    /// Ignores `code`.
    #[must_use]
    pub fn with_ignored(mut self, code: GrpcCode) -> Self {
        self.ignored |= code_bit(code);
        self.failures &= !code_bit(code);
        self
    }

    fn classify_code(self, code: i32) -> Result<(), NotSuccess> {
        if code == 0 {
            return Ok(());
        }
        let bit = u32::try_from(code)
            .ok()
            .and_then(|code| 1u32.checked_shl(code))
            .unwrap_or(0);
        if bit == 0 || self.failures & bit != 0 {
            // An out-of-range code is as good as Unknown.
            if bit == 0 && self.failures & code_bit(GrpcCode::Unknown) == 0 {
                return Ok(());
            }
            Err(NotSuccess::Failure)
        } else if self.ignored & bit != 0 {
            Err(NotSuccess::Ignored)
        } else {
            Ok(())
        }
    }

    fn classify_headers(self, headers: &HeaderMap) -> Option<Result<(), NotSuccess>> {
        let value = headers.get("grpc-status")?;
        let code = value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
            .unwrap_or(GrpcCode::Unknown as i32);
        Some(self.classify_code(code))
    }
}

impl ClassifyResponse for GrpcClassifier {
    type FailureClass = NotSuccess;
    type ClassifyEos = GrpcEosClassifier;

    fn classify_response<B>(
        self,
        res: &Response<B>,
    ) -> ClassifiedResponse<NotSuccess, GrpcEosClassifier> {
        if let Some(result) = self.classify_headers(res.headers()) {
            return ClassifiedResponse::Ready(result);
        }
        let status = res.status();
        if status != StatusCode::OK {
            let code = match status.as_u16() {
                400 => GrpcCode::Internal,
                401 => GrpcCode::Unauthenticated,
                403 => GrpcCode::PermissionDenied,
                404 => GrpcCode::Unimplemented,
                429 | 502..=504 => GrpcCode::Unavailable,
                _ => GrpcCode::Unknown,
            };
            return ClassifiedResponse::Ready(self.classify_code(code as i32));
        }
        ClassifiedResponse::RequiresEos(GrpcEosClassifier { classifier: self })
    }

    fn classify_error<E: fmt::Display + 'static>(self, _error: &E) -> NotSuccess {
        NotSuccess::Failure
    }
}

/// Classifies a gRPC stream by the `grpc-status` of its trailers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcEosClassifier {
    classifier: GrpcClassifier,
}

impl ClassifyEos for GrpcEosClassifier {
    type FailureClass = NotSuccess;

    fn classify_eos(self, trailers: Option<&HeaderMap>) -> Result<(), NotSuccess> {
        trailers
            .and_then(|trailers| self.classifier.classify_headers(trailers))
            .unwrap_or_else(|| self.classifier.classify_code(GrpcCode::Unknown as i32))
    }

    fn classify_error<E: fmt::Display + 'static>(self, _error: &E) -> NotSuccess {
        NotSuccess::Failure
    }
}

/// The default: the gRPC preset for requests whose `content-type` is `application/grpc*`, the HTTP preset for the
/// rest, so one layer serves a server that speaks both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AutoClassifier {
    http: HttpClassifier,
    grpc: GrpcClassifier,
}

impl AutoClassifier {
    /// Both presets with their defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the HTTP preset.
    #[must_use]
    pub fn http(mut self, http: HttpClassifier) -> Self {
        self.http = http;
        self
    }

    /// Replaces the gRPC preset.
    #[must_use]
    pub fn grpc(mut self, grpc: GrpcClassifier) -> Self {
        self.grpc = grpc;
        self
    }
}

/// Whether a request is gRPC, by its `content-type`.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

impl MakeClassifier for AutoClassifier {
    type FailureClass = NotSuccess;
    type ClassifyEos = AutoEosClassifier;
    type Classifier = AutoResponseClassifier;

    fn make_classifier<B>(&self, req: &Request<B>) -> AutoResponseClassifier {
        if is_grpc(req.headers()) {
            AutoResponseClassifier::Grpc(self.grpc)
        } else {
            AutoResponseClassifier::Http(self.http)
        }
    }
}

/// The classifier [`AutoClassifier`] chose for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoResponseClassifier {
    /// The HTTP preset.
    Http(HttpClassifier),
    /// The gRPC preset.
    Grpc(GrpcClassifier),
}

/// End-of-stream classification for [`AutoResponseClassifier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoEosClassifier(GrpcEosClassifier);

impl ClassifyEos for AutoEosClassifier {
    type FailureClass = NotSuccess;

    fn classify_eos(self, trailers: Option<&HeaderMap>) -> Result<(), NotSuccess> {
        self.0.classify_eos(trailers)
    }

    fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> NotSuccess {
        ClassifyEos::classify_error(self.0, error)
    }
}

impl ClassifyResponse for AutoResponseClassifier {
    type FailureClass = NotSuccess;
    type ClassifyEos = AutoEosClassifier;

    fn classify_response<B>(
        self,
        res: &Response<B>,
    ) -> ClassifiedResponse<NotSuccess, AutoEosClassifier> {
        match self {
            Self::Http(http) => ClassifiedResponse::Ready(http.classify_status(res.status())),
            Self::Grpc(grpc) => match grpc.classify_response(res) {
                ClassifiedResponse::Ready(result) => ClassifiedResponse::Ready(result),
                ClassifiedResponse::RequiresEos(eos) => {
                    ClassifiedResponse::RequiresEos(AutoEosClassifier(eos))
                }
            },
        }
    }

    fn classify_error<E: fmt::Display + 'static>(self, _error: &E) -> NotSuccess {
        NotSuccess::Failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::needless_pass_by_value)]
    fn outcome(result: ClassifiedResponse<NotSuccess, impl ClassifyEos>) -> Option<Outcome> {
        match result {
            ClassifiedResponse::Ready(Ok(())) => Some(Outcome::Success),
            ClassifiedResponse::Ready(Err(class)) => Some(class.into_outcome()),
            ClassifiedResponse::RequiresEos(_) => None,
        }
    }

    fn response(status: u16, grpc_status: Option<&str>) -> Response<()> {
        let mut builder = Response::builder().status(status);
        if let Some(code) = grpc_status {
            builder = builder.header("grpc-status", code);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn http_counts_5xx_as_failures_4xx_as_successes_and_ignores_429() {
        let http = HttpClassifier::new();
        let cases = [
            (200, Outcome::Success),
            (304, Outcome::Success),
            (404, Outcome::Success),
            (429, Outcome::Ignored),
            (500, Outcome::Failure),
            (503, Outcome::Failure),
        ];
        for (status, expected) in cases {
            assert_eq!(
                outcome(http.classify_response(&response(status, None))),
                Some(expected),
                "{status}"
            );
        }
        let strict = http
            .too_many_requests(Outcome::Failure)
            .client_errors(Outcome::Ignored);
        assert_eq!(
            outcome(strict.classify_response(&response(429, None))),
            Some(Outcome::Failure)
        );
        assert_eq!(
            outcome(strict.classify_response(&response(404, None))),
            Some(Outcome::Ignored)
        );
    }

    #[test]
    fn grpc_reads_the_status_of_a_trailers_only_reply_from_the_headers() {
        let grpc = GrpcClassifier::new();
        let cases = [
            ("0", Outcome::Success),
            ("1", Outcome::Ignored),
            ("5", Outcome::Success),
            ("14", Outcome::Failure),
            ("4", Outcome::Failure),
            ("99", Outcome::Failure),
            ("nonsense", Outcome::Failure),
        ];
        for (code, expected) in cases {
            assert_eq!(
                outcome(grpc.classify_response(&response(200, Some(code)))),
                Some(expected),
                "{code}"
            );
        }
        assert_eq!(
            outcome(
                grpc.with_success(GrpcCode::Unavailable)
                    .classify_response(&response(200, Some("14")))
            ),
            Some(Outcome::Success)
        );
    }

    #[test]
    fn grpc_waits_for_the_trailers_otherwise() {
        let grpc = GrpcClassifier::new();
        let ClassifiedResponse::RequiresEos(eos) = grpc.classify_response(&response(200, None))
        else {
            panic!("a 200 without grpc-status needs the trailers");
        };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "13".parse().unwrap());
        assert_eq!(eos.classify_eos(Some(&trailers)), Err(NotSuccess::Failure));
        trailers.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(eos.classify_eos(Some(&trailers)), Ok(()));
        assert_eq!(
            eos.classify_eos(None),
            Err(NotSuccess::Failure),
            "no status at all is Unknown"
        );
    }

    #[test]
    fn grpc_maps_http_errors_like_tonic() {
        let grpc = GrpcClassifier::new();
        assert_eq!(
            outcome(grpc.classify_response(&response(503, None))),
            Some(Outcome::Failure)
        );
        assert_eq!(
            outcome(grpc.classify_response(&response(404, None))),
            Some(Outcome::Success)
        );
    }
}
