//! `forkd fork --exec`'s collection over a real process pool whose children each serve the
//! real forkd-agent behind a hybrid-vsock emulator (no VM: this PVM host cannot boot Linux).
//!
//! In a test binary of its own on purpose: pool children are forked (not exec'd) from the test
//! process, and a sibling test spawning commands at that moment would leave std's environment
//! lock held forever in the child, hanging its agent's first exec.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_agent::protocol::Stream;
use forkd_sandbox::exec::{connect_restored_agent, AgentError, CommandEnd, ExecSpec, AGENT_PORT};
use forkd_sandbox::fork::{fork_children_checked, identity, ChildCheck, ForkPlan};
use forkd_sandbox::pool::{ChildBody, ChildError, ChildIdentity, RunningChild, StopReport};
use forkd_sandbox::run::{run_one, RunError, RunOutcome};
use forkd_sandbox::run_dirs::RunDirs;
use forkd_test_support::vsock_agent::HybridVsockAgent;
use forkd_test_support::Failure;

const LONG: Duration = Duration::from_secs(30);

fn deadline(d: Duration) -> Instant {
    Instant::now() + d
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec::shell(script, LONG)
}

fn plan(dir: &tempfile::TempDir, n: usize, timeout: Duration) -> ForkPlan {
    ForkPlan {
        n,
        run_dir: dir.path().join("run").into(),
        snapshot_counter: None,
        timeout,
        dirty_kib: None,
        jail: Default::default(),
    }
}

/// Each pool child serves a real agent behind the emulator on its own socket, from a working
/// directory named after its index (`<run_dir>/home-<index>`), which commands inherit. A
/// command that creates `poweroff` (or `reboot`, or `die`) there stops the child's "guest"
/// by itself, as a Linux guest's `poweroff -f` stops its VM.
struct AgentBody;

struct AgentRunning {
    /// Why the child stopped; the first reason wins, as in the VMM.
    stop: Arc<Mutex<Option<Result<String, String>>>>,
    /// Where the guest's own stop files are looked for.
    home: Option<PathBuf>,
    _emulator: HybridVsockAgent,
}

impl AgentRunning {
    fn new(emulator: HybridVsockAgent, home: Option<PathBuf>) -> AgentRunning {
        AgentRunning {
            stop: Arc::default(),
            home,
            _emulator: emulator,
        }
    }

    /// The stop the guest asked for itself, if it did.
    fn guest_stop(home: &Path) -> Option<Result<String, String>> {
        [
            ("poweroff", Ok("guest powered off")),
            ("reboot", Ok("guest requested a reset")),
            ("die", Err("vCPU 0 triple fault")),
        ]
        .into_iter()
        .find(|(file, _)| home.join(file).exists())
        .map(|(_, reason)| reason.map(String::from).map_err(String::from))
    }
}

/// Records `reason` unless the child already stopped; true if this is what stopped it.
fn stop_with(slot: &Mutex<Option<Result<String, String>>>, reason: Result<String, String>) -> bool {
    let mut s = slot.lock().unwrap();
    if s.is_some() {
        return false;
    }
    *s = Some(reason);
    true
}

impl ChildBody for AgentBody {
    type Shell = ();
    type Running = AgentRunning;
    type Error = Failure;

    fn prepare(&self) -> Result<(), Failure> {
        Ok(())
    }

    fn start(&self, _: (), identity: &ChildIdentity) -> Result<AgentRunning, Failure> {
        // The child's own process (forked): its working directory is its own. (Not an
        // environment variable: setting one takes std's environment lock, which a forked
        // child may have inherited in a locked state.)
        let home = home_of(identity);
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        std::env::set_current_dir(&home).map_err(|e| e.to_string())?;
        let emulator =
            HybridVsockAgent::start(&identity.vsock_uds, AGENT_PORT).map_err(|e| e.to_string())?;
        Ok(AgentRunning::new(emulator, Some(home)))
    }
}

fn home_of(identity: &ChildIdentity) -> PathBuf {
    identity
        .vsock_uds
        .with_file_name(format!("home-{}", identity.index))
}

impl RunningChild for AgentRunning {
    type Error = Failure;

    fn stopper(&self) -> Box<dyn Fn() -> bool + Send> {
        let stop = self.stop.clone();
        Box::new(move || stop_with(&stop, Ok("stopped on request".into())))
    }

    fn wait(self) -> Result<String, Failure> {
        loop {
            if let Some(reason) = self.home.as_deref().and_then(AgentRunning::guest_stop) {
                stop_with(&self.stop, reason);
            }
            if let Some(reason) = self.stop.lock().unwrap().clone() {
                return reason.map_err(Failure);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn fork_exec_collects_every_childs_result_and_names_the_failures() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(&dir, 4, LONG);
    // $PPID is the agent, i.e. the child's own process; child 2's command fails.
    let check = ChildCheck::Agent {
        exec: Some(sh(
            "echo \"$(basename \"$PWD\") agent $PPID\"; [ \"$PWD\" = \"${PWD%home-2}\" ] || exit 5",
        )),
        capture_limit: 4096,
    };
    let (mut pool, report) = fork_children_checked(&AgentBody, &plan, &check).unwrap();
    assert_eq!(report.requested, 4);
    assert_eq!(report.alive, 4, "{report:#?}");
    for c in &report.children {
        assert!(c.error.is_none(), "{c:?}");
        assert_eq!(c.fork_count, Some(1), "restored went first, once");
        let exec = c.exec.as_ref().unwrap();
        assert_eq!(exec.stdout, format!("home-{} agent {}\n", c.index, c.pid));
        assert!(c.answered_ms.unwrap() <= c.first_exec_ms.unwrap());
    }
    let failed: Vec<(usize, Option<i32>)> = report
        .failed_commands()
        .map(|c| (c.index, c.exec.as_ref().unwrap().exit_code))
        .collect();
    assert_eq!(failed, vec![(2, Some(5))]);
    assert_eq!(report.answered.unwrap().count, 4);
    assert_eq!(report.first_exec.unwrap().count, 4);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["children"][2]["exec"]["exit_code"], 5);

    let stopped = pool.stop_all(LONG);
    assert!(
        stopped.iter().all(|s| s.is_clean() && !s.by_guest),
        "{stopped:?}"
    );
}

#[test]
fn fork_exec_names_how_a_childs_vm_ended_mid_command() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(&dir, 3, LONG);
    // Child 1's guest powers off while its command runs, child 2's dies (a triple fault); the
    // loop ends (SIGPIPE) once the child's agent is gone.
    let check = ChildCheck::Agent {
        exec: Some(sh(
            "case \"$(basename \"$PWD\")\" in home-1) touch poweroff;; home-2) touch die;; *) echo ok; exit;; esac; while echo tick; do sleep 0.1; done",
        )),
        capture_limit: 4096,
    };
    let (mut pool, mut report) = fork_children_checked(&AgentBody, &plan, &check).unwrap();
    assert_eq!(report.alive, 1, "{report:#?}");
    for i in [1, 2] {
        assert!(report.children[i].exec.is_none(), "{report:#?}");
        assert!(report.children[i].error.is_some(), "{report:#?}");
    }
    let stopped = pool.stop_all(LONG);
    assert_eq!(
        stopped[1],
        StopReport {
            index: 1,
            outcome: Ok("guest powered off".into()),
            by_guest: true,
        }
    );
    assert!(!stopped[0].by_guest, "{stopped:?}");
    assert_eq!(
        stopped[2].outcome,
        Err(ChildError::Stopped("vCPU 0 triple fault".into()))
    );
    let seen = report.children[2].error.clone().unwrap();
    report.note_stops(&stopped, "the command finished");
    assert_eq!(
        report.children[1].error.as_deref(),
        Some("guest powered off before the command finished")
    );
    // A dead VM's own reason comes first, then what the host saw of it.
    assert_eq!(
        report.children[2].error,
        Some(format!("vCPU 0 triple fault; the host saw: {seen}"))
    );
    assert!(report.children[0].error.is_none(), "{report:#?}");
    assert_eq!(report.children[0].exec.as_ref().unwrap().stdout, "ok\n");
}

#[test]
fn plain_fork_of_an_agent_guest_sends_restored_and_pings() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(&dir, 2, LONG);
    let check = ChildCheck::Agent {
        exec: None,
        capture_limit: 0,
    };
    let (mut pool, report) = fork_children_checked(&AgentBody, &plan, &check).unwrap();
    assert_eq!(report.alive, 2, "{report:#?}");
    assert!(report
        .children
        .iter()
        .all(|c| c.fork_count == Some(1) && c.exec.is_none()));
    assert!(report.first_exec.is_none());
    assert_eq!(report.failed_commands().count(), 0);
    // Each child's socket is its own.
    let a = identity(&plan.run_dir, 0).vsock_uds;
    let b = identity(&plan.run_dir, 1).vsock_uds;
    let ra = connect_restored_agent(&a, deadline(LONG)).unwrap();
    assert_eq!(ra.restored.fork_count, 2);
    let rb = connect_restored_agent(&b, deadline(LONG)).unwrap();
    assert_eq!(rb.restored.fork_count, 2);
    drop((ra, rb));
    pool.stop_all(LONG);
}

#[test]
fn a_child_without_an_agent_is_reported_for_that_child() {
    struct Mute;
    impl ChildBody for Mute {
        type Shell = ();
        type Running = AgentRunning;
        type Error = Failure;
        fn prepare(&self) -> Result<(), Failure> {
            Ok(())
        }
        fn start(&self, _: (), identity: &ChildIdentity) -> Result<AgentRunning, Failure> {
            // Child 1 serves the agent on the wrong port: nothing answers on 1024.
            let port = if identity.index == 1 { 7 } else { AGENT_PORT };
            let emulator =
                HybridVsockAgent::start(&identity.vsock_uds, port).map_err(|e| e.to_string())?;
            Ok(AgentRunning::new(emulator, None))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(&dir, 2, Duration::from_millis(500));
    let check = ChildCheck::Agent {
        exec: Some(sh("true")),
        capture_limit: 16,
    };
    let (mut pool, report) = fork_children_checked(&Mute, &plan, &check).unwrap();
    assert_eq!(report.alive, 1);
    let bad = &report.children[1];
    assert!(
        bad.error
            .as_deref()
            .unwrap()
            .contains("no forkd-agent reachable"),
        "{bad:?}"
    );
    assert!(report.children[0].exec.as_ref().unwrap().succeeded());
    pool.stop_all(LONG);
}

#[test]
fn dirtying_memory_in_agent_children_goes_through_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = plan(&dir, 2, LONG);
    plan.dirty_kib = Some(64);
    let check = ChildCheck::Agent {
        exec: None,
        capture_limit: 0,
    };
    let (mut pool, report) = fork_children_checked(&AgentBody, &plan, &check).unwrap();
    // The agent runs on this host here, so the guest's tmpfs file is the host's: remove it.
    let _ = std::fs::remove_file("/dev/shm/forkd-dirty");
    assert_eq!(report.alive, 2, "{report:#?}");
    for c in &report.children {
        assert!(c.memory_after_fork.is_some(), "{c:?}");
        assert!(c.memory_after_dirty.is_some(), "{c:?}");
    }
    pool.stop_all(LONG);
}

/// Output chunks as `run_one` hands them over, shared with the test.
type Collected = Arc<Mutex<Vec<(Stream, String)>>>;

fn collector() -> (
    Collected,
    impl FnMut(Stream, &[u8]) -> std::io::Result<()> + Send + 'static,
) {
    let seen: Collected = Arc::default();
    let sink = seen.clone();
    (seen, move |stream, data: &[u8]| {
        sink.lock()
            .unwrap()
            .push((stream, String::from_utf8_lossy(data).into_owned()));
        Ok(())
    })
}

fn text_of(seen: &Collected, which: Stream) -> String {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(s, _)| *s == which)
        .map(|(_, t)| t.as_str())
        .collect()
}

#[test]
fn run_one_streams_the_output_returns_the_exit_code_and_removes_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = RunDirs {
        files: dir.path().join("run-1"),
        runtime: dir.path().join("runtime-1"),
    };
    let (seen, sink) = collector();
    let started = AtomicBool::new(false);
    let outcome = run_one(
        &AgentBody,
        &run_dir,
        &sh("echo \"out from $(basename \"$PWD\")\"; echo err >&2; exit 4"),
        LONG,
        || started.store(true, Ordering::SeqCst),
        &|| false,
        sink,
    )
    .unwrap();
    let RunOutcome::Finished(result) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(CommandEnd::of(&result, None), CommandEnd::Exited(4));
    assert_eq!(text_of(&seen, Stream::Stdout), "out from home-0\n");
    assert_eq!(text_of(&seen, Stream::Stderr), "err\n");
    assert!(started.load(Ordering::SeqCst));
    assert!(
        !run_dir.files.exists() && !run_dir.runtime.exists(),
        "the run directory must be removed"
    );
}

#[test]
fn run_one_stops_the_child_when_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = RunDirs {
        files: dir.path().join("run-2"),
        runtime: dir.path().join("runtime-2"),
    };
    // "Ctrl-C" as soon as the command has shown it is running.
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let outcome = run_one(
        &AgentBody,
        &run_dir,
        // Ends by itself (SIGPIPE) once the stopped child's agent is gone: no stray process.
        &sh("echo running; while echo tick; do sleep 0.1; done"),
        LONG,
        || {},
        &|| interrupted.load(Ordering::SeqCst),
        move |_, data: &[u8]| {
            if String::from_utf8_lossy(data).contains("running") {
                flag.store(true, Ordering::SeqCst);
            }
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(outcome, RunOutcome::Interrupted);
    assert!(
        !run_dir.files.exists() && !run_dir.runtime.exists(),
        "the run directory must be removed"
    );
}

#[test]
fn run_one_reports_an_unreachable_agent_and_still_cleans_up() {
    struct NoAgent;
    impl ChildBody for NoAgent {
        type Shell = ();
        type Running = AgentRunning;
        type Error = Failure;
        fn prepare(&self) -> Result<(), Failure> {
            Ok(())
        }
        fn start(&self, _: (), identity: &ChildIdentity) -> Result<AgentRunning, Failure> {
            let emulator =
                HybridVsockAgent::start(&identity.vsock_uds, 7).map_err(|e| e.to_string())?;
            Ok(AgentRunning::new(emulator, None))
        }
    }
    struct FailsToStart;
    impl ChildBody for FailsToStart {
        type Shell = ();
        type Running = AgentRunning;
        type Error = Failure;
        fn prepare(&self) -> Result<(), Failure> {
            Ok(())
        }
        fn start(&self, _: (), _: &ChildIdentity) -> Result<AgentRunning, Failure> {
            Err("restore: memory.bin is shorter than guest RAM".into())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = RunDirs {
        files: dir.path().join("run-3"),
        runtime: dir.path().join("runtime-3"),
    };
    let (_, sink) = collector();
    let err = run_one(
        &NoAgent,
        &run_dir,
        &sh("true"),
        Duration::from_millis(300),
        || {},
        &|| false,
        sink,
    )
    .unwrap_err();
    assert!(
        matches!(err, RunError::Agent(AgentError::Unreachable { .. })),
        "{err}"
    );
    assert!(!run_dir.files.exists() && !run_dir.runtime.exists());

    let (_, sink) = collector();
    let err = run_one(
        &FailsToStart,
        &run_dir,
        &sh("true"),
        LONG,
        || {},
        &|| false,
        sink,
    )
    .unwrap_err();
    assert!(matches!(err, RunError::Start(_)), "{err}");
    assert!(err.to_string().contains("memory.bin is shorter"), "{err}");
    assert!(!run_dir.files.exists() && !run_dir.runtime.exists());
}

/// `run_one` of `script` in an [`AgentBody`] child, in a fresh run directory under `dir`.
fn run_in_agent_child(dir: &Path, name: &str, script: &str) -> Result<RunOutcome, RunError> {
    let run_dir = RunDirs {
        files: dir.join(format!("run-{name}")),
        runtime: dir.join(format!("runtime-{name}")),
    };
    let (_, sink) = collector();
    let outcome = run_one(
        &AgentBody,
        &run_dir,
        &sh(script),
        LONG,
        || {},
        &|| false,
        sink,
    );
    assert!(
        !run_dir.files.exists() && !run_dir.runtime.exists(),
        "the run directory must be removed"
    );
    outcome
}

#[test]
fn run_one_reports_a_guest_that_powered_off_or_rebooted_mid_command() {
    let dir = tempfile::tempdir().unwrap();
    // The agent's connection drops mid-command as the child's guest stops by itself; the loop
    // ends (SIGPIPE) once the child's agent is gone.
    for (file, reason) in [
        ("poweroff", "guest powered off"),
        ("reboot", "guest requested a reset"),
    ] {
        let outcome = run_in_agent_child(
            dir.path(),
            file,
            &format!("echo going down; touch {file}; while echo tick; do sleep 0.1; done"),
        )
        .unwrap();
        assert_eq!(
            outcome,
            RunOutcome::GuestStopped {
                reason: reason.into()
            }
        );
    }
}

#[test]
fn run_one_still_fails_when_the_guest_dies_mid_command() {
    let dir = tempfile::tempdir().unwrap();
    // A guest that stopped by itself uncleanly (a crash) is not a clean end of the run.
    let err = run_in_agent_child(
        dir.path(),
        "die",
        "touch die; while echo tick; do sleep 0.1; done",
    )
    .unwrap_err();
    assert!(matches!(err, RunError::Agent(_)), "{err}");
}
