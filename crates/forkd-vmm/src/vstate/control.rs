//! Run control shared by the VMM and its vCPU threads: pause (every vCPU acknowledges),
//! resume, stop (first reason wins), and jobs run on a paused vCPU's own thread (state
//! save/restore needs the vCPU fd, which only its thread holds).
//!
//! A vCPU blocked in KVM_RUN is kicked with a real-time signal whose handler sets
//! `immediate_exit` in that thread's kvm_run: KVM_RUN then returns EINTR whether the signal
//! lands while the guest runs or just before the thread re-enters KVM_RUN.

use std::cell::Cell;
use std::collections::VecDeque;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;

use super::vcpu::Vcpu;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote `code` to the debug-exit port (test-guest power-off).
    GuestExit(u32),
    /// The guest asked for a reset (i8042 0xFE, or a KVM system event reset).
    Reset,
    /// The guest powered off through a KVM system event.
    PowerOff,
    /// The VMM was asked to stop.
    Requested,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u32 },
    /// KVM could not emulate or run guest code.
    InternalError { vcpu: u32, suberror: u32, rip: u64 },
    /// Entering the guest failed.
    FailEntry { vcpu: u32, reason: u64 },
    /// Anything else that ended a vCPU (failed ioctl, unexpected exit).
    VcpuError { vcpu: u32, message: String },
}

impl StopReason {
    /// A clean stop: the guest exited with 0, reset or powered off, or the VMM asked.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            StopReason::GuestExit(0)
                | StopReason::Reset
                | StopReason::PowerOff
                | StopReason::Requested
        )
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::GuestExit(c) => write!(f, "guest exited with code {c}"),
            StopReason::Reset => write!(f, "guest requested a reset"),
            StopReason::PowerOff => write!(f, "guest powered off"),
            StopReason::Requested => write!(f, "stopped on request"),
            StopReason::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN)"),
            StopReason::InternalError { vcpu, suberror, rip } => write!(
                f,
                "KVM internal error on vCPU {vcpu}: exit reason KVM_EXIT_INTERNAL_ERROR, suberror {suberror}, RIP {rip:#x}"
            ),
            StopReason::FailEntry { vcpu, reason } => write!(
                f,
                "KVM could not enter the guest on vCPU {vcpu}: exit reason KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}"
            ),
            StopReason::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
        }
    }
}

/// Errors from run control.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM has stopped ({0})")]
    Stopped(StopReason),
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is not running")]
    NotRunning,
    #[error("no vCPU {0}")]
    NoSuchVcpu(u32),
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

type Job = Box<dyn FnOnce(&mut Vcpu) + Send>;

struct State {
    request: Request,
    /// vCPU threads currently parked in the pause point.
    paused: usize,
    /// vCPU threads that have not exited yet.
    live: usize,
    stop_reason: Option<StopReason>,
    threads: Vec<libc::pthread_t>,
    jobs: Vec<VecDeque<Job>>,
}

/// What a vCPU thread should do at its check point.
pub(crate) enum Checkpoint {
    Run,
    Exit,
}

/// Shared between the VMM handle, the vCPU threads and devices that stop the VM.
pub struct VmControl {
    state: Mutex<State>,
    changed: Condvar,
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmControl").finish_non_exhaustive()
    }
}

thread_local! {
    /// This thread's kvm_run, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only touches a thread-local Cell (no allocation, no locks): async-signal-safe.
    let ptr = KVM_RUN_PTR.with(|p| p.get());
    if !ptr.is_null() {
        // SAFETY: set by this thread's vCPU loop to its own mapped kvm_run, cleared before the
        // VcpuFd (and the mapping) is dropped.
        unsafe { (*ptr).immediate_exit = 1 };
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() -> Result<(), ControlError> {
    static INSTALL: Once = Once::new();
    static mut RESULT: Option<String> = None;
    INSTALL.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            // SAFETY: written once inside call_once, read only after it completed.
            unsafe { RESULT = Some(e.to_string()) };
        }
    });
    // SAFETY: call_once has completed; no more writes happen.
    match unsafe { (*std::ptr::addr_of!(RESULT)).clone() } {
        Some(e) => Err(ControlError::Signal(e)),
        None => Ok(()),
    }
}

/// Points the kick handler at this thread's kvm_run (null to detach).
pub(crate) fn set_thread_kvm_run(ptr: *mut kvm_run) {
    KVM_RUN_PTR.with(|p| p.set(ptr));
}

impl VmControl {
    pub(crate) fn new(vcpus: usize) -> Result<VmControl, ControlError> {
        install_kick_handler()?;
        Ok(VmControl {
            state: Mutex::new(State {
                request: Request::Run,
                paused: 0,
                live: 0,
                stop_reason: None,
                threads: Vec::new(),
                jobs: (0..vcpus).map(|_| VecDeque::new()).collect(),
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking vCPU thread must not wedge the VMM: the state stays consistent because
        // every update is a few plain assignments.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the spawned vCPU threads so they can be kicked.
    pub(crate) fn set_threads(&self, handles: &[JoinHandle<()>]) {
        let mut s = self.lock();
        s.threads = handles.iter().map(|h| h.as_pthread_t()).collect();
        // A pause or stop requested while the threads were starting could not kick them; a
        // thread that passed its checkpoint before the request needs the kick now. With no
        // request there is nothing to catch up on, and a kick would only cost each vCPU a
        // wasted KVM_RUN exit.
        if s.request != Request::Run {
            self.kick_all(&s);
        }
    }

    /// Called before the vCPU threads are spawned: `pause` waits for this many acks.
    pub(crate) fn expect_vcpus(&self, count: usize) {
        self.lock().live = count;
    }

    fn kick_all(&self, s: &State) {
        for t in &s.threads {
            // SAFETY: the pthread ids belong to vCPU threads whose JoinHandles the VMM keeps
            // unjoined until after the last kick, so the ids stay valid.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Stops the VM for `reason` (the first reason recorded wins) and kicks every vCPU.
    pub fn request_stop(&self, reason: StopReason) {
        let mut s = self.lock();
        if s.stop_reason.is_none() {
            tracing::debug!(%reason, "VM stopping");
            s.stop_reason = Some(reason);
        }
        s.request = Request::Stop;
        self.kick_all(&s);
        self.changed.notify_all();
    }

    /// Why the VM stopped, if it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.lock().stop_reason.clone()
    }

    /// Pauses every vCPU; returns once each one has acknowledged.
    pub fn pause(&self) -> Result<(), ControlError> {
        let mut s = self.lock();
        if let Some(r) = &s.stop_reason {
            return Err(ControlError::Stopped(r.clone()));
        }
        s.request = Request::Pause;
        self.kick_all(&s);
        while s.paused < s.live && s.request == Request::Pause {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        match &s.stop_reason {
            Some(r) => Err(ControlError::Stopped(r.clone())),
            None => Ok(()),
        }
    }

    /// Makes vCPU threads that are about to start park at their first checkpoint, before
    /// their first KVM_RUN, until [`VmControl::resume`].
    pub(crate) fn hold_at_start(&self) {
        self.lock().request = Request::Pause;
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut s = self.lock();
        if let Some(r) = &s.stop_reason {
            return Err(ControlError::Stopped(r.clone()));
        }
        if s.request != Request::Pause {
            return Err(ControlError::NotPaused);
        }
        s.request = Request::Run;
        self.changed.notify_all();
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        let s = self.lock();
        s.request == Request::Pause && s.paused == s.live
    }

    /// Runs `job` on vCPU `index`'s own thread while the VM is paused and waits for it.
    pub fn run_on_vcpu<R: Send + 'static>(
        &self,
        index: u32,
        job: impl FnOnce(&mut Vcpu) -> R + Send + 'static,
    ) -> Result<R, ControlError> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut s = self.lock();
            if !(s.request == Request::Pause && s.paused == s.live) {
                return Err(ControlError::NotPaused);
            }
            let queue = s
                .jobs
                .get_mut(index as usize)
                .ok_or(ControlError::NoSuchVcpu(index))?;
            queue.push_back(Box::new(move |v: &mut Vcpu| {
                let _ = tx.send(job(v));
            }));
            self.changed.notify_all();
        }
        rx.recv().map_err(|_| match self.stop_reason() {
            Some(r) => ControlError::Stopped(r),
            None => ControlError::NotRunning,
        })
    }

    /// Blocks until every vCPU thread has exited; returns why the VM stopped.
    pub fn wait_stopped(&self) -> StopReason {
        let mut s = self.lock();
        while !(s.live == 0 && s.stop_reason.is_some()) {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.stop_reason.clone().unwrap_or(StopReason::Requested)
    }

    /// Like [`VmControl::wait_stopped`] with a timeout; None if still running.
    pub fn wait_stopped_timeout(&self, timeout: std::time::Duration) -> Option<StopReason> {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.lock();
        while !(s.live == 0 && s.stop_reason.is_some()) {
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.stop_reason.clone()
    }

    /// The vCPU thread's check point before every KVM_RUN: parks while paused (running jobs
    /// queued for this vCPU), and says whether to exit.
    pub(crate) fn checkpoint(&self, vcpu: &mut Vcpu) -> Checkpoint {
        let mut s = self.lock();
        loop {
            match s.request {
                Request::Run => return Checkpoint::Run,
                Request::Stop => return Checkpoint::Exit,
                Request::Pause => {}
            }
            vcpu.on_pause();
            s.paused += 1;
            self.changed.notify_all();
            while s.request == Request::Pause {
                if let Some(job) = s.jobs[vcpu.index() as usize].pop_front() {
                    drop(s);
                    job(vcpu);
                    s = self.lock();
                    continue;
                }
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.paused -= 1;
        }
    }

    /// A vCPU thread is exiting.
    pub(crate) fn vcpu_exited(&self, index: u32) {
        let mut s = self.lock();
        s.live -= 1;
        s.jobs[index as usize].clear();
        if s.stop_reason.is_none() {
            s.stop_reason = Some(StopReason::VcpuError {
                vcpu: index,
                message: "vCPU thread ended unexpectedly".into(),
            });
            s.request = Request::Stop;
            self.kick_all(&s);
        }
        self.changed.notify_all();
    }
}
