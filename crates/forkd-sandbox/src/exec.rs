//! Driving the forkd-agent inside a child (or a booted parent) through its hybrid-vsock socket.
//!
//! The rule every caller follows: after a restore, the first thing sent to a child's agent is
//! `restored` (fresh host entropy, the host clock, a fork-counter bump) —
//! [`connect_restored_agent`] does exactly that and nothing else may talk to a fresh child
//! first. `forkd run`, `forkd fork` (with or without `--exec`) and later the daemon go through
//! it. [`run_warmups`] drives the agent of a freshly *booted* guest (no restore: no
//! `restored`) before `forkd snapshot` pauses it.

use std::io;
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use forkd_agent::client::{hybrid_vsock_handshake, AgentClient, ClientError, ExecBuilder};
use forkd_agent::protocol::{ExecRequest, RestoredResult, DEFAULT_VSOCK_PORT};
use forkd_store::Manifest;

/// What a finished command reports, and which stream a chunk of its output is from
/// (re-exported so callers need not name forkd-agent).
pub use forkd_agent::protocol::{ExecResult, Stream};
use serde::Serialize;

/// Guest vsock port the agent listens on.
pub const AGENT_PORT: u32 = DEFAULT_VSOCK_PORT;
/// Bytes of host entropy sent with every `restored`.
pub const ENTROPY_BYTES: usize = 64;
/// Extra time the host waits for the agent's answer beyond a command's own timeout (the agent
/// enforces the timeout; this only guards against a guest that stopped answering at all).
const REPLY_GRACE: Duration = Duration::from_secs(10);
/// Pause between connection attempts while a child's agent is not reachable yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// A connection to one agent.
pub type AgentConn = AgentClient<UnixStream>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Nothing answered on the agent's port before the deadline.
    #[error("no forkd-agent reachable through {} (guest vsock port {port}) within {:.1} s: {last}", uds.display(), waited.as_secs_f64())]
    Unreachable {
        uds: PathBuf,
        port: u32,
        waited: Duration,
        last: String,
    },
    /// Something accepted the connection but did not answer as the agent does.
    #[error("the guest behind {} does not speak the forkd-agent protocol on vsock port {port}: {message}", uds.display())]
    NotAnAgent {
        uds: PathBuf,
        port: u32,
        message: String,
    },
    /// The agent failed a request, or the connection broke during one.
    #[error("forkd-agent behind {}: {what}", uds.display())]
    Request {
        uds: PathBuf,
        what: String,
        source: ClientError,
    },
    /// The command cannot be sent as given.
    #[error("exec {argv:?}")]
    InvalidSpec {
        argv: Vec<String>,
        #[source]
        source: ExecSpecError,
    },
    /// The snapshot's guest has no agent to talk to.
    #[error("snapshot {tag} is of the built-in guest {kernel}, which has no forkd-agent; {what} needs a Linux snapshot whose image runs forkd-agent")]
    NoAgentInSnapshot {
        tag: String,
        kernel: String,
        what: String,
    },
}

/// Whether the snapshot's guest runs forkd-agent. Built-in guests (`builtin:<name>`, the demo
/// and the VMM's test guests) are freestanding programs without one; every other guest is a
/// kernel the user brought, whose image runs the agent.
pub fn snapshot_has_agent(manifest: &Manifest) -> bool {
    !manifest.kernel.starts_with("builtin:")
}

/// Refuses (before anything is forked) to drive the agent of a snapshot that has none.
/// `what` names the operation for the message, e.g. "forkd run".
pub fn require_agent(manifest: &Manifest, what: &str) -> Result<(), AgentError> {
    if snapshot_has_agent(manifest) {
        Ok(())
    } else {
        Err(AgentError::NoAgentInSnapshot {
            tag: manifest.tag.to_string(),
            // The guest's name; the build digest after '@' means nothing to the reader here.
            kernel: manifest
                .kernel
                .split_once('@')
                .map_or(manifest.kernel.as_str(), |(name, _)| name)
                .to_string(),
            what: what.to_string(),
        })
    }
}

/// A child's agent that has handled `restored`.
pub struct RestoredAgent {
    pub client: AgentConn,
    pub restored: RestoredResult,
    pub uds: PathBuf,
}

impl std::fmt::Debug for RestoredAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoredAgent")
            .field("uds", &self.uds)
            .field("restored", &self.restored)
            .finish_non_exhaustive()
    }
}

/// Connects to a freshly restored child's agent through its hybrid-vsock socket `uds` and
/// sends `restored` before anything else. Retries until `deadline` while the agent is not
/// reachable yet (the socket not created, the guest not listening, the connection reset by
/// the child's vsock transport reset).
pub fn connect_restored_agent(uds: &Path, deadline: Instant) -> Result<RestoredAgent, AgentError> {
    connect_restored_agent_with(uds, deadline, None)
}

/// [`connect_restored_agent`] that also hands the child the resolvers its network policy
/// opens (`--allow-dns`), which its agent writes to resolv.conf before anything else runs.
pub fn connect_restored_agent_with(
    uds: &Path,
    deadline: Instant,
    resolvers: Option<&[IpAddr]>,
) -> Result<RestoredAgent, AgentError> {
    let (client, restored) = connect_then(uds, deadline, "restored", |client| {
        client.restored_with(&host_entropy(), SystemTime::now(), resolvers)
    })?;
    Ok(RestoredAgent {
        client,
        restored,
        uds: uds.to_path_buf(),
    })
}

/// Connects to an agent without sending `restored`: the agent of a guest that was booted (not
/// restored), or of a child that has already been sent `restored` (by `forkd fork --hold`, for
/// instance). Retries until `deadline` like [`connect_restored_agent`]; the connection is
/// checked with a `ping`.
pub fn connect_agent(uds: &Path, deadline: Instant) -> Result<AgentConn, AgentError> {
    connect_then(uds, deadline, "ping", |client| client.ping()).map(|(client, _)| client)
}

/// Connects (retrying until `deadline`) and makes `first` the connection's first request.
fn connect_then<T>(
    uds: &Path,
    deadline: Instant,
    what: &str,
    first: impl Fn(&mut AgentConn) -> Result<T, ClientError>,
) -> Result<(AgentConn, T), AgentError> {
    let started = Instant::now();
    loop {
        let last = match connect_agent_once(uds, deadline) {
            Ok(mut client) => match first(&mut client) {
                Ok(answer) => {
                    clear_timeout(&client);
                    return Ok((client, answer));
                }
                Err(e) => match classify(uds, what, e) {
                    Attempt::Retry(why) => why,
                    Attempt::Fail(e) => return Err(e),
                },
            },
            Err(why) => why,
        };
        if Instant::now() + RETRY_INTERVAL >= deadline {
            return Err(AgentError::Unreachable {
                uds: uds.to_path_buf(),
                port: AGENT_PORT,
                waited: started.elapsed(),
                last,
            });
        }
        std::thread::sleep(RETRY_INTERVAL);
    }
}

enum Attempt {
    Retry(String),
    Fail(AgentError),
}

/// After a successful handshake: an I/O failure (reset, EOF, read timeout) may be the child's
/// transport reset or a guest still starting, so it is retried; an answer that is not the
/// agent's protocol is final.
fn classify(uds: &Path, what: &str, e: ClientError) -> Attempt {
    match e {
        ClientError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Attempt::Retry("connected, but nothing answered the agent protocol (is forkd-agent running in the guest?)".into())
        }
        ClientError::Io(e) => Attempt::Retry(format!("connected, then {e}")),
        ClientError::Protocol(message) => Attempt::Fail(AgentError::NotAnAgent {
            uds: uds.to_path_buf(),
            port: AGENT_PORT,
            message,
        }),
        e @ ClientError::BadReply(_) => Attempt::Fail(AgentError::NotAnAgent {
            uds: uds.to_path_buf(),
            port: AGENT_PORT,
            message: forkd_store::error_chain(&e),
        }),
        other => Attempt::Fail(AgentError::Request {
            uds: uds.to_path_buf(),
            what: what.to_string(),
            source: other,
        }),
    }
}

/// One connection attempt: Unix connect, `CONNECT <port>` handshake, with every read bounded
/// by `deadline`. Errors are the reason to retry.
fn connect_agent_once(uds: &Path, deadline: Instant) -> Result<AgentConn, String> {
    let mut stream = UnixStream::connect(uds).map_err(|e| format!("connect: {e}"))?;
    set_deadline(&stream, deadline).map_err(|e| e.to_string())?;
    hybrid_vsock_handshake(&mut stream, AGENT_PORT).map_err(|e| forkd_store::error_chain(&e))?;
    Ok(AgentClient::new(stream))
}

fn set_deadline(stream: &UnixStream, deadline: Instant) -> io::Result<()> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

fn clear_timeout(client: &AgentConn) {
    let _ = client.get_ref().set_read_timeout(None);
    let _ = client.get_ref().set_write_timeout(None);
}

/// Fresh entropy from the host kernel for a child's pool.
pub fn host_entropy() -> Vec<u8> {
    let mut buf = vec![0u8; ENTROPY_BYTES];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom(2) writes at most the given length through the pointer, which is
        // the start of `buf[filled..]`, a live, exclusively borrowed slice of exactly that
        // length; u8 accepts any bytes it writes.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // No getrandom(2) (a very old kernel): the device gives the same bytes.
            use std::io::Read;
            if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
                if f.read_exact(&mut buf[filled..]).is_ok() {
                    break;
                }
            }
            tracing::warn!("no host entropy available for the restored child");
            break;
        }
    }
    buf
}

/// What to run in a child, as the CLI takes it.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// The agent kills the command's process group when it expires.
    pub timeout: Option<Duration>,
    /// Bytes the command reads on its standard input (then end of file).
    pub stdin: Vec<u8>,
}

/// Why an [`ExecSpec`] cannot be sent as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecSpecError {
    #[error("no command given")]
    NoCommand,
    #[error("working directory {0:?} is not an absolute path inside the guest")]
    RelativeCwd(String),
    #[error("environment variable name {0:?} is empty or contains '=' or a NUL byte")]
    BadEnvName(String),
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error("the command's timeout must be longer than zero")]
    ZeroTimeout,
}

impl ExecSpec {
    /// Checks what the agent would refuse (or misread) before anything is sent: every front
    /// end (the CLI's `run` and `fork --exec`, the daemon) goes through this.
    pub fn validate(&self) -> Result<(), ExecSpecError> {
        if self.argv.is_empty() {
            return Err(ExecSpecError::NoCommand);
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') {
                return Err(ExecSpecError::RelativeCwd(cwd.clone()));
            }
        }
        for (key, _) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ExecSpecError::BadEnvName(key.clone()));
            }
        }
        let texts = self.argv.iter().chain(self.env.iter().map(|(_, v)| v));
        if let Some(bad) = texts.chain(self.cwd.as_ref()).find(|t| t.contains('\0')) {
            return Err(ExecSpecError::Nul(bad.clone()));
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(ExecSpecError::ZeroTimeout);
        }
        Ok(())
    }

    /// `sh -c script` with `timeout`.
    pub fn shell(script: impl Into<String>, timeout: Duration) -> ExecSpec {
        ExecSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Some(timeout),
            ..Default::default()
        }
    }

    pub fn request(&self) -> ExecRequest {
        let mut b = ExecBuilder::new(self.argv.iter().cloned());
        for (k, v) in &self.env {
            b = b.env(k.clone(), v.clone());
        }
        if let Some(dir) = &self.cwd {
            b = b.cwd(dir.clone());
        }
        if let Some(t) = self.timeout {
            b = b.timeout_ms(t.as_millis().max(1) as u64);
        }
        b.build()
    }
}

/// How a finished command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandEnd {
    Exited(i32),
    /// Killed by this signal (not by its timeout).
    Signalled(i32),
    /// Its timeout (`after`, when known) expired and the agent killed its process group.
    TimedOut {
        after: Option<Duration>,
    },
    /// The agent reported neither an exit code nor a signal.
    Unknown,
}

impl CommandEnd {
    /// How the command that reported `result` ended; `timeout` is the one it was given.
    pub fn of(result: &ExecResult, timeout: Option<Duration>) -> CommandEnd {
        match (result.timed_out, result.exit_code, result.signal) {
            (true, _, _) => CommandEnd::TimedOut { after: timeout },
            (false, Some(code), _) => CommandEnd::Exited(code),
            (false, None, Some(sig)) => CommandEnd::Signalled(sig),
            (false, None, None) => CommandEnd::Unknown,
        }
    }

    pub fn succeeded(self) -> bool {
        self == CommandEnd::Exited(0)
    }
}

impl std::fmt::Display for CommandEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandEnd::Exited(code) => write!(f, "exit code {code}"),
            CommandEnd::Signalled(sig) => write!(f, "killed by signal {sig}"),
            CommandEnd::TimedOut { after: Some(t) } => write!(
                f,
                "timed out after {:.1} s (its process group was killed)",
                t.as_secs_f64()
            ),
            CommandEnd::TimedOut { after: None } => {
                write!(f, "timed out (its process group was killed)")
            }
            CommandEnd::Unknown => write!(f, "ended without an exit code"),
        }
    }
}

/// Runs `spec` through `conn`, handing each output chunk to `on_output` as it arrives.
pub fn exec_streaming(
    conn: &mut RestoredAgent,
    spec: &ExecSpec,
    on_output: impl FnMut(Stream, &[u8]) -> io::Result<()>,
) -> Result<ExecResult, AgentError> {
    exec_streaming_on(&mut conn.client, &conn.uds, spec, on_output)
}

/// [`exec_streaming`] on an agent connection that already had its `restored` (say, one the
/// daemon opens to a sandbox it created); `uds` names it in errors.
pub fn exec_streaming_on(
    client: &mut AgentConn,
    uds: &Path,
    spec: &ExecSpec,
    on_output: impl FnMut(Stream, &[u8]) -> io::Result<()>,
) -> Result<ExecResult, AgentError> {
    spec.validate().map_err(|source| AgentError::InvalidSpec {
        argv: spec.argv.clone(),
        source,
    })?;
    // The agent enforces the command's timeout; the host only bounds how long it waits for a
    // guest that stopped answering altogether.
    let guard = spec.timeout.map(|t| t + REPLY_GRACE);
    let result = client
        .get_ref()
        .set_read_timeout(guard)
        .map_err(ClientError::Io)
        .and_then(|()| client.exec_streaming(&spec.request(), &spec.stdin, on_output))
        .map_err(|source| AgentError::Request {
            uds: uds.to_path_buf(),
            what: format!("exec {:?}", spec.argv),
            source,
        });
    clear_timeout(client);
    result
}

/// A command's result with the first `limit` bytes of each stream kept.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapturedExec {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// The start of stdout (lossy UTF-8), at most the capture limit.
    pub stdout: String,
    pub stderr: String,
    /// Total bytes the command wrote to each stream.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

impl CapturedExec {
    pub fn succeeded(&self) -> bool {
        self.end().succeeded()
    }

    /// How the command ended (a timeout is named without its length: see [`CommandEnd::of`]).
    pub fn end(&self) -> CommandEnd {
        CommandEnd::of(&self.result(), None)
    }

    pub fn result(&self) -> ExecResult {
        ExecResult {
            exit_code: self.exit_code,
            signal: self.signal,
            timed_out: self.timed_out,
            stdout_bytes: self.stdout_bytes,
            stderr_bytes: self.stderr_bytes,
            duration_ms: self.duration_ms,
        }
    }
}

/// Runs `spec` and keeps at most `limit` bytes of each output stream (the rest is counted,
/// not stored, so a chatty command in many children cannot exhaust the host's memory).
pub fn exec_captured(
    conn: &mut RestoredAgent,
    spec: &ExecSpec,
    limit: usize,
) -> Result<CapturedExec, AgentError> {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let result = exec_streaming(conn, spec, |stream, data| {
        let buf = match stream {
            Stream::Stderr => &mut stderr,
            _ => &mut stdout,
        };
        let room = limit.saturating_sub(buf.len());
        buf.extend_from_slice(&data[..data.len().min(room)]);
        Ok(())
    })?;
    Ok(CapturedExec {
        exit_code: result.exit_code,
        signal: result.signal,
        timed_out: result.timed_out,
        duration_ms: result.duration_ms,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        stdout_bytes: result.stdout_bytes,
        stderr_bytes: result.stderr_bytes,
    })
}

/// One warm-up step run in a freshly booted guest before its snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warmup {
    /// A shell command (`sh -c CMD`) that must exit 0.
    Shell(String),
    /// Code for the agent's warm interpreter that must not raise.
    Eval(String),
}

/// Why a warm-up step failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    #[error("warm-up")]
    Connect(#[source] AgentError),
    #[error("warm-up {step}: forkd-agent behind {}", uds.display())]
    Agent {
        step: String,
        uds: PathBuf,
        #[source]
        source: ClientError,
    },
    #[error(
        "warm-up command {command:?} failed: {end}{}",
        last_output_note(last_output)
    )]
    CommandFailed {
        command: String,
        end: CommandEnd,
        /// The last non-empty line of its stderr, else of its stdout.
        last_output: Option<String>,
    },
    #[error("warm-up eval {code:?} timed out after {:.1} s", timeout.as_secs_f64())]
    EvalTimedOut { code: String, timeout: Duration },
    #[error("warm-up eval {code:?} raised {type_name}: {message}")]
    EvalRaised {
        code: String,
        type_name: String,
        message: String,
    },
}

fn last_output_note(line: &Option<String>) -> String {
    match line {
        Some(line) => format!(" (last output: {line:?})"),
        None => String::new(),
    }
}

impl Warmup {
    /// The step as the errors name it: `command "…"` or `eval "…"`.
    fn describe(&self) -> String {
        match self {
            Warmup::Shell(cmd) => format!("command {cmd:?}"),
            Warmup::Eval(code) => format!("eval {code:?}"),
        }
    }
}

/// Runs `steps` in order through the agent of a booted guest (`uds` is its hybrid-vsock
/// socket); each step gets `timeout`. The first failing step (non-zero exit, exception,
/// timeout, agent unreachable) is the error, naming the step.
pub fn run_warmups(uds: &Path, steps: &[Warmup], timeout: Duration) -> Result<(), WarmupError> {
    if steps.is_empty() {
        return Ok(());
    }
    let mut client = connect_agent(uds, Instant::now() + timeout).map_err(WarmupError::Connect)?;
    for step in steps {
        run_warmup(&mut client, uds, step, timeout)?;
    }
    Ok(())
}

fn run_warmup(
    client: &mut AgentConn,
    uds: &Path,
    step: &Warmup,
    timeout: Duration,
) -> Result<(), WarmupError> {
    let timeout_ms = timeout.as_millis().max(1) as u64;
    let _ = client
        .get_ref()
        .set_read_timeout(Some(timeout + REPLY_GRACE));
    let agent_error = |source| WarmupError::Agent {
        step: step.describe(),
        uds: uds.to_path_buf(),
        source,
    };
    match step {
        Warmup::Shell(cmd) => {
            let request = ExecBuilder::new(["sh", "-c", cmd.as_str()])
                .timeout_ms(timeout_ms)
                .build();
            let out = client.exec(&request, &[]).map_err(agent_error)?;
            let end = CommandEnd::of(&out.result, Some(timeout));
            if !end.succeeded() {
                return Err(WarmupError::CommandFailed {
                    command: cmd.clone(),
                    end,
                    last_output: last_line(&out.stderr).or_else(|| last_line(&out.stdout)),
                });
            }
        }
        Warmup::Eval(code) => {
            let result = client.eval(code, Some(timeout_ms)).map_err(agent_error)?;
            if result.timed_out {
                return Err(WarmupError::EvalTimedOut {
                    code: code.clone(),
                    timeout,
                });
            }
            if let Some(err) = result.error {
                return Err(WarmupError::EvalRaised {
                    code: code.clone(),
                    type_name: err.type_name,
                    message: err.message,
                });
            }
        }
    }
    Ok(())
}

/// The last non-empty line of `output`, trimmed.
fn last_line(output: &[u8]) -> Option<String> {
    String::from_utf8_lossy(output)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(kernel: &str) -> Manifest {
        let text = format!(
            "format_version = 1\ntag = \"t\"\ncreated_at = \"2026-01-01T00:00:00Z\"\n\
             forkd_version = \"0\"\nmemory_mib = 64\nvcpus = 1\nkernel = {kernel:?}\n"
        );
        Manifest::parse(&text, Path::new("manifest.toml")).unwrap()
    }

    #[test]
    fn built_in_guests_have_no_agent_and_are_refused_by_name() {
        assert!(!snapshot_has_agent(&manifest("builtin:demo@1c195e9b9a76")));
        let err = require_agent(&manifest("builtin:demo@1c195e9b9a76"), "forkd run").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("snapshot t is of the built-in guest builtin:demo, which"),
            "{text}"
        );
        assert!(text.contains("forkd run needs a Linux snapshot"), "{text}");
        assert!(snapshot_has_agent(&manifest(
            "/root/.cache/forkd/kernels/k/vmlinuz"
        )));
        assert!(require_agent(&manifest("/boot/vmlinuz"), "forkd run").is_ok());
    }

    #[test]
    fn command_ends_are_told_apart() {
        let r = |exit_code, signal, timed_out| ExecResult {
            exit_code,
            signal,
            timed_out,
            ..Default::default()
        };
        let end = |r| CommandEnd::of(&r, None);
        assert_eq!(end(r(Some(0), None, false)), CommandEnd::Exited(0));
        assert!(end(r(Some(0), None, false)).succeeded());
        assert_eq!(end(r(None, Some(15), false)), CommandEnd::Signalled(15));
        assert_eq!(end(r(None, None, false)), CommandEnd::Unknown);
        assert_eq!(CommandEnd::Signalled(15).to_string(), "killed by signal 15");
        let timed_out = CommandEnd::of(&r(None, Some(9), true), Some(Duration::from_secs(2)));
        assert_eq!(
            timed_out.to_string(),
            "timed out after 2.0 s (its process group was killed)"
        );
    }

    #[test]
    fn exec_specs_are_checked_before_they_are_sent() {
        let ok = ExecSpec {
            argv: vec!["ls".into()],
            env: vec![("K".into(), "v".into())],
            cwd: Some("/tmp".into()),
            timeout: Some(Duration::from_secs(1)),
            ..ExecSpec::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let with = |f: fn(&mut ExecSpec)| {
            let mut spec = ok.clone();
            f(&mut spec);
            spec.validate().unwrap_err()
        };
        assert_eq!(with(|s| s.argv.clear()), ExecSpecError::NoCommand);
        assert_eq!(
            with(|s| s.cwd = Some("tmp".into())),
            ExecSpecError::RelativeCwd("tmp".into())
        );
        assert_eq!(
            with(|s| s.env.push(("A=B".into(), "v".into()))),
            ExecSpecError::BadEnvName("A=B".into())
        );
        assert_eq!(
            with(|s| s.env.push(("".into(), "v".into()))),
            ExecSpecError::BadEnvName("".into())
        );
        assert_eq!(
            with(|s| s.argv.push("a\0b".into())),
            ExecSpecError::Nul("a\0b".into())
        );
        assert_eq!(
            with(|s| s.timeout = Some(Duration::ZERO)),
            ExecSpecError::ZeroTimeout
        );
    }

    #[test]
    fn exec_specs_become_requests() {
        let spec = ExecSpec {
            argv: vec!["ls".into(), "-l".into()],
            env: vec![("K".into(), "v".into())],
            cwd: Some("/tmp".into()),
            timeout: Some(Duration::from_millis(1500)),
            ..ExecSpec::default()
        };
        let req = spec.request();
        assert_eq!(req.argv, ["ls", "-l"]);
        assert_eq!(req.env.get("K").map(String::as_str), Some("v"));
        assert_eq!(req.cwd.as_deref(), Some("/tmp"));
        assert_eq!(req.timeout_ms, Some(1500));
        assert_eq!(ExecSpec::default().request().timeout_ms, None);
    }

    #[test]
    fn host_entropy_is_fresh() {
        let a = host_entropy();
        assert_eq!(a.len(), ENTROPY_BYTES);
        assert_ne!(a, host_entropy());
    }
}
