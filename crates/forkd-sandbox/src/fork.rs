//! `forkd fork`: N children from one snapshot, each in its own process, checked alive and
//! measured.
//!
//! The calling process is the zygote: it has the snapshot loaded and its memory mapped
//! (copy-on-write) before it forks the pool, so every child inherits the mapping instead of
//! building its own. KVM_CREATE_VM and vCPU creation happen in the pool ahead of `go`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use forkd_store::error_chain;
use serde::Serialize;

use crate::exec::{self, CapturedExec, ExecSpec};
use crate::pool::{ChildBody, ChildIdentity, Pool, PoolError, StopReport};
use crate::proc_mem::{self, ProcMem};
use crate::run_dirs::RunDirs;
use crate::stats::Summary;

/// Port the demo guest (and the agent) serves on.
pub use forkd_guest_abi::GUEST_PORT;

/// What to fork and how to check it.
#[derive(Debug, Clone)]
pub struct ForkPlan {
    pub n: usize,
    /// Where the children's sockets, overlays and logs go.
    pub run_dir: RunDirs,
    /// The demo counter in the snapshot, if the snapshot is of the demo guest.
    pub snapshot_counter: Option<u64>,
    /// How long a child may take to prepare, start and answer.
    pub timeout: Duration,
    /// Ask each child to dirty this many KiB and measure memory again.
    pub dirty_kib: Option<u64>,
    /// The children's jail ([`fork_snapshot`] builds it; a caller's own body brings its own).
    pub jail: crate::jail::JailConfig,
}

/// How each started child is checked.
#[derive(Debug, Clone)]
pub enum ChildCheck {
    /// The demo guest: it must answer `COUNTER <nonce>` with a counter that continues from
    /// the snapshot's and its own nonce.
    DemoCounter,
    /// A guest running forkd-agent: send `restored` (always first), then run `exec` if given,
    /// else `ping`. Each stream of the command's output is kept up to `capture_limit` bytes.
    Agent {
        exec: Option<ExecSpec>,
        capture_limit: usize,
    },
    /// A guest running forkd-agent: send `restored`, then evaluate `code` in its warm
    /// interpreter. The result is kept like a command's: the value (or what the code printed)
    /// as stdout, the exception as stderr, exit code 1 when it raised or timed out.
    AgentEval { code: String, capture_limit: usize },
    /// Only confirm the child started: the caller talks to it next (and sends `restored`).
    StartOnly,
}

impl ChildCheck {
    /// The check that fits the snapshot's guest: the demo counter for the demo guest, the
    /// agent (restored + ping) for Linux guests; the other built-in test guests speak
    /// neither, so their children are only checked to have started.
    pub fn for_snapshot(manifest: &forkd_store::Manifest) -> ChildCheck {
        let kernel = manifest.kernel.as_str();
        if exec::snapshot_has_agent(manifest) {
            ChildCheck::Agent {
                exec: None,
                capture_limit: 0,
            }
        } else if kernel == "builtin:demo" || kernel.starts_with("builtin:demo@") {
            ChildCheck::DemoCounter
        } else {
            ChildCheck::StartOnly
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChildOutcome {
    pub index: usize,
    pub pid: i32,
    /// Restore time measured inside the child (identity, state, resume).
    pub restore_ms: Option<f64>,
    /// The demo counter the child answered with (continuing from the snapshot).
    pub counter: Option<u64>,
    /// The agent's fork counter after `restored`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fork_count: Option<u64>,
    /// Whether the agent reseeded the kernel's CRNG with this child's entropy at `restored`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crng_reseeded: Option<bool>,
    /// From telling the child to start until it first answered the host (the demo's
    /// COUNTER; an agent handling `restored`): the guest itself running, not only its VMM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered_ms: Option<f64>,
    /// From telling the child to start until its first command's result arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_exec_ms: Option<f64>,
    /// The command's result (`forkd fork --exec`). A command that ran and failed is not a
    /// child error: the child is alive, the command is what failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec: Option<CapturedExec>,
    pub memory_after_fork: Option<ProcMem>,
    pub memory_after_dirty: Option<ProcMem>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForkReport {
    pub requested: usize,
    pub alive: usize,
    /// Time to fork the pool processes and prepare every VM shell (off the fork path).
    pub pool_ms: f64,
    /// Each child's shell preparation (VM, memory, devices' registrations, KVM state, vCPU
    /// threads), measured inside it: the identity-free part of a restore, done by the pool.
    pub prepare: Summary,
    /// From the first `go` to the last child running.
    pub wall_ms: f64,
    pub children_per_sec: f64,
    pub restore: Summary,
    /// Start → the child's first answer, per child; its max is the wall-clock until every
    /// child's guest has answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered: Option<Summary>,
    /// Start → first command's result, per child (`--exec` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_exec: Option<Summary>,
    pub children: Vec<ChildOutcome>,
}

impl ForkReport {
    /// Children whose command ran but did not succeed (non-zero exit, signal, timeout).
    pub fn failed_commands(&self) -> impl Iterator<Item = &ChildOutcome> {
        self.children
            .iter()
            .filter(|c| c.exec.as_ref().is_some_and(|e| !e.succeeded()))
    }

    /// After the pool was stopped, a child that failed (its agent never answered, or its
    /// connection dropped mid-command) is described by how its VM ended when that explains it:
    /// a guest that stopped by itself cleanly is "guest powered off before `unfinished`" (e.g.
    /// "the command finished"), not a failure of ours; a VM that died (a triple fault with its
    /// registers, a VMM process killed by a signal) puts that cause first, then what the host saw.
    pub fn note_stops(&mut self, stopped: &[StopReport], unfinished: &str) {
        for s in stopped {
            let Some(c) = self.children.iter_mut().find(|c| c.index == s.index) else {
                continue;
            };
            let Some(seen) = c.error.take() else {
                continue;
            };
            c.error = Some(match (&s.outcome, s.guest_stop()) {
                (_, Some(reason)) => format!("{reason} before {unfinished}"),
                (Err(died), None) => format!("{died}; the host saw: {seen}"),
                (Ok(_), None) => seen,
            });
        }
    }
}

/// Forks the pool, starts every child, checks each answers, and measures memory. The pool is
/// returned so the caller can hold the children or stop them.
pub fn fork_children<B: ChildBody>(
    body: &B,
    plan: &ForkPlan,
) -> Result<(Pool, ForkReport), PoolError> {
    fork_children_checked(body, plan, &ChildCheck::DemoCounter)
}

/// [`fork_children`] with the given check of each started child.
pub fn fork_children_checked<B: ChildBody>(
    body: &B,
    plan: &ForkPlan,
    check: &ChildCheck,
) -> Result<(Pool, ForkReport), PoolError> {
    plan.run_dir.create().map_err(PoolError::Fork)?;
    let t = Instant::now();
    // A jailed child gets a cgroup leaf of its own where the host allows it.
    let leaves = body.jail().and_then(|_| {
        crate::cgroup::ChildLeaves::for_this_process()
            .map_err(|e| {
                tracing::debug!("children get no cgroup leaf: {}", error_chain(&e));
            })
            .ok()
    });
    let (mut pool, prepare_failures) = Pool::spawn_in_leaves(body, plan.n, plan.timeout, leaves)?;
    let pool_ms = ms(t.elapsed());
    let prepares: Vec<Duration> = pool.children().iter().filter_map(|c| c.prepare).collect();
    let mut outcomes: Vec<ChildOutcome> =
        prepare_failures.into_iter().map(failed_outcome).collect();
    let go = Instant::now();
    let (results, wall) = pool.go_all(|i| identity(&plan.run_dir, i), plan.timeout);
    let pids: Vec<(usize, i32)> = pool.children().iter().map(|c| (c.index, c.pid)).collect();
    for ((index, pid), result) in pids.into_iter().zip(results) {
        let mut outcome = ChildOutcome::new(index, pid);
        match result {
            Ok(report) => outcome.restore_ms = Some(ms(report.start)),
            Err(e) => outcome.error = Some(error_chain(&e)),
        }
        outcomes.push(outcome);
    }
    let resolvers = body.resolvers();
    check_children(&mut outcomes, plan, check, resolvers.as_deref(), go);
    outcomes.sort_by_key(|o| o.index);
    let restores = durations(outcomes.iter().filter_map(|o| o.restore_ms));
    let answered = durations(outcomes.iter().filter_map(|o| o.answered_ms));
    let first_exec = durations(outcomes.iter().filter_map(|o| o.first_exec_ms));
    let alive = outcomes.iter().filter(|o| o.error.is_none()).count();
    let report = ForkReport {
        requested: plan.n,
        alive,
        pool_ms,
        prepare: Summary::of(&prepares),
        wall_ms: ms(wall),
        children_per_sec: if wall.is_zero() {
            0.0
        } else {
            restores.len() as f64 / wall.as_secs_f64()
        },
        restore: Summary::of(&restores),
        answered: (!answered.is_empty()).then(|| Summary::of(&answered)),
        first_exec: (!first_exec.is_empty()).then(|| Summary::of(&first_exec)),
        children: outcomes,
    };
    Ok((pool, report))
}

fn durations(ms: impl Iterator<Item = f64>) -> Vec<Duration> {
    ms.map(|m| Duration::from_secs_f64(m / 1e3)).collect()
}

fn failed_outcome(e: PoolError) -> ChildOutcome {
    let index = match &e {
        PoolError::Child { index, .. } => *index,
        PoolError::Fork(_) | PoolError::Net(_) => usize::MAX,
    };
    ChildOutcome {
        error: Some(error_chain(&e)),
        ..ChildOutcome::new(index, 0)
    }
}

impl ChildOutcome {
    fn new(index: usize, pid: i32) -> ChildOutcome {
        ChildOutcome {
            index,
            pid,
            restore_ms: None,
            counter: None,
            fork_count: None,
            crng_reseeded: None,
            answered_ms: None,
            first_exec_ms: None,
            exec: None,
            memory_after_fork: None,
            memory_after_dirty: None,
            error: None,
        }
    }
}

/// Checks every started child, in parallel. `go` is when the children were told to start.
fn check_children(
    outcomes: &mut [ChildOutcome],
    plan: &ForkPlan,
    check: &ChildCheck,
    resolvers: Option<&[std::net::IpAddr]>,
    go: Instant,
) {
    std::thread::scope(|s| {
        for o in outcomes.iter_mut().filter(|o| o.error.is_none()) {
            match check {
                ChildCheck::DemoCounter => s.spawn(move || check_child(o, plan, go)),
                ChildCheck::Agent {
                    exec,
                    capture_limit,
                } => s.spawn(move || {
                    let work = match exec {
                        Some(spec) => AgentWork::Exec(spec, *capture_limit),
                        None => AgentWork::Ping,
                    };
                    check_agent_child(o, plan, work, resolvers, go)
                }),
                ChildCheck::AgentEval {
                    code,
                    capture_limit,
                } => s.spawn(move || {
                    let work = AgentWork::Eval(code, *capture_limit);
                    check_agent_child(o, plan, work, resolvers, go)
                }),
                ChildCheck::StartOnly => continue,
            };
        }
    });
}

/// Asks a demo child for its counter (with a per-child nonce), then measures memory,
/// optionally dirties memory and measures again.
fn check_child(o: &mut ChildOutcome, plan: &ForkPlan, go: Instant) {
    let uds = identity(&plan.run_dir, o.index).vsock_uds;
    let nonce = format!("child-{}-{:x}", o.index, nonce_seed(o.pid));
    let deadline = Instant::now() + plan.timeout;
    match ask_counter(&uds, &nonce, deadline) {
        Ok(counter) => {
            o.answered_ms = Some(ms(go.elapsed()));
            o.counter = Some(counter);
            if let Some(base) = plan.snapshot_counter {
                if counter < base {
                    o.error = Some(format!(
                        "counter {counter} went back before the snapshot's {base}"
                    ));
                    return;
                }
            }
        }
        Err(e) => {
            o.error = Some(format!("did not answer: {}", error_chain(&e)));
            return;
        }
    }
    o.memory_after_fork = proc_mem::read(o.pid as u32).ok();
    if let Some(kib) = plan.dirty_kib {
        match request(&uds, &format!("DIRTY {kib}"), deadline) {
            Ok(reply) if reply.starts_with("DIRTY ") => {
                o.memory_after_dirty = proc_mem::read(o.pid as u32).ok()
            }
            Ok(reply) => o.error = Some(format!("DIRTY request answered {reply:?}")),
            Err(e) => o.error = Some(format!("DIRTY request failed: {}", error_chain(&e))),
        }
    }
}

/// Sends a started agent child `restored` (before anything else reaches it), measures memory,
/// then runs the command (or pings). Timings count from `go`, when the child was told to start.
/// What an agent child is asked after `restored`.
enum AgentWork<'a> {
    Ping,
    Exec(&'a ExecSpec, usize),
    Eval(&'a str, usize),
}

fn check_agent_child(
    o: &mut ChildOutcome,
    plan: &ForkPlan,
    work: AgentWork<'_>,
    resolvers: Option<&[std::net::IpAddr]>,
    go: Instant,
) {
    let uds = identity(&plan.run_dir, o.index).vsock_uds;
    let deadline = Instant::now() + plan.timeout;
    let mut agent = match exec::connect_restored_agent_with(&uds, deadline, resolvers) {
        Ok(agent) => agent,
        Err(e) => {
            o.error = Some(error_chain(&e));
            return;
        }
    };
    o.answered_ms = Some(ms(go.elapsed()));
    o.fork_count = Some(agent.restored.fork_count);
    o.crng_reseeded = Some(agent.restored.crng_reseeded);
    o.memory_after_fork = proc_mem::read(o.pid as u32).ok();
    if let Some(kib) = plan.dirty_kib {
        // Guest pages written through tmpfs: the agent's own work (a shell, its pipes) dirties
        // some more, so this is an upper bound next to the demo guest's exact DIRTY.
        let dirty = ExecSpec::shell(
            format!("head -c {} /dev/zero > /dev/shm/forkd-dirty", kib * 1024),
            plan.timeout,
        );
        match exec::exec_captured(&mut agent, &dirty, 512) {
            Ok(c) if c.succeeded() => o.memory_after_dirty = proc_mem::read(o.pid as u32).ok(),
            Ok(c) => {
                o.error = Some(format!(
                    "dirtying {kib} KiB of guest memory: {}{}",
                    c.end(),
                    if c.stderr.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", c.stderr.trim())
                    }
                ));
                return;
            }
            Err(e) => {
                o.error = Some(format!(
                    "dirtying {kib} KiB of guest memory: {}",
                    error_chain(&e)
                ));
                return;
            }
        }
    }
    match work {
        AgentWork::Exec(spec, capture_limit) => {
            match exec::exec_captured(&mut agent, spec, capture_limit) {
                Ok(captured) => {
                    o.first_exec_ms = Some(ms(go.elapsed()));
                    o.exec = Some(captured);
                }
                Err(e) => o.error = Some(error_chain(&e)),
            }
        }
        AgentWork::Eval(code, capture_limit) => {
            let started = Instant::now();
            let timeout_ms = plan.timeout.as_millis() as u64;
            match agent.client.eval(code, Some(timeout_ms)) {
                Ok(result) => {
                    o.first_exec_ms = Some(ms(go.elapsed()));
                    o.exec = Some(eval_as_captured(result, started.elapsed(), capture_limit));
                }
                Err(e) => o.error = Some(format!("eval: {}", error_chain(&e))),
            }
        }
        AgentWork::Ping => match agent.client.ping() {
            Ok(ping) if ping.fork_count >= 1 => {}
            Ok(ping) => {
                o.error = Some(format!(
                    "the agent's fork counter is {} after `restored`",
                    ping.fork_count
                ))
            }
            Err(e) => o.error = Some(format!("ping after restored: {}", error_chain(&e))),
        },
    }
}

/// An eval's result in the shape of a command's, so `fork` reports both alike.
fn eval_as_captured(
    r: forkd_agent::protocol::EvalResult,
    took: Duration,
    limit: usize,
) -> CapturedExec {
    let mut out = r.stdout;
    if let Some(value) = r.value {
        out.push_str(&value);
    }
    let mut err = r.stderr;
    if let Some(e) = &r.error {
        err.push_str(&format!("{}: {}", e.type_name, e.message));
    }
    if r.timed_out {
        err.push_str("timed out");
    }
    let failed = r.error.is_some() || r.timed_out;
    let (stdout_bytes, stderr_bytes) = (out.len() as u64, err.len() as u64);
    CapturedExec {
        exit_code: Some(i32::from(failed)),
        signal: None,
        timed_out: r.timed_out,
        duration_ms: took.as_millis() as u64,
        stdout: truncate_utf8(out, limit),
        stderr: truncate_utf8(err, limit),
        stdout_bytes,
        stderr_bytes,
    }
}

fn truncate_utf8(mut s: String, limit: usize) -> String {
    if s.len() > limit {
        let mut end = limit;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Why a line request to a guest port got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum GuestRequestError {
    #[error("no attempt before the deadline")]
    NoAttempt,
    #[error("connecting to guest port {GUEST_PORT}")]
    Connect(#[source] forkd_agent::client::ClientError),
    #[error("talking to guest port {GUEST_PORT}")]
    Io(#[source] std::io::Error),
    #[error("the connection closed without an answer")]
    NoAnswer,
    #[error("unexpected answer {reply:?} to {request}")]
    Unexpected { request: String, reply: String },
}

/// `COUNTER <nonce>` → `COUNTER <value> <nonce>`; the nonce proves the answer is this child's.
pub fn ask_counter(uds: &Path, nonce: &str, deadline: Instant) -> Result<u64, GuestRequestError> {
    let line = format!("COUNTER {nonce}");
    let reply = request(uds, &line, deadline)?;
    let mut parts = reply.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|v| v.parse::<u64>().ok()),
        parts.next(),
    ) {
        (Some("COUNTER"), Some(value), Some(echo)) if echo == nonce => Ok(value),
        _ => Err(GuestRequestError::Unexpected {
            request: line,
            reply,
        }),
    }
}

/// One request line to the guest's port over hybrid vsock, retried until `deadline` while
/// the guest is not listening yet.
pub fn request(uds: &Path, line: &str, deadline: Instant) -> Result<String, GuestRequestError> {
    let mut last = GuestRequestError::NoAttempt;
    while Instant::now() < deadline {
        match try_request(uds, line, deadline) {
            Ok(reply) => return Ok(reply),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(last)
}

fn try_request(uds: &Path, line: &str, deadline: Instant) -> Result<String, GuestRequestError> {
    let mut stream = forkd_agent::client::connect_hybrid_vsock(uds, GUEST_PORT)
        .map_err(GuestRequestError::Connect)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10));
    stream
        .set_read_timeout(Some(left))
        .map_err(GuestRequestError::Io)?;
    writeln!(stream, "{line}").map_err(GuestRequestError::Io)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(GuestRequestError::Io)?;
    if reply.is_empty() {
        return Err(GuestRequestError::NoAnswer);
    }
    Ok(reply.trim_end().to_string())
}

/// The identity of child `index` in `run_dir`: its own socket, overlay and log.
pub fn identity(run_dir: &RunDirs, index: usize) -> ChildIdentity {
    run_dir.identity(index)
}

fn nonce_seed(salt: i32) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ ((salt as u64) << 32)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Forks `plan.n` children of a loaded snapshot (the calling process is the zygote), checked
/// as fits the snapshot's guest ([`ChildCheck::for_snapshot`]).
pub fn fork_snapshot(
    loaded: &forkd_vmm::snapshot::LoadedSnapshot,
    plan: &ForkPlan,
    track_dirty_pages: bool,
) -> Result<(Pool, ForkReport), PoolError> {
    let check = ChildCheck::for_snapshot(loaded.manifest());
    fork_snapshot_checked(loaded, plan, track_dirty_pages, &check)
}

/// [`fork_snapshot`] with the given check of each started child.
pub fn fork_snapshot_checked(
    loaded: &forkd_vmm::snapshot::LoadedSnapshot,
    plan: &ForkPlan,
    track_dirty_pages: bool,
    check: &ChildCheck,
) -> Result<(Pool, ForkReport), PoolError> {
    fork_snapshot_net(loaded, plan, track_dirty_pages, check, None)
}

/// [`fork_snapshot_checked`] with each child in the network `net` prepared for its index
/// (child `i` of the plan enters `net`'s namespace for `i`).
pub fn fork_snapshot_net(
    loaded: &forkd_vmm::snapshot::LoadedSnapshot,
    plan: &ForkPlan,
    track_dirty_pages: bool,
    check: &ChildCheck,
    net: Option<&crate::net::NetPool>,
) -> Result<(Pool, ForkReport), PoolError> {
    let threads = crate::process::thread_count();
    if threads > 1 {
        tracing::warn!("forking children from a process with {threads} threads");
    }
    let mut plan = plan.clone();
    plan.snapshot_counter = plan
        .snapshot_counter
        .or_else(|| forkd_vmm::guests::demo_counter(loaded.memory()));
    let view = crate::jail::View {
        writable: vec![plan.run_dir.files.clone(), plan.run_dir.runtime.clone()],
        ..Default::default()
    };
    let body = crate::vm_child::VmBody {
        loaded,
        track_dirty_pages,
        store: None,
        net,
        jail: crate::vm_child::VmBody::jail_for(&plan.jail, loaded, None, view),
    };
    fork_children_checked(&body, &plan, check)
}
