//! The jail of a child's VMM process, proved from inside real children of a real snapshot:
//! a probe runs in the child after its jail is in place (on a thread confined as a given
//! kind) and either reports what it sees or makes a call the jail must refuse.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_sandbox::fork::{ask_counter, fork_children_checked, identity, ChildCheck, ForkPlan};
use forkd_sandbox::jail::{privs, JailConfig, View};
use forkd_sandbox::pool::{
    ChildBody, ChildError, ChildIdentity, Pool, RunningChild, SnapshotRequest, StopReport,
};
use forkd_sandbox::run_dirs::RunDirs;
use forkd_sandbox::vm_child::{VmBody, VmChildError, VmRunning};
use forkd_store::{Store, Tag};
use forkd_vmm::snapshot::{snapshot_after_ready, BootSnapshot, LoadedSnapshot, PreparedShell};
use forkd_vmm::thread_jail::{self, ThreadKind};
use forkd_vmm::{KernelSource, VmConfig};

use forkd_test_support::{kvm_available, skip};

/// What a child does once jailed.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// Nothing: a sibling that must keep running.
    None,
    /// Reports its user and capabilities (on a thread started after the lock-down, so with
    /// the process's state then), then, confined as the control thread (whose filter allows
    /// opening files), its view of the filesystem.
    Report,
    Exec(ThreadKind),
    /// An execve a while after the child started: it is idle by then, nobody waits on it.
    LaterExec(ThreadKind),
    InetSocket(ThreadKind),
    Ptrace(ThreadKind),
}

struct ProbeBody<'a> {
    inner: VmBody<'a>,
    probes: Vec<Probe>,
    /// A path of the snapshot (must stay visible) and one outside the view.
    snapshot_dir: PathBuf,
}

struct ProbeRunning {
    inner: VmRunning,
    probe: Probe,
    snapshot_dir: PathBuf,
    report: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<String>>>>,
}

impl ChildBody for ProbeBody<'_> {
    type Shell = PreparedShell;
    type Running = ProbeRunning;
    type Error = VmChildError;

    fn prepare(&self) -> Result<PreparedShell, VmChildError> {
        self.inner.prepare()
    }

    fn start(
        &self,
        shell: PreparedShell,
        id: &ChildIdentity,
    ) -> Result<ProbeRunning, VmChildError> {
        Ok(ProbeRunning {
            inner: self.inner.start(shell, id)?,
            probe: self.probes[id.index],
            snapshot_dir: self.snapshot_dir.clone(),
            report: Default::default(),
        })
    }

    fn jail(&self) -> Option<&forkd_sandbox::jail::Jail> {
        self.inner.jail()
    }
}

impl RunningChild for ProbeRunning {
    type Error = VmChildError;

    fn resume(&self) -> Result<(), VmChildError> {
        self.inner.resume()?;
        let (probe, dir) = (self.probe, self.snapshot_dir.clone());
        let handle = std::thread::spawn(move || run_probe(probe, &dir));
        *self.report.lock().unwrap() = Some(handle);
        Ok(())
    }

    fn stopper(&self) -> Box<dyn Fn() -> bool + Send> {
        self.inner.stopper()
    }

    fn wait(self) -> Result<String, VmChildError> {
        let reason = self.inner.wait()?;
        let probe = self.report.lock().unwrap().take().map(|h| h.join());
        Ok(match probe {
            Some(Ok(report)) if !report.is_empty() => report,
            _ => reason,
        })
    }
}

/// Runs in the jailed child, on a thread confined as the probe's kind.
fn run_probe(probe: Probe, snapshot_dir: &std::path::Path) -> String {
    let kind = match probe {
        Probe::None => return String::new(),
        Probe::Report => ThreadKind::Control,
        Probe::Exec(k) | Probe::LaterExec(k) | Probe::InetSocket(k) | Probe::Ptrace(k) => k,
    };
    if let Probe::LaterExec(_) = probe {
        std::thread::sleep(Duration::from_millis(300));
    }
    let privileges = matches!(probe, Probe::Report).then(privileges);
    thread_jail::enter(kind);
    // SAFETY (all calls below): plain system calls with integer arguments or pointers to
    // live, NUL-terminated locals; a refused one ends the process in its SIGSYS handler.
    match probe {
        Probe::Exec(_) | Probe::LaterExec(_) => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            // SAFETY: see above.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), std::ptr::null()) };
            "execve returned".into()
        }
        Probe::InetSocket(_) => {
            // SAFETY: see above.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            format!("socket(AF_INET) returned {fd}")
        }
        Probe::Ptrace(_) => {
            // SAFETY: see above.
            let r = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            format!("ptrace returned {r}")
        }
        Probe::Report => format!("{} {}", privileges.unwrap_or_default(), view(snapshot_dir)),
        Probe::None => unreachable!(),
    }
}

fn privileges() -> String {
    let caps = privs::thread_caps().unwrap();
    // SAFETY: getuid/getgid take no arguments and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    format!(
        "uid={uid} gid={gid} eff={:x} prm={:x} inh={:x} bounding_empty={} nnp={}",
        caps.effective,
        caps.permitted,
        caps.inheritable,
        privs::bounding_set_is_empty(),
        privs::has_no_new_privs(),
    )
}

fn view(snapshot_dir: &std::path::Path) -> String {
    let shadow = match std::fs::File::open("/etc/shadow") {
        Ok(_) => "readable".to_string(),
        Err(e) if e.kind() == ErrorKind::NotFound => "missing".to_string(),
        Err(e) => format!("error {e}"),
    };
    let write_snapshot = match std::fs::File::create(snapshot_dir.join("intruder")) {
        Ok(_) => "writable".to_string(),
        Err(e) => format!("{:?}", e.raw_os_error()),
    };
    format!(
        "shadow={shadow} root_dir={} etc={} snapshot_visible={} snapshot_write={write_snapshot}",
        std::path::Path::new("/root").exists(),
        std::path::Path::new("/etc").exists(),
        snapshot_dir.join("memory.bin").exists(),
    )
}

struct Setup {
    home: tempfile::TempDir,
    store: Store,
    loaded: LoadedSnapshot,
}

fn demo_snapshot() -> Setup {
    let home = tempfile::tempdir().unwrap();
    // A data directory only its owner can traverse, like mkdtemp's or a home's: the jail's
    // user must still reach the run directories made inside it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let store = Store::open(home.path()).unwrap();
    let tag = Tag::parse("demo").unwrap();
    let mut vm = VmConfig::new(KernelSource::parse("builtin:demo").unwrap());
    vm.mem_mib = 64;
    let what = BootSnapshot {
        vm,
        rootfs: None,
        ready_timeout: Duration::from_secs(60),
    };
    snapshot_after_ready(&store, &tag, &what).unwrap();
    let loaded = LoadedSnapshot::load(&store, &tag).unwrap();
    Setup {
        home,
        store,
        loaded,
    }
}

/// Forks one child per probe, jailed, and stops them all; returns each child's error (from
/// its start, its check, or its stop) or its stop reason, by index, and whether the
/// unprobed ones answered after the others were killed.
fn fork_probes(setup: &Setup, probes: Vec<Probe>) -> (Vec<Result<String, String>>, bool) {
    let plan = ForkPlan {
        n: probes.len(),
        run_dir: setup.home.path().join("run").into(),
        snapshot_counter: None,
        timeout: Duration::from_secs(60),
        dirty_kib: None,
        jail: JailConfig::default(),
    };
    let view = View {
        writable: vec![plan.run_dir.files.clone(), plan.run_dir.runtime.clone()],
        ..View::default()
    };
    let body = ProbeBody {
        inner: VmBody {
            loaded: &setup.loaded,
            track_dirty_pages: false,
            store: None,
            net: None,
            jail: VmBody::jail_for(&JailConfig::default(), &setup.loaded, None, view),
        },
        probes: probes.clone(),
        snapshot_dir: setup.loaded.dir().to_path_buf(),
    };
    plan.run_dir.create().unwrap();
    let (mut pool, report) = fork_children_checked(&body, &plan, &ChildCheck::StartOnly).unwrap();
    // Give the killing probes time to run; siblings must answer afterwards.
    std::thread::sleep(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(30);
    let siblings_answer = probes.iter().enumerate().all(|(i, p)| {
        !matches!(p, Probe::None)
            || ask_counter(
                &identity(&plan.run_dir, i).vsock_uds,
                &format!("sibling-{i}"),
                deadline,
            )
            .is_ok()
    });
    let stopped: Vec<StopReport> = pool.stop_all(Duration::from_secs(10));
    let outcomes = (0..probes.len())
        .map(|i| {
            if let Some(e) = report
                .children
                .iter()
                .find(|c| c.index == i)
                .and_then(|c| c.error.clone())
            {
                return Err(e);
            }
            let s = stopped.iter().find(|s| s.index == i).expect("stop report");
            s.outcome.clone().map_err(|e| e.to_string())
        })
        .collect();
    plan.run_dir.remove();
    (outcomes, siblings_answer)
}

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_jailed_child_has_no_privileges_and_sees_only_its_files() {
    let name = "a_jailed_child_has_no_privileges_and_sees_only_its_files";
    if !kvm_available(name) {
        return;
    }
    if !is_root() {
        skip(name, "the jail's user switch and mount namespace need root");
        return;
    }
    let setup = demo_snapshot();
    let (outcomes, _) = fork_probes(&setup, vec![Probe::Report]);
    let report = outcomes[0].clone().expect("the probe child ran");
    let (uid, gid) = privs::resolve_user(forkd_sandbox::jail::FALLBACK_USER);
    assert!(
        report.starts_with(&format!("uid={uid} gid={gid} eff=0 prm=0 inh=0 ")),
        "{report}"
    );
    assert_ne!(uid, 0);
    for fact in [
        "bounding_empty=true",
        "nnp=true",
        "shadow=missing",
        "root_dir=false",
        "etc=false",
        "snapshot_visible=true",
    ] {
        assert!(report.contains(fact), "{fact} not in: {report}");
    }
    // EROFS (30): the snapshot is bound read-only.
    assert!(report.contains("snapshot_write=Some(30)"), "{report}");
    assert!(!setup.loaded.dir().join("intruder").exists());
    assert!(setup.store.verify(setup.loaded.tag()).unwrap().is_empty());
}

#[test]
fn forbidden_calls_kill_only_the_child_that_made_them_and_are_reported() {
    let name = "forbidden_calls_kill_only_the_child_that_made_them_and_are_reported";
    if !kvm_available(name) {
        return;
    }
    if !is_root() {
        skip(name, "the jail's mount namespace needs root");
        return;
    }
    let setup = demo_snapshot();
    let probes = vec![
        Probe::None,
        Probe::Exec(ThreadKind::Vcpu),
        Probe::InetSocket(ThreadKind::Devices),
        Probe::None,
        Probe::Ptrace(ThreadKind::Control),
        Probe::Exec(ThreadKind::Main),
    ];
    let (outcomes, siblings_answer) = fork_probes(&setup, probes);
    let expect = [
        (
            1,
            "killed by seccomp: syscall 59 (execve) from the vCPU thread",
        ),
        (
            2,
            "killed by seccomp: syscall 41 (socket) from the device event-loop thread",
        ),
        (
            4,
            "killed by seccomp: syscall 101 (ptrace) from the control thread",
        ),
        (
            5,
            "killed by seccomp: syscall 59 (execve) from the main thread",
        ),
    ];
    for (i, message) in expect {
        let error = outcomes[i]
            .clone()
            .expect_err("the child must have been killed");
        assert!(error.contains(message), "child {i}: {error}");
    }
    assert!(siblings_answer, "{outcomes:?}");
    for i in [0, 3] {
        assert_eq!(
            outcomes[i].as_deref(),
            Ok("stopped on request"),
            "{outcomes:?}"
        );
    }
}

/// The uids (real, effective, saved, filesystem) of process `pid`'s main thread.
fn uids(pid: i32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect()
}

#[test]
fn a_child_that_may_branch_runs_unprivileged_and_its_branch_is_adopted_into_the_store() {
    let name = "a_child_that_may_branch_runs_unprivileged_and_its_branch_is_adopted_into_the_store";
    if !kvm_available(name) {
        return;
    }
    if !is_root() {
        skip(name, "the jail's user switch needs root");
        return;
    }
    let setup = demo_snapshot();
    let run_dir = RunDirs::single(setup.home.path().join("sandboxes"));
    run_dir.create().unwrap();
    let view = View {
        writable: vec![run_dir.files.clone()],
        ..View::default()
    };
    let body = VmBody {
        loaded: &setup.loaded,
        track_dirty_pages: true,
        store: Some(&setup.store),
        net: None,
        jail: VmBody::jail_for(
            &JailConfig::default(),
            &setup.loaded,
            Some(&setup.store),
            view,
        ),
    };
    let t = Duration::from_secs(60);
    let (mut pool, failures) = Pool::spawn(&body, 1, t).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let (results, _) = pool.go_all(|i| identity(&run_dir, i), t);
    results[0].as_ref().unwrap();
    let pid = pool.children()[0].pid;
    let (uid, _) = privs::resolve_user(forkd_sandbox::jail::FALLBACK_USER);
    assert_ne!(uid, 0);
    assert_eq!(uids(pid), vec![uid; 4], "the sandbox process's uids");

    // BRANCH, full then diff, through the directory its parent adopts from.
    let inbox = body
        .inbox()
        .expect("a root-started child that may BRANCH has an inbox");
    for (tag, diff) in [("branched", false), ("branched-diff", true)] {
        let request = SnapshotRequest {
            tag: tag.into(),
            diff,
            stop_after: false,
            inbox: None,
        };
        let (done, stopped) = inbox
            .snapshot(&mut pool, 0, &request, &run_dir.files, t)
            .unwrap_or_else(|e| panic!("{tag}: {}", forkd_store::error_chain(&e)));
        assert!(stopped.is_none());
        assert_eq!(done.tag, tag);
        let tag = Tag::parse(tag).unwrap();
        let snapshot = setup.store.get(&tag).unwrap();
        assert!(setup.store.verify(&tag).unwrap().is_empty());
        for entry in std::fs::read_dir(&snapshot.dir).unwrap() {
            let meta = entry.unwrap().metadata().unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!((meta.uid(), meta.mode() & 0o022), (0, 0), "{tag}: {meta:?}");
        }
    }
    assert_eq!(
        setup
            .store
            .get(&Tag::parse("branched-diff").unwrap())
            .unwrap()
            .manifest
            .parent()
            .map(|t| t.to_string())
            .as_deref(),
        Some("branched")
    );
    // Nothing left of the inboxes, and the child runs on.
    let left: Vec<_> = std::fs::read_dir(&run_dir.files)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".branch."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    ask_counter(&identity(&run_dir, 0).vsock_uds, "after", deadline).unwrap();
    let stopped = pool.stop_all(Duration::from_secs(10));
    assert!(stopped[0].is_clean(), "{stopped:?}");
    // A restore of the adopted snapshot works.
    LoadedSnapshot::load(&setup.store, &Tag::parse("branched-diff").unwrap()).unwrap();
}

#[test]
fn an_idle_child_killed_by_seccomp_is_reported_with_the_call_and_thread() {
    let name = "an_idle_child_killed_by_seccomp_is_reported_with_the_call_and_thread";
    if !kvm_available(name) {
        return;
    }
    if !is_root() {
        skip(name, "the jail's mount namespace needs root");
        return;
    }
    let setup = demo_snapshot();
    let run_dir = RunDirs::single(setup.home.path().join("idle"));
    run_dir.create().unwrap();
    let view = View {
        writable: vec![run_dir.files.clone()],
        ..View::default()
    };
    let body = ProbeBody {
        inner: VmBody {
            loaded: &setup.loaded,
            track_dirty_pages: false,
            store: None,
            net: None,
            jail: VmBody::jail_for(&JailConfig::default(), &setup.loaded, None, view),
        },
        probes: vec![Probe::LaterExec(ThreadKind::Vcpu), Probe::None],
        snapshot_dir: setup.loaded.dir().to_path_buf(),
    };
    let t = Duration::from_secs(60);
    let (mut pool, _) = Pool::spawn(&body, 2, t).unwrap();
    let (results, _) = pool.go_all(|i| identity(&run_dir, i), t);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = pool.reap_dead();
        if !dead.is_empty() || Instant::now() > deadline {
            break dead;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (index, _, cause) = &dead[0];
    assert_eq!(*index, 0);
    let cause = cause.as_ref().expect("the seccomp report");
    assert!(matches!(cause, ChildError::Seccomp { .. }), "{cause:?}");
    assert_eq!(
        cause.to_string(),
        "killed by seccomp: syscall 59 (execve) from the vCPU thread"
    );
    // The sibling runs on.
    ask_counter(&identity(&run_dir, 1).vsock_uds, "sibling", deadline).unwrap();
    pool.stop_all(Duration::from_secs(10));
}

#[test]
fn a_jailed_forked_child_runs_in_a_cgroup_leaf_of_its_own_removed_when_it_ends() {
    let name = "a_jailed_forked_child_runs_in_a_cgroup_leaf_of_its_own_removed_when_it_ends";
    if !kvm_available(name) {
        return;
    }
    if let Err(why) = forkd_sandbox::cgroup::support() {
        skip(name, format!("no cgroup v2 leaves on this host: {why}"));
        return;
    }
    let setup = demo_snapshot();
    let plan = ForkPlan {
        n: 2,
        run_dir: setup.home.path().join("run").into(),
        snapshot_counter: None,
        timeout: Duration::from_secs(60),
        dirty_kib: None,
        jail: JailConfig::default(),
    };
    let view = View {
        writable: vec![plan.run_dir.files.clone(), plan.run_dir.runtime.clone()],
        ..View::default()
    };
    let body = VmBody {
        loaded: &setup.loaded,
        track_dirty_pages: false,
        store: None,
        net: None,
        jail: VmBody::jail_for(&JailConfig::default(), &setup.loaded, None, view),
    };
    let (mut pool, report) = fork_children_checked(&body, &plan, &ChildCheck::StartOnly).unwrap();
    assert_eq!(report.alive, 2, "{report:?}");
    let mut leaves = Vec::new();
    for child in pool.children() {
        let leaf = child.leaf.clone().expect("a leaf for each child");
        let procs = std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), child.pid.to_string(), "{}", leaf.display());
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", child.pid)).unwrap();
        let name = leaf.file_name().unwrap().to_string_lossy().into_owned();
        assert!(own.trim_end().ends_with(&format!("/{name}")), "{own}");
        leaves.push(leaf);
    }
    assert_ne!(leaves[0], leaves[1]);
    pool.stop_all(Duration::from_secs(10));
    for leaf in &leaves {
        assert!(!leaf.exists(), "{} is left", leaf.display());
    }
    plan.run_dir.remove();
}
