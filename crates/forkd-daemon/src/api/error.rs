//! API errors: a status and a JSON body `{"code": "...", "message": "..."}` with a one-line
//! message. [`ApiError::from_store`] is the one place engine errors become HTTP statuses.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use forkd_hub::HubError;
use forkd_store::{error_chain, StoreError};

use forkd_agent::client::ClientError;
use forkd_agent::protocol::ErrorCode;
use forkd_sandbox::exec::AgentError;

use crate::registry::RegistryError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable: `not_found`, `conflict`, `bad_request`, `unauthorized`,
    /// `payload_too_large`, `method_not_allowed`, `snapshot_damaged`, `internal`,
    /// `port_taken`, `no_network_device`, `limits_unsupported`, and for
    /// work inside a sandbox `no_agent`, `not_a_directory`, `spawn_failed`,
    /// `unsupported_by_agent`, `agent_unavailable`, ...
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

impl ApiError {
    /// The HTTP face of a hub error: a reference that names nothing is 404, a pack or
    /// registry that is broken or hostile 422, a hub that does not answer 502.
    pub fn from_hub(err: &HubError) -> ApiError {
        let (status, code) = match err {
            HubError::Store(e) => return ApiError::from_store(e),
            HubError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            HubError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            HubError::BadPack { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "bad_pack"),
            HubError::MissingParent { .. } => (StatusCode::CONFLICT, "missing_parent"),
            HubError::Registry { .. } => (StatusCode::BAD_GATEWAY, "bad_registry"),
            HubError::Signature(_) => (StatusCode::UNPROCESSABLE_ENTITY, "bad_signature"),
            HubError::Http { .. } => (StatusCode::BAD_GATEWAY, "hub_unavailable"),
            HubError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, error_chain(err))
    }

    /// A request body axum could not take (malformed JSON, unknown fields, too large).
    pub fn from_json_rejection(rejection: &JsonRejection) -> ApiError {
        // Malformed JSON and JSON of the wrong shape (a missing or unknown field, a wrong
        // type) are both the client's bad request.
        let status = match rejection {
            JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
                StatusCode::BAD_REQUEST
            }
            other => other.status(),
        };
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "bad_request",
        };
        ApiError::new(status, code, rejection.body_text())
    }

    /// The body of this error, as a job records it.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.to_string(),
            message: self.message.replace('\n', " "),
        }
    }
}

impl ApiError {
    /// The HTTP face of a registry error.
    pub fn from_registry(err: &RegistryError) -> ApiError {
        let (status, code) = match err {
            RegistryError::Store(e) => return ApiError::from_store(e),
            RegistryError::UnknownSandbox(_) => (StatusCode::NOT_FOUND, "not_found"),
            RegistryError::TooMany { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_sandboxes"),
            RegistryError::Paused(_) => (StatusCode::CONFLICT, "paused"),
            RegistryError::Limits(_) => (StatusCode::UNPROCESSABLE_ENTITY, "limits_unsupported"),
            RegistryError::PortTaken { .. } => (StatusCode::CONFLICT, "port_taken"),
            RegistryError::NoNetDevice(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "no_network_device")
            }
            RegistryError::Network { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
            RegistryError::NotPaused(_) => (StatusCode::CONFLICT, "not_paused"),
            RegistryError::Start { .. }
            | RegistryError::Zygote { .. }
            | RegistryError::Snapshot { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "sandbox_failed")
            }
            RegistryError::Agent(e) => return ApiError::from_agent(e),
            RegistryError::Launch { .. } | RegistryError::Persist { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, error_chain(err))
    }
}

impl ApiError {
    /// The HTTP face of an agent error: a request the agent would refuse is 400, a sandbox
    /// without an agent 409, an agent that does not answer 502.
    pub fn from_agent(err: &AgentError) -> ApiError {
        let (status, code) = match err {
            AgentError::InvalidSpec { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
            AgentError::NoAgentInSnapshot { .. } => (StatusCode::CONFLICT, "no_agent"),
            AgentError::Request {
                source: ClientError::Agent { code, .. },
                ..
            } => agent_refusal(*code),
            AgentError::Unreachable { .. }
            | AgentError::NotAnAgent { .. }
            | AgentError::Request { .. } => (StatusCode::BAD_GATEWAY, "agent_unavailable"),
        };
        ApiError::new(status, code, error_chain(err))
    }
}

/// What the agent itself refused (it answered, with its error code).
fn agent_refusal(code: ErrorCode) -> (StatusCode, &'static str) {
    match code {
        ErrorCode::SpawnFailed => (StatusCode::UNPROCESSABLE_ENTITY, "spawn_failed"),
        ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        ErrorCode::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        ErrorCode::AlreadyExists => (StatusCode::CONFLICT, "conflict"),
        ErrorCode::NotADirectory => (StatusCode::CONFLICT, "not_a_directory"),
        // An agent from an older snapshot that predates the op.
        ErrorCode::UnknownOp => (StatusCode::NOT_IMPLEMENTED, "unsupported_by_agent"),
        ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
        ErrorCode::EvalUnavailable => (StatusCode::CONFLICT, "eval_unavailable"),
        ErrorCode::InterpreterDied => (StatusCode::INTERNAL_SERVER_ERROR, "interpreter_died"),
        ErrorCode::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        ErrorCode::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
        ErrorCode::Io => (StatusCode::INTERNAL_SERVER_ERROR, "guest_io_error"),
        _ => (StatusCode::BAD_GATEWAY, "agent_error"),
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> ApiError {
        ApiError::from_registry(&err)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        ApiError::from_store(&err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
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

    #[test]
    fn agent_refusals_map_to_the_status_a_client_can_act_on() {
        for (code, status, api_code) in [
            (ErrorCode::NotFound, 404, "not_found"),
            (ErrorCode::AlreadyExists, 409, "conflict"),
            (ErrorCode::NotADirectory, 409, "not_a_directory"),
            (ErrorCode::BadRequest, 400, "bad_request"),
            (ErrorCode::Busy, 503, "busy"),
            (ErrorCode::UnknownOp, 501, "unsupported_by_agent"),
        ] {
            let err = AgentError::Request {
                uds: "/run/x.vsock".into(),
                what: "mkdir /a".into(),
                source: ClientError::Agent {
                    code,
                    message: "file_mkdir /a: refused".into(),
                },
            };
            let api = ApiError::from_agent(&err);
            assert_eq!(
                (api.status.as_u16(), api.code),
                (status, api_code),
                "{code}"
            );
        }
    }
}
