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
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;

use super::vcpu::Vcpu;

/// Why a VM stopped.
///
/// The fatal vCPU exits carry the vCPU's registers at the exit ([`RegisterDump`], None when
/// KVM would not give them), which their Display prints on the same line. Match them with
/// `..` in tests: the registers differ from run to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote `code` to the debug-exit port (test-guest power-off).
    GuestExit(u32),
    /// The guest asked for a reset (ACPI reset register, i8042 0xFE, or a KVM system event
    /// reset).
    Reset,
    /// The guest powered off (ACPI S5 through the sleep control register, or a KVM system
    /// event).
    PowerOff,
    /// The VMM was asked to stop.
    Requested,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    ///
    /// On AMD hosts KVM resets the vCPU when it intercepts the shutdown (the VMCB is undefined
    /// after one), so the registers there show the reset state (rip=0xfff0, cs=0xf000), not
    /// the faulting context; Intel and PVM hosts keep the faulting context.
    TripleFault {
        vcpu: u32,
        regs: Option<Box<RegisterDump>>,
    },
    /// KVM could not emulate or run guest code (KVM_EXIT_INTERNAL_ERROR).
    InternalError {
        vcpu: u32,
        suberror: u32,
        regs: Option<Box<RegisterDump>>,
    },
    /// Entering the guest failed (KVM_EXIT_FAIL_ENTRY).
    FailEntry {
        vcpu: u32,
        reason: u64,
        regs: Option<Box<RegisterDump>>,
    },
    /// KVM_RUN returned an exit this VMM does not handle (`exit` names it).
    UnexpectedExit {
        vcpu: u32,
        exit: String,
        regs: Option<Box<RegisterDump>>,
    },
    /// Anything else that ended a vCPU (failed ioctl, a vCPU thread that ended).
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

    /// The vCPU registers captured at a fatal exit, if this is one and they could be read.
    pub fn registers(&self) -> Option<&RegisterDump> {
        match self {
            StopReason::TripleFault { regs, .. }
            | StopReason::InternalError { regs, .. }
            | StopReason::FailEntry { regs, .. }
            | StopReason::UnexpectedExit { regs, .. } => regs.as_deref(),
            _ => None,
        }
    }
}

/// ` (rip=... )` after a fatal exit's description, or a note that the registers were not
/// readable.
struct RegsSuffix<'a>(&'a Option<Box<RegisterDump>>);

impl std::fmt::Display for RegsSuffix<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(regs) => write!(f, " ({regs})"),
            None => write!(f, " (registers unreadable)"),
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::GuestExit(c) => write!(f, "guest exited with code {c}"),
            StopReason::Reset => write!(f, "guest requested a reset"),
            StopReason::PowerOff => write!(f, "guest powered off"),
            StopReason::Requested => write!(f, "stopped on request"),
            StopReason::TripleFault { vcpu, regs } => write!(
                f,
                "vCPU {vcpu} triple fault, KVM_EXIT_SHUTDOWN{}",
                RegsSuffix(regs)
            ),
            StopReason::InternalError {
                vcpu,
                suberror,
                regs,
            } => write!(
                f,
                "KVM internal error on vCPU {vcpu}: exit reason KVM_EXIT_INTERNAL_ERROR, suberror {suberror}{}",
                RegsSuffix(regs)
            ),
            StopReason::FailEntry { vcpu, reason, regs } => write!(
                f,
                "KVM could not enter the guest on vCPU {vcpu}: exit reason KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}{}",
                RegsSuffix(regs)
            ),
            StopReason::UnexpectedExit { vcpu, exit, regs } => write!(
                f,
                "vCPU {vcpu} stopped on an exit the VMM does not handle: {exit}{}",
                RegsSuffix(regs)
            ),
            StopReason::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
        }
    }
}

/// The registers that tell where and in what mode a vCPU was when it died: KVM_GET_REGS,
/// KVM_GET_SREGS and (if KVM gives them) the pending events of KVM_GET_VCPU_EVENTS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegisterDump {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// Code and stack segment selectors.
    pub cs: u16,
    pub ss: u16,
    /// An exception KVM holds for delivery (pending) or was delivering (injected).
    pub exception: Option<PendingException>,
    /// An external interrupt vector being injected.
    pub interrupt: Option<u8>,
    /// An NMI pending or being injected.
    pub nmi: bool,
}

/// One exception from KVM_GET_VCPU_EVENTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingException {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// True when KVM was delivering it; false when it is still pending.
    pub injected: bool,
}

impl RegisterDump {
    pub fn new(
        regs: &kvm_bindings::kvm_regs,
        sregs: &kvm_bindings::kvm_sregs,
        events: Option<&kvm_bindings::kvm_vcpu_events>,
    ) -> RegisterDump {
        let mut dump = RegisterDump {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            cs: sregs.cs.selector,
            ss: sregs.ss.selector,
            ..RegisterDump::default()
        };
        if let Some(e) = events {
            let x = &e.exception;
            if x.injected != 0 || x.pending != 0 {
                dump.exception = Some(PendingException {
                    vector: x.nr,
                    error_code: (x.has_error_code != 0).then_some(x.error_code),
                    injected: x.injected != 0,
                });
            }
            if e.interrupt.injected != 0 {
                dump.interrupt = Some(e.interrupt.nr);
            }
            dump.nmi = e.nmi.injected != 0 || e.nmi.pending != 0;
        }
        dump
    }
}

/// The mnemonic of exception `vector` (#UD, #GP, ...), if it has one.
fn exception_name(vector: u8) -> Option<&'static str> {
    const NAMES: [&str; 22] = [
        "DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "", "TS", "NP", "SS", "GP", "PF",
        "", "MF", "AC", "MC", "XM", "VE", "CP",
    ];
    NAMES
        .get(usize::from(vector))
        .filter(|n| !n.is_empty())
        .copied()
}

impl std::fmt::Display for RegisterDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} ss={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.rip,
            self.rsp,
            self.rflags,
            self.cs,
            self.ss,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.efer
        )?;
        if let Some(x) = &self.exception {
            let state = if x.injected { "injected" } else { "pending" };
            match exception_name(x.vector) {
                Some(name) => write!(f, " {state} #{name}")?,
                None => write!(f, " {state} exception {}", x.vector)?,
            }
            if let Some(code) = x.error_code {
                write!(f, " error_code={code:#x}")?;
            }
        }
        if let Some(vector) = self.interrupt {
            write!(f, " injected irq={vector:#x}")?;
        }
        if self.nmi {
            write!(f, " nmi")?;
        }
        Ok(())
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
        // SAFETY: the Cell is thread-local, so this is the pointer the interrupted thread's own
        // vCPU loop stored: the kvm_run page its VcpuFd keeps mapped, reset to null before the
        // VcpuFd (and so the mapping) is dropped. A non-null value therefore points at a live,
        // writable kvm_run. The store is one aligned byte through the raw pointer, the way
        // kvm-ioctls' own set_kvm_immediate_exit writes it; KVM reads it on the next KVM_RUN.
        unsafe { (*ptr).immediate_exit = 1 };
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() -> Result<(), ControlError> {
    // Installed once per process; every later VM gets the first attempt's outcome.
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(ControlError::Signal)
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
            // SAFETY: pthread_kill takes no pointers. The ids belong to vCPU threads whose
            // JoinHandles the VMM keeps unjoined until after the last kick, so each id still
            // names a live (or at worst exited but unjoined) thread, never a recycled one; the
            // kick signal has a handler installed (VmControl::new), so it cannot kill the VMM.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> RegisterDump {
        RegisterDump {
            rip: 0x10_0123,
            rsp: 0x8fd8,
            rflags: 0x10046,
            cr0: 0x8000_0031,
            cr2: 0,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            cs: 0x8,
            ss: 0x10,
            ..RegisterDump::default()
        }
    }

    #[test]
    fn fatal_exits_show_the_registers_on_one_line() {
        let reason = StopReason::TripleFault {
            vcpu: 2,
            regs: Some(Box::new(dump())),
        };
        assert_eq!(
            reason.to_string(),
            "vCPU 2 triple fault, KVM_EXIT_SHUTDOWN (rip=0x100123 rsp=0x8fd8 rflags=0x10046 \
             cs=0x8 ss=0x10 cr0=0x80000031 cr2=0x0 cr3=0x9000 cr4=0x20 efer=0x500)"
        );
        assert_eq!(reason.registers(), Some(&dump()));
        assert!(!reason.is_clean());

        let internal = StopReason::InternalError {
            vcpu: 0,
            suberror: 1,
            regs: None,
        }
        .to_string();
        assert!(
            internal.ends_with("suberror 1 (registers unreadable)"),
            "{internal}"
        );
        let unexpected = StopReason::UnexpectedExit {
            vcpu: 1,
            exit: "Debug".into(),
            regs: Some(Box::new(dump())),
        }
        .to_string();
        assert!(
            unexpected.starts_with(
                "vCPU 1 stopped on an exit the VMM does not handle: Debug (rip=0x100123 "
            ),
            "{unexpected}"
        );
        assert_eq!(StopReason::PowerOff.registers(), None);
    }

    #[test]
    fn pending_events_are_named() {
        let mut events = kvm_bindings::kvm_vcpu_events::default();
        events.exception.injected = 1;
        events.exception.nr = 13;
        events.exception.has_error_code = 1;
        events.exception.error_code = 0x1a;
        events.interrupt.injected = 1;
        events.interrupt.nr = 0x41;
        events.nmi.pending = 1;
        let regs = kvm_bindings::kvm_regs {
            rip: 0x1000,
            ..Default::default()
        };
        let sregs = kvm_bindings::kvm_sregs::default();
        let text = RegisterDump::new(&regs, &sregs, Some(&events)).to_string();
        assert!(
            text.ends_with(" injected #GP error_code=0x1a injected irq=0x41 nmi"),
            "{text}"
        );
        assert!(text.starts_with("rip=0x1000 "), "{text}");

        let mut events = kvm_bindings::kvm_vcpu_events::default();
        events.exception.pending = 1;
        events.exception.nr = 6;
        let text = RegisterDump::new(&regs, &sregs, Some(&events)).to_string();
        assert!(text.ends_with("efer=0x0 pending #UD"), "{text}");
        events.exception.nr = 31;
        let text = RegisterDump::new(&regs, &sregs, Some(&events)).to_string();
        assert!(text.ends_with(" pending exception 31"), "{text}");
        // No events (KVM_GET_VCPU_EVENTS failed) or none pending: registers only.
        let quiet = RegisterDump::new(&regs, &sregs, None);
        assert_eq!(quiet.exception, None);
        assert!(quiet.to_string().ends_with("efer=0x0"));
        let none_pending = kvm_bindings::kvm_vcpu_events::default();
        assert_eq!(RegisterDump::new(&regs, &sregs, Some(&none_pending)), quiet);
    }
}
