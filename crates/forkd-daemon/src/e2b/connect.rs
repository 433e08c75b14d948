//! The Connect protocol as E2B's envd speaks it with its SDKs: JSON codec, unary requests as
//! plain `application/json`, errors as `{"code": "<connect code>", "message"}` with the HTTP
//! status Connect assigns to the code.

use axum::body::{Body, Bytes};
use std::task::Poll;
use std::time::Duration;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

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

// ---- streaming: enveloped messages ---------------------------------------------------

/// One Connect envelope: flags, the length (big-endian), the JSON message.
pub fn envelope(flags: u8, message: &serde_json::Value) -> Bytes {
    let json = serde_json::to_vec(message).expect("JSON values serialize");
    let mut frame = Vec::with_capacity(5 + json.len());
    frame.push(flags);
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    Bytes::from(frame)
}

/// The messages of an enveloped request body, in order; the end-stream flag ends them.
pub fn envelopes<T: serde::de::DeserializeOwned>(mut body: &[u8]) -> Result<Vec<T>, ConnectError> {
    let bad = |what: String| ConnectError::new("invalid_argument", what);
    let mut messages = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 {
            return Err(bad(format!(
                "{} bytes left, shorter than a Connect envelope's prefix",
                body.len()
            )));
        }
        let flags = body[0];
        let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        if flags & 0x01 != 0 {
            return Err(bad(
                "a compressed Connect envelope (forkd takes identity only)".into(),
            ));
        }
        let Some(payload) = body.get(5..5 + length) else {
            return Err(bad(format!(
                "the envelope says {length} bytes but {} follow",
                body.len() - 5
            )));
        };
        if flags & 0x02 != 0 {
            break;
        }
        messages.push(message(payload)?);
        body = &body[5 + length..];
    }
    Ok(messages)
}

/// The one message of a server-streaming request's enveloped body.
pub fn enveloped<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ConnectError> {
    let mut messages = envelopes(body)?;
    match messages.len() {
        1 => Ok(messages.remove(0)),
        n => Err(ConnectError::new(
            "invalid_argument",
            format!("a server-streaming request carries one message, not {n}"),
        )),
    }
}

pub fn stream_error(error: &ConnectError) -> Bytes {
    envelope(
        0x02,
        &json!({ "error": { "code": error.code, "message": error.message } }),
    )
}

pub fn streaming_response(body: Body) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/connect+json")],
        body,
    )
        .into_response()
}

/// A number in a request header (`Connect-Timeout-Ms`, `Keepalive-Ping-Interval`).
pub fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A server-streaming response of the envelopes `frames` receives, with `keepalive` sent
/// whenever nothing else went for the interval the SDK asked for (`Keepalive-Ping-Interval`,
/// seconds; envd's default 50). `guard` lives as long as the response: dropping it is how
/// the producer learns the client went away.
pub fn server_stream<G: Send + 'static>(
    mut frames: tokio::sync::mpsc::Receiver<Bytes>,
    headers: &HeaderMap,
    keepalive: serde_json::Value,
    guard: G,
) -> Response {
    let interval = Duration::from_secs(
        header_number(headers, "keepalive-ping-interval")
            .unwrap_or(50)
            .max(1),
    );
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let stream = futures_util::stream::poll_fn(move |cx| {
        let _held = &guard;
        match frames.poll_recv(cx) {
            Poll::Ready(frame) => {
                ticks.reset();
                Poll::Ready(frame.map(Ok::<_, std::io::Error>))
            }
            Poll::Pending => ticks
                .poll_tick(cx)
                .map(|_| Some(Ok(envelope(0, &keepalive)))),
        }
    });
    streaming_response(Body::from_stream(stream))
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
