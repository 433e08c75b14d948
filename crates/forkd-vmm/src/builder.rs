//! Builds a ready-to-start [`Vmm`] from a [`VmConfig`]: validates the inputs first (so a bad
//! kernel or size leaves nothing behind), then creates the VM in the order KVM requires,
//! loads the kernel, writes the boot structures, configures the vCPUs and attaches the legacy
//! devices.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::{self, InitrdError, InitrdRegion, KernelError, LoadedKernel};
use crate::arch::x86_64::layout::{
    self, ACPI_PM_PORT_BASE, ACPI_PM_PORT_LEN, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_LEN,
    I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_GSI, SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use crate::arch::x86_64::{mptable, regs};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{AcpiPm, DebugExit, SerialDevice, SerialOutput, I8042};
use crate::memory::{GuestAddress, GuestMemory};
use crate::vmm::Vmm;
use crate::vstate::control::{ControlError, VmControl};
use crate::vstate::vcpu::{Buses, Vcpu, VcpuError};
use crate::vstate::vm::{open_kvm, Vm, VmError};
use crate::vstate::{kvm_err, KvmError};

/// Command line used when none is given: Firecracker's, keeping the UART as the console.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";
pub const DEFAULT_MEM_MIB: u32 = 128;
pub const MIN_MEM_MIB: u32 = 8;
pub const MAX_MEM_MIB: u32 = 256 * 1024;
pub const MAX_VCPUS: u32 = 64;

/// Where the kernel comes from.
#[derive(Debug, Clone)]
pub enum KernelSource {
    /// An ELF vmlinux or bzImage file.
    Path(PathBuf),
    /// An image compiled into forkd (`builtin:<name>`, see [`crate::guests`]).
    Builtin { name: String, image: &'static [u8] },
}

impl KernelSource {
    /// Parses `builtin:<name>` or a path.
    pub fn parse(spec: &str) -> Result<KernelSource, BuildError> {
        match spec.strip_prefix("builtin:") {
            Some(name) => crate::guests::by_name(name)
                .map(|image| KernelSource::Builtin {
                    name: name.to_string(),
                    image,
                })
                .ok_or_else(|| BuildError::UnknownBuiltin {
                    name: name.to_string(),
                }),
            None => Ok(KernelSource::Path(PathBuf::from(spec))),
        }
    }

    /// How error messages name this kernel.
    pub fn describe(&self) -> String {
        match self {
            KernelSource::Path(p) => p.display().to_string(),
            KernelSource::Builtin { name, .. } => format!("builtin:{name}"),
        }
    }

    /// What a snapshot records as its kernel: the path, or for a built-in guest its name and
    /// a digest of the image (`builtin:demo@1f2e3d4c5b6a`), so a snapshot of an older build of
    /// the guest can be told apart from one of this build.
    pub fn identity(&self) -> String {
        match self {
            KernelSource::Path(p) => p.display().to_string(),
            KernelSource::Builtin { name, image } => {
                let digest = forkd_store::hash::sha256_hex(image);
                format!("builtin:{name}@{}", &digest[..12])
            }
        }
    }

    fn read(&self) -> Result<std::borrow::Cow<'static, [u8]>, BuildError> {
        match self {
            KernelSource::Path(p) => {
                if p.is_dir() {
                    return Err(BuildError::KernelRead {
                        path: p.clone(),
                        message: "is a directory".into(),
                    });
                }
                std::fs::read(p)
                    .map(std::borrow::Cow::Owned)
                    .map_err(|e| BuildError::KernelRead {
                        path: p.clone(),
                        message: e.to_string(),
                    })
            }
            KernelSource::Builtin { image, .. } => Ok(std::borrow::Cow::Borrowed(image)),
        }
    }
}

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: KernelSource,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub cmdline: String,
    pub serial: SerialOutput,
    /// Register memory with KVM dirty-page logging (needed for diff snapshots).
    pub track_dirty_pages: bool,
    /// An initramfs (or initrd) loaded high in RAM for the kernel.
    pub initrd: Option<PathBuf>,
    /// Describe the machine with ACPI tables (and give it a VMGenID); on by default. Kernels
    /// with `virtio_mmio.device=` support can boot without them.
    pub acpi: bool,
}

impl VmConfig {
    pub fn new(kernel: KernelSource) -> VmConfig {
        VmConfig {
            kernel,
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: 1,
            cmdline: DEFAULT_CMDLINE.to_string(),
            serial: SerialOutput::Sink,
            track_dirty_pages: false,
            initrd: None,
            acpi: true,
        }
    }

    fn validate(&self) -> Result<(), BuildError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(BuildError::BadConfig(format!(
                "memory size {} MiB is outside {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB",
                self.mem_mib
            )));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(BuildError::BadConfig(format!(
                "vCPU count {} is outside 1..={MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.cmdline.len() >= layout::CMDLINE_MAX_SIZE {
            return Err(BuildError::BadConfig(format!(
                "command line is {} bytes, the limit is {}",
                self.cmdline.len(),
                layout::CMDLINE_MAX_SIZE - 1
            )));
        }
        Ok(())
    }
}

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid VM configuration: {0}")]
    BadConfig(String),
    #[error("cannot read kernel {}: {message}", path.display())]
    KernelRead { path: PathBuf, message: String },
    #[error("initrd {}: {message}", path.display())]
    Initrd { path: PathBuf, message: String },
    #[error("no built-in guest named {name:?} (available: {available})", available = crate::guests::names().join(", "))]
    UnknownBuiltin { name: String },
    #[error("kernel {kernel}")]
    Kernel {
        kernel: String,
        #[source]
        source: KernelError,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("guest memory of {mem_mib} MiB: {message}")]
    Memory { mem_mib: u32, message: String },
    #[error("boot structures: {0}")]
    Boot(String),
    #[error("serial output {target}: {message}")]
    SerialOutput { target: String, message: String },
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Lets this process give guests the AMX state component; KVM hides AMX from
/// KVM_GET_SUPPORTED_CPUID otherwise. Hosts without AMX refuse, which is fine.
fn request_amx_permission() {
    const ARCH_REQ_XCOMP_GUEST_PERM: libc::c_ulong = 0x1025;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;
    // SAFETY: arch_prctl with two integer arguments touches no memory of ours.
    let _ = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_GUEST_PERM,
            XFEATURE_XTILEDATA,
        )
    };
}

/// KVM_GET_SUPPORTED_CPUID, asked once per process: the answer depends only on the host and
/// KVM module, and the ioctl costs about as much as creating a VM.
pub fn supported_cpuid(kvm: &kvm_ioctls::Kvm) -> Result<&'static CpuId, KvmError> {
    static SUPPORTED: OnceLock<CpuId> = OnceLock::new();
    if let Some(c) = SUPPORTED.get() {
        return Ok(c);
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(SUPPORTED.get_or_init(|| cpuid))
}

fn guest_memory(mem_mib: u32) -> Result<GuestMemory, BuildError> {
    let size = u64::from(mem_mib) << 20;
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|e| BuildError::Memory {
        mem_mib,
        message: e.to_string(),
    })
}

fn write_boot_structures(mem: &GuestMemory, vcpus: u32) -> Result<(), BuildError> {
    let boot = |e: &dyn std::error::Error| BuildError::Boot(forkd_store::error_chain(e));
    regs::write_gdt_and_idt(mem).map_err(|e| boot(&e))?;
    regs::write_identity_page_tables(mem).map_err(|e| boot(&e))?;
    mptable::write(mem, vcpus).map_err(|e| boot(&e))?;
    Ok(())
}

/// What a VM shell needs besides its memory.
#[derive(Debug, Clone)]
pub struct ShellConfig {
    pub vcpus: u32,
    pub serial: SerialOutput,
    /// Register memory with KVM dirty-page logging (needed for diff snapshots).
    pub track_dirty_pages: bool,
}

pub(crate) fn open_serial(
    serial: &SerialOutput,
) -> Result<Box<dyn std::io::Write + Send>, BuildError> {
    serial.open().map_err(|e| BuildError::SerialOutput {
        target: match serial {
            SerialOutput::File(p) => p.display().to_string(),
            other => format!("{other:?}"),
        },
        message: e.to_string(),
    })
}

/// A VM with no identity yet: KVM_CREATE_VM, its memory (when given), TSS, irqchip, PIT2 and
/// the vCPUs, created in the order KVM requires. This is the expensive, identity-free part of
/// a VM, so a pool can create shells ahead of time; [`VmShell::finish_attached`] then adds
/// serial output and the legacy devices once memory is attached. A shell only works in the
/// process that created it (KVM ties a VM fd to its creator's mm).
pub struct VmShell {
    kvm: kvm_ioctls::Kvm,
    vm: Vm,
    vcpus: Vec<Vcpu>,
}

impl std::fmt::Debug for VmShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShell")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl VmShell {
    /// Creates the VM and `vcpus` vCPUs (never run, so CPUID can still be set).
    pub fn new(vcpus: u32) -> Result<VmShell, BuildError> {
        VmShell::create(vcpus, None)
    }

    /// [`VmShell::new`] with `memory` registered first (with KVM dirty logging when
    /// `track_dirty_pages`): cheaper than [`VmShell::attach_memory`] afterwards, which waits
    /// for a kernel grace period once the VM has an irqchip.
    pub fn with_memory(
        vcpus: u32,
        memory: GuestMemory,
        track_dirty_pages: bool,
    ) -> Result<VmShell, BuildError> {
        VmShell::create(vcpus, Some((memory, track_dirty_pages)))
    }

    fn create(vcpus: u32, memory: Option<(GuestMemory, bool)>) -> Result<VmShell, BuildError> {
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(BuildError::BadConfig(format!(
                "vCPU count {vcpus} is outside 1..={MAX_VCPUS}"
            )));
        }
        request_amx_permission();
        let kvm = open_kvm()?;
        let vm = Vm::with_memory(&kvm, memory)?;
        let vcpus = (0..vcpus)
            .map(|i| Vcpu::new(&vm, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmShell { kvm, vm, vcpus })
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpus.len() as u32
    }

    pub fn kvm(&self) -> &kvm_ioctls::Kvm {
        &self.kvm
    }

    /// KVM_GET_TSC_KHZ of vCPU `index`.
    pub fn vcpu_tsc_khz(&self, index: usize) -> Option<u32> {
        self.vcpus.get(index)?.fd().get_tsc_khz().ok()
    }

    /// Makes every vCPU's TSC run at `khz` when this host's differs by more than 250 ppm
    /// (a restored guest calibrated its clock against the old rate). On failure returns this
    /// host's rate and KVM's error.
    pub fn match_tsc_khz(&self, khz: u32) -> Result<(), (u32, kvm_ioctls::Error)> {
        let Some(here) = self.vcpu_tsc_khz(0) else {
            return Ok(());
        };
        if u64::from(here).abs_diff(u64::from(khz)) * 1_000_000 <= u64::from(khz) * 250 {
            return Ok(());
        }
        for vcpu in &self.vcpus {
            vcpu.fd().set_tsc_khz(khz).map_err(|e| (here, e))?;
        }
        Ok(())
    }

    /// Registers `memory` as the VM's slots (with KVM dirty logging when `track_dirty_pages`).
    ///
    /// Identity-free, so a pool can do it ahead of the fork path: registering a slot in a VM
    /// that already has an irqchip and vCPUs waits for a kernel grace period (milliseconds).
    pub fn attach_memory(
        &mut self,
        memory: GuestMemory,
        track_dirty_pages: bool,
    ) -> Result<(), BuildError> {
        Ok(self.vm.set_memory(memory, track_dirty_pages)?)
    }

    /// Whether [`VmShell::attach_memory`] has run.
    pub fn has_memory(&self) -> bool {
        self.vm.has_memory()
    }

    /// Attaches the legacy devices (serial on GSI 4 writing to `serial`, i8042, the ACPI
    /// power-management registers, debug exit) to a shell whose memory is attached, giving a
    /// [`Vmm`] ready for state restore or boot, then [`Vmm::start`]. Booted and restored VMs
    /// both come through here, so every child has the same legacy devices as a fresh boot
    /// (none of them but the serial port has state a snapshot records).
    pub fn finish_attached(self, serial: &SerialOutput) -> Result<Vmm, BuildError> {
        let serial_out = open_serial(serial)?;
        let VmShell { kvm, vm, vcpus, .. } = self;
        let control = Arc::new(VmControl::new(vcpus.len())?);
        let buses = Buses {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
        };
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&serial_irq, SERIAL_GSI)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out)));
        buses
            .pio
            .insert(SERIAL_PORT_BASE, SERIAL_PORT_LEN, serial.clone())?;
        buses.pio.insert(
            I8042_PORT_BASE,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(control.clone()))),
        )?;
        buses.pio.insert(
            ACPI_PM_PORT_BASE,
            ACPI_PM_PORT_LEN,
            Arc::new(Mutex::new(AcpiPm::new(control.clone()))),
        )?;
        buses.pio.insert(
            DEBUG_EXIT_PORT,
            DEBUG_EXIT_PORT_LEN,
            Arc::new(Mutex::new(DebugExit::new(control.clone()))),
        )?;
        Ok(Vmm::new(kvm, Arc::new(vm), vcpus, control, buses, serial))
    }
}

/// Creates a VM with no guest state yet ([`VmShell::with_memory`] then
/// [`VmShell::finish_attached`]). [`build`]
/// boots a kernel on top of it; a restore writes saved vCPU and VM state into it instead (see
/// [`Vmm::vcpus`], [`Vmm::vm`]) before [`Vmm::start`].
pub fn build_shell(shell: &ShellConfig, memory: GuestMemory) -> Result<Vmm, BuildError> {
    // Open the serial output first so a bad path fails before any KVM object exists.
    drop(open_serial(&shell.serial)?);
    VmShell::with_memory(shell.vcpus, memory, shell.track_dirty_pages)?
        .finish_attached(&shell.serial)
}

/// An initrd file opened and sized, not yet read.
struct InitrdFile {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
}

fn initrd_err(path: &std::path::Path, message: impl ToString) -> BuildError {
    BuildError::Initrd {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn open_initrd(path: &std::path::Path) -> Result<InitrdFile, BuildError> {
    let file = std::fs::File::open(path).map_err(|e| initrd_err(path, e))?;
    let meta = file.metadata().map_err(|e| initrd_err(path, e))?;
    if !meta.is_file() {
        return Err(initrd_err(path, "not a regular file"));
    }
    Ok(InitrdFile {
        path: path.to_path_buf(),
        file,
        size: meta.len(),
    })
}

/// Places `initrd` above `kernel` and copies it into guest memory.
fn load_initrd(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &LoadedKernel,
    mut initrd: InitrdFile,
) -> Result<InitrdRegion, BuildError> {
    let region = boot::place_initrd(
        mem_size,
        kernel.footprint_end(),
        kernel.initrd_addr_max(),
        initrd.size,
    )
    .map_err(|e: InitrdError| initrd_err(&initrd.path, e))?;
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(
        GuestAddress(region.addr),
        &mut initrd.file,
        region.size as usize,
    )
    .map_err(|e| initrd_err(&initrd.path, format!("reading it into guest memory: {e}")))?;
    Ok(region)
}

/// Builds the VM described by `config` and prepares it to boot its kernel, ready for
/// [`Vmm::start`]. Inputs are checked, and the kernel, initrd and boot structures written into
/// guest memory, before any KVM object exists.
pub fn build(config: &VmConfig) -> Result<Vmm, BuildError> {
    config.validate()?;
    let image = config.kernel.read()?;
    let initrd = config.initrd.as_deref().map(open_initrd).transpose()?;
    let kernel_name = config.kernel.describe();
    let memory = guest_memory(config.mem_mib)?;
    let mem_size = u64::from(config.mem_mib) << 20;

    let kernel: LoadedKernel =
        boot::load_kernel(&memory, &image).map_err(|source| BuildError::Kernel {
            kernel: kernel_name.clone(),
            source,
        })?;
    tracing::debug!(kernel = %kernel_name, format = ?kernel.format, entry = format_args!("{:#x}", kernel.entry), "kernel loaded");
    let initrd = initrd
        .map(|f| load_initrd(&memory, mem_size, &kernel, f))
        .transpose()?;
    if let Some(r) = initrd {
        tracing::debug!(
            addr = format_args!("{:#x}", r.addr),
            size = r.size,
            "initrd loaded"
        );
    }
    write_boot_structures(&memory, config.vcpus)?;

    let shell = ShellConfig {
        vcpus: config.vcpus,
        serial: config.serial.clone(),
        track_dirty_pages: config.track_dirty_pages,
    };
    let mut vmm = build_shell(&shell, memory)?;
    let supported = supported_cpuid(vmm.kvm())?;
    for vcpu in vmm.vcpus() {
        let entry = (vcpu.index() == 0).then_some(kernel.entry);
        vcpu.configure_boot(supported, config.vcpus, entry)?;
    }
    vmm.set_boot(kernel, config.cmdline.clone(), initrd, config.acpi);
    Ok(vmm)
}
