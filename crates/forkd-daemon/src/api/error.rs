//! API errors: a status and a JSON body `{"code": "...", "message": "..."}` with a one-line
//! message. [`ApiError::from_store`] is the one place engine errors become HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use forkd_store::{error_chain, StoreError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable: `not_found`, `conflict`, `bad_request`, `unauthorized`,
    /// `payload_too_large`, `method_not_allowed`, `snapshot_damaged`, `internal`.
    pub code: String,
    /// One line for a human: the error and its causes.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The HTTP face of a store error: what the client did wrong (unknown or taken tag,
    /// dependents) is 4xx, a snapshot on disk that cannot be read is 500.
    pub fn from_store(err: &StoreError) -> ApiError {
        let (status, code) = match err {
            StoreError::Tag(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            StoreError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            StoreError::AlreadyExists(_) | StoreError::HasDependents { .. } => {
                (StatusCode::CONFLICT, "conflict")
            }
            StoreError::NewerFormat { .. }
            | StoreError::Manifest { .. }
            | StoreError::BadContent { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "snapshot_damaged")
            }
            StoreError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, error_chain(err))
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        ApiError::from_store(&err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // One line, whatever the cause carried.
        let message = self.message.replace('\n', " ");
        let body = ErrorBody {
            code: self.code.to_string(),
            message,
        };
        (self.status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_store::Tag;

    #[test]
    fn store_errors_map_to_the_status_a_client_can_act_on() {
        let tag = Tag::parse("web").unwrap();
        let cases = [
            (StoreError::NotFound(tag.clone()), 404, "not_found"),
            (StoreError::AlreadyExists(tag.clone()), 409, "conflict"),
            (
                StoreError::HasDependents {
                    tag: tag.clone(),
                    dependents: vec![Tag::parse("child").unwrap()],
                },
                409,
                "conflict",
            ),
            (
                StoreError::io(
                    std::path::Path::new("/x"),
                    std::io::Error::other("disk on fire"),
                ),
                500,
                "internal",
            ),
        ];
        for (err, status, code) in cases {
            let api = ApiError::from_store(&err);
            assert_eq!((api.status.as_u16(), api.code), (status, code), "{err}");
        }
        let io = ApiError::from_store(&StoreError::io(
            std::path::Path::new("/x"),
            std::io::Error::other("disk on fire"),
        ));
        assert_eq!(io.message, "/x: disk on fire", "the cause is kept, once");
    }
}
