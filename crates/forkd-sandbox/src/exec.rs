//! Driving the forkd-agent inside a child (or a booted parent) through its hybrid-vsock socket.
//!
//! The rule every caller follows: after a restore, the first thing sent to a child's agent is
//! `restored` (fresh host entropy, the host clock, a fork-counter bump) —
//! [`connect_restored_agent`] does exactly that and nothing else may talk to a fresh child
//! first. `forkd run`, `forkd fork` (with or without `--exec`) and later the daemon go through
//! it. [`run_warmups`] drives the agent of a freshly *booted* guest (no restore: no
//! `restored`) before `forkd snapshot` pauses it.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use forkd_agent::client::{hybrid_vsock_handshake, AgentClient, ClientError, ExecBuilder};
use forkd_agent::protocol::{ExecRequest, RestoredResult, Stream, DEFAULT_VSOCK_PORT};
use forkd_store::Manifest;

/// What a finished command reports (re-exported so callers need not name forkd-agent).
pub use forkd_agent::protocol::ExecResult;
use serde::Serialize;

/// Guest vsock port the agent listens on.
pub const AGENT_PORT: u32 = DEFAULT_VSOCK_PORT;
/// Bytes of host entropy sent with every `restored`.
pub const ENTROPY_BYTES: usize = 64;
/// Exit status `forkd run` reports for a command killed by its timeout (as timeout(1) does).
pub const TIMEOUT_EXIT_CODE: i32 = 124;
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
    #[error("forkd-agent behind {}: {what}: {source}", uds.display())]
    Request {
        uds: PathBuf,
        what: String,
        source: ClientError,
    },
    /// The snapshot's guest has no agent to talk to.
    #[error("snapshot {tag} is of the built-in guest {kernel}, which has no forkd-agent; {what} needs a Linux snapshot whose image runs forkd-agent (forkd snapshot --kernel VMLINUZ --rootfs IMAGE)")]
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
    let (client, restored) = connect_then(uds, deadline, "restored", |client| {
        client.restored(&host_entropy(), SystemTime::now())
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
    hybrid_vsock_handshake(&mut stream, AGENT_PORT)?;
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
        // SAFETY: getrandom writes at most the given length into the buffer.
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
}

impl ExecSpec {
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

/// Parses a `KEY=VALUE` environment assignment (the error names the input).
pub fn parse_env_assignment(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("{s:?} is not KEY=VALUE with a non-empty KEY")),
    }
}

/// How a finished command ended, as a process exit code: its own, 128 + signal when a signal
/// killed it, [`TIMEOUT_EXIT_CODE`] when its timeout did.
pub fn exit_code_of(result: &ExecResult) -> i32 {
    if result.timed_out {
        TIMEOUT_EXIT_CODE
    } else if let Some(code) = result.exit_code {
        code
    } else if let Some(sig) = result.signal {
        128 + sig
    } else {
        1
    }
}

/// A one-line description of how a command ended: "exit code 3", "killed by signal 9",
/// "timed out after 2.0 s".
pub fn describe_status(result: &ExecResult, timeout: Option<Duration>) -> String {
    if result.timed_out {
        match timeout {
            Some(t) => format!(
                "timed out after {:.1} s (its process group was killed)",
                t.as_secs_f64()
            ),
            None => "timed out (its process group was killed)".into(),
        }
    } else if let Some(code) = result.exit_code {
        format!("exit code {code}")
    } else if let Some(sig) = result.signal {
        format!("killed by signal {sig}")
    } else {
        "ended without an exit code".into()
    }
}

/// Runs `spec` through `conn`, handing each output chunk to `on_output` as it arrives.
pub fn exec_streaming(
    conn: &mut RestoredAgent,
    spec: &ExecSpec,
    on_output: impl FnMut(Stream, &[u8]) -> io::Result<()>,
) -> Result<ExecResult, AgentError> {
    // The agent enforces the command's timeout; the host only bounds how long it waits for a
    // guest that stopped answering altogether.
    let guard = spec.timeout.map(|t| t + REPLY_GRACE);
    let result = conn
        .client
        .get_ref()
        .set_read_timeout(guard)
        .map_err(ClientError::Io)
        .and_then(|()| conn.client.exec_streaming(&spec.request(), &[], on_output))
        .map_err(|source| AgentError::Request {
            uds: conn.uds.clone(),
            what: format!("exec {:?}", spec.argv),
            source,
        });
    clear_timeout(&conn.client);
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
        !self.timed_out && self.exit_code == Some(0)
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

/// Runs `steps` in order through the agent of a booted guest (`uds` is its hybrid-vsock
/// socket); each step gets `timeout`. The first failing step (non-zero exit, exception,
/// timeout, agent unreachable) is the error, in one line naming the step.
pub fn run_warmups(uds: &Path, steps: &[Warmup], timeout: Duration) -> Result<(), String> {
    if steps.is_empty() {
        return Ok(());
    }
    let mut client =
        connect_agent(uds, Instant::now() + timeout).map_err(|e| format!("warm-up: {e}"))?;
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
) -> Result<(), String> {
    let timeout_ms = timeout.as_millis().max(1) as u64;
    let _ = client
        .get_ref()
        .set_read_timeout(Some(timeout + REPLY_GRACE));
    match step {
        Warmup::Shell(cmd) => {
            let request = ExecBuilder::new(["sh", "-c", cmd.as_str()])
                .timeout_ms(timeout_ms)
                .build();
            let out = client.exec(&request, &[]).map_err(|e| {
                format!(
                    "warm-up command {cmd:?}: forkd-agent behind {}: {e}",
                    uds.display()
                )
            })?;
            if out.result.timed_out || out.result.exit_code != Some(0) {
                return Err(format!(
                    "warm-up command {cmd:?} failed: {}{}",
                    describe_status(&out.result, Some(timeout)),
                    last_line_note(&out.stderr, &out.stdout)
                ));
            }
        }
        Warmup::Eval(code) => {
            let result = client.eval(code, Some(timeout_ms)).map_err(|e| {
                format!(
                    "warm-up eval {code:?}: forkd-agent behind {}: {e}",
                    uds.display()
                )
            })?;
            if result.timed_out {
                return Err(format!(
                    "warm-up eval {code:?} timed out after {:.1} s",
                    timeout.as_secs_f64()
                ));
            }
            if let Some(err) = result.error {
                return Err(format!(
                    "warm-up eval {code:?} raised {}: {}",
                    err.type_name, err.message
                ));
            }
        }
    }
    Ok(())
}

/// `: <last non-empty line of stderr, else stdout>`, or nothing.
fn last_line_note(stderr: &[u8], stdout: &[u8]) -> String {
    let pick = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
    };
    match pick(stderr).or_else(|| pick(stdout)) {
        Some(line) => format!(" (last output: {line:?})"),
        None => String::new(),
    }
}

/// Writes chunks to this process's stdout / stderr as they arrive. Once a write fails (e.g.
/// stdout is a pipe whose reader went away) that stream is dropped silently, so the command
/// still runs to its end and its exit code is still reported.
#[derive(Debug, Default)]
pub struct OutputForwarder {
    stdout_broken: bool,
    stderr_broken: bool,
}

impl OutputForwarder {
    pub fn forward(&mut self, stream: Stream, data: &[u8]) -> io::Result<()> {
        let broken = match stream {
            Stream::Stderr => &mut self.stderr_broken,
            _ => &mut self.stdout_broken,
        };
        if *broken {
            return Ok(());
        }
        let written = match stream {
            Stream::Stderr => write_flush(&mut io::stderr(), data),
            _ => write_flush(&mut io::stdout(), data),
        };
        *broken = written.is_err();
        Ok(())
    }
}

fn write_flush(w: &mut impl Write, data: &[u8]) -> io::Result<()> {
    w.write_all(data)?;
    w.flush()
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
    fn env_assignments_need_a_key() {
        assert_eq!(
            parse_env_assignment("A=b=c").unwrap(),
            ("A".into(), "b=c".into())
        );
        assert_eq!(parse_env_assignment("A=").unwrap(), ("A".into(), "".into()));
        for bad in ["A", "=x", ""] {
            let err = parse_env_assignment(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn exit_codes_follow_the_shell_conventions() {
        let r = |exit_code, signal, timed_out| ExecResult {
            exit_code,
            signal,
            timed_out,
            ..Default::default()
        };
        assert_eq!(exit_code_of(&r(Some(0), None, false)), 0);
        assert_eq!(exit_code_of(&r(Some(42), None, false)), 42);
        assert_eq!(exit_code_of(&r(None, Some(15), false)), 143);
        assert_eq!(exit_code_of(&r(None, Some(9), true)), TIMEOUT_EXIT_CODE);
        assert_eq!(
            describe_status(&r(None, Some(9), true), Some(Duration::from_secs(2))),
            "timed out after 2.0 s (its process group was killed)"
        );
        assert_eq!(
            describe_status(&r(None, Some(15), false), None),
            "killed by signal 15"
        );
    }

    #[test]
    fn exec_specs_become_requests() {
        let spec = ExecSpec {
            argv: vec!["ls".into(), "-l".into()],
            env: vec![("K".into(), "v".into())],
            cwd: Some("/tmp".into()),
            timeout: Some(Duration::from_millis(1500)),
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
