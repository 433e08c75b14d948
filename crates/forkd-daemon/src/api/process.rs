//! Inside a sandbox, through its forkd-agent: `exec` (output streamed as it is produced),
//! `eval` in the warm interpreter, `ping`.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use forkd_agent::client::ClientError;
use forkd_sandbox::exec::{
    connect_agent, exec_streaming_on, AgentConn, AgentError, ExecSpec, Stream,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::sandboxes::seconds_within;
use super::{blocking, AppState};
use crate::registry::SandboxRecord;

/// Longest command timeout: a day.
pub(super) const MAX_EXEC_TIMEOUT_SECS: u64 = 24 * 3600;

/// A command: an argument vector, or a string for `sh -c`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Command {
    Argv(Vec<String>),
    Shell(String),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub cmd: Command,
    /// Added to (and overriding) the sandbox's own environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory in the guest.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Text given to the command's standard input (then end of file).
    #[serde(default)]
    pub stdin: Option<String>,
    /// The command's process group is killed after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// One line of an exec's response stream (`application/x-ndjson`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// Output as it was produced: `data` when it is UTF-8, else `data_b64`.
    Stdout {
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    Stderr {
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    /// The last line: how the command ended.
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        duration_ms: u64,
    },
    /// The last line when the command could not run to its end (the agent went away).
    Error { code: String, message: String },
    /// Sent while the command is silent, every few seconds: a client that is gone is noticed
    /// (writing to it fails) and its command ended. Clients skip it.
    Heartbeat,
}

/// How long an exec stream stays silent before a heartbeat line.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Runs a command in the sandbox; the response streams its output as it is produced, one
/// JSON event per line, ending with `exit` (or `error`).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "process",
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body = ExecRequest,
    responses((status = 200, description = "JSON lines of ExecEvent", body = ExecEvent,
                content_type = "application/x-ndjson"),
              (status = 400, description = "Malformed request", body = ErrorBody),
              (status = 404, description = "No such sandbox", body = ErrorBody),
              (status = 409, description = "The sandbox's guest has no agent", body = ErrorBody),
              (status = 502, description = "The agent does not answer", body = ErrorBody)))]
pub async fn exec(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::from_json_rejection(&e))?;
    let registry = state.registry.clone();
    let record = blocking(move || registry.with_agent(&id, "exec")).await??;
    let spec = exec_spec(&record, request)?;
    spec.validate()
        .map_err(|e| ApiError::bad_request(forkd_store::error_chain(&e)))?;
    // Connect before answering, so an unreachable agent is a status, not a stream.
    let uds = record.vsock_uds.clone();
    let patience = state.agent_timeout;
    let mut client = blocking(move || connect_agent(&uds, Instant::now() + patience))
        .await?
        .map_err(|e| ApiError::from_agent(&e))?;
    state.metrics.execs.inc();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    let gone = end_with_the_stream(&client);
    let uds = record.vsock_uds.clone();
    tokio::task::spawn_blocking(move || run_exec(&mut client, &uds, &spec, tx));
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    let stream = futures_util::stream::poll_fn(move |cx| {
        let _until_dropped = &gone;
        match rx.poll_recv(cx) {
            Poll::Ready(line) => {
                heartbeat.reset();
                Poll::Ready(line.map(Ok::<_, io::Error>))
            }
            Poll::Pending => heartbeat
                .poll_tick(cx)
                .map(|_| Some(Ok(Bytes::from_static(b"{\"type\":\"heartbeat\"}\n")))),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// A client that goes away mid-stream must not leave its command running until it next
/// prints: once the response stream is dropped (finished, or its client gone), the agent
/// connection is shut down, which ends the command in the guest. Keep the returned sender
/// inside the stream.
fn end_with_the_stream(client: &AgentConn) -> Option<tokio::sync::oneshot::Sender<()>> {
    let socket = client.get_ref().try_clone().ok()?;
    let (gone, dropped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = dropped.await;
        let _ = socket.shutdown(std::net::Shutdown::Both);
    });
    Some(gone)
}

pub(super) fn exec_spec(
    record: &SandboxRecord,
    request: ExecRequest,
) -> Result<ExecSpec, ApiError> {
    let argv = match request.cmd {
        Command::Argv(argv) => argv,
        Command::Shell(script) => vec!["sh".into(), "-c".into(), script],
    };
    let timeout = request
        .timeout_secs
        .map(|secs| seconds_within(secs, MAX_EXEC_TIMEOUT_SECS))
        .transpose()?;
    let mut env = record.env.clone();
    env.extend(request.env);
    Ok(ExecSpec {
        argv,
        env: env.into_iter().collect(),
        cwd: request.cwd,
        timeout,
        stdin: request.stdin.unwrap_or_default().into_bytes(),
    })
}

/// Runs the command, sending each chunk as an event line; a client that went away ends the
/// stream (the agent then ends the command with its connection).
fn run_exec(
    client: &mut AgentConn,
    uds: &std::path::Path,
    spec: &ExecSpec,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let send = |event: &ExecEvent| -> io::Result<()> {
        let mut line = serde_json::to_vec(event).expect("events serialize");
        line.push(b'\n');
        tx.blocking_send(Bytes::from(line))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    };
    let result = exec_streaming_on(client, uds, spec, |stream, data| {
        send(&output_event(stream, data))
    });
    let last = match result {
        Ok(r) => ExecEvent::Exit {
            exit_code: r.exit_code,
            signal: r.signal,
            timed_out: r.timed_out,
            duration_ms: r.duration_ms,
        },
        Err(e) => {
            let api = ApiError::from_agent(&e);
            ExecEvent::Error {
                code: api.code.to_string(),
                message: api.body().message,
            }
        }
    };
    let _ = send(&last);
}

/// Output as JSON: the text when it is UTF-8, else base64 (the second).
pub(super) fn text_or_b64(data: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(data) {
        Ok(text) => (Some(text.to_string()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(data)),
        ),
    }
}

fn output_event(stream: Stream, data: &[u8]) -> ExecEvent {
    let (text, b64) = text_or_b64(data);
    match stream {
        Stream::Stderr => ExecEvent::Stderr {
            data: text,
            data_b64: b64,
        },
        _ => ExecEvent::Stdout {
            data: text,
            data_b64: b64,
        },
    }
}

/// The record of a sandbox whose guest has an agent (not connected yet).
pub(super) async fn record_with_agent(
    state: &AppState,
    id: String,
    what: &'static str,
) -> Result<SandboxRecord, ApiError> {
    let registry = state.registry.clone();
    Ok(blocking(move || registry.with_agent(&id, what)).await??)
}

/// Opens an agent connection to `record`'s sandbox.
pub(super) async fn connect_to(
    state: &AppState,
    record: SandboxRecord,
) -> Result<(SandboxRecord, AgentConn), ApiError> {
    let patience = state.agent_timeout;
    blocking(move || {
        let client = connect_agent(&record.vsock_uds, Instant::now() + patience)
            .map_err(|e| ApiError::from_agent(&e))?;
        Ok((record, client))
    })
    .await?
}

/// Opens an agent connection to a sandbox that has one.
pub(crate) async fn agent_of(
    state: &AppState,
    id: String,
    what: &'static str,
) -> Result<(SandboxRecord, AgentConn), ApiError> {
    let registry = state.registry.clone();
    let patience = state.agent_timeout;
    blocking(move || {
        let record = registry.with_agent(&id, what)?;
        let client = connect_agent(&record.vsock_uds, Instant::now() + patience)?;
        Ok::<_, crate::registry::RegistryError>((record, client))
    })
    .await?
    .map_err(ApiError::from)
}

/// An agent's failure on `record`'s sandbox during `what`, as the API answers it.
pub(crate) fn agent_error(record: &SandboxRecord, what: String, source: ClientError) -> ApiError {
    ApiError::from_agent(&AgentError::Request {
        uds: record.vsock_uds.clone(),
        what,
        source,
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalRequest {
    pub code: String,
    /// The interpreter is killed (and its state lost) after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// What an eval gave.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EvalOutcome {
    /// `repr()` of the last expression's value, when it has one.
    pub value: Option<String>,
    pub stdout: String,
    pub stderr: String,
    /// The exception the code raised.
    pub error: Option<EvalException>,
    pub timed_out: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EvalException {
    #[serde(rename = "type")]
    pub type_name: String,
    pub message: String,
    pub traceback: String,
}

/// Evaluates code in the sandbox's warm interpreter (its state persists between calls).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/eval", tag = "process",
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body = EvalRequest,
    responses((status = 200, description = "The outcome", body = EvalOutcome),
              (status = 400, description = "Malformed request", body = ErrorBody),
              (status = 404, description = "No such sandbox", body = ErrorBody),
              (status = 409, description = "The sandbox's guest has no agent", body = ErrorBody),
              (status = 502, description = "The agent does not answer or has no interpreter", body = ErrorBody)))]
pub async fn eval(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<Json<EvalRequest>, JsonRejection>,
) -> Result<Json<EvalOutcome>, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::from_json_rejection(&e))?;
    let timeout_ms = request
        .timeout_secs
        .map(|secs| seconds_within(secs, MAX_EXEC_TIMEOUT_SECS))
        .transpose()?
        .map(|t| t.as_millis() as u64);
    let (record, mut client) = agent_of(&state, id, "eval").await?;
    let result = blocking(move || {
        client
            .eval(&request.code, timeout_ms)
            .map_err(|e| agent_error(&record, "eval".into(), e))
    })
    .await??;
    Ok(Json(EvalOutcome {
        value: result.value,
        stdout: result.stdout,
        stderr: result.stderr,
        error: result.error.map(|e| EvalException {
            type_name: e.type_name,
            message: e.message,
            traceback: e.traceback,
        }),
        timed_out: result.timed_out,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Pong {
    pub agent_version: String,
    /// Restores of this VM the agent has seen (1 for a sandbox forked once).
    pub fork_count: u64,
    pub uptime_ms: u64,
}

/// Checks the sandbox's agent answers.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ping", tag = "process",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 200, description = "The agent answered", body = Pong),
              (status = 404, description = "No such sandbox", body = ErrorBody),
              (status = 409, description = "The sandbox's guest has no agent", body = ErrorBody),
              (status = 502, description = "The agent does not answer", body = ErrorBody)))]
pub async fn ping(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Pong>, ApiError> {
    let (record, mut client) = agent_of(&state, id, "ping").await?;
    let pong = blocking(move || {
        client
            .ping()
            .map_err(|e| agent_error(&record, "ping".into(), e))
    })
    .await??;
    Ok(Json(Pong {
        agent_version: pong.agent_version,
        fork_count: pong.fork_count,
        uptime_ms: pong.uptime_ms,
    }))
}
