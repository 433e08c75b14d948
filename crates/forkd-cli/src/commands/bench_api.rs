//! `forkd bench api --tag T`: the daemon's costs against baselines measured in the same run —
//! one sandbox created through the API against the bare KVM floor, N in one request,
//! an exec round trip against a bare agent ping (Linux snapshots), the daemon's memory idle and
//! with N sandboxes. The daemon is a private `forkd serve` (its own socket and state).

use std::io::{BufRead, BufReader};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use forkd_sandbox::stats::Summary;
use forkd_sandbox::zygote::{ZygoteClient, ZygoteRequest};
use forkd_store::Tag;
use forkd_vmm::snapshot::LoadedSnapshot;
use serde::Serialize;
use serde_json::json;

use super::fork::measure_floor;
use super::{open_store, parse_tag};
use crate::daemon_client::{DaemonClient, Host};
use crate::output::print_json;

#[derive(Args)]
pub struct BenchApiArgs {
    #[arg(long, value_parser = parse_tag)]
    tag: Tag,
    /// Sequential single-sandbox creates.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Sandboxes created in one request.
    #[arg(short = 'n', long = "count", default_value_t = 100)]
    n: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct ApiBench {
    /// One sandbox per request, request to response, through the Unix socket.
    create_one: Summary,
    /// The restore inside each of those sandboxes' processes (part of `create_one`).
    restore_in_sandbox: Summary,
    kvm_floor: Summary,
    p50_over_floor_p50: f64,
    p99_over_floor_p50: f64,
    /// N sandboxes in one request, wall-clock.
    create_many_ms: f64,
    create_many: usize,
    /// Exec of `true` through the daemon against a ping straight to the agent (Linux only).
    #[serde(skip_serializing_if = "Option::is_none")]
    exec_round_trip: Option<Summary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_ping: Option<Summary>,
    daemon_rss_idle_kib: u64,
    daemon_rss_with_many_kib: u64,
}

/// A private daemon, stopped (and its zygote shut down) when dropped.
struct PrivateDaemon {
    child: Child,
    state: tempfile::TempDir,
    tag: Tag,
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let socket = self
            .state
            .path()
            .join("zygotes")
            .join(format!("{}.sock", self.tag));
        if let Ok(mut zygote) = ZygoteClient::connect(&socket, Duration::ZERO) {
            let _ = zygote.call(&ZygoteRequest::Shutdown);
        }
    }
}

pub fn run(args: BenchApiArgs) -> Result<ExitCode> {
    if args.runs == 0 || args.n == 0 {
        bail!("--runs and --count must be at least 1");
    }
    let store = open_store()?;
    let loaded = LoadedSnapshot::load(&store, &args.tag)
        .with_context(|| format!("bench api {}", args.tag))?;
    let has_agent = forkd_sandbox::exec::snapshot_has_agent(loaded.manifest());
    let floor = measure_floor(&loaded, args.runs.max(5))?;
    drop(loaded);
    let state = tempfile::tempdir().context("a state directory for the benchmark's daemon")?;
    let socket = state.path().join("forkd.sock");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--max-sandboxes"])
        .arg((args.n + 10).to_string())
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(state.path())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting forkd serve")?;
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("piped")).read_line(&mut line)?;
    let daemon = PrivateDaemon {
        child,
        state,
        tag: args.tag.clone(),
    };
    if !line.contains("listening on") {
        bail!("forkd serve did not start: {}", line.trim());
    }
    let client = DaemonClient::new(Host::Unix(socket))?;
    let tag = args.tag.to_string();
    // The ids made, and the restore time each sandbox measured in its own process.
    let create_timed = |count: usize| -> Result<Vec<(String, f64)>> {
        let made = client.json(
            "POST",
            "/v1/sandboxes",
            Some(json!({"tag": tag, "count": count})),
        )?;
        Ok(made["sandboxes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let id = s["id"].as_str().unwrap_or_default().to_string();
                (id, s["restore_ms"].as_f64().unwrap_or_default())
            })
            .collect())
    };
    let create = |count: usize| -> Result<Vec<String>> {
        Ok(create_timed(count)?.into_iter().map(|(id, _)| id).collect())
    };
    let kill = |ids: &[String]| -> Result<()> {
        for id in ids {
            client.json("DELETE", &format!("/v1/sandboxes/{id}"), None)?;
        }
        Ok(())
    };
    // The first create starts the snapshot's zygote: not what a spawn costs.
    kill(&create(1)?)?;
    let rss_idle = rss_kib(daemon.child.id());
    let mut samples = Vec::with_capacity(args.runs);
    let mut restores = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let started = Instant::now();
        let made = create_timed(1)?;
        samples.push(started.elapsed());
        restores.extend(made.iter().map(|(_, ms)| Duration::from_secs_f64(ms / 1e3)));
        let ids: Vec<String> = made.into_iter().map(|(id, _)| id).collect();
        kill(&ids)?;
    }
    let create_one = Summary::of(&samples);
    let restore_in_sandbox = Summary::of(&restores);
    let started = Instant::now();
    let many = create(args.n)?;
    let create_many_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss_many = rss_kib(daemon.child.id());
    let (exec_round_trip, agent_ping) = if has_agent {
        let (e, p) = exec_against_ping(&client, daemon.state.path(), &many[0], args.runs)?;
        (Some(e), Some(p))
    } else {
        (None, None)
    };
    kill(&many)?;
    let report = ApiBench {
        p50_over_floor_p50: create_one.p50_ms / floor.p50_ms,
        p99_over_floor_p50: create_one.p99_ms / floor.p50_ms,
        create_one,
        restore_in_sandbox,
        kvm_floor: floor,
        create_many_ms,
        create_many: many.len(),
        exec_round_trip,
        agent_ping,
        daemon_rss_idle_kib: rss_idle,
        daemon_rss_with_many_kib: rss_many,
    };
    drop(daemon);
    print(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// `runs` execs of `true` through the daemon, and as many pings straight to the sandbox's
/// agent over its vsock socket (found in the daemon's state directory).
fn exec_against_ping(
    client: &DaemonClient,
    state: &std::path::Path,
    id: &str,
    runs: usize,
) -> Result<(Summary, Summary)> {
    let mut execs = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let response = client.send(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["true"]})),
        )?;
        response.collect()?;
        execs.push(started.elapsed());
    }
    let dir = state.join("sandboxes").join(id);
    let uds = std::fs::read_dir(&dir)
        .with_context(|| format!("{}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "vsock"))
        .with_context(|| format!("no vsock socket in {}", dir.display()))?;
    let mut agent =
        forkd_sandbox::exec::connect_agent(&uds, Instant::now() + Duration::from_secs(30))?;
    let mut pings = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        agent.ping().context("agent ping")?;
        pings.push(started.elapsed());
    }
    Ok((Summary::of(&execs), Summary::of(&pings)))
}

/// The daemon's resident memory (the project's smaps_rollup reader).
fn rss_kib(pid: u32) -> u64 {
    forkd_sandbox::proc_mem::read(pid).map_or(0, |m| m.rss_kib)
}

fn print(r: &ApiBench, as_json: bool) -> Result<()> {
    if as_json {
        return print_json(r);
    }
    println!(
        "API create, one sandbox per request: p50 {:.2} ms, p99 {:.2} ms; KVM floor p50 {:.2} ms, p99 {:.2} ms",
        r.create_one.p50_ms, r.create_one.p99_ms, r.kvm_floor.p50_ms, r.kvm_floor.p99_ms
    );
    println!(
        "ratio to the floor's p50: p50 {:.2}x (goal <= 1.5x), p99 {:.2}x",
        r.p50_over_floor_p50, r.p99_over_floor_p50
    );
    println!(
        "of which the restore in the sandbox's process: p50 {:.2} ms, p99 {:.2} ms",
        r.restore_in_sandbox.p50_ms, r.restore_in_sandbox.p99_ms
    );
    println!(
        "{} sandboxes in one request: {:.1} ms wall",
        r.create_many, r.create_many_ms
    );
    if let (Some(e), Some(p)) = (&r.exec_round_trip, &r.agent_ping) {
        println!(
            "exec `true` through the API p50 {:.2} ms p99 {:.2} ms; bare agent ping p50 {:.2} ms p99 {:.2} ms",
            e.p50_ms, e.p99_ms, p.p50_ms, p.p99_ms
        );
    }
    println!(
        "daemon RSS: idle {} KiB, with {} sandboxes {} KiB",
        r.daemon_rss_idle_kib, r.create_many, r.daemon_rss_with_many_kib
    );
    Ok(())
}
