//! Confinement of each child's VMM process, in layers (each its own module):
//!
//! - [`mount`]: a private mount namespace holding only what the child uses;
//! - [`privs`]: no_new_privs, no capabilities, an unprivileged user when started as root;
//! - [`seccomp`]: one system-call allow-list per kind of thread;
//! - [`report`]: a refused call ends the process with a report the parent shows;
//! - cgroup v2 leaves are [`crate::cgroup`]'s (the daemon's limits land there).
//!
//! Order in a pool child, and why:
//! 1. right after the fork, single-threaded ([`Jail::enter_process`]): the mount namespace
//!    (it is per thread until shared), no_new_privs, empty bounding and ambient sets, no
//!    inheritable capabilities, no core dumps, the SIGSYS reporter, the filters compiled,
//!    and the process-wide base filter loaded (every thread made later inherits it): what
//!    any thread of the child may call at all, shell, restore and lock-down included;
//! 2. the shell is prepared. The threads it starts confine themselves at once, off the fork
//!    path ([`forkd_vmm::thread_jail::confine_early`]): each its own switch to the
//!    unprivileged user (credentials are per thread; switching every thread at once through
//!    the C library would signal and wait for each), its capabilities cleared, its kind's
//!    filter loaded. These are the vCPU threads (parked before their first KVM_RUN until
//!    the resume), the control thread (waiting for work until the child has started) and
//!    the device event loop's thread, reserved for the restore
//!    ([`forkd_vmm::thread_jail::reserve`]; a child with a network starts it in its
//!    namespace on the fork path instead);
//! 3. on `Go`, the main thread restores as the user forkd runs as: /dev/kvm, the tap, the
//!    overlay, the serial log and the vsock socket are opened;
//! 4. [`ChildJail::lock_down`], on the main thread: its switch to the unprivileged user
//!    (which clears its capabilities), or, for a child that keeps its user, its capabilities
//!    cleared. That opens the gate that every thread waits at before its first guest-driven
//!    work ([`forkd_vmm::thread_jail::enter`]); the guest runs from the resume on;
//! 5. after reporting `Started`, the main thread loads its own filter.
//!
//! A child that may BRANCH becomes the unprivileged user too: the store is read-only in its
//! view, and it writes each new snapshot into a directory its parent made for it and then
//! adopts into the store ([`crate::inbox`]).
//!
//! Cost (`forkd bench fork`, release build, this 2-core PVM host with one core busy, medians
//! of 3 runs): one restore p50 0.170 ms jailed vs 0.165 ms unjailed (1.03x), p99 0.259 vs
//! 0.237 ms (1.09x); 100 children started at once 35.9 vs 26.9 ms wall-clock (each run's
//! ratio 1.14x, 1.22x, 1.34x). Before the filters moved into the pool: 72.0 vs 36.6 ms
//! (1.27x, 1.96x, 2.36x). Loading a
//! program costs about 0.5 us per BPF instruction with no filter underneath (the kernel runs a
//! new filter over every system-call number to build its allow cache), half that over the
//! base: vCPU 147 -> 64 us, devices 173 -> 74 us, control 174 -> 77 us, main 116 -> 53 us.
//! What is left on the fork path is the main thread's 53 us (5.3 ms of CPU per 100
//! children), its credential switch and the stacked filters' checks: the main thread
//! restores with root's privileges, so its own list (which has no socket, bind, setns or
//! KVM ioctls) can only be loaded after the restore. A shorter program (a binary search on
//! the call number instead of seccompiler's linear chain) would cut the kernel's cache
//! preparation; handing the main thread's remaining work (wait, tear down, report) to a
//! thread confined in the pool and ending the main thread would remove it, at the cost of a
//! zombie thread-group leader (whose /proc entries stop describing the process).

pub mod mount;
pub mod privs;
pub mod report;
pub mod seccomp;
pub mod syscall_names;

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use forkd_vmm::thread_jail::{self, Point, ThreadKind};

pub use mount::View;

/// The user a root-started child becomes when no `forkd` user exists (nobody/nogroup).
pub const FALLBACK_USER: (u32, u32) = (65534, 65534);

/// What the caller asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// Off: children run with forkd's own privileges, every system call, the host's files
    /// (`--no-jail`, for debugging).
    pub enabled: bool,
    /// The user and group a child started as root becomes when there is no `forkd` user.
    pub fallback_user: (u32, u32),
}

impl Default for JailConfig {
    fn default() -> JailConfig {
        JailConfig {
            enabled: true,
            fallback_user: FALLBACK_USER,
        }
    }
}

impl JailConfig {
    pub fn disabled() -> JailConfig {
        JailConfig {
            enabled: false,
            ..JailConfig::default()
        }
    }

    /// What `--no-jail` turns off, for its help and the warning a run prints.
    pub const OFF_NOTE: &'static str = "children run without their jail: no seccomp filters, \
        their parent's privileges and user, and the host's whole filesystem";
}

/// A jail for the children of one pool, made in the parent.
#[derive(Debug, Clone)]
pub struct Jail {
    view: View,
    /// Whether children get their own mount namespace: it needs CAP_SYS_ADMIN, so only a
    /// forkd started as root gives them one (`forkd doctor` says so); an unprivileged forkd's
    /// children still get every other layer.
    private_mounts: bool,
    /// The user to become after the restore (None: keep the current one).
    user: Option<(u32, u32)>,
}

/// Why a child's jail could not be put in place (the child then does not start).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Mount(#[from] mount::MountError),
    #[error(transparent)]
    Filter(#[from] seccomp::FilterError),
    #[error("jail: {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Io { what, source }
}

impl Jail {
    /// The jail for children that see `view`. A child started as root becomes the `forkd`
    /// user, or `config.fallback_user` (one that may BRANCH then writes its snapshots through
    /// an [`crate::inbox::Inbox`]). None when the config turns the jail off.
    pub fn new(config: &JailConfig, mut view: View) -> Option<Jail> {
        if !config.enabled {
            return None;
        }
        for dev in ["/dev/kvm", "/dev/net/tun"] {
            if !view.devices.iter().any(|d| d == std::path::Path::new(dev)) {
                view.devices.push(PathBuf::from(dev));
            }
        }
        // SAFETY: geteuid takes no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let user = root.then(|| privs::resolve_user(config.fallback_user));
        Some(Jail {
            view,
            private_mounts: root,
            user,
        })
    }

    /// The user the children become (None: they keep forkd's).
    pub fn user(&self) -> Option<(u32, u32)> {
        self.user
    }

    /// Whether the children get a private mount namespace (forkd runs as root).
    pub fn has_private_mounts(&self) -> bool {
        self.private_mounts
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    /// Step 1, in the forked child while it is single-threaded. `report_fd` is where a
    /// refused call is reported (the control socket). Returns the child's side of the jail.
    pub fn enter_process(&self, report_fd: i32) -> Result<Arc<ChildJail>, JailError> {
        // SAFETY: getpid takes no arguments and cannot fail.
        let pid = unsafe { libc::getpid() };
        let programs = seccomp::Programs::compile(pid)?;
        if let Some((uid, gid)) = self.user {
            // The directories it writes in after the switch (overlay maps, sockets, logs)
            // become its own; forkd (root) still removes them.
            for dir in &self.view.writable {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .map_err(io("giving the run's directories to the jail's user"))?;
            }
        }
        // What the host's facts need from /proc and /sys, read while they are in view.
        forkd_vmm::host::cache_host_files();
        if self.private_mounts {
            mount::enter(&self.view)?;
        }
        privs::no_core_dumps().map_err(io("RLIMIT_CORE"))?;
        privs::no_new_privs().map_err(io("no_new_privs"))?;
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            privs::drop_bounding_and_ambient().map_err(io("dropping the bounding set"))?;
        }
        let mut caps = privs::thread_caps().map_err(io("capget"))?;
        caps.inheritable = 0;
        privs::set_thread_caps(caps).map_err(io("capset"))?;
        report::install(report_fd).map_err(io("installing the SIGSYS handler"))?;
        // Still single-threaded: every thread inherits the base list.
        programs
            .enter()
            .map_err(|e| io("loading the base seccomp filter")(std::io::Error::other(e)))?;
        let child = Arc::new(ChildJail {
            programs,
            user: self.user,
            gate: (Mutex::new(false), Condvar::new()),
        });
        let hooked = child.clone();
        thread_jail::set_hook(move |kind, point| hooked.confine_thread(kind, point));
        Ok(child)
    }
}

/// The jail inside one child process.
pub struct ChildJail {
    programs: seccomp::Programs,
    user: Option<(u32, u32)>,
    /// Opened by [`ChildJail::lock_down`]; threads wait for it before confining themselves.
    gate: (Mutex<bool>, Condvar),
}

impl ChildJail {
    /// Step 3, on the main thread after the restore, before the vCPUs run.
    pub fn lock_down(&self) -> Result<(), JailError> {
        if let Some((uid, gid)) = self.user {
            privs::switch_thread_user(uid, gid).map_err(io("switching to the jail's user"))?;
        }
        privs::clear_thread_caps().map_err(io("dropping capabilities"))?;
        let (lock, cv) = &self.gate;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        Ok(())
    }

    /// Step 4 for the calling thread: confines it as `kind` (once: a thread confined
    /// already is left as it is) and, at [`Point::Work`], waits for the lock-down first. A
    /// thread that cannot be confined must not go on: the process ends, saying why.
    pub fn confine_thread(&self, kind: ThreadKind, point: Point) {
        self.confine(kind);
        if point == Point::Work {
            let (lock, cv) = &self.gate;
            let mut open = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !*open {
                open = cv.wait(open).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    fn confine(&self, kind: ThreadKind) {
        match report::thread_kind() {
            Some(k) if k == kind => return,
            Some(k) => {
                eprintln!(
                    "forkd jail: the {} cannot become a {}",
                    k.describe(),
                    kind.describe()
                );
                // SAFETY: _exit takes an integer and does not return.
                unsafe { libc::_exit(report::JAIL_FAILED_EXIT) }
            }
            None => {}
        }
        report::set_thread_kind(kind);
        // SAFETY: geteuid takes no arguments and cannot fail (it reads this thread's).
        let euid = unsafe { libc::geteuid() };
        let switched = match self.user {
            Some((uid, gid)) if euid != uid => privs::switch_thread_user(uid, gid),
            _ => Ok(()),
        };
        let result = switched
            .and_then(|()| privs::clear_thread_caps())
            .map_err(|e| e.to_string())
            .and_then(|()| self.programs.apply(kind).map_err(|e| e.to_string()));
        if let Err(e) = result {
            eprintln!("forkd jail: confining the {}: {e}", kind.describe());
            // SAFETY: _exit takes an integer and does not return.
            unsafe { libc::_exit(report::JAIL_FAILED_EXIT) }
        }
    }
}

/// Which layers this host supports, for `forkd doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Support {
    pub seccomp: Result<(), String>,
    pub no_new_privs: Result<(), String>,
    pub drop_user: Result<(u32, u32), String>,
    pub mount_namespace: Result<(), String>,
}

/// Probes each layer in a throwaway child process (nothing of this process changes).
pub fn probe_support(config: &JailConfig) -> Support {
    let probe = |f: fn() -> Result<(), String>| -> Result<(), String> {
        let (r, w) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => return Err(e.to_string()),
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&w);
        let pid = crate::process::fork_child(&[], move || {
            let msg = match f() {
                Ok(()) => "ok".to_string(),
                Err(e) => e,
            };
            // SAFETY: write reads `msg`'s bytes, a live String.
            unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
            0
        })
        .map_err(|e| e.to_string())?;
        drop(w);
        let _ = crate::process::wait(pid);
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut &r, &mut out);
        if out == "ok" {
            Ok(())
        } else if out.is_empty() {
            Err("the probe process died".into())
        } else {
            Err(out)
        }
    };
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    Support {
        seccomp: probe(|| {
            let programs = seccomp::Programs::compile(std::process::id() as i32)
                .map_err(|e| forkd_store::error_chain(&e))?;
            programs.apply(ThreadKind::Main).map_err(|e| e.to_string())
        }),
        no_new_privs: probe(|| privs::no_new_privs().map_err(|e| e.to_string())),
        drop_user: if root {
            let user = privs::resolve_user(config.fallback_user);
            probe(|| {
                privs::switch_user(FALLBACK_USER.0, FALLBACK_USER.1).map_err(|e| e.to_string())
            })
            .map(|()| user)
        } else {
            Err("forkd does not run as root: children keep its (unprivileged) user".into())
        },
        mount_namespace: probe(|| {
            mount::enter(&View {
                devices: vec![PathBuf::from("/dev/kvm")],
                ..View::default()
            })
            .map_err(|e| forkd_store::error_chain(&e))
        }),
    }
}
