//! envd's process service on the agent's background processes (`proc_*`): `Start` and
//! `Connect` stream a command's events (`start`, `data`, `end`, `keepalive`) as Connect
//! envelopes while the agent follows its output; `List`, `SendInput`, `StreamInput`,
//! `CloseStdin` and `SendSignal` act on it by its guest pid. A command outlives the stream
//! that started it (E2B's `disconnect`), as in envd.
//!
//! Terminals: `Start` with `pty` runs the command on a guest pseudo-terminal, whose output
//! streams as `pty` data; `SendInput` with `pty` types into it and `Update` resizes it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use forkd_agent::client::ClientError;
use forkd_agent::protocol::{
    ExecRequest, Follow, ProcInfo, ProcState, ProcWaitResult, PtySize, Stream,
};
use forkd_sandbox::exec::AgentConn;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::connect::{self, ConnectError};
use super::envd::Target;
use super::E2b;
use crate::api::blocking;
use crate::api::process::{agent_error, agent_of};
use crate::registry::SandboxRecord;

/// What E2B's `Start` said about the commands it started (the agent knows only their argv),
/// by sandbox and guest pid.
#[derive(Default)]
pub struct Commands {
    started: Mutex<HashMap<(String, u32), Started>>,
}

#[derive(Clone)]
struct Started {
    config: ProcessConfig,
    tag: Option<String>,
    /// It runs on a terminal: its output is `pty` data.
    pty: bool,
}

impl Commands {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), Started>> {
        self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, sandbox: &str, pid: u32) {
        self.lock().remove(&(sandbox.to_string(), pid));
    }

    fn on_terminal(&self, sandbox: &str, pid: u32) -> bool {
        self.lock()
            .get(&(sandbox.to_string(), pid))
            .is_some_and(|s| s.pty)
    }
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

/// E2B's `PTY`: `{"size": {"cols", "rows"}}`.
#[derive(Debug, Default, Deserialize)]
struct Pty {
    #[serde(default)]
    size: PtySize,
}

#[derive(Debug, Deserialize)]
struct UpdateMessage {
    process: Selector,
    #[serde(default)]
    pty: Option<Pty>,
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    process: ProcessConfig,
    #[serde(default)]
    pty: Option<Pty>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    stdin: Option<bool>,
}

/// E2B's `ProcessSelector`: a pid or the tag given at start.
#[derive(Debug, Default, Deserialize)]
struct Selector {
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SelectorMessage {
    process: Selector,
}

#[derive(Debug, Deserialize)]
struct SignalMessage {
    process: Selector,
    #[serde(default)]
    signal: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct ProcessInput {
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    pty: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InputMessage {
    process: Selector,
    #[serde(default)]
    input: ProcessInput,
}

/// One message of `StreamInput`'s request stream.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
enum StreamInputMessage {
    Start(SelectorMessage),
    Data {
        #[serde(default)]
        input: ProcessInput,
    },
    Keepalive {},
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
        "Connect" => return reconnect(e2b, target, headers, body).await,
        "List" => list(&e2b, &target).await,
        "SendSignal" => send_signal(&e2b, &target, &body).await,
        "SendInput" => send_input(&e2b, &target, &body).await,
        "CloseStdin" => close_stdin(&e2b, &target, &body).await,
        "StreamInput" => return stream_input(&e2b, &target, &body).await,
        "Update" => update(&e2b, &target, &body).await,
        other => Err(ConnectError::new(
            "unimplemented",
            format!("process.Process/{other} is not a method of envd's process service"),
        )),
    };
    match outcome {
        Ok(message) => connect::unary(&message),
        Err(e) => e.into_response(),
    }
}

/// Runs `call` on a fresh agent connection to the target's sandbox, off the async runtime.
async fn with_agent<T: Send + 'static>(
    e2b: &E2b,
    target: &Target,
    what: &'static str,
    call: impl FnOnce(&mut AgentConn) -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ConnectError> {
    let (record, mut client) = agent_of(&e2b.state, target.id.clone(), what).await?;
    blocking(move || call(&mut client).map_err(|e| agent_error(&record, what.into(), e)))
        .await?
        .map_err(ConnectError::from)
}

/// The pid a selector names: its own, or the one started with its tag.
fn pid_of(e2b: &E2b, target: &Target, selector: &Selector) -> Result<u32, ConnectError> {
    if let Some(pid) = selector.pid {
        return Ok(pid);
    }
    let Some(tag) = selector.tag.as_deref() else {
        return Err(ConnectError::new(
            "invalid_argument",
            "the process selector names neither a pid nor a tag",
        ));
    };
    e2b.commands
        .lock()
        .iter()
        .find(|((id, _), s)| *id == target.id && s.tag.as_deref() == Some(tag))
        .map(|((_, pid), _)| *pid)
        .ok_or_else(|| ConnectError::new("not_found", format!("process with tag {tag} not found")))
}

/// The agent's `not_found` for a pid in envd's words.
fn no_such_process(pid: u32) -> impl Fn(ConnectError) -> ConnectError {
    move |e| match e.code {
        "not_found" => ConnectError::new("not_found", format!("process with pid {pid} not found")),
        _ => e,
    }
}

async fn running(e2b: &E2b, target: &Target) -> Result<Vec<ProcInfo>, ConnectError> {
    let listed = with_agent(e2b, target, "process list", |c| c.proc_list()).await?;
    Ok(listed
        .processes
        .into_iter()
        .filter(|p| p.state == ProcState::Running)
        .collect())
}

async fn list(e2b: &E2b, target: &Target) -> Result<serde_json::Value, ConnectError> {
    let running = running(e2b, target).await?;
    let started = e2b.commands.lock();
    let processes: Vec<serde_json::Value> = running
        .into_iter()
        .map(|p| {
            let known = started.get(&(target.id.clone(), p.pid)).cloned();
            let config = known.as_ref().map_or_else(
                || ProcessConfig {
                    cmd: p.argv.first().cloned().unwrap_or_default(),
                    args: p.argv.iter().skip(1).cloned().collect(),
                    ..ProcessConfig::default()
                },
                |s| s.config.clone(),
            );
            let mut entry = json!({ "config": config, "pid": p.pid });
            if let Some(tag) = known.and_then(|s| s.tag) {
                entry["tag"] = json!(tag);
            }
            entry
        })
        .collect();
    Ok(json!({ "processes": processes }))
}

async fn send_signal(
    e2b: &E2b,
    target: &Target,
    body: &[u8],
) -> Result<serde_json::Value, ConnectError> {
    let message: SignalMessage = connect::message(body)?;
    let pid = pid_of(e2b, target, &message.process)?;
    let signal = match message.signal.unwrap_or(json!("SIGNAL_SIGKILL")) {
        s if s == json!("SIGNAL_SIGKILL") || s == json!(9) => libc::SIGKILL,
        s if s == json!("SIGNAL_SIGTERM") || s == json!(15) => libc::SIGTERM,
        other => {
            return Err(ConnectError::new(
                "invalid_argument",
                format!("signal {other} is not SIGKILL or SIGTERM"),
            ))
        }
    };
    let killed = with_agent(e2b, target, "process signal", move |c| {
        c.proc_kill(pid, Some(signal))
    })
    .await
    .map_err(no_such_process(pid))?;
    // An ended command nobody collected yet is gone for envd.
    if killed.state == ProcState::Exited {
        return Err(no_such_process(pid)(ConnectError::new("not_found", "")));
    }
    Ok(json!({}))
}

/// The bytes of an input message, for its stdin or its terminal (the same to the agent).
fn input_bytes(input: &ProcessInput) -> Result<Vec<u8>, ConnectError> {
    base64::engine::general_purpose::STANDARD
        .decode(
            input
                .pty
                .as_deref()
                .or(input.stdin.as_deref())
                .unwrap_or_default(),
        )
        .map_err(|e| {
            ConnectError::new(
                "invalid_argument",
                format!("input.stdin is not base64: {e}"),
            )
        })
}

async fn write_input(
    e2b: &E2b,
    target: &Target,
    pid: u32,
    data: Vec<u8>,
    close: bool,
) -> Result<serde_json::Value, ConnectError> {
    let input = with_agent(e2b, target, "process input", move |c| {
        c.proc_input(pid, &data, close)
    })
    .await
    .map_err(no_such_process(pid))
    .map_err(|e| match e.code {
        // envd's word for stdin that is closed or was never kept open.
        "invalid_argument" => ConnectError::new("failed_precondition", e.message),
        _ => e,
    })?;
    tracing::debug!("e2b: {} bytes to pid {pid}'s stdin", input.written);
    Ok(json!({}))
}

async fn send_input(
    e2b: &E2b,
    target: &Target,
    body: &[u8],
) -> Result<serde_json::Value, ConnectError> {
    let message: InputMessage = connect::message(body)?;
    let pid = pid_of(e2b, target, &message.process)?;
    write_input(e2b, target, pid, input_bytes(&message.input)?, false).await
}

/// `Update`: a terminal's new size.
async fn update(
    e2b: &E2b,
    target: &Target,
    body: &[u8],
) -> Result<serde_json::Value, ConnectError> {
    let message: UpdateMessage = connect::message(body)?;
    let pid = pid_of(e2b, target, &message.process)?;
    let Some(pty) = message.pty else {
        return Ok(json!({}));
    };
    if pty.size.cols == 0 || pty.size.rows == 0 {
        return Err(ConnectError::new(
            "invalid_argument",
            "a terminal needs at least one column and one row",
        ));
    }
    with_agent(e2b, target, "terminal resize", move |c| {
        c.proc_resize(pid, pty.size)
    })
    .await
    .map_err(no_such_process(pid))?;
    Ok(json!({}))
}

async fn close_stdin(
    e2b: &E2b,
    target: &Target,
    body: &[u8],
) -> Result<serde_json::Value, ConnectError> {
    let message: SelectorMessage = connect::message(body)?;
    let pid = pid_of(e2b, target, &message.process)?;
    write_input(e2b, target, pid, Vec::new(), true).await
}

/// `StreamInput`: a client stream (`start`, then `data` messages) answered with one empty
/// message. The whole request body is read first, so its input arrives when it ends.
async fn stream_input(e2b: &E2b, target: &Target, body: &[u8]) -> Response {
    let outcome = async {
        let mut pid = None;
        for message in connect::envelopes::<StreamInputMessage>(body)? {
            match message {
                StreamInputMessage::Start(start) => {
                    pid = Some(pid_of(e2b, target, &start.process)?);
                }
                StreamInputMessage::Data { input } => {
                    let Some(pid) = pid else {
                        return Err(ConnectError::new(
                            "invalid_argument",
                            "StreamInput: data before the start message",
                        ));
                    };
                    write_input(e2b, target, pid, input_bytes(&input)?, false).await?;
                }
                StreamInputMessage::Keepalive {} => {}
            }
        }
        Ok(())
    }
    .await;
    let frames = match outcome {
        Ok(()) => [
            connect::envelope(0, &json!({})),
            connect::envelope(0x02, &json!({})),
        ]
        .concat(),
        Err(e) => connect::stream_error(&e).to_vec(),
    };
    connect::streaming_response(Body::from(frames))
}

async fn start(e2b: Arc<E2b>, target: Target, headers: &HeaderMap, body: Bytes) -> Response {
    let message: StartMessage = match connect::enveloped(&body) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let pty = message.pty.as_ref().map(|p| p.size);
    if pty.is_some_and(|size| size.cols == 0 || size.rows == 0) {
        return ConnectError::new(
            "invalid_argument",
            "a terminal needs at least one column and one row",
        )
        .into_response();
    }
    let (record, mut client) = match agent_of(&e2b.state, target.id.clone(), "process start").await
    {
        Ok(pair) => pair,
        Err(e) => return ConnectError::from(e).into_response(),
    };
    let mut env = record.env.clone();
    env.extend(message.process.envs.clone());
    let mut argv = vec![message.process.cmd.clone()];
    argv.extend(message.process.args.clone());
    let request = ExecRequest {
        argv,
        env,
        cwd: message.process.cwd.clone(),
        // The request's deadline is the command's lifetime, as in envd.
        timeout_ms: connect::header_number(headers, "connect-timeout-ms").filter(|ms| *ms > 0),
        keep_stdin: message.stdin == Some(true),
        pty,
        ..ExecRequest::default()
    };
    let started = blocking({
        let record = record.clone();
        move || {
            let started = client
                .proc_start(&request, &[])
                .map_err(|e| agent_error(&record, "process start".into(), e));
            (client, started)
        }
    })
    .await;
    let (client, pid) = match started {
        Ok((client, Ok(started))) => (client, started.pid),
        Ok((_, Err(e))) | Err(e) => return ConnectError::from(e).into_response(),
    };
    e2b.commands.lock().insert(
        (target.id.clone(), pid),
        Started {
            config: message.process,
            tag: message.tag,
            pty: pty.is_some(),
        },
    );
    follow(e2b, target, record, client, pid, Follow::Start, headers)
}

/// `Connect`: the events of a running command from now on.
async fn reconnect(e2b: Arc<E2b>, target: Target, headers: &HeaderMap, body: Bytes) -> Response {
    let message: SelectorMessage = match connect::enveloped(&body) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let pid = match pid_of(&e2b, &target, &message.process) {
        Ok(pid) => pid,
        Err(e) => return e.into_response(),
    };
    match running(&e2b, &target).await {
        Ok(running) if running.iter().any(|p| p.pid == pid) => {}
        Ok(_) => return no_such_process(pid)(ConnectError::new("not_found", "")).into_response(),
        Err(e) => return e.into_response(),
    }
    let (record, client) = match agent_of(&e2b.state, target.id.clone(), "process connect").await {
        Ok(pair) => pair,
        Err(e) => return ConnectError::from(e).into_response(),
    };
    follow(e2b, target, record, client, pid, Follow::Now, headers)
}

/// Streams `start`, then the command's output as the agent follows it, then its `end`; a
/// keepalive whenever nothing else was sent for the interval the SDK asked for.
fn follow(
    e2b: Arc<E2b>,
    target: Target,
    record: SandboxRecord,
    mut client: AgentConn,
    pid: u32,
    from: Follow,
    headers: &HeaderMap,
) -> Response {
    // Dropping the response (the SDK's `disconnect`, or the client going away) shuts the
    // agent connection, which ends the follow; the command keeps running.
    let hangup = client.get_ref().try_clone().ok().map(HangUp);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    let _ = tx.try_send(connect::envelope(
        0,
        &json!({ "event": { "start": { "pid": pid } } }),
    ));
    let on_terminal = e2b.commands.on_terminal(&target.id, pid);
    tokio::task::spawn_blocking(move || {
        let ended = relay(&mut client, &record, pid, from, on_terminal, &tx);
        if ended {
            e2b.commands.forget(&target.id, pid);
        }
    });
    connect::server_stream(rx, headers, json!({ "event": { "keepalive": {} } }), hangup)
}

/// Shuts an agent connection down when dropped.
struct HangUp(UnixStream);

impl Drop for HangUp {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// Sends the followed output and the end as events, then the end of the stream. True when
/// the command's end was seen.
fn relay(
    client: &mut AgentConn,
    record: &SandboxRecord,
    pid: u32,
    from: Follow,
    on_terminal: bool,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
) -> bool {
    let send = |frame: Bytes| {
        tx.blocking_send(frame)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    };
    let b64 = |data: &[u8]| base64::engine::general_purpose::STANDARD.encode(data);
    let result = client.proc_follow(pid, from, None, &mut |stream, data| {
        let key = match stream {
            _ if on_terminal => "pty",
            Stream::Stderr => "stderr",
            _ => "stdout",
        };
        send(connect::envelope(
            0,
            &json!({ "event": { "data": { key: b64(data) } } }),
        ))
    });
    match result {
        Ok(result) => {
            let (end, trailer) = end_event(&result);
            let _ = send(connect::envelope(0, &json!({ "event": { "end": end } })));
            let _ = send(match trailer {
                Some(error) => connect::stream_error(&error),
                None => connect::envelope(0x02, &json!({})),
            });
            true
        }
        Err(e) => {
            let error = ConnectError::from(agent_error(record, "process output".into(), e));
            let _ = send(connect::stream_error(&no_such_process(pid)(error)));
            false
        }
    }
}

/// envd's `end` event for how the command ended, and the stream's error when its deadline
/// killed it.
fn end_event(result: &ProcWaitResult) -> (serde_json::Value, Option<ConnectError>) {
    let process = &result.process;
    if process.timed_out {
        return (
            json!({ "exitCode": -1, "exited": false, "status": "signal: killed" }),
            Some(ConnectError::new(
                "deadline_exceeded",
                "the command outlived its timeout and was killed",
            )),
        );
    }
    let end = match (process.exit_code, process.signal) {
        (Some(code), _) => {
            json!({ "exitCode": code, "exited": true, "status": format!("exit status {code}") })
        }
        (None, signal) => json!({
            "exitCode": -1, "exited": false,
            "status": format!("signal: {}", signal_name(signal.unwrap_or(libc::SIGKILL))),
        }),
    };
    (end, None)
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
        let frame = connect::envelope(0, &json!({ "process": { "cmd": "ls" } }));
        let message: StartMessage = connect::enveloped(&frame).unwrap();
        assert_eq!(message.process.cmd, "ls");
        assert!(connect::enveloped::<StartMessage>(&frame[..frame.len() - 1]).is_err());
        assert!(connect::enveloped::<StartMessage>(b"\x00\x00").is_err());
        let mut compressed = frame.to_vec();
        compressed[0] = 1;
        assert!(connect::enveloped::<StartMessage>(&compressed).is_err());
        let two = [frame.clone(), frame.clone()].concat();
        assert!(connect::enveloped::<StartMessage>(&two).is_err());
    }

    #[test]
    fn a_client_stream_is_read_to_its_end_stream_flag() {
        let body = [
            connect::envelope(0, &json!({ "start": { "process": { "pid": 7 } } })),
            connect::envelope(0, &json!({ "data": { "input": { "stdin": "aGkK" } } })),
            connect::envelope(0, &json!({ "keepalive": {} })),
            connect::envelope(0x02, &json!({})),
        ]
        .concat();
        let messages = connect::envelopes::<StreamInputMessage>(&body).unwrap();
        assert_eq!(messages.len(), 3);
        assert!(matches!(&messages[0], StreamInputMessage::Start(s) if s.process.pid == Some(7)));
        let StreamInputMessage::Data { input } = &messages[1] else {
            panic!("{messages:?}")
        };
        assert_eq!(input_bytes(input).unwrap(), b"hi\n");
        let bad = ProcessInput {
            stdin: Some("***".into()),
            pty: None,
        };
        assert_eq!(input_bytes(&bad).unwrap_err().code, "invalid_argument");
    }
}
