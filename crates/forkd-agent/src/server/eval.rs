//! `eval`: a long-lived interpreter (Python, running a small driver) warmed at startup, so a
//! snapshot taken after readiness carries its imported modules into every fork.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{lock, OpError, State};
use crate::protocol::{ErrorCode, EvalError, EvalRequest, EvalResult, EvalStatus};

const DRIVER: &str = include_str!("eval_driver.py");

/// Which interpreter to run and what to warm it with.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Interpreter command (program and leading arguments); the agent appends `-c <driver>`.
    pub interpreter: Vec<String>,
    /// Code evaluated once at start, e.g. `import numpy`.
    pub warmup: Option<String>,
    /// Limit for the warm-up; past it the interpreter is killed and eval reports unavailable.
    pub warmup_timeout: Option<Duration>,
}

struct Interpreter {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<String>,
}

impl Interpreter {
    fn kill(mut self) {
        // The interpreter leads its own process group: take its children with it.
        // SAFETY: killpg(2) takes only integers and touches no memory of ours; the group id is
        // the interpreter's pid, never 0 (our own group). ESRCH (already gone) is fine.
        unsafe {
            libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

enum CallError {
    Timeout,
    Died(String),
}

/// The interpreter process and its status (shared with `ping`).
pub(super) struct EvalEngine {
    config: EvalConfig,
    interpreter: Option<Interpreter>,
    status: Arc<Mutex<EvalStatus>>,
}

#[derive(Deserialize)]
struct DriverReply {
    value: Option<String>,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    stderr: String,
    error: Option<EvalError>,
    driver_error: Option<String>,
}

impl EvalEngine {
    pub fn start(config: EvalConfig, status: Arc<Mutex<EvalStatus>>) -> Self {
        {
            let mut s = lock(&status);
            s.enabled = true;
            s.interpreter = config.interpreter.clone();
        }
        let mut engine = Self {
            config,
            interpreter: None,
            status,
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
            if let Some(stale) = self.interpreter.take() {
                stale.kill();
            }
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
        let request = json!({"op": "eval", "code": code});
        match self.call(&request, self.config.warmup_timeout) {
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

    /// Sends one request line to the driver and waits for its reply line. On a timeout or a
    /// dead driver the interpreter is killed; the next eval starts a fresh one.
    fn call(
        &mut self,
        request: &Value,
        timeout: Option<Duration>,
    ) -> Result<DriverReply, CallError> {
        let Some(interp) = self.interpreter.as_mut() else {
            return Err(CallError::Died("no interpreter is running".into()));
        };
        let mut line = serde_json::to_vec(request).expect("JSON values always serialize");
        line.push(b'\n');
        let failure = match interp
            .stdin
            .write_all(&line)
            .and_then(|()| interp.stdin.flush())
        {
            Err(e) => CallError::Died(format!("writing to it failed: {e}")),
            Ok(()) => {
                let received = match timeout {
                    Some(t) => interp.replies.recv_timeout(t),
                    None => interp
                        .replies
                        .recv()
                        .map_err(|_| RecvTimeoutError::Disconnected),
                };
                match received {
                    Ok(text) => {
                        return serde_json::from_str(&text).map_err(|e| {
                            CallError::Died(format!("its driver sent an unreadable reply: {e}"))
                        })
                    }
                    Err(RecvTimeoutError::Timeout) => CallError::Timeout,
                    Err(RecvTimeoutError::Disconnected) => {
                        CallError::Died("it closed its output".into())
                    }
                }
            }
        };
        if let Some(interp) = self.interpreter.take() {
            interp.kill();
        }
        self.set_status(false, None);
        Err(match failure {
            CallError::Died(why) => CallError::Died(format!(
                "the interpreter exited or broke ({why}); it restarts on the next eval, state is lost"
            )),
            timeout => timeout,
        })
    }

    fn eval(&mut self, req: &EvalRequest, reseed: bool) -> Result<EvalResult, OpError> {
        self.ensure_running()?;
        let timeout = req.timeout_ms.map(Duration::from_millis);
        if reseed {
            // Best effort: a failure here shows up again on the eval itself.
            let _ = self.call(&json!({"op": "reseed"}), timeout);
            self.ensure_running()?;
        }
        match self.call(&json!({"op": "eval", "code": req.code}), timeout) {
            Ok(reply) => match reply.driver_error {
                Some(e) => Err(OpError::new(
                    ErrorCode::Internal,
                    format!("eval driver: {e}"),
                )),
                None => Ok(EvalResult {
                    value: reply.value,
                    stdout: reply.stdout,
                    stderr: reply.stderr,
                    error: reply.error,
                    timed_out: false,
                }),
            },
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
}

fn spawn(command: &[String]) -> io::Result<Interpreter> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty interpreter command"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg("-c")
        .arg(DRIVER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group, so a kill on timeout takes the interpreter's children too.
    cmd.process_group(0);
    let mut child = cmd.spawn()?;
    let stdin = child.stdin.take().expect("stdin was piped");
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    let (tx, replies) = mpsc::channel();
    thread::Builder::new()
        .name("eval-out".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })?;
    // Whatever the interpreter writes to its real stdout/stderr (outside an eval's capture)
    // goes to the agent's log rather than blocking on a full pipe.
    thread::Builder::new()
        .name("eval-err".into())
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                tracing::info!(target: "eval", "{line}");
            }
        })?;
    Ok(Interpreter {
        child,
        stdin,
        replies,
    })
}

pub(super) fn run(state: &State, req: &EvalRequest) -> Result<EvalResult, OpError> {
    let engine = state.eval.as_ref().ok_or_else(|| {
        OpError::new(
            ErrorCode::EvalUnavailable,
            "eval: the agent runs without an interpreter (--no-eval)",
        )
    })?;
    let mut engine = lock(engine);
    let reseed = state.reseed_pending.swap(false, Ordering::SeqCst);
    engine.eval(req, reseed)
}
