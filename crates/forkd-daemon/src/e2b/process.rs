//! envd's process service on the agent's `exec`: `Start` runs a command and streams its
//! events (`start`, `data`, `end`, `keepalive`) as Connect envelopes; `List` and `SendSignal`
//! see and end the commands started this way. A command's pid is the daemon's number for it
//! (the agent's exec does not report the guest's), unique per daemon.
//!
//! Not served yet (`unimplemented`): `Connect` (re-attaching to a running command),
//! `SendInput`, `StreamInput`, `CloseStdin` and `Update` (terminals), which need the agent
//! to keep a command's stdin and output open beyond one request.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use forkd_sandbox::exec::{connect_agent, exec_streaming_on, ExecSpec, Stream};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::connect::{self, ConnectError};
use super::envd::Target;
use super::E2b;
use crate::api::blocking;

/// The commands E2B's SDKs started, by sandbox and pid.
#[derive(Default)]
pub struct Commands {
    next_pid: AtomicU32,
    running: Mutex<HashMap<(String, u32), Running>>,
}

struct Running {
    config: ProcessConfig,
    /// The agent connection the command runs on: shutting it down ends the command.
    socket: UnixStream,
    killed: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessConfig {
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    process: ProcessConfig,
    #[serde(default)]
    pty: Option<serde_json::Value>,
    #[serde(default)]
    stdin: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Selector {
    #[serde(default)]
    pid: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct SignalMessage {
    process: Selector,
    #[serde(default)]
    signal: Option<serde_json::Value>,
}

impl Commands {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `process.Process/<method>`.
pub async fn serve(
    e2b: Arc<E2b>,
    target: Target,
    method: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let outcome = match method {
        "Start" => return start(e2b, target, headers, body).await,
        "List" => Ok(list(&e2b, &target)),
        "SendSignal" => send_signal(&e2b, &target, &body),
        other => Err(ConnectError::new(
            "unimplemented",
            format!("process.Process/{other} is not served by forkd yet"),
        )),
    };
    match outcome {
        Ok(message) => connect::unary(&message),
        Err(e) => e.into_response(),
    }
}

fn list(e2b: &E2b, target: &Target) -> serde_json::Value {
    let processes: Vec<serde_json::Value> = e2b
        .commands
        .lock()
        .iter()
        .filter(|((id, _), _)| *id == target.id)
        .map(|((_, pid), r)| json!({ "config": r.config, "pid": pid }))
        .collect();
    json!({ "processes": processes })
}

fn send_signal(e2b: &E2b, target: &Target, body: &[u8]) -> Result<serde_json::Value, ConnectError> {
    let message: SignalMessage = connect::message(body)?;
    let pid = message
        .process
        .pid
        .ok_or_else(|| ConnectError::new("invalid_argument", "SendSignal needs process.pid"))?;
    let signal = message.signal.unwrap_or(json!("SIGNAL_SIGKILL"));
    if !(signal == json!("SIGNAL_SIGKILL")
        || signal == json!("SIGNAL_SIGTERM")
        || signal == json!(9)
        || signal == json!(15))
    {
        return Err(ConnectError::new(
            "invalid_argument",
            format!("signal {signal} is not SIGKILL or SIGTERM"),
        ));
    }
    let running = e2b.commands.lock();
    let Some(command) = running.get(&(target.id.clone(), pid)) else {
        return Err(ConnectError::new(
            "not_found",
            format!("process with pid {pid} not found"),
        ));
    };
    // Closing its agent connection makes the agent kill the command's process group.
    command.killed.store(true, Ordering::SeqCst);
    let _ = command.socket.shutdown(std::net::Shutdown::Both);
    Ok(json!({}))
}

/// One Connect envelope: flags, the length (big-endian), the JSON message.
fn envelope(flags: u8, message: &serde_json::Value) -> Bytes {
    let json = serde_json::to_vec(message).expect("JSON values serialize");
    let mut frame = Vec::with_capacity(5 + json.len());
    frame.push(flags);
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    Bytes::from(frame)
}

/// The one message of a server-streaming request's enveloped body.
fn enveloped<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ConnectError> {
    let bad = |what: String| ConnectError::new("invalid_argument", what);
    if body.len() < 5 {
        return Err(bad(format!(
            "the request is {} bytes, shorter than a Connect envelope",
            body.len()
        )));
    }
    let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body[0] & 0x01 != 0 {
        return Err(bad(
            "a compressed Connect envelope (forkd takes identity only)".into(),
        ));
    }
    let Some(message) = body.get(5..5 + length) else {
        return Err(bad(format!(
            "the envelope says {length} bytes but {} follow",
            body.len() - 5
        )));
    };
    connect::message(message)
}

fn stream_error(error: &ConnectError) -> Bytes {
    envelope(
        0x02,
        &json!({ "error": { "code": error.code, "message": error.message } }),
    )
}

fn header_secs(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

async fn start(e2b: Arc<E2b>, target: Target, headers: &HeaderMap, body: Bytes) -> Response {
    let message: StartMessage = match enveloped(&body) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    if message.pty.is_some() || message.stdin == Some(true) {
        return ConnectError::new(
            "unimplemented",
            "terminals and open stdin are not served by forkd yet",
        )
        .into_response();
    }
    // The command's lifetime is the request's deadline, as in envd.
    let timeout = header_secs(headers, "connect-timeout-ms")
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    let keepalive = Duration::from_secs(
        header_secs(headers, "keepalive-ping-interval")
            .unwrap_or(50)
            .max(1),
    );
    let registry = e2b.state.registry.clone();
    let id = target.id.clone();
    let patience = e2b.state.agent_timeout;
    let connected = blocking(move || {
        let record = registry.with_agent(&id, "process start")?;
        let client = connect_agent(&record.vsock_uds, Instant::now() + patience)?;
        Ok::<_, crate::registry::RegistryError>((record, client))
    })
    .await;
    let (record, mut client) = match connected {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            return ConnectError::from(crate::api::error::ApiError::from_registry(&e))
                .into_response()
        }
        Err(e) => return ConnectError::from(e).into_response(),
    };
    let Ok(socket) = client.get_ref().try_clone() else {
        return ConnectError::new("internal", "cannot hold the agent connection").into_response();
    };
    let mut env: BTreeMap<String, String> = record.env.clone();
    env.extend(message.process.envs.clone());
    let mut argv = vec![message.process.cmd.clone()];
    argv.extend(message.process.args.clone());
    let spec = ExecSpec {
        argv,
        env: env.into_iter().collect(),
        cwd: message.process.cwd.clone(),
        timeout,
        stdin: Vec::new(),
    };
    let pid = 1000 + e2b.commands.next_pid.fetch_add(1, Ordering::SeqCst);
    let killed = Arc::new(AtomicBool::new(false));
    e2b.commands.lock().insert(
        (target.id.clone(), pid),
        Running {
            config: message.process,
            socket,
            killed: killed.clone(),
        },
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    let _ = tx.try_send(envelope(
        0,
        &json!({ "event": { "start": { "pid": pid } } }),
    ));
    let commands = e2b.clone();
    let key = (target.id.clone(), pid);
    tokio::task::spawn_blocking(move || {
        run(&mut client, &record.vsock_uds, &spec, &killed, &tx);
        commands.commands.lock().remove(&key);
    });
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    let stream = futures_util::stream::poll_fn(move |cx| match rx.poll_recv(cx) {
        Poll::Ready(frame) => {
            ticks.reset();
            Poll::Ready(frame.map(Ok::<_, io::Error>))
        }
        Poll::Pending => ticks
            .poll_tick(cx)
            .map(|_| Some(Ok(envelope(0, &json!({ "event": { "keepalive": {} } }))))),
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/connect+json")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Runs the command, sending its output and its end as events, then the end of the stream.
fn run(
    client: &mut forkd_sandbox::exec::AgentConn,
    uds: &std::path::Path,
    spec: &ExecSpec,
    killed: &AtomicBool,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
) {
    let send = |frame: Bytes| {
        tx.blocking_send(frame)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    };
    let b64 = |data: &[u8]| base64::engine::general_purpose::STANDARD.encode(data);
    let result = exec_streaming_on(client, uds, spec, |stream, data| {
        let key = if stream == Stream::Stderr {
            "stderr"
        } else {
            "stdout"
        };
        send(envelope(
            0,
            &json!({ "event": { "data": { key: b64(data) } } }),
        ))
    });
    let (end, trailer) = match result {
        Ok(r) if r.timed_out => (
            killed_end(),
            Some(ConnectError::new(
                "deadline_exceeded",
                "the command outlived its timeout and was killed",
            )),
        ),
        Ok(r) => match (r.exit_code, r.signal) {
            (Some(code), _) => (
                json!({ "exitCode": code, "exited": true, "status": format!("exit status {code}") }),
                None,
            ),
            (None, signal) => (
                json!({ "exitCode": -1, "exited": false,
                        "status": format!("signal: {}", signal_name(signal.unwrap_or(9))) }),
                None,
            ),
        },
        Err(_) if killed.load(Ordering::SeqCst) => (killed_end(), None),
        Err(e) => {
            let error = ConnectError::from(crate::api::error::ApiError::from_agent(&e));
            let _ = send(stream_error(&error));
            return;
        }
    };
    let _ = send(envelope(0, &json!({ "event": { "end": end } })));
    let _ = send(match trailer {
        Some(error) => stream_error(&error),
        None => envelope(0x02, &json!({})),
    });
}

fn killed_end() -> serde_json::Value {
    json!({ "exitCode": -1, "exited": false, "status": "signal: killed" })
}

/// Go's names for the signals a command usually dies of, as envd reports them.
fn signal_name(signal: i32) -> String {
    match signal {
        9 => "killed".into(),
        15 => "terminated".into(),
        2 => "interrupt".into(),
        6 => "aborted".into(),
        11 => "segmentation fault".into(),
        13 => "broken pipe".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_bad_ones_are_refused() {
        let frame = envelope(0, &json!({ "process": { "cmd": "ls" } }));
        let message: StartMessage = enveloped(&frame).unwrap();
        assert_eq!(message.process.cmd, "ls");
        assert!(enveloped::<StartMessage>(&frame[..frame.len() - 1]).is_err());
        assert!(enveloped::<StartMessage>(b"\x00\x00").is_err());
        let mut compressed = frame.to_vec();
        compressed[0] = 1;
        assert!(enveloped::<StartMessage>(&compressed).is_err());
    }
}
