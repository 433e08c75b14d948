//! Facts about the host's KVM: which flavour it is and which capabilities it has.
//!
//! Used by `forkd doctor`, by error messages for KVM internal errors, and by snapshots (a
//! restore is refused when these differ in ways that matter).

use std::path::Path;
use std::sync::OnceLock;

use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};

pub const KVM_DEVICE: &str = "/dev/kvm";

/// /proc/cpuinfo as this process first read it ("" when unreadable).
pub fn cpuinfo() -> &'static str {
    static CPUINFO: OnceLock<String> = OnceLock::new();
    CPUINFO.get_or_init(|| std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

/// Reads now what host facts need from /proc and /sys: a sandbox's jailed process has
/// neither in its view, yet records the host's facts in the snapshots it takes of itself.
pub fn cache_host_files() {
    let _ = cpuinfo();
    let _ = KvmFlavour::detect();
}

/// How this host's /dev/kvm virtualizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmFlavour {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
    /// PVM: software virtualization; guests that are not PVM-aware run under KVM's instruction
    /// emulator and stock Linux cannot boot.
    Pvm,
    /// /dev/kvm exists but neither hardware extension nor PVM was recognised.
    Unknown,
}

impl KvmFlavour {
    /// This host's flavour, detected once per process (see [`cache_host_files`]).
    pub fn detect() -> KvmFlavour {
        static FLAVOUR: OnceLock<KvmFlavour> = OnceLock::new();
        *FLAVOUR.get_or_init(KvmFlavour::detect_now)
    }

    fn detect_now() -> KvmFlavour {
        if Path::new("/sys/module/kvm_pvm").exists() {
            return KvmFlavour::Pvm;
        }
        let flags = cpuinfo()
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or("");
        let has = |f: &str| flags.split_whitespace().any(|w| w == f);
        if has("vmx") {
            KvmFlavour::Vmx
        } else if has("svm") {
            KvmFlavour::Svm
        } else {
            KvmFlavour::Unknown
        }
    }

    pub fn is_hardware(self) -> bool {
        matches!(self, KvmFlavour::Vmx | KvmFlavour::Svm)
    }

    pub fn describe(self) -> &'static str {
        match self {
            KvmFlavour::Vmx => "hardware virtualization (Intel VT-x)",
            KvmFlavour::Svm => "hardware virtualization (AMD-V)",
            KvmFlavour::Pvm => "PVM (software virtualization, /sys/module/kvm_pvm)",
            KvmFlavour::Unknown => "unknown (no vmx/svm CPU flag and no kvm_pvm module)",
        }
    }
}

/// What a PVM host means for guests; shown by `forkd doctor` and with KVM internal errors.
pub const PVM_EXPLANATION: &str = "guests that are not PVM-aware run through KVM's instruction \
emulator (~3M instructions/s) and some instructions (int3, cmpxchg16b, xrstor) stop them with a \
KVM internal error, so a stock Linux kernel cannot boot here; forkd's demo and test guests, \
snapshots and forks work; Linux guests need a host with VT-x/AMD-V or a PVM-enabled guest kernel";

/// The KVM capabilities forkd relies on, with the name `forkd doctor` shows for each.
pub const REQUIRED_CAPS: &[(&str, Cap)] = &[
    ("irqchip", Cap::Irqchip),
    ("pit2", Cap::Pit2),
    ("irqfd", Cap::Irqfd),
    ("ioeventfd", Cap::Ioeventfd),
    ("user-memory", Cap::UserMemory),
    ("vcpu-events", Cap::VcpuEvents),
    ("xsave", Cap::Xsave),
    ("xcrs", Cap::Xcrs),
    ("debug-regs", Cap::Debugregs),
    ("mp-state", Cap::MpState),
    ("tsc-khz", Cap::GetTscKhz),
    ("immediate-exit", Cap::ImmediateExit),
    ("adjust-clock", Cap::AdjustClock),
    ("set-tss-addr", Cap::SetTssAddr),
];

/// Names of the required capabilities this KVM lacks.
pub fn missing_caps(kvm: &Kvm) -> Vec<&'static str> {
    REQUIRED_CAPS
        .iter()
        .filter(|(_, cap)| !kvm.check_extension(*cap))
        .map(|(name, _)| *name)
        .collect()
}

/// Why the dirty-log probe failed: the step and its cause.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogProbeError {
    #[error("KVM_CREATE_VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("mmap")]
    Map(#[source] std::io::Error),
    #[error("KVM_SET_USER_MEMORY_REGION with dirty logging")]
    SetRegion(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG")]
    GetDirtyLog(#[source] kvm_ioctls::Error),
}

/// Checks dirty-page logging end to end: a VM with one logged 2 MiB slot answers
/// KVM_GET_DIRTY_LOG. (Plain dirty logging has no capability bit of its own.)
pub fn probe_dirty_log(kvm: &Kvm) -> Result<(), DirtyLogProbeError> {
    const SLOT_SIZE: usize = 2 << 20;
    let vm = kvm.create_vm().map_err(DirtyLogProbeError::CreateVm)?;
    // SAFETY: an anonymous private mapping we own for the lifetime of the VM below.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SLOT_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(DirtyLogProbeError::Map(std::io::Error::last_os_error()));
    }
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: SLOT_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the region points at the live mapping above, unmapped only after the VM is gone.
    let result = unsafe { vm.set_user_memory_region(region) }
        .map_err(DirtyLogProbeError::SetRegion)
        .and_then(|_| {
            vm.get_dirty_log(0, SLOT_SIZE)
                .map_err(DirtyLogProbeError::GetDirtyLog)
        })
        .map(|_| ());
    drop(vm);
    // SAFETY: unmapping the mapping created above; the VM using it has been dropped.
    unsafe { libc::munmap(host, SLOT_SIZE) };
    result
}
