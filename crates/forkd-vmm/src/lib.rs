//! Virtual machine monitor: boots, runs, pauses, snapshots and restores KVM guests.
//!
//! Layout (modelled on Firecracker's `src/vmm`):
//! - [`arch::x86_64`]: memory layout and boot structures (GDT, page tables, zero page, e820,
//!   MP table, CPUID, boot registers).
//! - [`vstate`]: the KVM VM and vCPUs, run control (pause/resume/stop) and vCPU state.
//! - [`devices`]: the bus and device models (legacy serial, i8042, debug exit; virtio).
//! - [`builder`]: turns a [`VmConfig`] into a ready [`Vmm`].
//! - [`vmm`]: the running VM's handle.
//! - [`guests`]: guest images compiled into the library (the demo and the test guests).

pub mod arch;
pub mod builder;
pub mod devices;
pub mod guests;
pub mod host;
pub mod memory;
pub mod snapshot;
pub mod vmm;
pub mod vstate;

pub use builder::{build, BuildError, KernelSource, VmConfig};
pub use devices::legacy::{SerialOutput, SharedBuffer};
pub use vmm::{MmioSlot, Vmm, VmmError};
pub use vstate::control::StopReason;
