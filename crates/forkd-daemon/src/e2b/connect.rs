//! The Connect protocol as E2B's envd speaks it with its SDKs: JSON codec, unary requests as
//! plain `application/json`, errors as `{"code": "<connect code>", "message"}` with the HTTP
//! status Connect assigns to the code.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::api::error::ApiError;

/// A Connect error: its code name and a one-line message.
#[derive(Debug, Clone)]
pub struct ConnectError {
    pub code: &'static str,
    pub message: String,
}

impl ConnectError {
    pub fn new(code: &'static str, message: impl Into<String>) -> ConnectError {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status the Connect protocol gives `code`.
    pub fn status(&self) -> StatusCode {
        match self.code {
            "canceled" => StatusCode::from_u16(499).expect("499 is a status"),
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "permission_denied" => StatusCode::FORBIDDEN,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// forkd's API errors in Connect's terms: the agent's `not_found`, `already_exists`, ...
impl From<ApiError> for ConnectError {
    fn from(e: ApiError) -> ConnectError {
        let code = match (e.status.as_u16(), e.code) {
            (_, "already_exists") => "already_exists",
            (_, "not_a_directory") => "invalid_argument",
            (_, "permission_denied") => "permission_denied",
            (400, _) => "invalid_argument",
            (401, _) => "unauthenticated",
            (404, _) => "not_found",
            (409, "paused") => "unavailable",
            (409, _) => "failed_precondition",
            (429, _) => "resource_exhausted",
            (502 | 503, _) => "unavailable",
            _ => "internal",
        };
        ConnectError::new(code, e.message)
    }
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorJson {
            code: self.code,
            message: &self.message,
        })
        .unwrap_or_default();
        (
            self.status(),
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

/// A unary success: the message as JSON.
pub fn unary<T: Serialize>(message: &T) -> Response {
    let body = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// A unary request's JSON message; a malformed one is `invalid_argument`.
pub fn message<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ConnectError> {
    serde_json::from_slice(body).map_err(|e| {
        ConnectError::new(
            "invalid_argument",
            format!("malformed request message: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_get_connects_statuses() {
        for (code, status) in [
            ("not_found", 404),
            ("already_exists", 409),
            ("invalid_argument", 400),
            ("unauthenticated", 401),
            ("unavailable", 503),
            ("unimplemented", 501),
            ("internal", 500),
        ] {
            assert_eq!(
                ConnectError::new(code, "x").status().as_u16(),
                status,
                "{code}"
            );
        }
    }
}
