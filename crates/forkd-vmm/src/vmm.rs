//! The running VM's handle: start, pause, resume, stop, wait, and the hooks device models use
//! (MMIO slots, bus registration, ioeventfd, irqfd).

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiError, AcpiLayout, VirtioMmioSlot, VmGenIdConfig};
use crate::arch::x86_64::boot::{self, InitrdRegion, LoadedKernel};
use crate::arch::x86_64::layout::{
    VIRTIO_FIRST_GSI, VIRTIO_MMIO_MAX_SLOTS, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START, VMGENID_GSI,
};
use crate::devices::bus::{Bus, BusError, SharedDevice};
use crate::devices::legacy::SerialDevice;
use crate::memory::{GuestMemory, GuestMemoryRegion};
use crate::vmgenid::{self, VmGenId, VmGenIdError};
use crate::vstate::control::{ControlError, StopReason, VmControl};
use crate::vstate::vcpu::{Buses, Vcpu};
use crate::vstate::vm::Vm;
use crate::vstate::KvmError;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// A 4 KiB virtio-mmio register window in the 32-bit hole and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// Errors from the VMM handle.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("all {VIRTIO_MMIO_MAX_SLOTS} virtio-mmio slots are taken")]
    NoMmioSlot,
    #[error("the VM has already been started")]
    AlreadyStarted,
    #[error("the VM has not been started")]
    NotStarted,
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing the zero page: {0}")]
    ZeroPage(String),
    #[error("ACPI tables")]
    Acpi(#[from] AcpiError),
    #[error("writing the ACPI tables into guest memory at {addr:#x}: {message}")]
    AcpiWrite { addr: u64, message: String },
    #[error(transparent)]
    VmGenId(#[from] VmGenIdError),
    #[error("spawning vCPU thread {index}")]
    Spawn { index: u32, source: std::io::Error },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
}

/// A built VM. Devices can be added until [`Vmm::start`]; after that the vCPUs run on their
/// own threads until the guest stops or [`Vmm::request_stop`] is called. Dropping a Vmm stops
/// it and joins its threads.
pub struct Vmm {
    kvm: Kvm,
    vm: Arc<Vm>,
    vcpus: Vec<Vcpu>,
    vcpu_count: u32,
    control: Arc<VmControl>,
    buses: Buses,
    serial: Arc<Mutex<SerialDevice>>,
    cmdline: String,
    /// The kernel to boot; None for a shell whose state is restored instead.
    kernel: Option<LoadedKernel>,
    /// The initrd already copied into guest memory, for the zero page.
    initrd: Option<InitrdRegion>,
    /// Whether [`Vmm::start`] writes ACPI tables (and a VMGenID) for the kernel.
    acpi: bool,
    /// The VM's VMGenID, once the boot wrote it or a restore refreshed it.
    vmgenid: Option<VmGenIdConfig>,
    mem_size: u64,
    /// Every virtio-mmio slot handed out, in order (the DSDT lists them).
    mmio_slots: Vec<MmioSlot>,
    threads: Vec<JoinHandle<()>>,
    started: bool,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpu_count)
            .field("mem_size", &self.mem_size)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    pub(crate) fn new(
        kvm: Kvm,
        vm: Arc<Vm>,
        vcpus: Vec<Vcpu>,
        control: Arc<VmControl>,
        buses: Buses,
        serial: Arc<Mutex<SerialDevice>>,
    ) -> Vmm {
        let vcpu_count = vcpus.len() as u32;
        let mem_size = vm.memory().iter().map(|r| r.len()).sum();
        Vmm {
            kvm,
            vm,
            vcpus,
            vcpu_count,
            control,
            buses,
            serial,
            cmdline: String::new(),
            kernel: None,
            initrd: None,
            acpi: false,
            vmgenid: None,
            mem_size,
            mmio_slots: Vec::new(),
            threads: Vec::new(),
            started: false,
        }
    }

    /// Makes [`Vmm::start`] write `cmdline`, the zero page and (with `acpi`) the ACPI tables
    /// for `kernel` (already loaded, as is `initrd`).
    pub(crate) fn set_boot(
        &mut self,
        kernel: LoadedKernel,
        cmdline: String,
        initrd: Option<InitrdRegion>,
        acpi: bool,
    ) {
        self.kernel = Some(kernel);
        self.cmdline = cmdline;
        self.initrd = initrd;
        self.acpi = acpi;
    }

    /// Every virtio-mmio slot allocated so far, in allocation order.
    pub fn mmio_slots(&self) -> &[MmioSlot] {
        &self.mmio_slots
    }

    /// Where the VM's VMGenID lives and its event line (None: no ACPI, or not started yet, or
    /// restored from a snapshot that had none).
    pub fn vmgenid_config(&self) -> Option<VmGenIdConfig> {
        self.vmgenid
    }

    /// The VMGenID id the guest currently sees, read from guest memory.
    pub fn vmgenid(&self) -> Option<VmGenId> {
        vmgenid::read(self.memory(), self.vmgenid?).ok()
    }

    /// Gives a restored VM (state written, vCPUs not started) a fresh VMGenID and raises its
    /// event line; see [`vmgenid::refresh`]. Returns the new id.
    pub fn refresh_vmgenid(&mut self, cfg: VmGenIdConfig) -> Result<VmGenId, VmmError> {
        let id = vmgenid::refresh(self.vm.memory(), cfg, &self.vm)?;
        self.vmgenid = Some(cfg);
        Ok(id)
    }

    /// Builds the ACPI tables for this VM as it is now (vCPUs, every virtio slot, VMGenID),
    /// writes them and a fresh VMGenID id into guest memory, and returns the RSDP address.
    fn write_acpi(&mut self) -> Result<u64, VmmError> {
        let vmgenid = VmGenIdConfig {
            addr: acpi::DEFAULT_VMGENID_ADDR,
            gsi: VMGENID_GSI,
        };
        let layout = AcpiLayout {
            virtio_mmio: self
                .mmio_slots
                .iter()
                .map(|s| VirtioMmioSlot {
                    base: s.base,
                    gsi: s.gsi,
                })
                .collect(),
            vmgenid: Some(vmgenid),
            ..AcpiLayout::new(self.vcpu_count)
        };
        let tables = acpi::build_tables(&layout)?;
        let mem = self.vm.memory();
        for piece in &tables.pieces {
            mem.write_slice(&piece.bytes, GuestAddress(piece.addr))
                .map_err(|e| VmmError::AcpiWrite {
                    addr: piece.addr,
                    message: e.to_string(),
                })?;
        }
        vmgenid::write(mem, vmgenid, &acpi::generate_vmgenid()?)?;
        self.vmgenid = Some(vmgenid);
        Ok(tables.rsdp_addr)
    }

    /// The vCPUs, before [`Vmm::start`] (for restoring state into them); empty once started:
    /// each vCPU then lives on its own thread, reachable through [`Vmm::run_on_vcpu`].
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// The /dev/kvm handle (capabilities, supported CPUID, MSR index list).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM: its fd, guest memory, ioeventfd/irqfd registration.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    pub fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.buses.pio
    }

    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.buses.mmio
    }

    /// The serial port (for host input and snapshots of its registers).
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// The kernel command line the guest will get.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Appends `arg` to the command line; only before [`Vmm::start`].
    pub fn append_cmdline(&mut self, arg: &str) -> Result<(), VmmError> {
        if self.started {
            return Err(VmmError::AlreadyStarted);
        }
        if !self.cmdline.is_empty() {
            self.cmdline.push(' ');
        }
        self.cmdline.push_str(arg);
        Ok(())
    }

    /// Reserves the next virtio-mmio window (4 KiB from 0xd0000000 up) and its GSI (5 up),
    /// and announces it on the command line as `virtio_mmio.device=4K@<base>:<gsi>` for
    /// kernels with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES. Test guests probe the windows in order.
    pub fn allocate_mmio_slot(&mut self) -> Result<MmioSlot, VmmError> {
        if self.started {
            return Err(VmmError::AlreadyStarted);
        }
        let n = self.mmio_slots.len() as u32;
        if n >= VIRTIO_MMIO_MAX_SLOTS {
            return Err(VmmError::NoMmioSlot);
        }
        let slot = MmioSlot {
            base: VIRTIO_MMIO_START + u64::from(n) * VIRTIO_MMIO_SLOT_SIZE,
            len: VIRTIO_MMIO_SLOT_SIZE,
            gsi: VIRTIO_FIRST_GSI + n,
        };
        self.append_cmdline(&format!(
            "virtio_mmio.device=4K@{:#x}:{}",
            slot.base, slot.gsi
        ))?;
        self.mmio_slots.push(slot);
        Ok(slot)
    }

    /// Attaches an MMIO device to `[base, base + len)`.
    pub fn add_mmio_device(
        &self,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), VmmError> {
        Ok(self.buses.mmio.insert(base, len, device)?)
    }

    /// Attaches a port-I/O device to `[base, base + len)`.
    pub fn add_pio_device(
        &self,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), VmmError> {
        Ok(self.buses.pio.insert(base, len, device)?)
    }

    /// Signals `evt` inside KVM when the guest writes `datamatch` to MMIO `addr`.
    pub fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmmError> {
        Ok(self.vm.register_ioevent(evt, addr, datamatch)?)
    }

    /// Raises `gsi` whenever `evt` is written.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmmError> {
        Ok(self.vm.register_irqfd(evt, gsi)?)
    }

    /// For a kernel boot, writes the command line, the ACPI tables (built here because the
    /// virtio slots are only known now) with a fresh VMGenID, and the zero page; then starts
    /// one thread per vCPU.
    pub fn start(&mut self) -> Result<(), VmmError> {
        if self.started {
            return Err(VmmError::AlreadyStarted);
        }
        if let Some(kernel) = self.kernel {
            let len = boot::write_cmdline(self.vm.memory(), &self.cmdline)
                .map_err(|e| VmmError::Cmdline(e.to_string()))?;
            let rsdp = if self.acpi {
                Some(self.write_acpi()?)
            } else {
                None
            };
            let mut params = boot::build_boot_params(self.mem_size, len, kernel.setup_header, rsdp);
            if let Some(initrd) = self.initrd {
                boot::set_initrd(&mut params, initrd);
            }
            boot::write_boot_params(self.vm.memory(), &params)
                .map_err(|e| VmmError::ZeroPage(e.to_string()))?;
        }

        self.control.expect_vcpus(self.vcpus.len());
        self.started = true;
        for vcpu in self.vcpus.drain(..) {
            let index = vcpu.index();
            let control = self.control.clone();
            let buses = self.buses.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu.run_loop(control, buses));
            match spawned {
                Ok(handle) => self.threads.push(handle),
                Err(source) => {
                    // Threads already running are stopped and joined by Drop.
                    self.control.set_threads(&self.threads);
                    self.control.request_stop(StopReason::VcpuError {
                        vcpu: index,
                        message: format!("thread spawn failed: {source}"),
                    });
                    return Err(VmmError::Spawn { index, source });
                }
            }
        }
        self.control.set_threads(&self.threads);
        Ok(())
    }

    /// Like [`Vmm::start`], but every vCPU thread parks before its first KVM_RUN until
    /// [`Vmm::resume`]: a pool spawns the threads ahead of time, and a child's start is then a
    /// wake-up, not a thread creation.
    pub fn start_paused(&mut self) -> Result<(), VmmError> {
        if self.started {
            return Err(VmmError::AlreadyStarted);
        }
        self.control.hold_at_start();
        self.start()
    }

    /// Pauses all vCPUs; returns once every one has acknowledged.
    pub fn pause(&self) -> Result<(), VmmError> {
        if !self.started {
            return Err(VmmError::NotStarted);
        }
        Ok(self.control.pause()?)
    }

    pub fn resume(&self) -> Result<(), VmmError> {
        Ok(self.control.resume()?)
    }

    /// Runs `job` on vCPU `index`'s thread (which owns its fd) while the VM is paused.
    pub fn run_on_vcpu<R: Send + 'static>(
        &self,
        index: u32,
        job: impl FnOnce(&mut Vcpu) -> R + Send + 'static,
    ) -> Result<R, VmmError> {
        Ok(self.control.run_on_vcpu(index, job)?)
    }

    /// Asks the VM to stop; [`Vmm::wait`] then returns [`StopReason::Requested`] (unless the
    /// guest stopped first).
    pub fn request_stop(&self) {
        self.control.request_stop(StopReason::Requested);
    }

    /// Why the VM stopped, if it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.control.stop_reason()
    }

    /// Waits until every vCPU thread has ended and returns why the VM stopped.
    pub fn wait(&mut self) -> Result<StopReason, VmmError> {
        if !self.started {
            return Err(VmmError::NotStarted);
        }
        let reason = self.control.wait_stopped();
        self.join_threads();
        Ok(reason)
    }

    /// Like [`Vmm::wait`] but gives up after `timeout` (None: still running).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<StopReason>, VmmError> {
        if !self.started {
            return Err(VmmError::NotStarted);
        }
        let reason = self.control.wait_stopped_timeout(timeout);
        if reason.is_some() {
            self.join_threads();
        }
        Ok(reason)
    }

    fn join_threads(&mut self) {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }

    /// Feeds host bytes (e.g. stdin) to the guest's serial port from a background thread.
    /// The thread ends at end of input or once the VM has stopped.
    pub fn spawn_serial_input(&self, mut input: Box<dyn Read + Send>) -> std::io::Result<()> {
        let serial = self.serial.clone();
        let control = self.control.clone();
        std::thread::Builder::new()
            .name("serial-input".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    let n = match input.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let mut pending = &buf[..n];
                    while !pending.is_empty() {
                        if control.stop_reason().is_some() {
                            return;
                        }
                        let taken = serial
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .enqueue_input(pending);
                        pending = &pending[taken..];
                        if taken == 0 {
                            // The guest has not drained its receive FIFO yet.
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            })
            .map(|_| ())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.control.request_stop(StopReason::Requested);
            self.join_threads();
        }
    }
}
