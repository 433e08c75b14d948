//! The process pool with a small child body: each child creates a real KVM VM shell ahead of
//! time, then serves its identity on its own Unix socket until told to stop (or until its
//! "guest" stops by itself: `poweroff` cleanly, `die` not).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_sandbox::pool::{
    ChildBody, ChildError, ChildIdentity, Pool, PoolError, RunningChild, SnapshotRequest,
    StopReport,
};
use forkd_store::error_chain;
use forkd_test_support::Failure;

const T: Duration = Duration::from_secs(20);

/// Prepares a KVM VM (when /dev/kvm exists) and, once started, answers "who" on its socket;
/// "poweroff" and "die" on the socket stop it by itself (cleanly, or not).
struct EchoBody {
    fail_prepare: bool,
    crash_start_at: Option<usize>,
}

/// Why the child stopped: the first reason wins, as in the VMM.
type StopSlot = Arc<Mutex<Option<Result<String, String>>>>;

/// Records `reason` unless the child already stopped; true if this is what stopped it.
fn stop_with(slot: &StopSlot, reason: Result<String, String>) -> bool {
    let mut s = slot.lock().unwrap();
    if s.is_some() {
        return false;
    }
    *s = Some(reason);
    true
}

struct Running {
    stop: StopSlot,
    index: usize,
    path: std::path::PathBuf,
    _vm: Option<kvm_ioctls::VmFd>,
}

impl ChildBody for EchoBody {
    type Shell = (Option<kvm_ioctls::VmFd>, usize);
    type Running = Running;
    type Error = Failure;

    fn prepare(&self) -> Result<Self::Shell, Failure> {
        if self.fail_prepare {
            return Err("no VM shell for you".into());
        }
        let vm = kvm_ioctls::Kvm::new()
            .ok()
            .map(|k| k.create_vm().map_err(|e| e.to_string()))
            .transpose()?;
        Ok((vm, 0))
    }

    fn start(&self, shell: Self::Shell, identity: &ChildIdentity) -> Result<Running, Failure> {
        if self.crash_start_at == Some(identity.index) {
            std::process::abort();
        }
        let listener = UnixListener::bind(&identity.vsock_uds).map_err(|e| e.to_string())?;
        let stop = StopSlot::default();
        let index = identity.index;
        let slot = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut w = conn.try_clone().unwrap();
                let mut line = String::new();
                if BufReader::new(conn).read_line(&mut line).is_ok() {
                    match line.trim() {
                        "poweroff" => stop_with(&slot, Ok("guest powered off".into())),
                        // A guest that takes a while to power off, as Linux does after its
                        // devices (and the agent's connection) are gone.
                        "slow-poweroff" => {
                            let slot = slot.clone();
                            std::thread::spawn(move || {
                                std::thread::sleep(Duration::from_millis(500));
                                stop_with(&slot, Ok("guest powered off".into()))
                            });
                            false
                        }
                        "die" => stop_with(&slot, Err("vCPU 0 triple fault".into())),
                        _ => false,
                    };
                    let _ = writeln!(w, "child {index} pid {}", std::process::id());
                }
            }
        });
        Ok(Running {
            stop,
            index,
            path: identity.vsock_uds.clone(),
            _vm: shell.0,
        })
    }
}

impl RunningChild for Running {
    type Error = Failure;

    fn stopper(&self) -> Box<dyn Fn() -> bool + Send> {
        let stop = self.stop.clone();
        let index = self.index;
        Box::new(move || stop_with(&stop, Ok(format!("child {index} stopped on request"))))
    }

    fn wait(self) -> Result<String, Failure> {
        loop {
            if let Some(reason) = self.stop.lock().unwrap().clone() {
                let _ = std::fs::remove_file(&self.path);
                return reason.map_err(Failure);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn identity(dir: &Path, index: usize) -> ChildIdentity {
    ChildIdentity {
        index,
        vsock_uds: dir.join(format!("child-{index}.sock")),
        disk_overlay: dir.join(format!("child-{index}.overlay")),
        serial_log: dir.join(format!("child-{index}.log")),
        net_policy: None,
    }
}

fn ask(dir: &Path, index: usize) -> std::io::Result<String> {
    let mut s = UnixStream::connect(dir.join(format!("child-{index}.sock")))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(s, "who")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

#[test]
fn children_start_in_their_own_processes_and_stop_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let body = EchoBody {
        fail_prepare: false,
        crash_start_at: None,
    };
    let (mut pool, failures) = Pool::spawn(&body, 4, T).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let (results, wall) = pool.go_all(|i| identity(dir.path(), i), T);
    assert_eq!(results.len(), 4);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert!(results.iter().all(|r| r.as_ref().unwrap().start <= wall));
    let mut pids = std::collections::HashSet::new();
    for i in 0..4 {
        let answer = ask(dir.path(), i).unwrap();
        assert!(answer.starts_with(&format!("child {i} pid ")), "{answer}");
        let pid: u32 = answer.trim().rsplit(' ').next().unwrap().parse().unwrap();
        assert_ne!(pid, std::process::id());
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 4, "every child is its own process");
    let stopped = pool.stop_all(T);
    assert_eq!(stopped.len(), 4);
    assert!(stopped.iter().all(|s| s.outcome.as_ref().unwrap()
        == &format!("child {} stopped on request", s.index)
        && !s.by_guest));
}

/// Tells child `index` `what` and waits until it has stopped (its socket is gone).
fn stop_by_itself(dir: &Path, index: usize, what: &str) {
    let path = dir.join(format!("child-{index}.sock"));
    let mut s = UnixStream::connect(&path).unwrap();
    writeln!(s, "{what}").unwrap();
    let deadline = Instant::now() + T;
    while path.exists() {
        assert!(Instant::now() < deadline, "child {index} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `n` started children of a well-behaved body, their sockets in `dir`.
fn started_pool(dir: &Path, n: usize) -> Pool {
    let body = EchoBody {
        fail_prepare: false,
        crash_start_at: None,
    };
    let (mut pool, _) = Pool::spawn(&body, n, T).unwrap();
    let (results, _) = pool.go_all(|i| identity(dir, i), T);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    pool
}

#[test]
fn a_child_that_stopped_by_itself_is_reported_as_the_guests_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = started_pool(dir.path(), 3);
    stop_by_itself(dir.path(), 1, "poweroff");
    stop_by_itself(dir.path(), 2, "die");
    let stopped = pool.stop_all(T);
    assert_eq!(
        stopped,
        vec![
            StopReport {
                index: 0,
                outcome: Ok("child 0 stopped on request".into()),
                by_guest: false,
            },
            StopReport {
                index: 1,
                outcome: Ok("guest powered off".into()),
                by_guest: true,
            },
            StopReport {
                index: 2,
                outcome: Err(ChildError::Stopped("vCPU 0 triple fault".into())),
                by_guest: true,
            },
        ]
    );
    let guest_stops: Vec<Option<&str>> = stopped.iter().map(StopReport::guest_stop).collect();
    assert_eq!(guest_stops, vec![None, Some("guest powered off"), None]);
    assert!(stopped[0].is_clean() && stopped[1].is_clean() && !stopped[2].is_clean());
}

/// Asks child `index` to power off in a while, without waiting for it.
fn power_off_slowly(dir: &Path, index: usize) {
    let mut s = UnixStream::connect(dir.join(format!("child-{index}.sock"))).unwrap();
    writeln!(s, "slow-poweroff").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
}

#[test]
fn a_grace_lets_a_guest_that_is_shutting_down_stop_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = started_pool(dir.path(), 2);
    power_off_slowly(dir.path(), 0);
    let stopped = pool.stop_all_after(Duration::from_secs(3), T);
    assert_eq!(stopped[0].guest_stop(), Some("guest powered off"));
    // The other child never stops by itself: once the grace is over it is asked to.
    assert_eq!(
        stopped[1].outcome,
        Ok("child 1 stopped on request".to_string())
    );
    assert!(!stopped[1].by_guest);

    // Without the grace, our stop overtakes the guest's.
    let mut pool = started_pool(dir.path(), 1);
    power_off_slowly(dir.path(), 0);
    let stopped = pool.stop_all(T);
    assert_eq!(stopped[0].guest_stop(), None, "{stopped:?}");
}

#[test]
fn a_crashing_child_is_reported_and_its_siblings_keep_running() {
    let dir = tempfile::tempdir().unwrap();
    let body = EchoBody {
        fail_prepare: false,
        crash_start_at: Some(1),
    };
    let (mut pool, _) = Pool::spawn(&body, 3, T).unwrap();
    let (results, _) = pool.go_all(|i| identity(dir.path(), i), T);
    let err = results[1].as_ref().unwrap_err();
    assert!(matches!(err, PoolError::Child { index: 1, .. }));
    assert!(error_chain(err).contains("SIGABRT"), "{err}");
    assert!(results[0].is_ok() && results[2].is_ok());
    assert!(ask(dir.path(), 0).is_ok() && ask(dir.path(), 2).is_ok());

    // Killing another child leaves the last one answering.
    let status = pool.kill(0).unwrap();
    assert!(status.to_string().contains("SIGKILL"));
    assert!(ask(dir.path(), 2).unwrap().starts_with("child 2"));
    let dead = pool.reap_dead();
    assert_eq!(dead.len(), 1, "the crashed child is reaped: {dead:?}");
    assert_eq!(pool.len(), 1);
}

#[test]
fn dropping_the_pool_kills_every_child() {
    let dir = tempfile::tempdir().unwrap();
    let body = EchoBody {
        fail_prepare: false,
        crash_start_at: None,
    };
    let (mut pool, _) = Pool::spawn(&body, 2, T).unwrap();
    let (results, _) = pool.go_all(|i| identity(dir.path(), i), T);
    assert!(results.iter().all(|r| r.is_ok()));
    let pids: Vec<i32> = pool.children().iter().map(|c| c.pid).collect();
    drop(pool);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived"
        );
    }
}

#[test]
fn failed_preparation_is_reported_per_child_and_leaves_no_process() {
    let body = EchoBody {
        fail_prepare: true,
        crash_start_at: None,
    };
    let (pool, failures) = Pool::spawn(&body, 2, T).unwrap();
    assert!(pool.is_empty());
    let text: Vec<String> = failures.iter().map(|e| error_chain(e)).collect();
    assert_eq!(
        text,
        vec![
            "child 0: no VM shell for you",
            "child 1: no VM shell for you"
        ]
    );
}

#[test]
fn a_long_lived_pool_grows_starts_some_shells_and_stops_one_child() {
    let dir = tempfile::tempdir().unwrap();
    let body = EchoBody {
        fail_prepare: false,
        crash_start_at: None,
    };
    let (mut pool, failures) = Pool::spawn(&body, 2, T).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(pool.grow(&body, 2, T).unwrap().is_empty());
    assert_eq!(
        pool.ready_shells(),
        [0, 1, 2, 3],
        "new shells take the next indices"
    );

    // Start two of the four; the others stay ready shells.
    let (results, _) = pool.go(&[3, 1], |i| identity(dir.path(), i), T);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(pool.ready_shells(), [0, 2]);
    assert!(ask(dir.path(), 3).unwrap().starts_with("child 3 "));
    assert!(ask(dir.path(), 0).is_err(), "a ready shell has not started");

    // A shell is started once; an unknown index is refused.
    let (again, _) = pool.go(&[3, 9], |i| identity(dir.path(), i), T);
    for r in &again {
        let err = r.as_ref().unwrap_err();
        assert!(error_chain(err).ends_with("not a ready shell"), "{err}");
    }

    // Stopping one child leaves its siblings running.
    let report = pool.stop(3, T).unwrap();
    assert_eq!(report.outcome.as_deref(), Ok("child 3 stopped on request"));
    assert!(pool.stop(3, T).is_none(), "it is gone from the pool");
    assert!(ask(dir.path(), 1).unwrap().starts_with("child 1 "));
    assert_eq!(pool.len(), 3);
    let rest = pool.stop_all(T);
    assert_eq!(rest.len(), 3);
}

#[test]
fn a_snapshot_request_reaches_a_running_child_which_says_why_it_cannot_and_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = started_pool(dir.path(), 2);
    let request = SnapshotRequest {
        tag: "b1".into(),
        diff: true,
        stop_after: true,
        inbox: None,
    };
    match pool.snapshot(1, &request, T) {
        Err(PoolError::Child {
            index: 1,
            source: ChildError::Snapshot(message),
        }) => assert_eq!(message, "this child cannot be snapshotted"),
        other => panic!("{other:?}"),
    }
    // A failed pause leaves the child running, its control channel in step.
    assert!(ask(dir.path(), 1).unwrap().starts_with("child 1 "));
    match pool.snapshot(7, &request, T) {
        Err(PoolError::Child {
            index: 7,
            source: ChildError::NotStarted,
        }) => {}
        other => panic!("{other:?}"),
    }
    let stopped = pool.stop_all(T);
    assert!(stopped.iter().all(StopReport::is_clean), "{stopped:?}");
}
