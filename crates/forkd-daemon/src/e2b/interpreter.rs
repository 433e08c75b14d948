//! E2B's code-interpreter plane (port 49999 of a sandbox, `e2b-code-interpreter`) on the
//! agent's warm Python interpreter.
//!
//! - `POST /execute` runs code (in a context, with `env_vars` set for that run only) and
//!   answers E2B's lines, one JSON object each, as they happen: `stdout` / `stderr` while the
//!   code prints, then `number_of_executions` (the context's count), the `result`s (Jupyter
//!   MIME bundles mapped to E2B's keys: `text`, `html`, `markdown`, `svg`, `png`, `jpeg`,
//!   `pdf`, `latex`, `json`, `javascript`, `data`, `chart`, the rest under `extra`; what
//!   `display()` showed and matplotlib figures first, the last expression's value with
//!   `is_main_result`), an `error` if the code raised, and `end_of_execution`. A `keepalive`
//!   line goes out when the code is silent for a while.
//! - `/contexts`: create (`{language?, cwd?}`), list, restart, remove. Contexts are namespaces
//!   of the one interpreter, each with its own working directory and execution count;
//!   `default` always exists and can be restarted, not removed. An unknown context is 404
//!   `Context <id> not found`, as E2B's SDK expects.
//!
//! The interpreter is Python: another `language` is refused (400) by name.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use forkd_agent::client::ClientError;
use forkd_agent::protocol::{
    ErrorCode, EvalContext, EvalContextAction, EvalDisplay, EvalRequest, EvalResult, Stream,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::envd::Target;
use super::{E2b, E2bError};
use crate::api::blocking;
use crate::api::error::ApiError;
use crate::api::process::{agent_error, agent_of};

/// The code interpreter's port inside an E2B sandbox.
pub const INTERPRETER_PORT: u16 = 49999;
/// The context that always exists (E2B's SDK runs there when given none).
const DEFAULT_CONTEXT: &str = "default";
/// A `keepalive` line after this long without output.
const KEEPALIVE: Duration = Duration::from_secs(5);

pub fn router(e2b: Arc<E2b>) -> Router {
    Router::new()
        .route("/health", get(|| async { "OK" }))
        .route("/execute", post(execute))
        .route("/contexts", get(list_contexts).post(create_context))
        .route("/contexts/{id}", axum::routing::delete(remove_context))
        .route("/contexts/{id}/restart", post(restart_context))
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
    env_vars: Option<Map<String, Value>>,
}

/// What the thread running an execution tells the response.
enum Progress {
    /// The code started running: the response is a 200 stream from here on.
    Started,
    Line(Bytes),
    /// It never started: the answer is this status.
    Refused(Response),
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

async fn execute(
    State(e2b): State<Arc<E2b>>,
    Extension(target): Extension<Target>,
    body: Bytes,
) -> Response {
    let request: Execute = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("malformed request body: {e}"),
            )
        }
    };
    if request.context_id.is_some() && request.language.is_some() {
        return plain(
            StatusCode::BAD_REQUEST,
            "give a context or a language, not both",
        );
    }
    if let Some(refusal) = language_refusal(request.language.as_deref()) {
        return refusal;
    }
    let context = request
        .context_id
        .clone()
        .unwrap_or_else(|| DEFAULT_CONTEXT.into());
    let eval = EvalRequest {
        code: request.code,
        timeout_ms: None,
        stream: true,
        context: Some(context.clone()),
        env: env_strings(request.env_vars.unwrap_or_default()),
    };
    let (record, mut client) = match agent_of(&e2b.state, target.id.clone(), "run_code").await {
        Ok(pair) => pair,
        Err(e) => return plain(e.status, e.message),
    };
    let (tx, mut rx) = mpsc::channel::<Progress>(32);
    tokio::task::spawn_blocking(move || {
        let mut started = false;
        let outcome = client.eval_streaming(&eval, |stream, data| {
            let progress = if data.is_empty() {
                started = true;
                Progress::Started
            } else {
                let kind = if stream == Stream::Stderr {
                    "stderr"
                } else {
                    "stdout"
                };
                let text = String::from_utf8_lossy(data);
                Progress::Line(line(&json!({
                    "type": kind,
                    "text": text,
                    "timestamp": chrono::Utc::now().to_rfc3339(),
                })))
            };
            tx.blocking_send(progress)
                .map_err(|_| std::io::Error::other("the client went away"))
        });
        let progress = match outcome {
            Ok(result) => {
                if !started {
                    // An agent that predates streaming answers with everything at once.
                    let _ = tx.blocking_send(Progress::Started);
                }
                result_lines(&result)
            }
            Err(e) if !started => {
                vec![Progress::Refused(refusal(&record, &context, "run_code", e))]
            }
            // It ran and then failed (the interpreter died): the stream says so.
            Err(e) => vec![
                Progress::Line(line(&json!({
                    "type": "error",
                    "name": "InterpreterError",
                    "value": e.to_string(),
                    "traceback": agent_error(&record, "run_code".into(), e).message,
                }))),
                Progress::Line(line(&json!({ "type": "unexpected_end_of_execution" }))),
            ],
        };
        for p in progress {
            if tx.blocking_send(p).is_err() {
                break;
            }
        }
    });
    match rx.recv().await {
        Some(Progress::Started) => {}
        Some(Progress::Refused(response)) => return response,
        Some(Progress::Line(_)) | None => {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the execution ended before it started",
            )
        }
    }
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    let stream = futures_util::stream::poll_fn(move |cx| match rx.poll_recv(cx) {
        Poll::Ready(Some(Progress::Line(bytes))) => {
            keepalive.reset();
            Poll::Ready(Some(Ok::<_, Infallible>(bytes)))
        }
        Poll::Ready(_) => Poll::Ready(None),
        Poll::Pending => keepalive
            .poll_tick(cx)
            .map(|_| Some(Ok(Bytes::from_static(b"{\"type\":\"keepalive\"}\n")))),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// One NDJSON line (never blank: E2B's SDK parses every line).
fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).expect("JSON values serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// The lines after the code ran: its count, its results, its error, the end.
fn result_lines(result: &EvalResult) -> Vec<Progress> {
    let mut lines = vec![json!({
        "type": "number_of_executions",
        "execution_count": result.execution_count,
    })];
    lines.extend(result.results.iter().map(result_line));
    if let Some(error) = &result.error {
        lines.push(json!({
            "type": "error", "name": error.type_name, "value": error.message, "traceback": error.traceback,
        }));
    }
    lines.push(json!({ "type": "end_of_execution" }));
    lines.iter().map(|l| Progress::Line(line(l))).collect()
}

/// A display result as E2B's `result` line: its MIME types under E2B's keys.
fn result_line(display: &EvalDisplay) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), "result".into());
    let mut extra = Map::new();
    for (mime, value) in &display.data {
        let key = match mime.as_str() {
            "text/plain" => "text",
            "text/html" => "html",
            "text/markdown" => "markdown",
            "image/svg+xml" => "svg",
            "image/png" => "png",
            "image/jpeg" => "jpeg",
            "application/pdf" => "pdf",
            "text/latex" => "latex",
            "application/json" => "json",
            "application/javascript" => "javascript",
            "e2b/data" => "data",
            "e2b/chart" => "chart",
            _ => {
                extra.insert(mime.clone(), value.clone());
                continue;
            }
        };
        let value = match (key, value) {
            ("text", Value::String(text)) => Value::String(display_text(text)),
            (_, Value::Null) => continue,
            _ => value.clone(),
        };
        out.insert(key.into(), value);
    }
    out.insert("extra".into(), Value::Object(extra));
    out.insert("is_main_result".into(), display.is_main.into());
    Value::Object(out)
}

/// `env_vars` as the agent takes them: strings (other JSON values as their JSON text).
fn env_strings(vars: Map<String, Value>) -> BTreeMap<String, String> {
    vars.into_iter()
        .filter_map(|(k, v)| match v {
            Value::Null => None,
            Value::String(s) => Some((k, s)),
            other => Some((k, other.to_string())),
        })
        .collect()
}

/// A language this sandbox cannot run, answered by name.
fn language_refusal(language: Option<&str>) -> Option<Response> {
    match language {
        None | Some("python" | "python3") => None,
        Some(other) => Some(plain(
            StatusCode::BAD_REQUEST,
            format!("language {other:?} is not available: only Python is available in this sandbox's code interpreter"),
        )),
    }
}

/// An agent's refusal of an operation on `context`, as E2B's code interpreter answers it:
/// an unknown context is 404 `Context <id> not found` (E2B's SDK raises NotFoundException).
fn refusal(
    record: &crate::registry::SandboxRecord,
    context: &str,
    what: &str,
    err: ClientError,
) -> Response {
    if let ClientError::Agent { code, message } = &err {
        match code {
            ErrorCode::NotFound => {
                let mut text = format!("Context {context} not found");
                if let Some((_, why)) = message.split_once(" (the interpreter was restarted") {
                    text.push_str(&format!(" (the interpreter was restarted{why}"));
                }
                return plain(StatusCode::NOT_FOUND, text);
            }
            ErrorCode::BadRequest => return plain(StatusCode::BAD_REQUEST, message.clone()),
            _ => {}
        }
    }
    let e = agent_error(record, what.into(), err);
    plain(e.status, e.message)
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

fn context_json(context: &EvalContext) -> Value {
    json!({ "id": context.id, "language": context.language, "cwd": context.cwd })
}

/// Runs one `eval_context` action on the sandbox's agent.
async fn context_op(
    e2b: &E2b,
    target: &Target,
    action: EvalContextAction,
    context: Option<String>,
    cwd: Option<String>,
) -> Result<Vec<EvalContext>, Response> {
    let what = match action {
        EvalContextAction::List => "list_code_contexts",
        EvalContextAction::Create => "create_code_context",
        EvalContextAction::Restart => "restart_code_context",
        EvalContextAction::Remove => "remove_code_context",
    };
    let (record, mut client) = agent_of(&e2b.state, target.id.clone(), what)
        .await
        .map_err(|e| plain(e.status, e.message))?;
    let outcome = blocking(move || {
        client
            .eval_context(action, context.as_deref(), cwd.as_deref())
            .map(|r| r.contexts)
            .map_err(|e| Box::new(refusal(&record, context.as_deref().unwrap_or(""), what, e)))
    })
    .await;
    match outcome {
        Ok(result) => result.map_err(|response| *response),
        Err(ApiError {
            status, message, ..
        }) => Err(plain(status, message)),
    }
}

async fn list_contexts(
    State(e2b): State<Arc<E2b>>,
    Extension(target): Extension<Target>,
) -> Response {
    match context_op(&e2b, &target, EvalContextAction::List, None, None).await {
        Ok(contexts) => Json(contexts.iter().map(context_json).collect::<Vec<_>>()).into_response(),
        Err(response) => response,
    }
}

#[derive(Debug, Default, Deserialize)]
struct CreateContext {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

async fn create_context(
    State(e2b): State<Arc<E2b>>,
    Extension(target): Extension<Target>,
    body: Bytes,
) -> Response {
    let request: CreateContext = if body.iter().all(u8::is_ascii_whitespace) {
        CreateContext::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("malformed request body: {e}"),
                )
            }
        }
    };
    if let Some(refusal) = language_refusal(request.language.as_deref()) {
        return refusal;
    }
    let made = context_op(&e2b, &target, EvalContextAction::Create, None, request.cwd).await;
    match made {
        Ok(contexts) => match contexts.first() {
            Some(context) => Json(context_json(context)).into_response(),
            None => plain(
                StatusCode::BAD_GATEWAY,
                "the agent answered without the context it created",
            ),
        },
        Err(response) => response,
    }
}

async fn restart_context(
    State(e2b): State<Arc<E2b>>,
    Extension(target): Extension<Target>,
    Path(id): Path<String>,
) -> Response {
    match context_op(&e2b, &target, EvalContextAction::Restart, Some(id), None).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(response) => response,
    }
}

async fn remove_context(
    State(e2b): State<Arc<E2b>>,
    Extension(target): Extension<Target>,
    Path(id): Path<String>,
) -> Response {
    match context_op(&e2b, &target, EvalContextAction::Remove, Some(id), None).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(response) => response,
    }
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

    #[test]
    fn mime_bundles_map_to_e2bs_result_keys() {
        let mut data = Map::new();
        data.insert("text/plain".into(), json!("'hi'"));
        data.insert("text/html".into(), json!("<b>hi</b>"));
        data.insert("image/png".into(), json!("iVBORw=="));
        data.insert("application/json".into(), json!({"a": 1}));
        data.insert("application/vnd.custom+json".into(), json!({"b": 2}));
        let line = result_line(&EvalDisplay {
            data,
            is_main: true,
        });
        assert_eq!(
            line,
            json!({
                "type": "result", "text": "hi", "html": "<b>hi</b>", "png": "iVBORw==",
                "json": {"a": 1}, "extra": {"application/vnd.custom+json": {"b": 2}},
                "is_main_result": true,
            })
        );
    }

    #[test]
    fn lines_are_never_blank_and_end_with_a_newline() {
        let result = EvalResult {
            execution_count: 3,
            ..Default::default()
        };
        let lines: Vec<Bytes> = result_lines(&result)
            .into_iter()
            .map(|p| match p {
                Progress::Line(b) => b,
                _ => panic!("only lines"),
            })
            .collect();
        let parsed: Vec<Value> = lines
            .iter()
            .map(|l| {
                assert!(l.ends_with(b"\n") && l.len() > 1, "{l:?}");
                assert_eq!(l.iter().filter(|b| **b == b'\n').count(), 1, "{l:?}");
                serde_json::from_slice(l).unwrap()
            })
            .collect();
        assert_eq!(
            parsed,
            [
                json!({"type": "number_of_executions", "execution_count": 3}),
                json!({"type": "end_of_execution"}),
            ]
        );
    }

    #[test]
    fn only_python_is_accepted_by_name() {
        assert!(language_refusal(None).is_none());
        assert!(language_refusal(Some("python")).is_none());
        assert_eq!(
            language_refusal(Some("javascript")).unwrap().status(),
            StatusCode::BAD_REQUEST
        );
    }
}
