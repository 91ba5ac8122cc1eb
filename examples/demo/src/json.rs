//! JSON request and response helpers shared by the services.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// `{"error": message}` with `status`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// `value` as JSON with `status`.
pub(crate) fn reply(status: StatusCode, value: &impl Serialize) -> Response {
    (status, Json(value)).into_response()
}

/// A request the service refuses: a status and why. Answered as `{"error": message}`.
#[derive(Debug)]
pub(crate) struct Problem {
    status: StatusCode,
    message: String,
}

impl Problem {
    /// `422 Unprocessable Entity` with `message`.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: message.into(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        error(self.status, self.message)
    }
}

/// Parses a JSON body; a body that is not the expected JSON is a `400` saying why.
pub(crate) fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|problem| Problem {
        status: StatusCode::BAD_REQUEST,
        message: format!("the body is not the expected JSON: {problem}"),
    })
}

/// An id given as a JSON string or a whole number, as a string.
pub(crate) fn id_from(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
        serde_json::Value::Number(number) if number.is_u64() => Some(number.to_string()),
        _ => None,
    }
}
