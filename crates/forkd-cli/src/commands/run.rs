//! `forkd run`: fork one child of a Linux snapshot, run one command in it through forkd-agent
//! with its output streamed to ours, exit with the command's exit code, remove the child.
//! A guest that powers off or reboots before the command finishes ends the run cleanly
//! (exit 0, one line on stderr saying so).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use forkd_sandbox::exec::{require_agent, CommandEnd, ExecSpec};
use forkd_sandbox::run::{run_one, RunOutcome};
use forkd_sandbox::run_dirs::{RunDirGuard, RunDirs};
use forkd_sandbox::vm_child::VmBody;
use forkd_store::Tag;
use forkd_vmm::snapshot::LoadedSnapshot;
use forkd_vmm::StopReason;

use super::{interrupt, open_store, parse_tag, ExecOptions, JailArgs};
use crate::terminal::{exit_code_of, OutputForwarder};

#[derive(Args)]
pub struct RunArgs {
    /// Snapshot to fork the child from (a Linux guest running forkd-agent).
    #[arg(long, value_parser = parse_tag)]
    tag: Tag,
    /// Kill the command (its whole process group) after this many seconds; forkd then
    /// exits with 124.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    #[command(flatten)]
    exec: ExecOptions,
    #[command(flatten)]
    net: super::net::NetOptions,
    #[command(flatten)]
    jail: JailArgs,
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
    args.net.validate()?;
    let spec = exec_spec(&args)?;
    let tag = &args.tag;
    let store = open_store()?;
    let loaded = LoadedSnapshot::load(&store, tag).with_context(|| format!("run {tag}"))?;
    require_agent(loaded.manifest(), "forkd run")?;
    if forkd_sandbox::process::thread_count() > 1 {
        tracing::warn!("forking the child from a process with several threads");
    }
    // run_one removes it; the guard covers a panic on the way.
    let run_dir = RunDirGuard::new(RunDirs::for_this_process(&store, "run"));
    let view = forkd_sandbox::jail::View {
        writable: vec![run_dir.dirs().files.clone(), run_dir.dirs().runtime.clone()],
        ..Default::default()
    };
    // The child's network, prepared before the fork; removed when it is dropped at the end.
    let nets = args.net.prepare(&loaded, 1)?;
    if let Some(net) = nets.as_ref().and_then(|n| n.child(0)) {
        eprintln!(
            "forkd run: the child's address is {} (network namespace {})",
            net.address, net.netns
        );
    }
    let body = VmBody {
        loaded: &loaded,
        track_dirty_pages: false,
        store: None,
        net: nets.as_ref(),
        jail: VmBody::jail_for(&args.jail.config(), &loaded, None, view),
    };
    let mut out = OutputForwarder::default();
    let outcome = run_one(
        &body,
        run_dir.dirs(),
        &spec,
        Duration::from_secs(args.start_timeout),
        interrupt::install,
        &interrupt::interrupted,
        move |stream, data| out.forward(stream, data),
    )
    .with_context(|| format!("run {tag}"))?;
    let result = match outcome {
        RunOutcome::Interrupted => {
            eprintln!("forkd run: interrupted; the child was stopped and removed");
            return Ok(ExitCode::from(INTERRUPTED_EXIT));
        }
        RunOutcome::GuestStopped { reason } => {
            // The child was stopped and removed like any other; the guest ending itself
            // (`poweroff -f`, `reboot -f`) is a clean exit.
            eprintln!("{}", guest_stopped_line(&reason));
            return Ok(ExitCode::SUCCESS);
        }
        RunOutcome::Finished(result) => result,
    };
    if result.timed_out {
        eprintln!(
            "forkd: error: run {tag}: command {:?} {}",
            spec.argv,
            CommandEnd::of(&result, spec.timeout)
        );
    }
    Ok(ExitCode::from(
        u8::try_from(exit_code_of(&result)).unwrap_or(1),
    ))
}

/// The line for a guest that stopped by itself before the command's result arrived.
fn guest_stopped_line(reason: &str) -> String {
    let what = if reason == StopReason::PowerOff.to_string() {
        "powered off".to_string()
    } else if reason == StopReason::Reset.to_string() {
        "rebooted".to_string()
    } else {
        format!("stopped ({reason})")
    };
    format!("forkd run: the guest {what} before the command finished")
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
    args.exec
        .spec(&args.command, args.timeout.map(Duration::from_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_stopped_itself_is_named_in_one_line() {
        assert_eq!(
            guest_stopped_line(&StopReason::PowerOff.to_string()),
            "forkd run: the guest powered off before the command finished"
        );
        assert_eq!(
            guest_stopped_line(&StopReason::Reset.to_string()),
            "forkd run: the guest rebooted before the command finished"
        );
        assert_eq!(
            guest_stopped_line(&StopReason::GuestExit(0).to_string()),
            "forkd run: the guest stopped (guest exited with code 0) before the command finished"
        );
    }
}
