//! `forkd bench fork` and `forkd bench branch`: fork and BRANCH costs against baselines
//! measured in the same run, reported as medians, p99 and ratios.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use forkd_sandbox::fork::{fork_snapshot, request, ForkPlan};
use forkd_sandbox::jail::JailConfig;
use forkd_sandbox::run_dirs::RunDirs;
use forkd_sandbox::stats::Summary;
use forkd_store::{RemoveMode, Store, Tag};
use forkd_vmm::snapshot::{
    restore, snapshot_after_ready, BootSnapshot, LoadedSnapshot, RestoreIdentity, SnapshotMode,
};
use forkd_vmm::{KernelSource, VmConfig};
use serde::Serialize;

use super::fork::{fork_measured, measure_floor, print_summary, ChildWork};
use super::{open_store, parse_tag};
use crate::output::print_json;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Restore cost of one child (sequential runs) and of N concurrent children, against the
    /// bare KVM floor; memory per child before and after it dirties 1 MiB.
    Fork(BenchForkArgs),
    /// BRANCH pause times (full and diff) of a running child, and spawn time of chains of
    /// depth 0-3, using the demo guest.
    Branch(BenchBranchArgs),
    /// The daemon: API create of one sandbox against the KVM floor, N in one request, exec
    /// round trip against a ping (Linux), daemon memory.
    Api(super::bench_api::BenchApiArgs),
    /// A network per child: fork of N children with networking against without (same run),
    /// and ICMP echo rate to a guest against a bare veth pair.
    Net(super::bench_net::BenchNetArgs),
}

#[derive(Args)]
struct BenchForkArgs {
    #[arg(long, value_parser = parse_tag)]
    tag: Tag,
    /// Concurrent children in the second phase.
    #[arg(short = 'n', long = "count", default_value_t = 100)]
    n: usize,
    /// Sequential single-child restores in the first phase.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchBranchArgs {
    /// Guest memory of the benchmark VM.
    #[arg(long, default_value_t = 512)]
    mem_mib: u32,
    /// Memory each run dirties before a BRANCH.
    #[arg(long, default_value_t = 16)]
    dirty_mib: u64,
    /// BRANCHes per mode, and spawns per chain depth.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    match args.what {
        BenchCommand::Fork(a) => bench_fork(a),
        BenchCommand::Branch(a) => bench_branch(a),
        BenchCommand::Api(a) => super::bench_api::run(a),
        BenchCommand::Net(a) => super::bench_net::run(a),
    }
}

#[derive(Serialize)]
struct SingleRestore {
    restore: Summary,
    kvm_floor: Summary,
    p50_over_floor_p50: f64,
    p99_over_floor_p50: f64,
    /// The pool's share of each child: its shell prepared ahead of `go`.
    prepare: Summary,
    /// Pool preparation plus restore, per child: the whole VM, against the floor's p50.
    whole_p50_over_floor_p50: f64,
}

/// What the jail costs: the same restores and concurrent forks with and without it, in
/// the same run.
#[derive(Serialize)]
struct JailCost {
    restore_jailed: Summary,
    restore_unjailed: Summary,
    /// Jailed restore p50 over unjailed restore p50 (target < 1.10).
    p50_ratio: f64,
    p99_ratio: f64,
    children: usize,
    wall_jailed_ms: f64,
    wall_unjailed_ms: f64,
    wall_ratio: f64,
}

fn bench_fork(args: BenchForkArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let jailed = JailConfig::default();
    let mut pair = single_restores_each(
        &store,
        &args.tag,
        args.runs,
        &[jailed.clone(), JailConfig::disabled()],
    )?;
    let unjailed_single = pair.remove(1);
    let single = pair.remove(0);
    let (summary, mut pool, run_dir, _) = fork_measured(
        &store,
        &args.tag,
        args.n,
        120,
        Some(1024),
        ChildWork::Answer,
        &jailed,
        &super::net::NetOptions::default(),
    )?;
    pool.stop_all(Duration::from_secs(10));
    run_dir.remove();
    // The 100-children wall-clock with and without the jail, in the order A B B A so that
    // neither gets the warmer host; each is the mean of its two rounds.
    let mut walls = [0.0f64; 2];
    for config in [0, 1, 1, 0] {
        let jail = if config == 0 {
            jailed.clone()
        } else {
            JailConfig::disabled()
        };
        let (round, mut pool, run_dir, _) = fork_measured(
            &store,
            &args.tag,
            args.n,
            120,
            None,
            ChildWork::Answer,
            &jail,
            &super::net::NetOptions::default(),
        )?;
        pool.stop_all(Duration::from_secs(10));
        run_dir.remove();
        walls[config] += round.report.wall_ms / 2.0;
    }
    let jail = JailCost {
        p50_ratio: ratio(single.restore.p50_ms, unjailed_single.restore.p50_ms),
        p99_ratio: ratio(single.restore.p99_ms, unjailed_single.restore.p99_ms),
        restore_jailed: single.restore,
        restore_unjailed: unjailed_single.restore,
        children: args.n,
        wall_jailed_ms: walls[0],
        wall_unjailed_ms: walls[1],
        wall_ratio: ratio(walls[0], walls[1]),
    };
    if args.json {
        print_json(&serde_json::json!({ "single": single, "concurrent": summary, "jail": jail }))?;
    } else {
        println!("== one child at a time ({} runs)", args.runs);
        println!(
            "restore p50 {:.2} ms, p99 {:.2} ms; KVM floor p50 {:.2} ms, p99 {:.2} ms",
            single.restore.p50_ms,
            single.restore.p99_ms,
            single.kvm_floor.p50_ms,
            single.kvm_floor.p99_ms
        );
        println!(
            "ratio to the floor's p50: p50 {:.2}x (target <= 1.5x), p99 {:.2}x (target <= 3x)",
            single.p50_over_floor_p50, single.p99_over_floor_p50
        );
        println!(
            "off the fork path, each pool shell prepared in p50 {:.2} ms, p99 {:.2} ms; prepared + restored p50 {:.2}x the floor",
            single.prepare.p50_ms, single.prepare.p99_ms, single.whole_p50_over_floor_p50
        );
        println!("== {} children at once", args.n);
        print_summary(&summary);
        print_jail_cost(&jail);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_jail_cost(j: &JailCost) {
    println!("== the jail's cost (same run)");
    println!(
        "restore jailed p50 {:.2} ms, p99 {:.2} ms; unjailed p50 {:.2} ms, p99 {:.2} ms; ratio p50 {:.3}x, p99 {:.3}x (target < 1.10x)",
        j.restore_jailed.p50_ms,
        j.restore_jailed.p99_ms,
        j.restore_unjailed.p50_ms,
        j.restore_unjailed.p99_ms,
        j.p50_ratio,
        j.p99_ratio
    );
    println!(
        "{} children at once: jailed {:.1} ms, unjailed {:.1} ms wall-clock; ratio {:.3}x",
        j.children, j.wall_jailed_ms, j.wall_unjailed_ms, j.wall_ratio
    );
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// `runs` sequential forks of one child each (pool preparation excluded, as on the fork path).
fn single_restores(
    store: &Store,
    tag: &Tag,
    runs: usize,
    jail: &JailConfig,
) -> Result<SingleRestore> {
    let mut all = single_restores_each(store, tag, runs, std::slice::from_ref(jail))?;
    Ok(all.remove(0))
}

/// [`single_restores`] for each of `jails`, their runs interleaved (one child of each in
/// turn) so that neither set of runs gets a warmer host than the other.
fn single_restores_each(
    store: &Store,
    tag: &Tag,
    runs: usize,
    jails: &[JailConfig],
) -> Result<Vec<SingleRestore>> {
    let loaded = LoadedSnapshot::load(store, tag).with_context(|| format!("bench fork {tag}"))?;
    let floor = measure_floor(&loaded, runs.max(5))?;
    let run_dir = forkd_sandbox::run_dirs::RunDirs::for_this_process(store, "bench");
    let mut samples = vec![Vec::with_capacity(runs); jails.len()];
    let mut prepares = samples.clone();
    let mut wholes = samples.clone();
    for i in 0..runs {
        for (j, jail) in jails.iter().enumerate() {
            let plan = ForkPlan {
                n: 1,
                run_dir: RunDirs {
                    files: run_dir.files.join(format!("{i}-{j}")),
                    runtime: run_dir.runtime.join(format!("{i}-{j}")),
                },
                snapshot_counter: None,
                timeout: Duration::from_secs(60),
                dirty_kib: None,
                jail: jail.clone(),
            };
            let (mut pool, report) = fork_snapshot(&loaded, &plan, false)?;
            pool.stop_all(Duration::from_secs(10));
            let child = &report.children[0];
            if let Some(e) = &child.error {
                anyhow::bail!("child failed during the benchmark: {e}");
            }
            let restore = Duration::from_secs_f64(child.restore_ms.unwrap_or(0.0) / 1e3);
            let prepare = Duration::from_secs_f64(report.prepare.p50_ms / 1e3);
            samples[j].push(restore);
            prepares[j].push(prepare);
            wholes[j].push(prepare + restore);
        }
    }
    run_dir.remove();
    Ok((0..jails.len())
        .map(|j| {
            let restore = Summary::of(&samples[j]);
            SingleRestore {
                prepare: Summary::of(&prepares[j]),
                whole_p50_over_floor_p50: Summary::of(&wholes[j]).p50_ms / floor.p50_ms,
                p50_over_floor_p50: restore.p50_ms / floor.p50_ms,
                p99_over_floor_p50: restore.p99_ms / floor.p50_ms,
                restore,
                kvm_floor: floor,
            }
        })
        .collect())
}

#[derive(Serialize)]
struct BranchBench {
    mem_mib: u32,
    dirty_mib: u64,
    pause_full: Summary,
    pause_diff: Summary,
    /// Child restore time by chain depth (0 = a flat snapshot), pool shell prepared ahead.
    spawn_by_depth: Vec<Summary>,
    depth3_over_flat_p50: f64,
    /// A spawn from nothing by chain depth: load the snapshot (chain checks, memory layers
    /// mapped), prepare a shell, restore, in one process.
    cold_spawn_by_depth: Vec<Summary>,
    cold_depth3_over_flat_p50: f64,
}

fn bench_branch(args: BenchBranchArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let prefix = format!("bench-branch-{}", std::process::id());
    let base = Tag::parse(&prefix).expect("valid tag");
    let result = branch_measurements(&store, &base, &args);
    // Everything the benchmark made is named after `base`: the diff links hang off it, the
    // full branches stand alone.
    let made: Vec<Tag> = store
        .list()?
        .into_iter()
        .filter_map(|snap| snap.ok().map(|s| s.tag().clone()))
        .filter(|t| t == &base || t.as_str().starts_with(&format!("{prefix}-")))
        .collect();
    store.remove(&made, RemoveMode::Cascade)?;
    let bench = result?;
    if args.json {
        print_json(&bench)?;
    } else {
        println!(
            "BRANCH of a running {} MiB demo guest after it dirtied {} MiB ({} runs each):",
            bench.mem_mib, bench.dirty_mib, args.runs
        );
        for (name, s) in [("full", &bench.pause_full), ("diff", &bench.pause_diff)] {
            println!(
                "  {name} pause: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                s.p50_ms, s.p99_ms, s.max_ms
            );
        }
        println!(
            "  diff / full pause (p50): {:.2}x (diff target <= 20 ms)",
            bench.pause_diff.p50_ms / bench.pause_full.p50_ms
        );
        println!("child restore by chain depth:");
        for (depth, s) in bench.spawn_by_depth.iter().enumerate() {
            println!(
                "  depth {depth}: p50 {:.2} ms, p99 {:.2} ms",
                s.p50_ms, s.p99_ms
            );
        }
        println!(
            "  depth 3 / flat (p50): {:.2}x (target <= 1.2x)",
            bench.depth3_over_flat_p50
        );
        println!("spawn from nothing (load + prepare + restore) by chain depth:");
        for (depth, s) in bench.cold_spawn_by_depth.iter().enumerate() {
            println!(
                "  depth {depth}: p50 {:.2} ms, p99 {:.2} ms",
                s.p50_ms, s.p99_ms
            );
        }
        println!(
            "  depth 3 / flat (p50): {:.2}x (target <= 1.2x)",
            bench.cold_depth3_over_flat_p50
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn branch_measurements(store: &Store, base: &Tag, args: &BenchBranchArgs) -> Result<BranchBench> {
    let mut vm = VmConfig::new(KernelSource::parse("builtin:demo")?);
    vm.mem_mib = args.mem_mib;
    let what = BootSnapshot {
        vm,
        rootfs: None,
        ready_timeout: Duration::from_secs(60),
    };
    snapshot_after_ready(store, base, &what).context("building the benchmark's base snapshot")?;
    let work = tempfile::tempdir()?;
    let dirty = format!("DIRTY {}", args.dirty_mib * 1024);
    let tag = |name: String| Tag::parse(&format!("{base}-{name}")).expect("valid tag");

    let pauses = |mode: SnapshotMode, name: &str| -> Result<Summary> {
        let identity = RestoreIdentity::in_dir(&work.path().join(name));
        std::fs::create_dir_all(work.path().join(name))?;
        let mut machine = restore(store, base, &identity)?;
        let mut samples = Vec::new();
        for i in 0..args.runs {
            dirty_guest(&identity, &dirty)?;
            let report = machine.branch(store, &tag(format!("{name}{i}")), mode)?;
            samples.push(report.paused);
        }
        machine.stop();
        Ok(Summary::of(&samples))
    };
    let pause_full = pauses(SnapshotMode::Full, "full")?;
    let pause_diff = pauses(SnapshotMode::Diff, "diff")?;

    // A chain base <- c1 <- c2 <- c3, each link made by a child of the previous one.
    let mut chain = vec![base.clone()];
    for depth in 1..=3 {
        let dir = work.path().join(format!("chain{depth}"));
        std::fs::create_dir_all(&dir)?;
        let identity = RestoreIdentity::in_dir(&dir);
        let mut machine = restore(store, chain.last().unwrap(), &identity)?;
        dirty_guest(&identity, &dirty)?;
        let link = tag(format!("chain{depth}"));
        machine.branch(store, &link, SnapshotMode::Diff)?;
        machine.stop();
        chain.push(link);
    }
    let mut spawn_by_depth = Vec::new();
    let mut cold_spawn_by_depth = Vec::new();
    for t in &chain {
        spawn_by_depth.push(single_restores(store, t, args.runs, &JailConfig::default())?.restore);
        cold_spawn_by_depth.push(cold_spawns(store, t, args.runs)?);
    }
    Ok(BranchBench {
        mem_mib: args.mem_mib,
        dirty_mib: args.dirty_mib,
        depth3_over_flat_p50: spawn_by_depth[3].p50_ms / spawn_by_depth[0].p50_ms,
        cold_depth3_over_flat_p50: cold_spawn_by_depth[3].p50_ms / cold_spawn_by_depth[0].p50_ms,
        cold_spawn_by_depth,
        pause_full,
        pause_diff,
        spawn_by_depth,
    })
}

/// `runs` in-process spawns of `tag` from nothing: load, prepare, restore (until it runs).
fn cold_spawns(store: &Store, tag: &Tag, runs: usize) -> Result<Summary> {
    let work = tempfile::tempdir().context("scratch directory")?;
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        let dir = work.path().join(i.to_string());
        std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        let t = Instant::now();
        let machine = restore(store, tag, &RestoreIdentity::in_dir(&dir))
            .with_context(|| format!("spawning {tag}"))?;
        samples.push(t.elapsed());
        machine.stop();
    }
    Ok(Summary::of(&samples))
}

fn dirty_guest(identity: &RestoreIdentity, line: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let reply =
        request(&identity.vsock_uds, line, deadline).map_err(|e| anyhow::anyhow!("{line}: {e}"))?;
    anyhow::ensure!(
        reply.starts_with("DIRTY "),
        "{line}: guest answered {reply:?}"
    );
    Ok(())
}
