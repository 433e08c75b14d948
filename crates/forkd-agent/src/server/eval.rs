//! `eval` and `eval_context`: a long-lived interpreter (Python or Node, running a small driver)
//! warmed at startup, so a snapshot taken after readiness carries its imported modules into
//! every fork. The driver (`eval_driver.py`, `eval_driver.js`: one protocol) holds the
//! contexts, builds the display bundles and, for a streaming eval, sends output events that are
//! forwarded here as chunks as they arrive. The interpreter program's name picks the driver
//! (see [`Language::of`]): one language per agent.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::{lock, OpError, Replier, State};
use crate::protocol::{
    ErrorCode, EvalContextAction, EvalContextRequest, EvalContextResult, EvalDisplay, EvalError,
    EvalRequest, EvalResult, EvalStatus, Stream,
};

const PYTHON_DRIVER: &str = include_str!("eval_driver.py");
const NODE_DRIVER: &str = include_str!("eval_driver.js");

/// The language `eval` runs, which is the driver the interpreter is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Python,
    JavaScript,
}

impl Language {
    /// Chosen by the interpreter program's file name: `node`, `nodejs` or a versioned `node`
    /// (`node20`, `node-18`) run JavaScript; anything else is taken for a Python.
    pub fn of(interpreter: &[String]) -> Language {
        let program = interpreter.first().map(String::as_str).unwrap_or_default();
        let name = Path::new(program)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let version = name
            .strip_prefix("nodejs")
            .or_else(|| name.strip_prefix("node"));
        match version {
            Some(v)
                if v.chars()
                    .all(|c| c.is_ascii_digit() || c == '.' || c == '-') =>
            {
                Language::JavaScript
            }
            _ => Language::Python,
        }
    }

    /// The name contexts and `ping` report.
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
        }
    }
}

/// Which interpreter to run and what to warm it with.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Interpreter command (program and leading arguments); the agent appends `-c <driver>`
    /// (Python) or `-e <driver> <request fd> <reply fd>` (Node).
    pub interpreter: Vec<String>,
    /// Code evaluated once at start, e.g. `import numpy`.
    pub warmup: Option<String>,
    /// Limit for the warm-up; past it the interpreter is killed and eval reports unavailable.
    pub warmup_timeout: Option<Duration>,
}

struct Interpreter {
    child: Child,
    /// Where requests go: the Python driver's stdin, the Node driver's request pipe.
    stdin: Box<dyn Write + Send>,
    replies: Receiver<String>,
}

impl Interpreter {
    fn kill(mut self) {
        let pid = self.child.id() as libc::pid_t;
        // Processes that left its group (Playwright starts browsers detached, in a session of
        // their own) are found by parentage; stopped first so it starts no more meanwhile.
        // SAFETY: kill(2) and killpg(2) take only integers and touch no memory of ours; the
        // pids are the interpreter's (not yet reaped, so not reused) and its descendants',
        // never 0 or negative. ESRCH (already gone) is fine.
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
        }
        for descendant in descendants(pid) {
            // SAFETY: as above.
            unsafe {
                libc::kill(descendant, libc::SIGKILL);
            }
        }
        // The interpreter leads its own process group: take the rest of the group with it.
        // SAFETY: as above; the group id is the interpreter's pid, never 0 (our own group).
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Every process descended from `root`, from /proc (parents before their children).
fn descendants(root: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(libc::pid_t, libc::pid_t)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect();
    let mut found = vec![root];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        next += 1;
    }
    found.remove(0);
    found
}

/// The parent pid from /proc/PID/stat (after the command name, which may hold spaces).
fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// How often a wait for the driver checks that the interpreter is still alive.
const LIVENESS_POLL: Duration = Duration::from_millis(250);

impl Interpreter {
    /// The driver's next line, or why none came by `deadline`. A dead interpreter counts as
    /// disconnected even while its reply pipe stays open: a process it started (a browser)
    /// may hold the pipe and outlive it.
    fn next_reply(&mut self, deadline: Option<Instant>) -> Result<String, RecvTimeoutError> {
        loop {
            let wait = deadline.map_or(LIVENESS_POLL, |d| {
                d.saturating_duration_since(Instant::now())
                    .min(LIVENESS_POLL)
            });
            match self.replies.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {}
                received => return received,
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(RecvTimeoutError::Timeout);
            }
            if !matches!(self.child.try_wait(), Ok(None)) {
                // What it wrote before exiting may still be on its way through the reader.
                return self
                    .replies
                    .recv_timeout(LIVENESS_POLL)
                    .map_err(|_| RecvTimeoutError::Disconnected);
            }
        }
    }
}

enum CallError {
    Timeout,
    Died(String),
}

/// Limit for a context operation (it runs no user code; only a busy interpreter delays it,
/// and that waits on the engine's lock, not here).
const CONTEXT_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// The interpreter process and its status (shared with `ping`).
pub(super) struct EvalEngine {
    config: EvalConfig,
    interpreter: Option<Interpreter>,
    status: Arc<Mutex<EvalStatus>>,
    /// Contexts the running interpreter has (besides `default`), and those a dead one had: an
    /// eval naming one of those is told why it is gone.
    contexts: HashSet<String>,
    lost_contexts: HashSet<String>,
}

#[derive(Deserialize)]
struct DriverReply {
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    stderr: String,
    #[serde(default)]
    error: Option<EvalError>,
    #[serde(default)]
    results: Vec<EvalDisplay>,
    #[serde(default)]
    execution_count: u64,
    #[serde(default)]
    contexts: Vec<crate::protocol::EvalContext>,
    #[serde(default)]
    fail: Option<DriverFailure>,
    #[serde(default)]
    driver_error: Option<String>,
}

/// A request the driver refused (an unknown context, a bad working directory).
#[derive(Deserialize)]
struct DriverFailure {
    code: ErrorCode,
    message: String,
}

/// A line the driver sends before its reply.
#[derive(Deserialize)]
struct DriverEvent {
    event: String,
    #[serde(default)]
    text: String,
}

impl EvalEngine {
    pub fn start(config: EvalConfig, status: Arc<Mutex<EvalStatus>>) -> Self {
        {
            let mut s = lock(&status);
            s.enabled = true;
            s.interpreter = config.interpreter.clone();
            s.language = Language::of(&config.interpreter).name().into();
        }
        let mut engine = Self {
            config,
            interpreter: None,
            status,
            contexts: HashSet::new(),
            lost_contexts: HashSet::new(),
        };
        if let Err(e) = engine.ensure_running() {
            tracing::warn!("{}", e.message);
        }
        engine
    }

    fn set_status(&self, ready: bool, error: Option<String>) {
        let mut s = lock(&self.status);
        s.ready = ready;
        s.error = error;
    }

    /// Starts (and warms) the interpreter unless it is already running.
    fn ensure_running(&mut self) -> Result<(), OpError> {
        if let Some(interp) = &mut self.interpreter {
            if matches!(interp.child.try_wait(), Ok(None)) {
                return Ok(());
            }
            self.drop_interpreter();
        }
        let interp = spawn(&self.config.interpreter).map_err(|e| {
            let message = format!(
                "eval: cannot start interpreter {:?}: {e}",
                self.config.interpreter
            );
            self.set_status(false, Some(message.clone()));
            OpError::new(ErrorCode::EvalUnavailable, message)
        })?;
        self.interpreter = Some(interp);
        let warmup_error = match self.config.warmup.clone() {
            None => None,
            Some(code) => self.warm_up(&code)?,
        };
        if let Some(e) = &warmup_error {
            tracing::warn!("{e}");
        }
        self.set_status(true, warmup_error);
        Ok(())
    }

    /// Runs the warm-up code. A failing warm-up leaves a working (cold) interpreter and an
    /// error for `ping`; a hanging or crashing one leaves no interpreter.
    fn warm_up(&mut self, code: &str) -> Result<Option<String>, OpError> {
        let request = json!({"op": "eval", "code": code, "count": false});
        match self.call(&request, self.config.warmup_timeout, &mut |_| {}) {
            Ok(reply) => match reply.error {
                Some(e) => Ok(Some(format!(
                    "eval warm-up {code:?} raised {}: {}",
                    e.type_name, e.message
                ))),
                None => Ok(reply.driver_error.map(|e| format!("eval warm-up: {e}"))),
            },
            Err(e) => {
                let message = match e {
                    CallError::Timeout => format!("eval warm-up {code:?} timed out"),
                    CallError::Died(why) => format!("eval warm-up {code:?}: {why}"),
                };
                self.set_status(false, Some(message.clone()));
                Err(OpError::new(ErrorCode::EvalUnavailable, message))
            }
        }
    }

    /// Kills the interpreter (if any); its contexts are lost with it.
    fn drop_interpreter(&mut self) {
        if let Some(interp) = self.interpreter.take() {
            interp.kill();
        }
        self.lost_contexts.extend(self.contexts.drain());
    }

    /// Sends one request line to the driver and waits for its reply line, handing the events
    /// it sends before (output of a streaming eval) to `on_event`. `timeout` bounds the whole
    /// exchange. On a timeout or a dead driver the interpreter is killed; the next eval starts
    /// a fresh one.
    fn call(
        &mut self,
        request: &Value,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(DriverEvent),
    ) -> Result<DriverReply, CallError> {
        let Some(interp) = self.interpreter.as_mut() else {
            return Err(CallError::Died("no interpreter is running".into()));
        };
        // Nothing of an earlier exchange may be taken for this one's reply.
        while interp.replies.try_recv().is_ok() {}
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut line = serde_json::to_vec(request).expect("JSON values always serialize");
        line.push(b'\n');
        let failure = match interp
            .stdin
            .write_all(&line)
            .and_then(|()| interp.stdin.flush())
        {
            Err(e) => CallError::Died(format!("writing to it failed: {e}")),
            Ok(()) => loop {
                let text = match interp.next_reply(deadline) {
                    Ok(text) => text,
                    Err(RecvTimeoutError::Timeout) => break CallError::Timeout,
                    Err(RecvTimeoutError::Disconnected) => {
                        break CallError::Died("it closed its output".into())
                    }
                };
                let value: Value = match serde_json::from_str(&text) {
                    Ok(value) => value,
                    Err(e) => {
                        break CallError::Died(format!("its driver sent an unreadable line: {e}"))
                    }
                };
                if value.get("event").is_some() {
                    match serde_json::from_value(value) {
                        Ok(event) => on_event(event),
                        Err(e) => {
                            break CallError::Died(format!(
                                "its driver sent an unreadable event: {e}"
                            ))
                        }
                    }
                    continue;
                }
                return serde_json::from_value(value).map_err(|e| {
                    CallError::Died(format!("its driver sent an unreadable reply: {e}"))
                });
            },
        };
        self.drop_interpreter();
        self.set_status(false, None);
        Err(match failure {
            CallError::Died(why) => CallError::Died(format!(
                "the interpreter exited or broke ({why}); it restarts on the next eval, state is lost"
            )),
            timeout => timeout,
        })
    }

    /// The driver's refusal or internal error, as the op's error.
    fn driver_failure(
        &self,
        op: &str,
        context: Option<&String>,
        reply: &mut DriverReply,
    ) -> Option<OpError> {
        if let Some(e) = reply.driver_error.take() {
            return Some(OpError::new(
                ErrorCode::Internal,
                format!("{op} driver: {e}"),
            ));
        }
        let fail = reply.fail.take()?;
        let mut message = format!("{op}: {}", fail.message);
        let lost = context.is_some_and(|id| self.lost_contexts.contains(id));
        if fail.code == ErrorCode::NotFound && lost {
            message.push_str(
                " (the interpreter was restarted after a timeout or crash: its contexts were lost)",
            );
        }
        Some(OpError::new(fail.code, message))
    }

    fn eval(
        &mut self,
        req: &EvalRequest,
        reseed: bool,
        replier: &Replier,
    ) -> Result<EvalResult, OpError> {
        self.ensure_running()?;
        let timeout = req.timeout_ms.map(Duration::from_millis);
        if reseed {
            // Best effort: a failure here shows up again on the eval itself.
            let _ = self.call(&json!({"op": "reseed"}), timeout, &mut |_| {});
            self.ensure_running()?;
        }
        let request = json!({
            "op": "eval",
            "code": req.code,
            "context": req.context,
            "stream": req.stream,
            "env": req.env,
        });
        // A peer that went away does not stop the code; its output is dropped.
        let mut forward = |event: DriverEvent| {
            let sent = match event.event.as_str() {
                "started" => replier.chunk_marker(Stream::Stdout),
                "stdout" => replier.chunk(Stream::Stdout, event.text.as_bytes()),
                "stderr" => replier.chunk(Stream::Stderr, event.text.as_bytes()),
                _ => Ok(()),
            };
            if let Err(e) = sent {
                tracing::debug!("eval output not delivered: {e}");
            }
        };
        match self.call(&request, timeout, &mut forward) {
            Ok(mut reply) => {
                if let Some(e) = self.driver_failure("eval", req.context.as_ref(), &mut reply) {
                    return Err(e);
                }
                Ok(EvalResult {
                    value: reply.value,
                    stdout: reply.stdout,
                    stderr: reply.stderr,
                    error: reply.error,
                    timed_out: false,
                    results: reply.results,
                    execution_count: reply.execution_count,
                })
            }
            Err(CallError::Timeout) => Ok(EvalResult {
                timed_out: true,
                ..Default::default()
            }),
            Err(CallError::Died(why)) => Err(OpError::new(
                ErrorCode::InterpreterDied,
                format!("eval: {why}"),
            )),
        }
    }

    fn context(&mut self, req: &EvalContextRequest) -> Result<EvalContextResult, OpError> {
        self.ensure_running()?;
        let needs_id = matches!(
            req.action,
            EvalContextAction::Restart | EvalContextAction::Remove
        );
        if needs_id && req.context.is_none() {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!("eval_context {:?}: name the context", req.action),
            ));
        }
        let request = json!({
            "op": "context",
            "action": req.action,
            "context": req.context,
            "cwd": req.cwd,
        });
        let mut reply = match self.call(&request, Some(CONTEXT_OP_TIMEOUT), &mut |_| {}) {
            Ok(reply) => reply,
            Err(CallError::Timeout) => {
                return Err(OpError::new(
                    ErrorCode::InterpreterDied,
                    "eval_context: the interpreter did not answer in time; it was restarted and its contexts are lost",
                ))
            }
            Err(CallError::Died(why)) => {
                return Err(OpError::new(
                    ErrorCode::InterpreterDied,
                    format!("eval_context: {why}"),
                ))
            }
        };
        if let Some(e) = self.driver_failure("eval_context", req.context.as_ref(), &mut reply) {
            return Err(e);
        }
        match req.action {
            EvalContextAction::List => {
                self.contexts = reply.contexts.iter().map(|c| c.id.clone()).collect();
            }
            EvalContextAction::Create => {
                self.contexts
                    .extend(reply.contexts.iter().map(|c| c.id.clone()));
            }
            EvalContextAction::Remove => {
                for c in &reply.contexts {
                    self.contexts.remove(&c.id);
                }
            }
            EvalContextAction::Restart => {}
        }
        Ok(EvalContextResult {
            contexts: reply.contexts,
        })
    }
}

fn spawn(command: &[String]) -> io::Result<Interpreter> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty interpreter command"))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    // Its own process group, so a kill on timeout takes the interpreter's children too.
    cmd.process_group(0);
    match Language::of(command) {
        Language::Python => spawn_python(cmd),
        Language::JavaScript => spawn_node(cmd),
    }
}

/// Python: the protocol on the driver's stdin/stdout (the driver moves it to private fds).
fn spawn_python(mut cmd: Command) -> io::Result<Interpreter> {
    cmd.arg("-c")
        .arg(PYTHON_DRIVER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let stdin = child.stdin.take().expect("stdin was piped");
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    let replies = read_replies(stdout)?;
    log_output(stderr)?;
    Ok(Interpreter {
        child,
        stdin: Box::new(stdin),
        replies,
    })
}

/// Node: the protocol on two pipes of their own, named to the driver by fd number, because
/// Node cannot move its stdio aside as the Python driver does: its fd 1 (inherited by any child
/// process user code starts) must not be the reply channel. Its stdout and stderr are logged.
fn spawn_node(mut cmd: Command) -> io::Result<Interpreter> {
    let (request_read, request_write) = cloexec_pipe()?;
    let (reply_read, reply_write) = cloexec_pipe()?;
    let inherited = [request_read.as_raw_fd(), reply_write.as_raw_fd()];
    cmd.arg("-e")
        .arg(NODE_DRIVER)
        .arg(inherited[0].to_string())
        .arg(inherited[1].to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls fcntl(2), which is async-signal-safe, on fds that stay
    // open in the parent until spawn returns. Clearing FD_CLOEXEC in the child (rather than
    // dup2 to fixed numbers) cannot clobber any fd std itself uses between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for fd in inherited {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // The child holds its ends now; ours would keep the pipes open after it dies.
    drop((request_read, reply_write));
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    let replies = read_replies(File::from(reply_read))?;
    log_output(stdout)?;
    log_output(stderr)?;
    Ok(Interpreter {
        child,
        stdin: Box::new(File::from(request_write)),
        replies,
    })
}

/// A pipe whose ends are not inherited by processes the agent starts (exec runs concurrently).
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: pipe2(2) writes two fds into the array, which we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The driver's reply lines, read on a thread of their own.
fn read_replies(source: impl Read + Send + 'static) -> io::Result<Receiver<String>> {
    let (tx, replies) = mpsc::channel();
    thread::Builder::new()
        .name("eval-out".into())
        .spawn(move || {
            for line in BufReader::new(source).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })?;
    Ok(replies)
}

/// Whatever the interpreter writes to its real stdout/stderr (outside an eval's capture) goes
/// to the agent's log rather than blocking on a full pipe.
fn log_output(source: impl Read + Send + 'static) -> io::Result<()> {
    thread::Builder::new()
        .name("eval-err".into())
        .spawn(move || {
            for line in BufReader::new(source).lines() {
                let Ok(line) = line else { break };
                tracing::info!(target: "eval", "{line}");
            }
        })?;
    Ok(())
}

fn engine(state: &State) -> Result<&Mutex<EvalEngine>, OpError> {
    state.eval.as_ref().ok_or_else(|| {
        OpError::new(
            ErrorCode::EvalUnavailable,
            "eval: the agent runs without an interpreter (--no-eval)",
        )
    })
}

pub(super) fn run(
    state: &State,
    req: &EvalRequest,
    replier: &Replier,
) -> Result<EvalResult, OpError> {
    let mut engine = lock(engine(state)?);
    let reseed = state.reseed_pending.swap(false, Ordering::SeqCst);
    engine.eval(req, reseed, replier)
}

pub(super) fn context(
    state: &State,
    req: &EvalContextRequest,
) -> Result<EvalContextResult, OpError> {
    lock(engine(state)?).context(req)
}

#[cfg(test)]
mod tests {
    use super::Language;

    #[test]
    fn the_interpreter_programs_name_picks_the_language() {
        let of = |command: &[&str]| {
            Language::of(&command.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        for js in [
            &["node"][..],
            &["/usr/bin/nodejs"],
            &["node20"],
            &["/opt/node-18.20"],
            &["node", "--max-old-space-size=512"],
        ] {
            assert_eq!(of(js), Language::JavaScript, "{js:?}");
        }
        for py in [
            &["python3"][..],
            &["/venv/bin/python"],
            &["nodemon"],
            &["/usr/bin/node/python3"],
            &[],
        ] {
            assert_eq!(of(py), Language::Python, "{py:?}");
        }
        assert_eq!(Language::JavaScript.name(), "javascript");
    }
}
