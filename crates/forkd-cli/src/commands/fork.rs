//! `forkd fork` and `forkd demo`: N children from a snapshot, each in its own process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use forkd_sandbox::fork::{fork_snapshot, ForkPlan, ForkReport};
use forkd_sandbox::stats::Summary;
use forkd_store::{Store, Tag};
use forkd_vmm::snapshot::{snapshot_after_ready, BootSnapshot, LoadedSnapshot};
use forkd_vmm::{KernelSource, VmConfig};
use serde::Serialize;

use super::{open_store, parse_tag};
use crate::output::print_json;

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
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Number of children to fork from the demo snapshot.
    #[arg(short = 'n', long = "count", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1024))]
    n: u32,
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

pub fn run_fork(args: ForkArgs) -> Result<ExitCode> {
    let store = open_store()?;
    fork_and_report(
        &store,
        &args.tag,
        args.n as usize,
        args.timeout,
        args.hold,
        args.json,
    )
}

pub fn run_demo(args: DemoArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let tag = Tag::parse(DEMO_TAG).expect("valid tag");
    if !store.exists(&tag) {
        eprintln!(
            "forkd demo: booting the built-in demo guest and snapshotting it as {tag} (once)"
        );
        let mut vm = VmConfig::new(KernelSource::parse("builtin:demo")?);
        vm.mem_mib = 128;
        let what = BootSnapshot {
            vm,
            rootfs: None,
            ready_timeout: Duration::from_secs(60),
        };
        snapshot_after_ready(&store, &tag, &what).context("building the demo snapshot")?;
    }
    fork_and_report(&store, &tag, args.n as usize, 120, false, args.json)
}

/// Loads, forks, checks, prints, stops. Exit code 1 if any child failed.
pub fn fork_and_report(
    store: &Store,
    tag: &Tag,
    n: usize,
    timeout: u64,
    hold: bool,
    json: bool,
) -> Result<ExitCode> {
    let (summary, mut pool, run_dir) = fork_measured(store, tag, n, timeout, None)?;
    if json {
        print_json(&summary)?;
    } else {
        print_summary(&summary);
    }
    if hold {
        eprintln!("holding {} children; Ctrl-C stops them", pool.len());
        wait_for_interrupt();
    }
    let stopped = pool.stop_all(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&run_dir);
    let unclean: Vec<String> = stopped
        .into_iter()
        .filter_map(|(i, r)| r.err().map(|e| format!("child {i}: {e}")))
        .collect();
    for line in &unclean {
        eprintln!("forkd fork: {line}");
    }
    let ok = summary.report.alive == n && unclean.is_empty();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Forks `n` children of `tag` (optionally dirtying memory in each) and measures the KVM
/// floor in the same run. Returns the live pool and its run directory.
pub fn fork_measured(
    store: &Store,
    tag: &Tag,
    n: usize,
    timeout: u64,
    dirty_kib: Option<u64>,
) -> Result<(ForkSummary, forkd_sandbox::pool::Pool, PathBuf)> {
    let loaded = LoadedSnapshot::load(store, tag).with_context(|| format!("fork {tag}"))?;
    let floor = measure_floor(&loaded, n.max(20))?;
    let run_dir = store
        .root()
        .join("run")
        .join(format!("fork-{}", std::process::id()));
    let plan = ForkPlan {
        n,
        run_dir: run_dir.clone(),
        snapshot_counter: None,
        timeout: Duration::from_secs(timeout),
        dirty_kib,
    };
    let (pool, report) = fork_snapshot(&loaded, &plan, false).context("forking children")?;
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
    Ok((summary, pool, run_dir))
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
    row("restore per child", &r.restore);
    row("KVM floor (same run)", &s.kvm_floor);
    println!(
        "{:<28} {:>8.2}x {:>8.2}x   (p99 against the floor's p50)",
        "restore / floor", s.restore_p50_over_floor_p50, s.restore_p99_over_floor_p50
    );
    println!(
        "{:<28} {:>6.1} ms (target {:.1} ms = n x floor / {} cores x 1.5)",
        "wall-clock for all", r.wall_ms, s.wall_target_ms, s.cores
    );
    let uss: Vec<u64> = r
        .children
        .iter()
        .filter_map(|c| c.memory_after_fork.map(|m| m.uss_kib))
        .collect();
    let pss: Vec<u64> = r
        .children
        .iter()
        .filter_map(|c| c.memory_after_fork.map(|m| m.pss_kib))
        .collect();
    if !uss.is_empty() {
        println!(
            "{:<28} USS p50 {} KiB, PSS p50 {} KiB (per child process, right after fork)",
            "memory per child",
            median(&uss),
            median(&pss)
        );
    }
    let dirty_uss: Vec<u64> = r
        .children
        .iter()
        .filter_map(|c| c.memory_after_dirty.map(|m| m.uss_kib))
        .collect();
    if !dirty_uss.is_empty() {
        println!(
            "{:<28} USS p50 {} KiB after each child dirtied guest memory",
            "",
            median(&dirty_uss)
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

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn wait_for_interrupt() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
    while !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
}
