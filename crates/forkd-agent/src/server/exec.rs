//! `exec`: run a process in its own process group, stream its output, enforce the timeout on the
//! whole process group.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{OpError, Replier};
use crate::protocol::{ErrorCode, ExecRequest, ExecResult, Stream, CHUNK_LEN};

/// After a kill, how long to wait for the output pipes to close. Processes that left the group
/// (their own setsid) can keep them open forever; the reply must not wait for those.
pub(super) const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How often a running command checks that its client is still there.
const PEER_CHECK: Duration = Duration::from_millis(500);

enum Event {
    Exited(io::Result<ExitStatus>),
    PipeClosed { stream: Stream, bytes: u64 },
}

pub(super) fn run(
    req: &ExecRequest,
    stdin: Vec<u8>,
    replier: &Arc<Replier>,
) -> Result<ExecResult, OpError> {
    let program = req
        .argv
        .first()
        .ok_or_else(|| OpError::new(ErrorCode::BadRequest, "exec: argv is empty"))?;
    if req.keep_stdin {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            "exec: keep_stdin is for proc_start (exec's stdin is its one payload)",
        ));
    }
    if req.pty.is_some() {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            "exec: pty is for proc_start (a terminal outlives one request)",
        ));
    }
    let started = Instant::now();
    let mut child = command(req, !stdin.is_empty())
        .spawn()
        .map_err(|e| OpError::new(ErrorCode::SpawnFailed, format!("exec {program:?}: {e}")))?;
    // The child leads a new process group whose id is its pid: killpg(pid) reaches every
    // descendant that did not move to a group or session of its own.
    let pgid = child.id() as libc::pid_t;
    tracing::debug!("exec {:?}: pid {pgid}", req.argv);

    let (events_tx, events) = mpsc::channel();
    if let Some(pipe) = child.stdin.take() {
        feed_stdin(pipe, stdin);
    }
    let pipes: [(Option<Box<dyn Read + Send>>, Stream); 2] = [
        (
            child.stdout.take().map(|p| Box::new(p) as _),
            Stream::Stdout,
        ),
        (
            child.stderr.take().map(|p| Box::new(p) as _),
            Stream::Stderr,
        ),
    ];
    for (pipe, stream) in pipes {
        if let Some(pipe) = pipe {
            pump_output(pipe, stream, pgid, replier.clone(), events_tx.clone());
        }
    }
    wait_for_exit(child, events_tx);

    let mut result = ExecResult::default();
    let mut exited = false;
    let mut pipes_open = 2;
    let mut deadline = req.timeout_ms.map(|ms| started + Duration::from_millis(ms));
    let mut killed = false;
    while !exited || pipes_open > 0 {
        // Wake at the deadline, and meanwhile often enough to notice a client that left.
        let wait = deadline
            .map_or(PEER_CHECK, |at| {
                at.saturating_duration_since(Instant::now())
            })
            .min(PEER_CHECK);
        match events.recv_timeout(wait) {
            Ok(Event::Exited(status)) => {
                exited = true;
                record_status(&mut result, status);
            }
            Ok(Event::PipeClosed { stream, bytes }) => {
                pipes_open -= 1;
                match stream {
                    Stream::Stderr => result.stderr_bytes = bytes,
                    _ => result.stdout_bytes = bytes,
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let due = deadline.is_some_and(|at| Instant::now() >= at);
                // Grace period over: output held open by processes outside the group.
                if due && killed {
                    break;
                }
                let why = if due {
                    result.timed_out = true;
                    "timeout"
                } else if !killed && replier.peer_gone() {
                    // Nobody will read the answer: a silent command must not run on for it.
                    "client gone"
                } else {
                    continue;
                };
                tracing::info!("exec {:?}: {why}, killing process group {pgid}", req.argv);
                killed = true;
                kill_group(pgid);
                deadline = Some(Instant::now() + DRAIN_GRACE);
            }
            // Every sender gone: answer with what we have.
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    result.duration_ms = started.elapsed().as_millis() as u64;
    Ok(result)
}

/// The program, arguments, environment and directory of `req`.
pub(super) fn base_command(req: &ExecRequest) -> Command {
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..]);
    if req.clear_env {
        cmd.env_clear();
    }
    cmd.envs(&req.env);
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    cmd
}

pub(super) fn command(req: &ExecRequest, with_stdin: bool) -> Command {
    let mut cmd = base_command(req);
    cmd.stdin(if with_stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped());
    cmd.stderr(Stdio::piped());
    // A process group of its own, so killpg reaches every descendant that does not leave it.
    // (process_group rather than a pre_exec setsid: it keeps std on the posix_spawn fast path
    // instead of fork, which measured about twice as slow per command.)
    cmd.process_group(0);
    cmd
}

pub(super) fn feed_stdin(mut pipe: ChildStdin, data: Vec<u8>) {
    spawn_helper("exec-stdin", move || {
        // EPIPE just means the process did not read all of its input; that is its business.
        let _ = pipe.write_all(&data);
    });
}

fn pump_output(
    mut pipe: Box<dyn Read + Send>,
    stream: Stream,
    pgid: libc::pid_t,
    replier: Arc<Replier>,
    events: mpsc::Sender<Event>,
) {
    spawn_helper("exec-output", move || {
        let mut buf = vec![0u8; CHUNK_LEN];
        let mut bytes = 0u64;
        let mut delivering = true;
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            bytes += n as u64;
            if delivering && replier.chunk(stream, &buf[..n]).is_err() {
                // Nobody is listening any more: stop the command rather than let it run on.
                delivering = false;
                kill_group(pgid);
            }
        }
        let _ = events.send(Event::PipeClosed { stream, bytes });
    });
}

fn wait_for_exit(mut child: Child, events: mpsc::Sender<Event>) {
    spawn_helper("exec-wait", move || {
        let _ = events.send(Event::Exited(child.wait()));
    });
}

fn record_status(result: &mut ExecResult, status: io::Result<ExitStatus>) {
    match status {
        Ok(status) => {
            result.exit_code = status.code();
            result.signal = status.signal();
        }
        Err(e) => tracing::warn!("waiting for an exec child failed: {e}"),
    }
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: killpg(2) takes only integers and touches no memory of ours. `pgid` is an exec
    // child's pid, which leads its own group (process_group(0)), never 0 (our own group).
    // ESRCH (the group is already gone) is fine.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

fn spawn_helper(name: &str, work: impl FnOnce() + Send + 'static) {
    if let Err(e) = super::pool::spawn(work) {
        tracing::error!("cannot start {name} thread: {e}");
    }
}
