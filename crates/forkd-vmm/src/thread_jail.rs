//! Where a jailed process's threads confine themselves.
//!
//! A seccomp filter belongs to one thread (a thread inherits its creator's at creation, and
//! nothing installs one in another thread afterwards), and the VMM's threads are created at
//! different times: the vCPU threads when a pool prepares a shell, the device event loop
//! during a restore, the sandbox's control thread after it. So each thread confines itself:
//! it calls [`enter`] with its kind at the point where it starts doing guest-driven work (a
//! vCPU before its first KVM_RUN, the device loop before its first event), and the hook the
//! process registered with [`set_hook`] (the sandbox manager's jail) installs that kind's
//! filter. In a process without a hook (the CLI booting a VM, tests) `enter` does nothing.

use std::sync::{mpsc, Mutex, OnceLock};

/// What a thread of a VMM process does; each kind has its own system-call allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The process's main thread: restores, then waits for the VM to stop and tears it down.
    Main,
    /// A vCPU thread: KVM_RUN and the device models its exits reach (serial, MMIO registers).
    Vcpu,
    /// The device event loop: virtio queues and their host backends (disk, vsock, tap, rng).
    Devices,
    /// The sandbox's control thread: stop and snapshot (BRANCH, pause) requests.
    Control,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::Control,
    ];

    /// How a report names the thread ("from the vCPU thread").
    pub fn describe(self) -> &'static str {
        match self {
            ThreadKind::Main => "main thread",
            ThreadKind::Vcpu => "vCPU thread",
            ThreadKind::Devices => "device event-loop thread",
            ThreadKind::Control => "control thread",
        }
    }

    /// A short stable name (in messages between processes).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Control => "control",
        }
    }

    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Where a thread is when it confines itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Ahead of time (in a pool, before the child is told to start): nothing guest-driven
    /// can reach the thread before the process is locked down (a vCPU parked before its first
    /// KVM_RUN, a thread waiting for work), so it confines itself now, off the fork path.
    Early,
    /// About to do guest-driven work: confined (if not already) and, when the process is
    /// still being locked down, waiting for that first.
    Work,
}

type Hook = Box<dyn Fn(ThreadKind, Point) + Send + Sync>;

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Registers the process's confinement hook (once per process; false if one was set already).
/// Set it before any thread that calls [`enter`] reaches that call.
pub fn set_hook(hook: impl Fn(ThreadKind, Point) + Send + Sync + 'static) -> bool {
    HOOK.set(Box::new(hook)).is_ok()
}

/// The calling thread, of `kind`, is about to do guest-driven work: confine it (when the
/// process has a hook). The hook may block until the process-wide part of its jail is done.
pub fn enter(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind, Point::Work);
    }
}

/// The calling thread will be of `kind` and nothing guest-driven reaches it before the
/// process is locked down: confine it now (see [`Point::Early`]). It still calls [`enter`]
/// before its first guest-driven work.
pub fn confine_early(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind, Point::Early);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads started ahead of time, each confined as its kind, waiting for the job that
/// [`spawn`] gives it.
static RESERVE: Mutex<Vec<(ThreadKind, mpsc::Sender<Job>)>> = Mutex::new(Vec::new());

/// Starts a thread of `kind` now and parks it, confined ([`confine_early`]), until [`spawn`]
/// asks for a thread of its kind: a pool child does this for the threads its restore would
/// otherwise start (the device event loop), so that their confinement is off the fork path.
pub fn reserve(kind: ThreadKind, name: &str) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            confine_early(kind);
            if let Ok(job) = rx.recv() {
                job();
            }
        })?;
    RESERVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((kind, tx));
    Ok(())
}

/// A thread running a job: [`Worker::join`] waits for its end.
pub struct Worker {
    inner: WorkerInner,
}

enum WorkerInner {
    Thread(std::thread::JoinHandle<()>),
    Reserved(mpsc::Receiver<()>),
}

impl Worker {
    /// Waits until the job has returned (or panicked).
    pub fn join(self) {
        match self.inner {
            WorkerInner::Thread(handle) => {
                let _ = handle.join();
            }
            // The sender is dropped when the job ends, however it ends.
            WorkerInner::Reserved(done) => {
                let _ = done.recv();
            }
        }
    }
}

/// Runs `job` on a thread of `kind`: one [`reserve`]d for it when there is one, else a new
/// thread called `name`.
pub fn spawn(
    kind: ThreadKind,
    name: &str,
    job: impl FnOnce() + Send + 'static,
) -> std::io::Result<Worker> {
    let reserved = {
        let mut reserve = RESERVE.lock().unwrap_or_else(|e| e.into_inner());
        reserve
            .iter()
            .position(|(k, _)| *k == kind)
            .map(|i| reserve.remove(i).1)
    };
    if let Some(tx) = reserved {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let job: Job = Box::new(move || {
            let _done = done_tx;
            job();
        });
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            // The reserved thread is gone: the job gets a new one.
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(job)?;
        }
        return Ok(Worker {
            inner: WorkerInner::Reserved(done_rx),
        });
    }
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(job)?;
    Ok(Worker {
        inner: WorkerInner::Thread(handle),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(ThreadKind::from_name("gpu"), None);
        assert_eq!(ThreadKind::Vcpu.describe(), "vCPU thread");
    }

    #[test]
    fn a_reserved_thread_runs_the_job_of_its_kind_and_join_waits_for_it() {
        reserve(ThreadKind::Devices, "reserved").unwrap();
        let reserved_tid = std::sync::Arc::new(Mutex::new(None));
        let (t, started) = (reserved_tid.clone(), std::time::Instant::now());
        let worker = spawn(ThreadKind::Devices, "x", move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            *t.lock().unwrap() = std::thread::current().name().map(String::from);
        })
        .unwrap();
        worker.join();
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        assert_eq!(reserved_tid.lock().unwrap().as_deref(), Some("reserved"));
        // None left: the next one is a new thread.
        let name = std::sync::Arc::new(Mutex::new(None));
        let n = name.clone();
        spawn(ThreadKind::Devices, "fresh", move || {
            *n.lock().unwrap() = std::thread::current().name().map(String::from);
        })
        .unwrap()
        .join();
        assert_eq!(name.lock().unwrap().as_deref(), Some("fresh"));
    }
}
