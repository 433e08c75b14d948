//! Virtual machine monitor: boots, runs, pauses, snapshots and restores KVM guests.
//!
//! Layout (modelled on Firecracker's `src/vmm`):
//! - [`arch::x86_64`]: memory layout and boot structures (GDT, page tables, zero page, e820,
//!   MP table, CPUID, boot registers).
//! - [`vstate`]: the KVM VM and vCPUs, run control (pause/resume/stop) and vCPU state.
//! - [`devices`]: the bus and device models (legacy serial, i8042, ACPI power management,
//!   debug exit; virtio).
//! - [`builder`]: turns a [`VmConfig`] into a ready [`Vmm`].
//! - [`vmm`]: the running VM's handle.
//! - [`guests`]: guest images compiled into the library (the demo and the test guests).
//! - [`acpi`]: the ACPI tables (pure), written by [`Vmm::start`]; [`vmgenid`]: the VMGenID id
//!   a boot writes and every restore refreshes.
//!
//! # Booting a guest
//!
//! ```no_run
//! use forkd_vmm::{build, KernelSource, SerialOutput, VmConfig};
//! let mut config = VmConfig::new(KernelSource::parse("builtin:hello")?);
//! config.serial = SerialOutput::Stdout;
//! let mut vmm = build(&config)?; // VM created, kernel loaded, vCPUs configured
//! vmm.start()?; // command line, ACPI tables + VMGenID, zero page written; one thread per vCPU
//! let reason = vmm.wait()?; // StopReason::GuestExit(0), PowerOff, Reset, Requested, ...
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Adding a virtio-mmio device (between `build` and `start`)
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use forkd_vmm::devices::BusDevice;
//! # use vmm_sys_util::eventfd::EventFd;
//! # struct Transport;
//! # impl BusDevice for Transport { fn read(&mut self, _: u64, _: &mut [u8]) {} fn write(&mut self, _: u64, _: &[u8]) {} }
//! # let mut vmm = forkd_vmm::build(&forkd_vmm::VmConfig::new(forkd_vmm::KernelSource::parse("builtin:hello")?))?;
//! let slot = vmm.allocate_mmio_slot()?; // 4 KiB window from 0xd0000000 up, GSI from 5 up
//! let irq = EventFd::new(libc::EFD_NONBLOCK)?;
//! vmm.register_irqfd(&irq, slot.gsi)?; // writing `irq` raises the device interrupt
//! let queue0 = EventFd::new(libc::EFD_NONBLOCK)?;
//! vmm.register_ioevent(&queue0, slot.base + 0x50, 0)?; // QueueNotify == 0 signals `queue0`
//! let memory = vmm.memory().clone(); // what the device reads descriptors from
//! vmm.add_mmio_device(slot.base, slot.len, Arc::new(Mutex::new(Transport)))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Pausing and reading state (snapshots)
//!
//! [`Vmm::pause`] returns once every vCPU has acknowledged; then [`Vmm::run_on_vcpu`] runs a
//! closure on a vCPU's own thread ([`vstate::vcpu::Vcpu::save_state`] /
//! [`restore_state`](vstate::vcpu::Vcpu::restore_state)), [`vstate::vm::Vm::save_state`]
//! reads PIT, clock and irqchips, and [`Vmm::resume`] continues. A restore builds a VM with
//! [`builder::build_shell`] from a memory mapping, writes the saved state into
//! [`Vmm::vcpus`] and [`Vmm::vm`], and starts it.

pub mod acpi;
pub mod arch;
pub mod builder;
pub mod devices;
pub mod guests;
pub mod host;
pub mod memory;
pub mod snapshot;
pub mod thread_jail;
pub mod vmgenid;
pub mod vmm;
pub mod vstate;

pub use builder::{build, BuildError, KernelSource, VmConfig, VmShell};
pub use devices::legacy::{SerialOutput, SharedBuffer};
pub use vmm::{MmioSlot, Vmm, VmmError};
pub use vstate::control::{RegisterDump, StopReason};
