//! `forkd run`: fork one child of a Linux snapshot, run one command in it through forkd-agent
//! with its output streamed to ours, exit with the command's exit code, remove the child.

use std::process::ExitCode;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use forkd_sandbox::exec::{
    connect_restored_agent, describe_status, exec_streaming, exit_code_of, parse_env_assignment,
    require_agent, ExecResult, ExecSpec, OutputForwarder,
};
use forkd_sandbox::fork::{fork_snapshot_checked, identity, ChildCheck, ForkPlan};
use forkd_store::Tag;
use forkd_vmm::snapshot::LoadedSnapshot;

use super::{interrupt, open_store, parse_tag, RunDir};

#[derive(Args)]
pub struct RunArgs {
    /// Snapshot to fork the child from (a Linux guest running forkd-agent).
    #[arg(long, value_parser = parse_tag)]
    tag: Tag,
    /// Kill the command (its whole process group) after this many seconds; forkd then
    /// exits with 124.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Environment variable for the command; repeatable.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env_assignment)]
    env: Vec<(String, String)>,
    /// Working directory of the command inside the guest.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Seconds the child may take to restore and its agent to answer.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    start_timeout: u64,
    /// The command and its arguments, after `--`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// Exit status after Ctrl-C / SIGTERM (128 + SIGINT, as shells report it).
const INTERRUPTED_EXIT: u8 = 130;

pub fn run_run(args: RunArgs) -> Result<ExitCode> {
    let spec = exec_spec(&args)?;
    let tag = &args.tag;
    let start_timeout = Duration::from_secs(args.start_timeout);
    let store = open_store()?;
    let loaded = LoadedSnapshot::load(&store, tag).with_context(|| format!("run {tag}"))?;
    require_agent(loaded.manifest(), "forkd run")?;

    // Dropped last: the child is stopped before its files go.
    let run_dir = RunDir::new(&store, "run");
    let plan = ForkPlan {
        n: 1,
        run_dir: run_dir.path().to_path_buf(),
        snapshot_counter: None,
        timeout: start_timeout,
        dirty_kib: None,
    };
    let (mut pool, report) = fork_snapshot_checked(&loaded, &plan, false, &ChildCheck::StartOnly)
        .with_context(|| format!("run {tag}: forking the child"))?;
    interrupt::install();
    if let Some(error) = report.children.first().and_then(|c| c.error.as_ref()) {
        bail!("run {tag}: the child did not start: {error}");
    }

    let outcome = run_in_child(plan.run_dir.as_path(), spec.clone(), start_timeout);
    let stopped = pool.stop_all(Duration::from_secs(10));
    for (index, reason) in stopped {
        if let Err(reason) = reason {
            tracing::warn!("child {index} stopped uncleanly: {reason}");
        }
    }
    drop(pool);
    drop(run_dir);

    let result = match outcome {
        None => {
            eprintln!("forkd run: interrupted; the child was stopped and removed");
            return Ok(ExitCode::from(INTERRUPTED_EXIT));
        }
        Some(result) => result.with_context(|| format!("run {tag}"))?,
    };
    let code = exit_code_of(&result);
    if result.timed_out {
        eprintln!(
            "forkd: error: run {tag}: command {:?} {}",
            spec.argv,
            describe_status(&result, spec.timeout)
        );
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn exec_spec(args: &RunArgs) -> Result<ExecSpec> {
    if args.command.is_empty() {
        bail!(
            "no command given; put it after `--`, e.g. forkd run --tag {} -- uname -a",
            args.tag
        );
    }
    if args.timeout == Some(0) {
        bail!("--timeout must be at least 1 second");
    }
    if args.start_timeout == 0 {
        bail!("--start-timeout must be at least 1 second");
    }
    if args.cwd.as_deref().is_some_and(|d| !d.starts_with('/')) {
        bail!(
            "--cwd {:?}: must be an absolute path inside the guest",
            args.cwd.as_deref().unwrap_or_default()
        );
    }
    Ok(ExecSpec {
        argv: args.command.clone(),
        env: args.env.clone(),
        cwd: args.cwd.clone(),
        timeout: args.timeout.map(Duration::from_secs),
    })
}

/// Sends the child `restored` and runs the command with its output streamed to ours, on a
/// worker thread so Ctrl-C is noticed while the command runs. `None` when interrupted.
fn run_in_child(
    run_dir: &std::path::Path,
    spec: ExecSpec,
    start_timeout: Duration,
) -> Option<Result<ExecResult>> {
    let uds = identity(run_dir, 0).vsock_uds;
    let deadline = Instant::now() + start_timeout;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let outcome = connect_restored_agent(&uds, deadline).and_then(|mut agent| {
            let mut out = OutputForwarder::default();
            exec_streaming(&mut agent, &spec, |stream, data| out.forward(stream, data))
        });
        let _ = tx.send(outcome.map_err(anyhow::Error::from));
    });
    loop {
        if interrupt::interrupted() {
            return None;
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            // A terminal's Ctrl-C reaches the child's process too, which may end the command
            // (or the connection) just before the flag is seen: that is still an interrupt.
            Ok(_) if interrupt::interrupted() => return None,
            Ok(outcome) => return Some(outcome),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Some(Err(anyhow::anyhow!(
                    "the thread talking to the child's agent ended without a result"
                )))
            }
        }
    }
}
