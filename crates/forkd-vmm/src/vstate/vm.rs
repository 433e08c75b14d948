//! The KVM VM: created in the order KVM requires, with guest memory registered as slots and
//! the hooks devices use to get notifications (ioeventfd) and raise interrupts (irqfd).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use super::{kvm_err, KvmError};
use crate::arch::x86_64::layout::KVM_TSS_ADDR;
use crate::host;
use crate::memory::{GuestMemory, GuestMemoryRegion};
use crate::snapshot::blob;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {dev} (is KVM available and are you in the kvm group?)", dev = host::KVM_DEVICE)]
    OpenKvm { source: kvm_ioctls::Error },
    #[error("this KVM lacks required capabilities: {}", .0.join(", "))]
    MissingCaps(Vec<&'static str>),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("guest memory is already registered with this VM")]
    MemoryAlreadySet,
    #[error("dirty-page tracking is off for this VM (build it with track_dirty_pages)")]
    DirtyTrackingOff,
}

/// VM-wide KVM state a snapshot carries: the PIT, the clock and the three irqchips, as
/// vmstate.json holds it (KVM's structs as base64 blobs of their bytes, see [`blob`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct VmState {
    #[serde(with = "blob::kvm")]
    pub pit: kvm_pit_state2,
    /// Flags cleared: only the clock value travels.
    #[serde(with = "blob::kvm")]
    pub clock: kvm_clock_data,
    #[serde(with = "blob::kvm")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "blob::kvm")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "blob::kvm")]
    pub ioapic: kvm_irqchip,
}

/// A KVM virtual machine with its guest memory.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    memory: Option<GuestMemory>,
    dirty_tracking: bool,
}

/// Opens /dev/kvm and checks it has every capability forkd relies on.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|source| VmError::OpenKvm { source })?;
    let missing = host::missing_caps(&kvm);
    if !missing.is_empty() {
        return Err(VmError::MissingCaps(missing));
    }
    Ok(kvm)
}

impl Vm {
    /// KVM_CREATE_VM, then TSS, in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT2: all of them
    /// must exist before the first vCPU is created.
    pub fn new(kvm: &Kvm) -> Result<Vm, VmError> {
        Vm::with_memory(kvm, None)
    }

    /// Like [`Vm::new`], with `memory` registered right after KVM_CREATE_VM (with dirty logging
    /// when its flag is set). Registering a slot once the VM has an irqchip waits for a kernel
    /// grace period (~5-7 ms on this host); before, it is as cheap as in a bare VM.
    pub fn with_memory(kvm: &Kvm, memory: Option<(GuestMemory, bool)>) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mut vm = Vm {
            fd,
            memory: None,
            dirty_tracking: false,
        };
        if let Some((memory, track_dirty)) = memory {
            vm.set_memory(memory, track_dirty)?;
        }
        vm.create_chips()?;
        Ok(vm)
    }

    /// TSS, irqchip and PIT2: everything KVM wants before the first vCPU.
    fn create_chips(&self) -> Result<(), VmError> {
        let fd = &self.fd;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(())
    }

    /// Registers every region of `memory` as a KVM memory slot (slot n = region n), with
    /// dirty-page logging when `track_dirty` is set (diff snapshots read it back).
    pub fn set_memory(&mut self, memory: GuestMemory, track_dirty: bool) -> Result<(), VmError> {
        if self.memory.is_some() {
            return Err(VmError::MemoryAlreadySet);
        }
        for (slot, region) in memory.iter().enumerate() {
            let kvm_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if track_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: `userspace_addr..+memory_size` is a live mapping owned by `memory`, which
            // this Vm keeps (self.memory) for as long as the VM fd, and so the slot, exists.
            // GuestMemory refuses overlapping regions, so the slots do not overlap either.
            unsafe { self.fd.set_user_memory_region(kvm_region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        self.memory = Some(memory);
        self.dirty_tracking = track_dirty;
        Ok(())
    }

    fn get_irqchip(&self, chip_id: u32) -> Result<kvm_irqchip, KvmError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }

    /// Reads the VM-wide state. Pause every vCPU first.
    pub fn save_state(&self) -> Result<VmState, KvmError> {
        let pit = self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
        let mut clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        // KVM_SET_CLOCK rejects flags it did not ask for; only the clock value travels.
        clock.flags = 0;
        Ok(VmState {
            pit,
            clock,
            pic_master: self.get_irqchip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.get_irqchip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.get_irqchip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Writes state read by [`Vm::save_state`]: PIT, clock, then the irqchips.
    pub fn restore_state(&self, state: &VmState) -> Result<(), KvmError> {
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        let mut clock = state.clock;
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        self.fd
            .set_clock(&clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Whether guest memory is registered yet.
    pub fn has_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// Guest memory; panics only if called before [`Vm::set_memory`] (a builder bug).
    pub fn memory(&self) -> &GuestMemory {
        self.memory
            .as_ref()
            .expect("guest memory is registered right after the vCPUs are created")
    }

    pub fn dirty_tracking(&self) -> bool {
        self.dirty_tracking
    }

    /// Guest-physical addresses of the pages KVM saw the guest write since the last call (the
    /// log is cleared by reading it), sorted. Needs `track_dirty_pages`; pause vCPUs first for
    /// a consistent answer. Pages the VMM itself wrote are in the memory's own bitmap instead.
    pub fn dirty_pages(&self) -> Result<Vec<u64>, VmError> {
        if !self.dirty_tracking {
            return Err(VmError::DirtyTrackingOff);
        }
        let mut pages = Vec::new();
        for (slot, region) in self.memory().iter().enumerate() {
            let bitmap = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            let base = region.start_addr().0;
            for (word_index, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as u64;
                    pages.push(
                        base + ((word_index as u64) * 64 + bit) * crate::memory::PAGE_SIZE as u64,
                    );
                    bits &= bits - 1;
                }
            }
        }
        Ok(pages)
    }

    /// Makes writes of `datamatch` (32-bit) to MMIO address `addr` signal `evt` inside KVM,
    /// without an exit to the VMM (virtio queue notifications).
    pub fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), KvmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    /// Removes a registration made by [`Vm::register_ioevent`].
    pub fn unregister_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), KvmError> {
        self.fd
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("KVM_IOEVENTFD (deassign)"))
    }

    /// Makes a write to `evt` raise edge-triggered interrupt `gsi` in the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    /// Raises edge-triggered `gsi` once (KVM_IRQ_LINE high, then low), for a one-off event
    /// such as a new VMGenID, without an irqfd.
    pub fn pulse_irq_line(&self, gsi: u32) -> Result<(), KvmError> {
        self.fd
            .set_irq_line(gsi, true)
            .map_err(kvm_err("KVM_IRQ_LINE (raise)"))?;
        self.fd
            .set_irq_line(gsi, false)
            .map_err(kvm_err("KVM_IRQ_LINE (lower)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_state_round_trips_through_json() {
        let mut state = VmState {
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data {
                clock: 123_456_789,
                ..Default::default()
            },
            pic_master: kvm_irqchip {
                chip_id: KVM_IRQCHIP_PIC_MASTER,
                ..Default::default()
            },
            pic_slave: kvm_irqchip {
                chip_id: KVM_IRQCHIP_PIC_SLAVE,
                ..Default::default()
            },
            ioapic: kvm_irqchip {
                chip_id: KVM_IRQCHIP_IOAPIC,
                ..Default::default()
            },
        };
        state.pit.channels[0].count = 0x1234;
        let json = serde_json::to_value(state).unwrap();
        assert!(json["ioapic"].is_string(), "{json}");
        let back: VmState = serde_json::from_value(json).unwrap();
        assert_eq!(back.clock.clock, 123_456_789);
        assert_eq!(back.pit.channels[0].count, 0x1234);
        assert_eq!(back.ioapic.chip_id, KVM_IRQCHIP_IOAPIC);
        assert_eq!(back.pic_slave.chip_id, KVM_IRQCHIP_PIC_SLAVE);
    }
}
