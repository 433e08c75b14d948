//! The jail of a child's VMM process, proved from inside real children of a real snapshot:
//! a probe runs in the child after its jail is in place (on a thread confined as a given
//! kind) and either reports what it sees or makes a call the jail must refuse.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_sandbox::fork::{ask_counter, fork_children_checked, identity, ChildCheck, ForkPlan};
use forkd_sandbox::jail::{privs, JailConfig, View};
use forkd_sandbox::pool::{ChildBody, ChildIdentity, RunningChild, StopReport};
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
        Probe::Exec(k) | Probe::InetSocket(k) | Probe::Ptrace(k) => k,
    };
    let privileges = matches!(probe, Probe::Report).then(privileges);
    thread_jail::enter(kind);
    // SAFETY (all calls below): plain system calls with integer arguments or pointers to
    // live, NUL-terminated locals; a refused one ends the process in its SIGSYS handler.
    match probe {
        Probe::Exec(_) => {
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
