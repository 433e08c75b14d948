//! E2B's code-interpreter plane (port 49999 of a sandbox, `e2b-code-interpreter`) on the
//! agent's warm interpreter: `POST /execute` answers E2B's lines (`number_of_executions`,
//! `stdout`, `stderr`, `result`, `error`, `end_of_execution`), one JSON object each, and
//! state carries from one execution to the next. The agent has one interpreter per sandbox,
//! Python: it is the `default` context; other contexts and languages are refused, and results
//! are the value's text (the display formats html, png and json need the agent's eval to
//! return them: not yet).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::envd::Target;
use super::{E2b, E2bError};
use crate::api::blocking;
use crate::api::process::{agent_error, agent_of};

/// The code interpreter's port inside an E2B sandbox.
pub const INTERPRETER_PORT: u16 = 49999;
/// The one context: the agent's interpreter.
const DEFAULT_CONTEXT: &str = "default";

pub fn router(e2b: Arc<E2b>) -> Router {
    Router::new()
        .route("/health", get(|| async { "OK" }))
        .route("/execute", post(execute))
        .route("/contexts", get(contexts).post(create_context))
        .route("/contexts/{id}", axum::routing::delete(other_context))
        .route("/contexts/{id}/restart", post(other_context))
        .fallback(|| async {
            E2bError::new(StatusCode::NOT_FOUND, "no such code-interpreter endpoint")
        })
        .layer(middleware::from_fn_with_state(e2b.clone(), check_access))
        .with_state(e2b)
}

/// E2B's SDK presents the sandbox's access token on `/execute`.
async fn check_access(State(e2b): State<Arc<E2b>>, request: Request, next: Next) -> Response {
    if request.uri().path() != "/execute" {
        return next.run(request).await;
    }
    let Some(target) = request.extensions().get::<Target>().cloned() else {
        return E2bError::new(StatusCode::NOT_FOUND, "no sandbox named").into_response();
    };
    if e2b.presents_token(&target, &request) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        "unauthorized access, please provide a valid access token",
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct Execute {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<serde_json::Map<String, serde_json::Value>>,
}

async fn execute(
    State(e2b): State<Arc<E2b>>,
    Extension(target): Extension<Target>,
    body: Bytes,
) -> Response {
    let request: Execute = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("malformed request body: {e}"),
            )
                .into_response()
        }
    };
    if let Some(refusal) = refusal(&request) {
        return refusal;
    }
    let (record, mut client) = match agent_of(&e2b.state, target.id.clone(), "run_code").await {
        Ok(pair) => pair,
        Err(e) => return (e.status, e.message).into_response(),
    };
    let count = e2b.executions(&target.id);
    let code = request.code;
    let outcome = blocking(move || {
        client
            .eval(&code, None)
            .map_err(|e| agent_error(&record, "run_code".into(), e))
    })
    .await;
    let result = match outcome {
        Ok(Ok(result)) => result,
        Ok(Err(e)) | Err(e) => return (e.status, e.message).into_response(),
    };
    let mut lines = vec![json!({ "type": "number_of_executions", "execution_count": count })];
    let now = chrono::Utc::now().to_rfc3339();
    for (kind, text) in [("stdout", &result.stdout), ("stderr", &result.stderr)] {
        if !text.is_empty() {
            lines.push(json!({ "type": kind, "text": text, "timestamp": now }));
        }
    }
    if let Some(value) = result.value.as_deref() {
        lines.push(json!({ "type": "result", "text": display_text(value), "is_main_result": true, "extra": {} }));
    }
    if let Some(error) = result.error {
        lines.push(json!({
            "type": "error", "name": error.type_name, "value": error.message, "traceback": error.traceback,
        }));
    }
    lines.push(json!({ "type": "end_of_execution" }));
    let mut body = Vec::new();
    for line in lines {
        body.extend(serde_json::to_vec(&line).expect("JSON values serialize"));
        body.push(b'\n');
    }
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// What this interpreter cannot do for `request`, answered as the code interpreter would.
fn refusal(request: &Execute) -> Option<Response> {
    let bad = |m: String| Some((StatusCode::BAD_REQUEST, m).into_response());
    if request.context_id.is_some() && request.language.is_some() {
        return bad("give a context or a language, not both".into());
    }
    if let Some(context) = request
        .context_id
        .as_deref()
        .filter(|c| *c != DEFAULT_CONTEXT)
    {
        return Some(
            (
                StatusCode::NOT_FOUND,
                format!("Context {context} not found"),
            )
                .into_response(),
        );
    }
    if let Some(language) = request.language.as_deref().filter(|l| *l != "python") {
        return bad(format!(
            "language {language:?}: this sandbox's interpreter is Python"
        ));
    }
    if request.env_vars.as_ref().is_some_and(|e| !e.is_empty()) {
        return bad(
            "env_vars per execution are not supported: set them at sandbox creation".into(),
        );
    }
    None
}

/// Jupyter's text/plain of a value whose repr is `repr`: a string's quotes dropped.
fn display_text(repr: &str) -> String {
    let quoted = repr.len() >= 2
        && ((repr.starts_with('\'') && repr.ends_with('\''))
            || (repr.starts_with('"') && repr.ends_with('"')));
    if quoted {
        repr[1..repr.len() - 1].to_string()
    } else {
        repr.to_string()
    }
}

fn default_context() -> serde_json::Value {
    json!({ "id": DEFAULT_CONTEXT, "language": "python", "cwd": "/root" })
}

async fn contexts() -> Json<Vec<serde_json::Value>> {
    Json(vec![default_context()])
}

async fn create_context() -> Response {
    (
        StatusCode::BAD_REQUEST,
        "this sandbox has one interpreter (the default Python context); more contexts are not supported yet",
    )
        .into_response()
}

async fn other_context(Path(id): Path<String>) -> Response {
    if id == DEFAULT_CONTEXT {
        return (
            StatusCode::BAD_REQUEST,
            "the default context cannot be restarted or removed yet",
        )
            .into_response();
    }
    (StatusCode::NOT_FOUND, format!("Context {id} not found")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strings_quotes_are_dropped_like_jupyters_text() {
        assert_eq!(display_text("2"), "2");
        assert_eq!(display_text("'abc'"), "abc");
        assert_eq!(display_text("[1, 'a']"), "[1, 'a']");
    }
}
