//! VMGenID: the 16-byte generation id a guest reads from memory (its DSDT says where) and
//! re-reads when the Generic Event Device's line fires. Every boot and every restored child
//! gets a fresh random id, so each child's kernel reseeds its random generator (Linux ≥ 5.18's
//! vmgenid driver) instead of repeating its siblings' output.

use crate::acpi::{generate_vmgenid, AcpiError, VmGenIdConfig, VMGENID_LEN};
use crate::memory::{Bytes, GuestAddress, GuestMemory};
use crate::vstate::vm::Vm;
use crate::vstate::KvmError;

/// A VMGenID id.
pub type VmGenId = [u8; VMGENID_LEN];

#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error(transparent)]
    Random(#[from] AcpiError),
    #[error("VMGenID id at {addr:#x} is outside guest memory: {message}")]
    Memory { addr: u64, message: String },
    #[error("raising the VMGenID event line")]
    Notify(#[from] KvmError),
}

/// Writes `id` where the guest reads it.
pub fn write(mem: &GuestMemory, cfg: VmGenIdConfig, id: &VmGenId) -> Result<(), VmGenIdError> {
    mem.write_slice(id, GuestAddress(cfg.addr))
        .map_err(|e| VmGenIdError::Memory {
            addr: cfg.addr,
            message: e.to_string(),
        })
}

/// The id the guest currently sees.
pub fn read(mem: &GuestMemory, cfg: VmGenIdConfig) -> Result<VmGenId, VmGenIdError> {
    let mut id = [0u8; VMGENID_LEN];
    mem.read_slice(&mut id, GuestAddress(cfg.addr))
        .map_err(|e| VmGenIdError::Memory {
            addr: cfg.addr,
            message: e.to_string(),
        })?;
    Ok(id)
}

/// Gives a restored (not yet resumed) VM a fresh id: writes a new random id into its
/// (copy-on-write) memory, then pulses the event device's line so the guest's GED handler runs
/// `_EVT`, which notifies the VMGenID device. Call it after the irqchip state is restored (a
/// restore of the IOAPIC would drop the pending edge) and before the vCPUs run.
pub fn refresh(mem: &GuestMemory, cfg: VmGenIdConfig, vm: &Vm) -> Result<VmGenId, VmGenIdError> {
    let id = generate_vmgenid()?;
    write(mem, cfg, &id)?;
    vm.pulse_irq_line(cfg.gsi)?;
    Ok(id)
}
