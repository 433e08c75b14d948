//! A vCPU: boot configuration, the run loop dispatching exits to the buses, and the one place
//! where its KVM state is read and written (pause, snapshot, restore all go through here).

use std::sync::Arc;

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use super::control::{set_thread_kvm_run, Checkpoint, RegisterDump, StopReason, VmControl};
use super::vm::Vm;
use super::{kvm_err, KvmError};
use crate::arch::x86_64::{cpuid, regs};
use crate::devices::bus::Bus;
use crate::snapshot::blob;

/// Errors configuring or accessing a vCPU. Each names the vCPU; the cause renders after it.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}")]
    Kvm {
        index: u32,
        #[source]
        source: KvmError,
    },
    #[error("vCPU {index}: CPUID")]
    Cpuid {
        index: u32,
        #[source]
        source: cpuid::CpuidError,
    },
    #[error("vCPU {index}: KVM accepted only {set} of {wanted} MSRs")]
    PartialMsrs {
        index: u32,
        set: usize,
        wanted: usize,
    },
    #[error("vCPU {index}: MSR list of {count} entries")]
    MsrList {
        index: u32,
        count: usize,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
}

/// Everything KVM keeps about one vCPU that a snapshot must carry, as vmstate.json holds it:
/// KVM's structs as base64 blobs of their bytes ([`blob`]), the CPUID entries and MSRs as
/// back-to-back `kvm_cpuid_entry2` / `kvm_msr_entry` records (TSC_DEADLINE last).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    #[serde(with = "blob::kvm")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "blob::kvm")]
    pub regs: kvm_regs,
    #[serde(with = "blob::kvm")]
    pub sregs: kvm_sregs,
    /// The 4 KiB legacy XSAVE area (KVM_GET_XSAVE).
    #[serde(with = "blob::kvm")]
    pub xsave: kvm_xsave,
    #[serde(with = "blob::kvm")]
    pub xcrs: kvm_xcrs,
    #[serde(with = "blob::kvm")]
    pub debug_regs: kvm_debugregs,
    #[serde(with = "blob::kvm")]
    pub lapic: kvm_lapic_state,
    pub tsc_khz: Option<u32>,
    #[serde(with = "cpuid_entries")]
    pub cpuid: CpuId,
    #[serde(with = "blob::kvm_list")]
    pub msrs: Vec<kvm_msr_entry>,
    #[serde(with = "blob::kvm")]
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> VcpuState {
        VcpuState {
            // kvm_xsave is not Clone (its flexible array member); the legacy area is all of it.
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            cpuid: self.cpuid.clone(),
            msrs: self.msrs.clone(),
            ..*self
        }
    }
}

/// A [`CpuId`] as its entries back to back (the FAM header is rebuilt on load).
mod cpuid_entries {
    use kvm_bindings::{kvm_cpuid_entry2, CpuId};
    use serde::{Deserializer, Serializer};

    use crate::snapshot::blob;

    pub fn serialize<S: Serializer>(cpuid: &CpuId, s: S) -> Result<S::Ok, S::Error> {
        blob::kvm_list::serialize(cpuid.as_slice(), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CpuId, D::Error> {
        let entries: Vec<kvm_cpuid_entry2> = blob::kvm_list::deserialize(d)?;
        CpuId::from_entries(&entries).map_err(|e| {
            serde::de::Error::custom(format_args!("{} CPUID entries: {e}", entries.len()))
        })
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The MSRs a snapshot saves: KVM's index list filtered to the ranges that are vCPU state
/// (not feature or read-only MSRs; x2APIC MSRs mirror the LAPIC page, restored with
/// KVM_SET_LAPIC), with TSC_DEADLINE moved last so a restore writes it after the TSC.
pub fn snapshot_msr_indices(kvm: &Kvm) -> Result<Vec<u32>, KvmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(serializable_msrs(list.as_slice()))
}

/// `supported` filtered to the MSRs a snapshot carries, TSC_DEADLINE last.
fn serializable_msrs(supported: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = supported
        .iter()
        .copied()
        .filter(|&i| is_serializable_msr(i) && i != MSR_IA32_TSC_DEADLINE)
        .collect();
    if supported.contains(&MSR_IA32_TSC_DEADLINE) {
        out.push(MSR_IA32_TSC_DEADLINE);
    }
    out
}

fn is_serializable_msr(index: u32) -> bool {
    matches!(
        index,
        0x10 // TSC
        | 0x1b // APIC_BASE
        | 0x48 // SPEC_CTRL
        | 0x174..=0x176 // SYSENTER_CS/ESP/EIP
        | 0x1a0 // MISC_ENABLE
        | 0x200..=0x26f // MTRR variable/fixed
        | 0x277 // PAT
        | 0x2ff // MTRRdefType
        | 0x6e0 // TSC_DEADLINE
        | 0xda0 // XSS
        | 0xc000_0080..=0xc000_0084 // EFER, STAR, LSTAR, CSTAR, SFMASK
        | 0xc000_0100..=0xc000_0103 // FS/GS/KERNEL_GS base, TSC_AUX
        | 0x4b56_4d00..=0x4b56_4dff // KVM paravirt (kvmclock, async PF, steal time, ...)
    )
}

/// A zero TSC deadline would leave the guest's timer disarmed forever after a restore: the
/// saved deadline becomes the TSC instead, so the timer fires right away (Firecracker does the
/// same).
fn arm_zero_tsc_deadline(msrs: &mut [kvm_msr_entry]) {
    let tsc = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data);
    if let (Some(deadline), Some(tsc)) = (
        msrs.iter_mut().find(|m| m.index == MSR_IA32_TSC_DEADLINE),
        tsc,
    ) {
        if deadline.data == 0 {
            deadline.data = tsc;
        }
    }
}

/// The buses a vCPU dispatches exits to.
#[derive(Clone, Debug)]
pub struct Buses {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

/// One KVM vCPU. Index = vCPU id = APIC id.
#[derive(Debug)]
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
}

/// How much lower than the VMM's own threads a vCPU thread runs (a nice value, relative to
/// the process's), unless `FORKD_VCPU_NICE` says otherwise (0: the same).
pub const DEFAULT_VCPU_NICE: i32 = 10;

/// Lowers this (vCPU) thread's scheduling priority so that the VMM's control plane — restores,
/// device models, the host side of vsock — is not starved by guest execution: when a hundred
/// children are forked at once, the restores finish first and the guests then share the CPUs
/// among themselves as before. Matters most where guest code is slow to run (PVM's emulator).
fn lower_thread_priority() {
    let nice = vcpu_nice(std::env::var("FORKD_VCPU_NICE").ok().as_deref());
    if nice <= 0 {
        return;
    }
    // SAFETY: getpriority/setpriority take only integers (Linux keeps nice per thread and
    // who = 0 is the calling thread), so they touch no memory of ours. __errno_location returns
    // a valid pointer to this thread's errno, which is how errno is read and cleared (needed
    // because -1 is both a valid nice and the error return). Raising nice needs no privilege;
    // a failure just leaves the priority as it was.
    unsafe {
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        if *libc::__errno_location() == 0 {
            libc::setpriority(libc::PRIO_PROCESS, 0, (current + nice).min(19));
        }
    }
}

/// The nice increment for vCPU threads given `FORKD_VCPU_NICE` (unset or not a number: the
/// default; clamped to what nice values allow).
fn vcpu_nice(setting: Option<&str>) -> i32 {
    setting
        .and_then(|v| v.trim().parse::<i32>().ok())
        .unwrap_or(DEFAULT_VCPU_NICE)
        .clamp(0, 39)
}

impl Vcpu {
    /// KVM_CREATE_VCPU with id `index`.
    pub fn new(vm: &Vm, index: u32) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))
            .map_err(|source| VcpuError::Kvm { index, source })?;
        Ok(Vcpu { index, fd })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn kvm(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |e| VcpuError::Kvm {
            index,
            source: KvmError { op, source: e },
        }
    }

    /// Sets the boot state, in the order KVM needs: CPUID (before any MSR access), MSRs,
    /// registers, FPU, segment/control registers, LAPIC LINT pins. `entry` is the 64-bit entry
    /// point for the boot vCPU; application processors (entry None) wait for INIT/SIPI.
    pub fn configure_boot(
        &self,
        supported_cpuid: &CpuId,
        vcpu_count: u32,
        entry: Option<u64>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let cpuid = cpuid::normalize(supported_cpuid, index, vcpu_count)
            .map_err(|source| VcpuError::Cpuid { index, source })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm("KVM_SET_CPUID2"))?;
        self.set_msrs(&regs::boot_msr_entries())?;
        if let Some(entry) = entry {
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(self.kvm("KVM_SET_REGS"))?;
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.kvm("KVM_SET_FPU"))?;
        if entry.is_some() {
            let sregs = self.fd.get_sregs().map_err(self.kvm("KVM_GET_SREGS"))?;
            self.fd
                .set_sregs(&regs::long_mode_sregs(sregs))
                .map_err(self.kvm("KVM_SET_SREGS"))?;
        }
        let lapic = self.fd.get_lapic().map_err(self.kvm("KVM_GET_LAPIC"))?;
        self.fd
            .set_lapic(&regs::set_lint(lapic))
            .map_err(self.kvm("KVM_SET_LAPIC"))?;
        Ok(())
    }

    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        let msrs = Msrs::from_entries(entries).map_err(|source| VcpuError::MsrList {
            index: self.index,
            count: entries.len(),
            source,
        })?;
        let set = self.fd.set_msrs(&msrs).map_err(self.kvm("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                set,
                wanted: entries.len(),
            });
        }
        Ok(())
    }

    /// Reads the MSRs in `indices` (KVM skips none: a short read is an error).
    pub fn get_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| VcpuError::MsrList {
            index: self.index,
            count: entries.len(),
            source,
        })?;
        let read = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.kvm("KVM_GET_MSRS"))?;
        if read != indices.len() {
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                set: read,
                wanted: indices.len(),
            });
        }
        Ok(msrs.as_slice().to_vec())
    }

    /// Reads the vCPU's complete state, with the MSRs in `msr_indices` (for a snapshot:
    /// [`snapshot_msr_indices`]; a zero TSC_DEADLINE is saved as the TSC). Call only while the
    /// vCPU is paused (through `Vmm::run_on_vcpu`). Order matters: MP state first (reading it
    /// can change the LAPIC), vCPU events last.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(self.kvm("KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(self.kvm("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(self.kvm("KVM_GET_SREGS"))?;
        let xsave = self.fd.get_xsave().map_err(self.kvm("KVM_GET_XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(self.kvm("KVM_GET_XCRS"))?;
        let debug_regs = self
            .fd
            .get_debug_regs()
            .map_err(self.kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = self.fd.get_lapic().map_err(self.kvm("KVM_GET_LAPIC"))?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.kvm("KVM_GET_CPUID2"))?;
        let mut msrs = self.get_msrs(msr_indices)?;
        arm_zero_tsc_deadline(&mut msrs);
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(self.kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            tsc_khz,
            cpuid,
            msrs,
            events,
        })
    }

    /// Writes a state read by [`Vcpu::save_state`]: CPUID, MP state, regs (this clears pending
    /// exceptions, so before events), sregs, XSAVE, XCRs, debug regs, LAPIC (before MSRs:
    /// TSC_DEADLINE needs it), MSRs, events.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        self.fd
            .set_cpuid2(&state.cpuid)
            .map_err(self.kvm("KVM_SET_CPUID2"))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(self.kvm("KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.kvm("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.kvm("KVM_SET_SREGS"))?;
        // SAFETY: KVM_SET_XSAVE copies the vCPU's uabi_size bytes from the pointer, which is
        // more than this 4 KiB kvm_xsave only if the CPUID set just above enables a dynamically
        // enabled XSTATE feature (AMX tile data). That CPUID was captured together with this
        // xsave by KVM_GET_XSAVE, which the kernel refuses (EINVAL) when uabi_size exceeds
        // 4 KiB, so for a saved state the size is the legacy 4 KiB the struct holds.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.kvm("KVM_SET_XSAVE"))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(self.kvm("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&state.debug_regs)
            .map_err(self.kvm("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.kvm("KVM_SET_LAPIC"))?;
        self.set_msrs(&state.msrs)?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(self.kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Called on the vCPU thread when it parks for a pause.
    pub(crate) fn on_pause(&mut self) {
        // Tells a kvmclock-using guest it was paused (avoids soft-lockup warnings); guests
        // without kvmclock make this fail with EINVAL, which is fine.
        let _ = self.fd.kvmclock_ctrl();
        self.fd.set_kvm_immediate_exit(0);
    }

    fn internal_error_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: only called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, for which
        // the kernel fills the `internal` member of the exit union; every member is plain
        // integers, so the read is of initialised memory of a valid type either way.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// The registers and pending events right now, for a fatal exit's report (None when
    /// KVM will not give the registers).
    fn register_dump(&self) -> Option<Box<RegisterDump>> {
        let regs = self.fd.get_regs().ok()?;
        let sregs = self.fd.get_sregs().ok()?;
        let events = self.fd.get_vcpu_events().ok();
        Some(Box::new(RegisterDump::new(&regs, &sregs, events.as_ref())))
    }

    /// Runs the guest until the VM stops. Runs on the vCPU's own thread.
    pub(crate) fn run_loop(mut self, control: Arc<VmControl>, buses: Buses) {
        /// Reports the thread's end even if a device model panics on this thread, so
        /// `Vmm::wait` and `pause` never wait for a vCPU that is gone.
        struct ExitGuard {
            control: Arc<VmControl>,
            index: u32,
        }
        impl Drop for ExitGuard {
            fn drop(&mut self) {
                set_thread_kvm_run(std::ptr::null_mut());
                self.control.vcpu_exited(self.index);
            }
        }
        let guard = ExitGuard {
            control: control.clone(),
            index: self.index,
        };
        set_thread_kvm_run(self.fd.get_kvm_run() as *mut _);
        lower_thread_priority();
        // A pool's vCPU threads start with their shell and park at their first checkpoint
        // until the child's restore is done: they confine themselves now, before the child
        // is asked for, so its start pays nothing for them.
        crate::thread_jail::confine_early(crate::thread_jail::ThreadKind::Vcpu);
        let mut confined = false;
        loop {
            if let Checkpoint::Exit = control.checkpoint(&mut self) {
                break;
            }
            // Confined after the first checkpoint: a pool's shell parks there until its
            // child's restore is done, and the guest must not run one instruction unconfined.
            if !confined {
                crate::thread_jail::enter(crate::thread_jail::ThreadKind::Vcpu);
                confined = true;
            }
            if let Some(reason) = self.run_once(&buses) {
                control.request_stop(reason);
            }
        }
        // A kick can still arrive (a stop or pause racing this exit): detach the handler from
        // kvm_run before its mapping goes, or the handler writes into an unmapped page. Then the
        // vCPU fd (and the mapping) goes before the guard reports the exit.
        set_thread_kvm_run(std::ptr::null_mut());
        drop(self);
        drop(guard);
    }

    /// One KVM_RUN and the handling of its exit; Some(reason) when the VM must stop.
    fn run_once(&mut self, buses: &Buses) -> Option<StopReason> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if !buses.pio.write(u64::from(port), data) {
                    tracing::trace!(port, ?data, "port write with no device");
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !buses.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !buses.mmio.write(addr, data) {
                    tracing::trace!(addr, "MMIO write with no device");
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !buses.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            // With the in-kernel LAPIC, HLT is handled inside KVM; an exit here means nothing
            // can wake this vCPU in userspace terms, so just re-enter.
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::Shutdown) => Some(StopReason::TripleFault {
                vcpu: index,
                regs: self.register_dump(),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_RESET => Some(StopReason::Reset),
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(StopReason::PowerOff),
                other => Some(StopReason::UnexpectedExit {
                    vcpu: index,
                    exit: format!("KVM system event {other}"),
                    regs: self.register_dump(),
                }),
            },
            Ok(VcpuExit::InternalError) => {
                let suberror = self.internal_error_suberror();
                Some(StopReason::InternalError {
                    vcpu: index,
                    suberror,
                    regs: self.register_dump(),
                })
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Some(StopReason::FailEntry {
                vcpu: index,
                reason,
                regs: self.register_dump(),
            }),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(other) => {
                let exit = format!("{other:?}");
                Some(StopReason::UnexpectedExit {
                    vcpu: index,
                    exit,
                    regs: self.register_dump(),
                })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: the checkpoint decides what happens next.
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(StopReason::VcpuError {
                vcpu: index,
                message: format!("KVM_RUN: {e}"),
            }),
        }
    }
}

#[cfg(test)]
impl VcpuState {
    /// A vCPU about to run at 1 MiB with everything else at its defaults, for tests.
    pub(crate) fn sample() -> VcpuState {
        VcpuState {
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs {
                rip: 0x10_0000,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debug_regs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            tsc_khz: Some(2_000_000),
            cpuid: CpuId::new(0).expect("an empty CPUID list"),
            msrs: Vec::new(),
            events: kvm_vcpu_events::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_nice_defaults_parses_and_clamps() {
        assert_eq!(vcpu_nice(None), DEFAULT_VCPU_NICE);
        assert_eq!(vcpu_nice(Some("not a number")), DEFAULT_VCPU_NICE);
        assert_eq!(vcpu_nice(Some(" 3 ")), 3);
        assert_eq!(vcpu_nice(Some("0")), 0);
        assert_eq!(vcpu_nice(Some("-5")), 0);
        assert_eq!(vcpu_nice(Some("99")), 39);
    }

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn snapshot_msrs_keep_state_msrs_with_tsc_deadline_last() {
        let supported = [0x6e0, 0x10, 0x3a, 0xc000_0080, 0x4b56_4d01, 0x8b, 0x1a0];
        assert_eq!(
            serializable_msrs(&supported),
            vec![0x10, 0xc000_0080, 0x4b56_4d01, 0x1a0, 0x6e0]
        );
        assert_eq!(serializable_msrs(&[0x10, 0x1b]), vec![0x10, 0x1b]);
    }

    #[test]
    fn a_zero_tsc_deadline_is_saved_as_the_tsc() {
        let mut msrs = vec![msr(0x10, 1234), msr(0x6e0, 0)];
        arm_zero_tsc_deadline(&mut msrs);
        assert_eq!(msrs[1].data, 1234);
        let mut armed = vec![msr(0x10, 1234), msr(0x6e0, 99)];
        arm_zero_tsc_deadline(&mut armed);
        assert_eq!(armed[1].data, 99, "an armed deadline is kept");
    }

    #[test]
    fn vcpu_state_round_trips_through_json() {
        let entry = kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            eax: 0x806f8,
            ..Default::default()
        };
        let state = VcpuState {
            mp_state: kvm_mp_state { mp_state: 3 },
            cpuid: CpuId::from_entries(&[entry]).unwrap(),
            msrs: vec![msr(0x10, 5), msr(0x6e0, 6)],
            ..VcpuState::sample()
        };
        let json = serde_json::to_value(&state).unwrap();
        assert!(
            json["regs"].is_string() && json["msrs"].is_string(),
            "{json}"
        );
        let back: VcpuState = serde_json::from_value(json).unwrap();
        assert_eq!(back.regs.rip, 0x10_0000);
        assert_eq!(back.mp_state.mp_state, 3);
        assert_eq!(back.cpuid.as_slice(), state.cpuid.as_slice());
        assert_eq!(back.msrs, state.msrs);
        assert_eq!(back.tsc_khz, Some(2_000_000));
    }
}
