//! One child, one command — what `forkd run` does, for any [`ChildBody`] (a VM in production,
//! an agent behind a vsock emulator in tests): fork the child in its own process, send its
//! agent `restored`, run the command with its output handed over as it arrives, then stop the
//! child and remove its run directory, whatever happened (error, interrupt) on the way.
//!
//! A guest may end itself while the command runs (`poweroff -f`, `reboot -f`): its agent's
//! connection then drops, and stopping the child tells whether its VM had stopped by itself,
//! cleanly. That is [`RunOutcome::GuestStopped`], not an error.

use crate::run_dirs::RunDirs;
use std::io;
use std::net::IpAddr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use forkd_agent::protocol::Stream;

use crate::exec::{connect_restored_agent_with, exec_streaming, AgentError, ExecResult, ExecSpec};
use crate::fork::{fork_children_checked, identity, ChildCheck, ForkPlan};
use crate::pool::{ChildBody, Pool, PoolError, StopReport};

/// How often the wait for the command checks `interrupted`.
const POLL: Duration = Duration::from_millis(50);
/// How long a guest whose agent's connection dropped gets to stop by itself (a `poweroff`
/// tears the vsock device down before the VM stops) before it is stopped as a failure.
pub const GUEST_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a child gets to stop before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How a run ended when it did not fail.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// The command ran to its end (or its timeout).
    Finished(ExecResult),
    /// `interrupted` said so before the command ended.
    Interrupted,
    /// The child's VM stopped by itself, cleanly, before the command's result arrived: its
    /// guest powered off, reset or exited with 0 (e.g. the command was `poweroff -f`).
    GuestStopped {
        /// The VM's stop reason ("guest powered off", "guest requested a reset", ...).
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("forking the child")]
    Fork(#[from] PoolError),
    #[error("the child did not start: {0}")]
    Start(String),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("the thread talking to the child's agent ended without a result")]
    Worker,
}

/// Forks one child of `body` into `run_dir`, then (after calling `started`, e.g. to install
/// a Ctrl-C handler that the forked child must not inherit) sends its agent `restored` and
/// runs `spec`, handing each output chunk to `on_output`. `interrupted` is polled while the
/// command runs. The child is stopped and `run_dir` removed before this returns, in every case.
pub fn run_one<B: ChildBody>(
    body: &B,
    run_dir: &RunDirs,
    spec: &ExecSpec,
    start_timeout: Duration,
    started: impl FnOnce(),
    interrupted: &dyn Fn() -> bool,
    on_output: impl FnMut(Stream, &[u8]) -> io::Result<()> + Send + 'static,
) -> Result<RunOutcome, RunError> {
    let plan = ForkPlan {
        n: 1,
        run_dir: run_dir.clone(),
        snapshot_counter: None,
        timeout: start_timeout,
        dirty_kib: None,
        // Unused: the body brings its own jail.
        jail: Default::default(),
    };
    let forked = fork_children_checked(body, &plan, &ChildCheck::StartOnly);
    started();
    let outcome = match forked {
        Ok((mut pool, report)) => {
            let outcome = match report.children.first().and_then(|c| c.error.clone()) {
                Some(error) => Err(RunError::Start(error)),
                None => {
                    let start = ChildStart {
                        run_dir,
                        timeout: start_timeout,
                        resolvers: body.resolvers(),
                    };
                    command_in_child(&start, spec, interrupted, on_output)
                }
            };
            // A dropped agent connection may be the guest shutting down: let it finish.
            let grace = match outcome {
                Err(RunError::Agent(_)) => GUEST_STOP_GRACE,
                _ => Duration::ZERO,
            };
            let stopped = stop(&mut pool, grace);
            guest_stopped(outcome, stopped.as_ref())
        }
        Err(e) => Err(e.into()),
    };
    run_dir.remove();
    outcome
}

/// Stops the (one) child, after `grace` for it to stop by itself; returns its report.
fn stop(pool: &mut Pool, grace: Duration) -> Option<StopReport> {
    let mut stopped = pool.stop_all_after(grace, STOP_TIMEOUT);
    for s in &stopped {
        if let Err(reason) = &s.outcome {
            tracing::warn!("child {} stopped uncleanly: {reason}", s.index);
        }
    }
    (!stopped.is_empty()).then(|| stopped.swap_remove(0))
}

/// An agent error (the connection dropped, or no agent answered) is the guest's own clean
/// stop when the child's VM had stopped by itself, cleanly. The error can reach us before the
/// child's report does, so this is decided after the child was stopped and reaped.
fn guest_stopped(
    outcome: Result<RunOutcome, RunError>,
    stopped: Option<&StopReport>,
) -> Result<RunOutcome, RunError> {
    match (outcome, stopped.and_then(StopReport::guest_stop)) {
        (Err(RunError::Agent(e)), Some(reason)) => {
            tracing::debug!("the agent's connection ended as the guest stopped: {e}");
            Ok(RunOutcome::GuestStopped {
                reason: reason.to_string(),
            })
        }
        (outcome, _) => outcome,
    }
}

/// How the started child is reached: its run directory, how long it may take to answer, and
/// the resolvers its network opens (given to its agent with `restored`).
struct ChildStart<'a> {
    run_dir: &'a RunDirs,
    timeout: Duration,
    resolvers: Option<Vec<IpAddr>>,
}

/// `restored`, then the command, on a worker thread so `interrupted` is noticed meanwhile.
fn command_in_child(
    start: &ChildStart<'_>,
    spec: &ExecSpec,
    interrupted: &dyn Fn() -> bool,
    mut on_output: impl FnMut(Stream, &[u8]) -> io::Result<()> + Send + 'static,
) -> Result<RunOutcome, RunError> {
    let uds = identity(start.run_dir, 0).vsock_uds;
    let deadline = Instant::now() + start.timeout;
    let spec = spec.clone();
    let resolvers = start.resolvers.clone();
    let (tx, rx) = mpsc::channel();
    // Detached: after an interrupt it ends by itself once the stopped child closes the socket.
    std::thread::spawn(move || {
        let outcome = connect_restored_agent_with(&uds, deadline, resolvers.as_deref())
            .and_then(|mut agent| exec_streaming(&mut agent, &spec, &mut on_output));
        let _ = tx.send(outcome);
    });
    loop {
        if interrupted() {
            return Ok(RunOutcome::Interrupted);
        }
        match rx.recv_timeout(POLL) {
            // A terminal's Ctrl-C reaches the child's process too, which may end the command
            // (or the connection) just before the flag is seen: that is still an interrupt.
            Ok(_) if interrupted() => return Ok(RunOutcome::Interrupted),
            Ok(outcome) => return Ok(RunOutcome::Finished(outcome?)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(RunError::Worker),
        }
    }
}
