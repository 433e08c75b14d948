//! `forkd fork` and `forkd demo`: N children from a snapshot, each in its own process.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use forkd_sandbox::exec::{require_agent, CapturedExec, ExecSpec};
use forkd_sandbox::fork::{fork_snapshot_net, ChildCheck, ChildOutcome, ForkPlan, ForkReport};
use forkd_sandbox::proc_mem::ProcMem;
use forkd_sandbox::run_dirs::RunDirs;
use forkd_sandbox::stats::Summary;
use forkd_store::{Store, Tag};
use forkd_vmm::snapshot::{snapshot_after_ready, BootSnapshot, LoadedSnapshot};
use forkd_vmm::{KernelSource, VmConfig};
use serde::Serialize;

use super::net::NetOptions;
use super::{open_store, parse_tag, ExecOptions, JailArgs};
use crate::output::{print_json, print_table};
use forkd_sandbox::jail::JailConfig;

#[derive(Args)]
pub struct ForkArgs {
    /// Snapshot to fork from.
    #[arg(long, value_parser = parse_tag)]
    tag: Tag,
    /// Number of children.
    #[arg(short = 'n', long = "count", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    n: u32,
    /// Keep the children running until Ctrl-C.
    #[arg(long)]
    hold: bool,
    /// Seconds a child may take to start and answer.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    timeout: u64,
    /// Run CMD (given after `--`) in every child right after its restore, concurrently;
    /// print each child's exit code and output. The snapshot's guest must run forkd-agent.
    #[arg(long)]
    exec: bool,
    /// Seconds CMD may run in each child before its process group is killed (default:
    /// --timeout).
    #[arg(long, value_name = "SECS", requires = "exec")]
    exec_timeout: Option<u64>,
    #[command(flatten)]
    exec_options: ExecOptions,
    #[command(flatten)]
    net: NetOptions,
    /// Evaluate CODE in every child's warm interpreter right after its restore; print each
    /// child's value or exception (exit code 1 if any raised). The guest must run forkd-agent.
    #[arg(long, value_name = "CODE", conflicts_with = "exec")]
    eval: Option<String>,
    #[command(flatten)]
    jail: JailArgs,
    #[arg(long)]
    json: bool,
    /// The command for --exec and its arguments, after `--`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Number of children to fork from the demo snapshot.
    #[arg(short = 'n', long = "count", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1024))]
    n: u32,
    #[command(flatten)]
    jail: JailArgs,
    #[arg(long)]
    json: bool,
}

/// The tag `forkd demo` builds once and reuses.
pub const DEMO_TAG: &str = "forkd-demo";

/// The fork report plus the bare KVM floor measured in the same run.
#[derive(Serialize)]
pub struct ForkSummary {
    pub tag: String,
    #[serde(flatten)]
    pub report: ForkReport,
    pub kvm_floor: Summary,
    pub restore_p50_over_floor_p50: f64,
    pub restore_p99_over_floor_p50: f64,
    pub wall_target_ms: f64,
    pub cores: usize,
}

/// How long each child gets to stop before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of each output stream kept per child with --exec (shown truncated; whole in --json).
pub const EXEC_CAPTURE_LIMIT: usize = 64 << 10;
/// Characters of output shown per child in the --exec table.
const OUTPUT_PREVIEW_CHARS: usize = 60;

/// What each child is asked once it is restored.
pub enum ChildWork {
    /// The check that fits the guest (the demo counter, or the agent's ping).
    Answer,
    Exec(ExecSpec),
    Eval(String),
}

pub fn run_fork(args: ForkArgs) -> Result<ExitCode> {
    args.net.validate()?;
    let exec = match (exec_spec(&args)?, args.eval.clone()) {
        (Some(spec), _) => ChildWork::Exec(spec),
        (None, Some(code)) => ChildWork::Eval(code),
        (None, None) => ChildWork::Answer,
    };
    let store = open_store()?;
    fork_and_report(
        &store,
        &args.tag,
        args.n as usize,
        args.timeout,
        Shown {
            hold: args.hold,
            json: args.json,
        },
        exec,
        &args.jail.config(),
        &args.net,
    )
}

/// The command for --exec; CMD without --exec (or the reverse) is refused.
fn exec_spec(args: &ForkArgs) -> Result<Option<ExecSpec>> {
    let options = &args.exec_options;
    if !args.exec && (!options.env.is_empty() || options.cwd.is_some()) {
        bail!("--env and --cwd apply to the command of --exec, which was not given");
    }
    match (args.exec, args.command.is_empty()) {
        (false, true) => Ok(None),
        (false, false) => bail!(
            "{:?} given without --exec (to run it in every child: forkd fork --tag {} -n {} --exec -- CMD...)",
            args.command.join(" "),
            args.tag,
            args.n
        ),
        (true, true) => bail!("--exec: no command given; put it after `--`, e.g. forkd fork --tag {} --exec -- uname -a", args.tag),
        (true, false) => {
            let secs = args.exec_timeout.unwrap_or(args.timeout);
            if secs == 0 {
                bail!("--exec-timeout must be at least 1 second");
            }
            let timeout = Some(Duration::from_secs(secs));
            Ok(Some(args.exec_options.spec(&args.command, timeout)?))
        }
    }
}

/// Whether the cached demo snapshot was taken of another build of the demo guest.
fn stale_demo(store: &Store, tag: &Tag, guest: &KernelSource) -> Result<bool> {
    let snap = store
        .get(tag)
        .with_context(|| format!("demo snapshot {tag}"))?;
    Ok(snap.manifest.kernel != guest.identity())
}

pub fn run_demo(args: DemoArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let tag = Tag::parse(DEMO_TAG).expect("valid tag");
    let guest = KernelSource::parse("builtin:demo")?;
    if store.exists(&tag) && stale_demo(&store, &tag, &guest)? {
        eprintln!(
            "forkd demo: the built-in demo guest changed since {tag} was taken; rebuilding it"
        );
        store
            .remove(std::slice::from_ref(&tag), forkd_store::RemoveMode::Refuse)
            .with_context(|| format!("replacing the stale demo snapshot {tag}"))?;
    }
    if !store.exists(&tag) {
        eprintln!(
            "forkd demo: booting the built-in demo guest and snapshotting it as {tag} (once)"
        );
        let mut vm = VmConfig::new(guest);
        vm.mem_mib = 128;
        let what = BootSnapshot {
            vm,
            rootfs: None,
            ready_timeout: Duration::from_secs(60),
        };
        snapshot_after_ready(&store, &tag, &what).context("building the demo snapshot")?;
    }
    let jail = args.jail.config();
    fork_and_report(
        &store,
        &tag,
        args.n as usize,
        120,
        Shown {
            hold: false,
            json: args.json,
        },
        ChildWork::Answer,
        &jail,
        &NetOptions::default(),
    )
}

/// How `fork_and_report` shows its children.
#[derive(Debug, Clone, Copy)]
pub struct Shown {
    /// Keep them running until Ctrl-C.
    pub hold: bool,
    pub json: bool,
}

/// Loads, forks, checks (or runs `exec` in every child), prints, stops. Exit code 1 if any
/// child (or its command) failed, each named on stderr.
#[allow(clippy::too_many_arguments)]
pub fn fork_and_report(
    store: &Store,
    tag: &Tag,
    n: usize,
    timeout: u64,
    Shown { hold, json }: Shown,
    exec: ChildWork,
    jail: &JailConfig,
    net: &NetOptions,
) -> Result<ExitCode> {
    let unfinished = match exec {
        ChildWork::Answer => "it answered",
        ChildWork::Exec(_) => "the command finished",
        ChildWork::Eval(_) => "its eval finished",
    };
    let (mut summary, mut pool, run_dir, nets) =
        fork_measured(store, tag, n, timeout, None, exec, jail, net)?;
    // Stopped before the report is printed (unless held), so a child whose guest powered off
    // or rebooted by itself is reported as that rather than as a dropped connection.
    let mut stopped = None;
    if !hold {
        // Children that failed may be guests shutting down: give them the grace to finish.
        let grace = if summary.report.children.iter().any(|c| c.error.is_some()) {
            forkd_sandbox::run::GUEST_STOP_GRACE
        } else {
            Duration::ZERO
        };
        let s = pool.stop_all_after(grace, STOP_TIMEOUT);
        summary.report.note_stops(&s, unfinished);
        stopped = Some(s);
    }
    if json {
        print_json(&summary)?;
    } else {
        if summary.report.children.iter().any(|c| c.exec.is_some()) {
            print_table(
                &["CHILD", "EXIT", "FIRST EXEC", "OUTPUT"],
                &exec_rows(&summary.report),
            );
            println!();
        }
        print_summary(&summary);
    }
    let command_failures = command_failures(&summary.report);
    if let Some(nets) = &nets {
        for (i, net) in nets.children() {
            eprintln!(
                "child {i}: network namespace {}, address {} (host end {})",
                net.netns, net.address, net.host_address
            );
        }
    }
    if hold {
        eprintln!("holding {} children; Ctrl-C stops them", pool.len());
        super::interrupt::wait();
    }
    let stopped = stopped.unwrap_or_else(|| pool.stop_all(STOP_TIMEOUT));
    run_dir.remove();
    drop(nets);
    let unclean: Vec<String> = stopped
        .into_iter()
        .filter_map(|s| s.outcome.err().map(|e| format!("child {}: {e}", s.index)))
        .collect();
    for line in command_failures.iter().chain(&unclean) {
        eprintln!("forkd fork: {line}");
    }
    let ok = summary.report.alive == n && unclean.is_empty() && command_failures.is_empty();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Forks `n` children of `tag` (optionally dirtying memory in each) and measures the KVM
/// floor in the same run. Returns the live pool and its run directory.
#[allow(clippy::too_many_arguments)]
pub fn fork_measured(
    store: &Store,
    tag: &Tag,
    n: usize,
    timeout: u64,
    dirty_kib: Option<u64>,
    work: ChildWork,
    jail: &JailConfig,
    net: &NetOptions,
) -> Result<(
    ForkSummary,
    forkd_sandbox::pool::Pool,
    RunDirs,
    Option<forkd_sandbox::net::NetPool>,
)> {
    let loaded = LoadedSnapshot::load(store, tag).with_context(|| format!("fork {tag}"))?;
    let check = match work {
        ChildWork::Exec(spec) => {
            require_agent(loaded.manifest(), "forkd fork --exec")?;
            ChildCheck::Agent {
                exec: Some(spec),
                capture_limit: EXEC_CAPTURE_LIMIT,
            }
        }
        ChildWork::Eval(code) => {
            require_agent(loaded.manifest(), "forkd fork --eval")?;
            ChildCheck::AgentEval {
                code,
                capture_limit: EXEC_CAPTURE_LIMIT,
            }
        }
        ChildWork::Answer => ChildCheck::for_snapshot(loaded.manifest()),
    };
    let floor = measure_floor(&loaded, n.max(20))?;
    // Prepared ahead, like the pool's VM shells: a child only enters its namespace.
    let nets = net.prepare(&loaded, n)?;
    let run_dir = RunDirs::for_this_process(store, "fork");
    let plan = ForkPlan {
        n,
        run_dir: run_dir.clone(),
        snapshot_counter: None,
        timeout: Duration::from_secs(timeout),
        dirty_kib,
        jail: jail.clone(),
    };
    let (pool, report) = match fork_snapshot_net(&loaded, &plan, false, &check, nets.as_ref()) {
        Ok(forked) => forked,
        Err(e) => {
            // The pool is gone with the error; its sockets and overlays must not stay.
            run_dir.remove();
            return Err(e).context("forking children");
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let summary = ForkSummary {
        tag: tag.to_string(),
        restore_p50_over_floor_p50: ratio(report.restore.p50_ms, floor.p50_ms),
        restore_p99_over_floor_p50: ratio(report.restore.p99_ms, floor.p50_ms),
        wall_target_ms: n as f64 * floor.p50_ms / cores as f64 * 1.5,
        cores,
        kvm_floor: floor,
        report,
    };
    Ok((summary, pool, run_dir, nets))
}

/// The bare KVM floor for this snapshot's shape: KVM_CREATE_VM + its vCPUs + one slot.
pub fn measure_floor(loaded: &LoadedSnapshot, runs: usize) -> Result<Summary> {
    let kvm = kvm_ioctls::Kvm::new().context("opening /dev/kvm")?;
    let mem = (loaded.manifest().memory_mib as usize) << 20;
    let samples = forkd_sandbox::floor::measure(&kvm, loaded.vcpus(), mem, runs)
        .context("measuring the KVM floor")?;
    Ok(Summary::of(&samples))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

pub fn print_summary(s: &ForkSummary) {
    let r = &s.report;
    println!(
        "forked {}/{} children of {} in {:.1} ms wall ({:.0} children/s); VM shells prepared ahead in {:.1} ms",
        r.alive, r.requested, s.tag, r.wall_ms, r.children_per_sec, r.pool_ms
    );
    println!("{:<28} {:>9} {:>9} {:>9}", "", "p50", "p99", "max");
    let row = |name: &str, x: &Summary| {
        println!(
            "{name:<28} {:>6.2} ms {:>6.2} ms {:>6.2} ms",
            x.p50_ms, x.p99_ms, x.max_ms
        );
    };
    row("pool: shell prepared", &r.prepare);
    row("restore per child", &r.restore);
    if let Some(answered) = &r.answered {
        row("fork to first answer", answered);
    }
    if let Some(first) = &r.first_exec {
        row("fork to first exec done", first);
    }
    row("KVM floor (same run)", &s.kvm_floor);
    println!(
        "{:<28} {:>8.2}x {:>8.2}x   (p99 against the floor's p50)",
        "restore / floor", s.restore_p50_over_floor_p50, s.restore_p99_over_floor_p50
    );
    println!(
        "{:<28} {:>6.1} ms (target {:.1} ms = n x floor / {} cores x 1.5)",
        "wall-clock for all", r.wall_ms, s.wall_target_ms, s.cores
    );
    if let Some(answered) = &r.answered {
        println!(
            "{:<28} {:>6.1} ms (every guest running and answering the host)",
            "wall-clock until all answer", answered.max_ms
        );
    }
    let memory = |pick: fn(&ChildOutcome) -> Option<ProcMem>| {
        let (uss, pss): (Vec<u64>, Vec<u64>) = r
            .children
            .iter()
            .filter_map(pick)
            .map(|m| (m.uss_kib, m.pss_kib))
            .unzip();
        (!uss.is_empty()).then(|| (median(&uss), median(&pss)))
    };
    if let Some((uss, pss)) = memory(|c| c.memory_after_fork) {
        println!(
            "{:<28} USS p50 {uss} KiB, PSS p50 {pss} KiB (per child process, right after fork)",
            "memory per child",
        );
    }
    if let Some((uss, pss)) = memory(|c| c.memory_after_dirty) {
        println!(
            "{:<28} USS p50 {uss} KiB, PSS p50 {pss} KiB after each child dirtied guest memory",
            ""
        );
    }
    let counters: Vec<u64> = r.children.iter().filter_map(|c| c.counter).collect();
    if let (Some(lo), Some(hi)) = (counters.iter().min(), counters.iter().max()) {
        println!("every answering child continued the demo counter (answers {lo}..{hi}) and echoed its own nonce");
    }
    for c in r.children.iter().filter(|c| c.error.is_some()) {
        println!(
            "child {}: FAILED: {}",
            c.index,
            c.error.as_deref().unwrap_or("")
        );
    }
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

/// One row per child for the --exec table: index, exit status, fork-to-first-exec time and
/// the start of its output.
pub fn exec_rows(report: &ForkReport) -> Vec<Vec<String>> {
    report
        .children
        .iter()
        .map(|c| {
            let (status, output) = match (&c.exec, &c.error) {
                (Some(e), _) => (exit_cell(e), output_preview(e, OUTPUT_PREVIEW_CHARS)),
                (None, Some(err)) => ("-".into(), format!("FAILED: {err}")),
                (None, None) => ("-".into(), String::new()),
            };
            let first = c
                .first_exec_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms"));
            vec![c.index.to_string(), status, first, output]
        })
        .collect()
}

/// How a command ended, in a table cell: its exit code, `signal N` or `timeout`.
pub fn exit_cell(e: &CapturedExec) -> String {
    if e.timed_out {
        "timeout".into()
    } else if let Some(code) = e.exit_code {
        code.to_string()
    } else if let Some(sig) = e.signal {
        format!("signal {sig}")
    } else {
        "?".into()
    }
}

/// The first non-empty line of stdout (else of stderr, marked), cut to `max` characters; `…`
/// marks anything left out.
pub fn output_preview(e: &CapturedExec, max: usize) -> String {
    let first_line = |text: &str| {
        text.lines()
            .find(|l| !l.trim().is_empty())
            .map(str::to_string)
    };
    let (line, whole, total) = match first_line(&e.stdout) {
        Some(line) => (line, &e.stdout, e.stdout_bytes),
        None => match first_line(&e.stderr) {
            Some(line) => (format!("stderr: {line}"), &e.stderr, e.stderr_bytes),
            None => return String::new(),
        },
    };
    let more = whole.trim_end().lines().count() > 1 || total > whole.len() as u64;
    let mut shown: String = line.chars().take(max).collect();
    if more || line.chars().count() > max {
        shown.push('…');
    }
    shown
}

/// One line per child whose command failed or that failed to run it, naming the child.
pub fn command_failures(report: &ForkReport) -> Vec<String> {
    report
        .failed_commands()
        .map(|c| {
            let e = c.exec.as_ref().expect("failed_commands have a result");
            let why = e.end();
            let last = e
                .stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| format!(" (stderr: {:?})", l.trim()))
                .unwrap_or_default();
            format!("child {}: command failed: {why}{last}", c.index)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_sandbox::fork::ChildOutcome;

    fn captured(code: Option<i32>, stdout: &str, stderr: &str) -> CapturedExec {
        CapturedExec {
            exit_code: code,
            signal: None,
            timed_out: false,
            duration_ms: 3,
            stdout: stdout.into(),
            stderr: stderr.into(),
            stdout_bytes: stdout.len() as u64,
            stderr_bytes: stderr.len() as u64,
        }
    }

    fn report(children: Vec<ChildOutcome>) -> ForkReport {
        ForkReport {
            requested: children.len(),
            alive: children.iter().filter(|c| c.error.is_none()).count(),
            pool_ms: 1.0,
            prepare: Summary::of(&[]),
            wall_ms: 1.0,
            children_per_sec: 1.0,
            restore: Summary::of(&[]),
            answered: None,
            first_exec: None,
            children,
        }
    }

    fn child(index: usize, exec: Option<CapturedExec>, error: Option<&str>) -> ChildOutcome {
        ChildOutcome {
            index,
            pid: 100 + index as i32,
            restore_ms: Some(0.5),
            counter: None,
            fork_count: Some(1),
            crng_reseeded: Some(true),
            answered_ms: Some(2.0),
            first_exec_ms: exec.as_ref().map(|_| 4.25),
            exec,
            memory_after_fork: None,
            memory_after_dirty: None,
            error: error.map(String::from),
        }
    }

    #[test]
    fn rows_show_exit_status_time_and_the_start_of_the_output() {
        let mut timed_out = captured(None, "partial\n", "");
        timed_out.timed_out = true;
        let mut killed = captured(None, "", "");
        killed.signal = Some(9);
        let r = report(vec![
            child(0, Some(captured(Some(0), "hello\n", "")), None),
            child(1, Some(captured(Some(3), "", "boom\n")), None),
            child(2, Some(timed_out), None),
            child(3, Some(killed), None),
            child(4, None, Some("no forkd-agent reachable")),
        ]);
        let rows = exec_rows(&r);
        assert_eq!(rows[0], vec!["0", "0", "4.2 ms", "hello"]);
        assert_eq!(rows[1], vec!["1", "3", "4.2 ms", "stderr: boom"]);
        assert_eq!(rows[2][1], "timeout");
        assert_eq!(rows[3][1], "signal 9");
        assert_eq!(
            rows[4],
            vec!["4", "-", "-", "FAILED: no forkd-agent reachable"]
        );
    }

    #[test]
    fn previews_are_cut_and_marked() {
        let long = "x".repeat(100);
        assert_eq!(
            output_preview(&captured(Some(0), &long, ""), 10),
            format!("{}…", "x".repeat(10))
        );
        assert_eq!(output_preview(&captured(Some(0), "a\nb\n", ""), 10), "a…");
        assert_eq!(output_preview(&captured(Some(0), "\n\n", ""), 10), "");
        let mut cut = captured(Some(0), "abc", "");
        cut.stdout_bytes = 1 << 20; // more was written than kept
        assert_eq!(output_preview(&cut, 10), "abc…");
    }

    #[test]
    fn failures_name_each_child_and_why() {
        let mut timed_out = captured(None, "", "");
        timed_out.timed_out = true;
        let r = report(vec![
            child(0, Some(captured(Some(0), "ok\n", "")), None),
            child(
                1,
                Some(captured(Some(2), "", "first\nno such file\n")),
                None,
            ),
            child(2, Some(timed_out), None),
        ]);
        assert_eq!(
            command_failures(&r),
            vec![
                "child 1: command failed: exit code 2 (stderr: \"no such file\")".to_string(),
                "child 2: command failed: timed out (its process group was killed)".to_string(),
            ]
        );
        let ok = report(vec![child(0, Some(captured(Some(0), "", "")), None)]);
        assert!(command_failures(&ok).is_empty());
    }
}
