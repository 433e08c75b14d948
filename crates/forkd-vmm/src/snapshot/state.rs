//! What `vmstate.json` holds: every vCPU's KVM state, the VM-wide KVM state, the legacy and
//! virtio device state, the memory layout, and (for a diff snapshot) the chain link.
//!
//! KVM structs travel as base64 blobs ([`pod`]); MSRs as plain (index, value) pairs.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId,
};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use super::memory_file::{Extent, RegionSpec};
use super::vmstate_file::pod;
use crate::acpi::VmGenIdConfig;
use crate::devices::virtio::VirtioDevicesState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// The whole saved machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// Where each guest RAM region lives in memory.bin.
    pub memory: Vec<RegionSpec>,
    /// Saved per vCPU, index order.
    pub vcpus: Vec<SavedVcpu>,
    pub vm: SavedVm,
    pub serial: SavedSerial,
    /// Which virtio devices the machine had (a restore recreates the same list).
    pub devices: DeviceList,
    /// The block device's GET_ID string.
    pub block_id: String,
    pub virtio: VirtioDevicesState,
    /// What the machine was booted from (informational).
    pub kernel: String,
    /// The initrd the machine was booted with (informational; it lives in guest memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    pub cmdline: String,
    /// Set for a diff snapshot: the parent it overlays and the pages it stores.
    pub chain: Option<ChainLink>,
    /// Where the guest's VMGenID lives and its event line, when it has one (booted with ACPI).
    /// Absent in snapshots from before VMGenID existed (and then omitted, so such files keep
    /// their shape): those restore without a new id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmgenid: Option<VmGenIdConfig>,
}

/// Which virtio devices a machine has, in attachment order: block, vsock, rng.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    pub block: bool,
    pub block_read_only: bool,
    pub vsock: bool,
    pub vsock_cid: u64,
    pub rng: bool,
}

/// A diff snapshot's link to its parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    pub parent_tag: String,
    /// sha256 of the parent's manifest.toml when this link was created: the manifest lists
    /// the sha256 of every parent file, so a replaced parent shows up here without re-hashing
    /// its memory.
    pub parent_manifest_sha256: String,
    /// The pages (memory.bin byte ranges) this link stores; everything else is the parent's.
    pub extents: Vec<Extent>,
}

/// One vCPU's KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedVcpu {
    #[serde(with = "pod")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "pod")]
    pub regs: kvm_regs,
    #[serde(with = "pod")]
    pub sregs: kvm_sregs,
    /// The 4 KiB legacy XSAVE area.
    #[serde(with = "blob")]
    pub xsave: Vec<u8>,
    #[serde(with = "pod")]
    pub xcrs: kvm_xcrs,
    #[serde(with = "pod")]
    pub debug_regs: kvm_debugregs,
    #[serde(with = "pod")]
    pub lapic: kvm_lapic_state,
    pub tsc_khz: Option<u32>,
    /// kvm_cpuid_entry2 records back to back.
    #[serde(with = "blob")]
    pub cpuid: Vec<u8>,
    /// (index, value), TSC_DEADLINE last.
    pub msrs: Vec<(u32, u64)>,
    #[serde(with = "pod")]
    pub events: kvm_vcpu_events,
}

/// VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedVm {
    #[serde(with = "pod")]
    pub pit: kvm_pit_state2,
    #[serde(with = "pod")]
    pub clock: kvm_clock_data,
    #[serde(with = "pod")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "pod")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "pod")]
    pub ioapic: kvm_irqchip,
}

/// The 8250's registers (vm-superio's SerialState has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSerial {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SavedSerial {
    pub fn of(s: &vm_superio::serial::SerialState) -> SavedSerial {
        SavedSerial {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }

    pub fn to_state(&self) -> vm_superio::serial::SerialState {
        vm_superio::serial::SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        }
    }
}

impl SavedVm {
    pub fn of(s: &VmState) -> SavedVm {
        SavedVm {
            pit: s.pit,
            clock: s.clock,
            pic_master: s.pic_master,
            pic_slave: s.pic_slave,
            ioapic: s.ioapic,
        }
    }

    pub fn to_state(&self) -> VmState {
        VmState {
            pit: self.pit,
            clock: self.clock,
            pic_master: self.pic_master,
            pic_slave: self.pic_slave,
            ioapic: self.ioapic,
        }
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

impl SavedVcpu {
    pub fn of(s: &VcpuState) -> SavedVcpu {
        let cpuid: Vec<u8> = s
            .cpuid
            .as_slice()
            .iter()
            .flat_map(|e| pod::bytes_of(e).to_vec())
            .collect();
        let mut msrs: Vec<(u32, u64)> = s.msrs.iter().map(|m| (m.index, m.data)).collect();
        // A zero TSC deadline would leave the guest's timer disarmed forever after restore:
        // save the TSC instead so the timer fires right away (Firecracker does the same).
        let tsc = msrs.iter().find(|m| m.0 == MSR_IA32_TSC).map(|m| m.1);
        if let (Some(deadline), Some(tsc)) =
            (msrs.iter_mut().find(|m| m.0 == MSR_IA32_TSC_DEADLINE), tsc)
        {
            if deadline.1 == 0 {
                deadline.1 = tsc;
            }
        }
        SavedVcpu {
            mp_state: s.mp_state,
            regs: s.regs,
            sregs: s.sregs,
            xsave: xsave_bytes(&s.xsave),
            xcrs: s.xcrs,
            debug_regs: s.debug_regs,
            lapic: s.lapic,
            tsc_khz: s.tsc_khz,
            cpuid,
            msrs,
            events: s.events,
        }
    }

    /// Back to KVM's types; fails on malformed blobs (checksummed files make that a bug or a
    /// hand edit with a recomputed checksum).
    pub fn to_state(&self) -> Result<VcpuState, String> {
        let entry_size = std::mem::size_of::<kvm_cpuid_entry2>();
        if !self.cpuid.len().is_multiple_of(entry_size) {
            return Err(format!(
                "cpuid blob of {} bytes is not a whole number of entries",
                self.cpuid.len()
            ));
        }
        let entries = self
            .cpuid
            .chunks(entry_size)
            .map(pod::from_bytes::<kvm_cpuid_entry2>)
            .collect::<Result<Vec<_>, _>>()?;
        let cpuid = CpuId::from_entries(&entries).map_err(|e| format!("cpuid: {e:?}"))?;
        Ok(VcpuState {
            mp_state: self.mp_state,
            regs: self.regs,
            sregs: self.sregs,
            xsave: xsave_from_bytes(&self.xsave)?,
            xcrs: self.xcrs,
            debug_regs: self.debug_regs,
            lapic: self.lapic,
            tsc_khz: self.tsc_khz,
            cpuid,
            msrs: self
                .msrs
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect(),
            events: self.events,
        })
    }
}

fn xsave_bytes(x: &kvm_xsave) -> Vec<u8> {
    x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn xsave_from_bytes(bytes: &[u8]) -> Result<kvm_xsave, String> {
    let mut x = kvm_xsave::default();
    if bytes.len() != x.region.len() * 4 {
        return Err(format!(
            "xsave blob of {} bytes, expected {}",
            bytes.len(),
            x.region.len() * 4
        ));
    }
    for (w, b) in x.region.iter_mut().zip(bytes.chunks(4)) {
        *w = u32::from_le_bytes(b.try_into().expect("4-byte chunk"));
    }
    Ok(x)
}

/// The MSRs a snapshot saves: KVM's index list filtered to the ranges that are vCPU state
/// (not feature or read-only MSRs; x2APIC MSRs mirror the LAPIC page, restored with
/// KVM_SET_LAPIC), with TSC_DEADLINE moved last so a restore writes it after
/// the TSC.
pub fn snapshot_msr_indices(kvm: &Kvm) -> Result<Vec<u32>, crate::vstate::KvmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(crate::vstate::kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut out: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| is_serializable_msr(i) && i != MSR_IA32_TSC_DEADLINE)
        .collect();
    if list.as_slice().contains(&MSR_IA32_TSC_DEADLINE) {
        out.push(MSR_IA32_TSC_DEADLINE);
    }
    Ok(out)
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

/// base64 for byte vectors.
mod blob {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}
