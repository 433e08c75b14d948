//! `/v1/sandboxes/{id}/processes`: background processes in a sandbox, through its agent's
//! `proc_*` ops — start (answered at once with the pid), list, wait (with the captured output),
//! kill (the whole process group). The agent keeps the table; the daemon keeps nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use forkd_agent::client::ProcOutput;
use forkd_agent::protocol::{ProcInfo, ProcState, MAX_SIGNAL};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::process::{
    agent_error, agent_of, connect_to, exec_spec, record_with_agent, text_or_b64, ExecRequest,
    MAX_EXEC_TIMEOUT_SECS,
};
use super::{blocking, AppState};

/// Beyond a wait's own timeout, how long the daemon listens for the agent's answer before it
/// calls the guest unresponsive (the agent ends the wait itself).
const WAIT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    Running,
    /// Ended: see `exit_code` / `signal`. A wait collects it.
    Exited,
}

/// A background process.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProcessInfo {
    /// Its process id in the guest.
    pub pid: u32,
    pub argv: Vec<String>,
    pub state: ProcessState,
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// Its own `timeout_secs` expired and its process group was killed.
    pub timed_out: bool,
    /// Milliseconds since the Unix epoch, by the guest's clock.
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// Bytes it wrote to each stream in all (the wait returns the last MiB of each).
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

impl From<ProcInfo> for ProcessInfo {
    fn from(p: ProcInfo) -> Self {
        ProcessInfo {
            pid: p.pid,
            argv: p.argv,
            state: match p.state {
                ProcState::Running => ProcessState::Running,
                ProcState::Exited => ProcessState::Exited,
            },
            exit_code: p.exit_code,
            signal: p.signal,
            timed_out: p.timed_out,
            started_ms: p.started_ms,
            ended_ms: p.ended_ms,
            stdout_bytes: p.stdout_bytes,
            stderr_bytes: p.stderr_bytes,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProcessStarted {
    pub pid: u32,
    pub started_ms: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProcessList {
    /// Running ones and ended ones not yet waited for, oldest first.
    pub processes: Vec<ProcessInfo>,
}

/// What a wait gave: the process's state and the last MiB of each output stream (so far, when
/// it still runs). Output is `stdout` when it is UTF-8, else `stdout_b64`; the same for stderr.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProcessWait {
    #[serde(flatten)]
    pub process: ProcessInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
    /// Bytes of each stream that no longer fitted the capture and are not included.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

impl From<ProcOutput> for ProcessWait {
    fn from(out: ProcOutput) -> Self {
        let (stdout, stdout_b64) = text_or_b64(&out.stdout);
        let (stderr, stderr_b64) = text_or_b64(&out.stderr);
        ProcessWait {
            process: out.result.process.into(),
            stdout,
            stdout_b64,
            stderr,
            stderr_b64,
            stdout_dropped: out.result.stdout_dropped,
            stderr_dropped: out.result.stderr_dropped,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProcessKilled {
    pub pid: u32,
    pub signal: i32,
    /// Its state when the signal was sent.
    pub state: ProcessState,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitParams {
    /// Seconds to wait for the end (0: just look); until it ends when absent.
    #[serde(default)]
    pub timeout: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct KillParams {
    /// A signal number (1-64) or name (`TERM`, `SIGTERM`, ...); KILL when absent.
    #[serde(default)]
    pub signal: Option<String>,
}

/// Starts a command in the background (same body as exec); answers at once with its pid. Its
/// output is kept (the last MiB of each stream) for the wait.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes", tag = "process",
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body = ExecRequest,
    responses((status = 201, description = "Started", body = ProcessStarted),
              (status = 400, description = "Malformed request", body = ErrorBody),
              (status = 404, description = "No such sandbox", body = ErrorBody),
              (status = 409, description = "The sandbox's guest has no agent", body = ErrorBody),
              (status = 422, description = "The command could not be started", body = ErrorBody),
              (status = 503, description = "Too many background processes running", body = ErrorBody)))]
pub async fn start(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ProcessStarted>), ApiError> {
    let Json(request) = body.map_err(|e| ApiError::from_json_rejection(&e))?;
    // Checked before connecting, as exec does: a bad command is a 400 whatever the guest.
    let record = record_with_agent(&state, id, "process start").await?;
    let spec = exec_spec(&record, request)?;
    spec.validate()
        .map_err(|e| ApiError::bad_request(forkd_store::error_chain(&e)))?;
    let (record, mut client) = connect_to(&state, record).await?;
    let started = blocking(move || {
        client
            .proc_start(&spec.request(), &spec.stdin)
            .map_err(|e| agent_error(&record, format!("start {:?}", spec.argv), e))
    })
    .await??;
    state.metrics.execs.inc();
    Ok((
        StatusCode::CREATED,
        Json(ProcessStarted {
            pid: started.pid,
            started_ms: started.started_ms,
        }),
    ))
}

/// The sandbox's background processes: running, and ended but not yet waited for.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes", tag = "process", operation_id = "list_processes",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 200, description = "The processes", body = ProcessList),
              (status = 404, description = "No such sandbox", body = ErrorBody),
              (status = 409, description = "The sandbox's guest has no agent", body = ErrorBody)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ProcessList>, ApiError> {
    let (record, mut client) = agent_of(&state, id, "process list").await?;
    let listed = blocking(move || {
        client
            .proc_list()
            .map_err(|e| agent_error(&record, "list processes".into(), e))
    })
    .await??;
    Ok(Json(ProcessList {
        processes: listed.processes.into_iter().map(Into::into).collect(),
    }))
}

/// Waits for a background process to end (at most `timeout` seconds) and returns its state and
/// captured output. A wait that sees the end collects the process: it leaves the list.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/wait", tag = "process",
    params(("id" = String, Path, description = "The sandbox's id"),
           ("pid" = u32, Path, description = "The process's pid"), WaitParams),
    responses((status = 200, description = "Its state (still running when the timeout came first) and output", body = ProcessWait),
              (status = 400, description = "A bad pid or timeout", body = ErrorBody),
              (status = 404, description = "No such sandbox or process", body = ErrorBody)))]
pub async fn wait(
    State(state): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, String)>,
    query: Result<Query<WaitParams>, QueryRejection>,
) -> Result<Json<ProcessWait>, ApiError> {
    let pid = parse_pid(&pid)?;
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let timeout = wait_timeout(params.timeout)?;
    let (record, mut client) = agent_of(&state, id, "process wait").await?;
    let out = blocking(move || {
        let guard = timeout.map(|t| t + WAIT_GRACE);
        client
            .get_ref()
            .set_read_timeout(guard)
            .map_err(Into::into)
            .and_then(|()| client.proc_wait(pid, timeout.map(|t| t.as_millis() as u64)))
            .map_err(|e| agent_error(&record, format!("wait for process {pid}"), e))
    })
    .await??;
    Ok(Json(out.into()))
}

/// Sends a signal (KILL by default) to a background process's whole process group. The
/// process stays listed until waited for; the wait reports the signal.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/processes/{pid}", tag = "process",
    params(("id" = String, Path, description = "The sandbox's id"),
           ("pid" = u32, Path, description = "The process's pid"), KillParams),
    responses((status = 200, description = "Signalled", body = ProcessKilled),
              (status = 400, description = "A bad pid or signal", body = ErrorBody),
              (status = 404, description = "No such sandbox or process", body = ErrorBody)))]
pub async fn kill(
    State(state): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, String)>,
    query: Result<Query<KillParams>, QueryRejection>,
) -> Result<Json<ProcessKilled>, ApiError> {
    let pid = parse_pid(&pid)?;
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let signal = params.signal.as_deref().map(parse_signal).transpose()?;
    let (record, mut client) = agent_of(&state, id, "process kill").await?;
    let killed = blocking(move || {
        client
            .proc_kill(pid, signal)
            .map_err(|e| agent_error(&record, format!("kill process {pid}"), e))
    })
    .await??;
    Ok(Json(ProcessKilled {
        pid: killed.pid,
        signal: killed.signal,
        state: match killed.state {
            ProcState::Running => ProcessState::Running,
            ProcState::Exited => ProcessState::Exited,
        },
    }))
}

fn parse_pid(text: &str) -> Result<u32, ApiError> {
    text.parse::<u32>()
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| ApiError::bad_request(format!("pid {text:?} is not a process id")))
}

/// A wait's `timeout`: 0 (just look) up to a day; None waits for the end.
fn wait_timeout(secs: Option<u64>) -> Result<Option<Duration>, ApiError> {
    match secs {
        Some(secs) if secs > MAX_EXEC_TIMEOUT_SECS => Err(ApiError::bad_request(format!(
            "timeout {secs} is not between 0 and {MAX_EXEC_TIMEOUT_SECS}"
        ))),
        other => Ok(other.map(Duration::from_secs)),
    }
}

/// Signal names as Linux numbers them (the guest is Linux, like this host).
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ABRT", libc::SIGABRT),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("WINCH", libc::SIGWINCH),
];

/// `signal=`: a number from 1 to MAX_SIGNAL, or a name with or without `SIG`, any case.
fn parse_signal(text: &str) -> Result<i32, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "signal {text:?} is not a signal number (1-{MAX_SIGNAL}) or name (TERM, KILL, ...)"
        ))
    };
    if let Ok(number) = text.parse::<i32>() {
        return (1..=MAX_SIGNAL)
            .contains(&number)
            .then_some(number)
            .ok_or_else(bad);
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, number)| *number)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_numbers_in_range_or_known_names() {
        for (text, number) in [
            ("9", 9),
            ("1", 1),
            ("64", 64),
            ("TERM", 15),
            ("sigterm", 15),
            ("SIGKILL", 9),
            ("usr1", libc::SIGUSR1),
        ] {
            assert_eq!(parse_signal(text).unwrap(), number, "{text}");
        }
        for text in ["0", "65", "-9", "", "SIG", "TERMINATE", "9.0"] {
            let err = parse_signal(text).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{text}");
            assert!(!err.message.contains('\n'));
        }
    }

    #[test]
    fn pids_and_wait_timeouts_are_checked() {
        assert_eq!(parse_pid("42").unwrap(), 42);
        for text in ["0", "-1", "abc", "", "4294967296"] {
            assert_eq!(
                parse_pid(text).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{text}"
            );
        }
        assert_eq!(wait_timeout(None).unwrap(), None);
        assert_eq!(wait_timeout(Some(0)).unwrap(), Some(Duration::ZERO));
        assert!(wait_timeout(Some(MAX_EXEC_TIMEOUT_SECS)).is_ok());
        assert!(wait_timeout(Some(MAX_EXEC_TIMEOUT_SECS + 1)).is_err());
    }

    #[test]
    fn a_wait_answer_is_text_when_it_can_be_and_base64_otherwise() {
        let out = ProcOutput {
            stdout: b"hi\n".to_vec(),
            stderr: vec![0xff, 0xfe],
            result: forkd_agent::protocol::ProcWaitResult {
                process: ProcInfo {
                    pid: 7,
                    argv: vec!["sh".into()],
                    state: ProcState::Exited,
                    exit_code: Some(3),
                    signal: None,
                    timed_out: false,
                    started_ms: 1,
                    ended_ms: Some(2),
                    stdout_bytes: 3,
                    stderr_bytes: 2,
                },
                stdout_dropped: 0,
                stderr_dropped: 0,
            },
        };
        let value = serde_json::to_value(ProcessWait::from(out)).unwrap();
        assert_eq!(value["pid"], 7, "flat: {value}");
        assert_eq!(value["state"], "exited");
        assert_eq!(value["exit_code"], 3);
        assert_eq!(value["stdout"], "hi\n");
        assert_eq!(value["stderr_b64"], "//4=");
        assert!(value.get("stderr").is_none() && value.get("stdout_b64").is_none());
    }
}
