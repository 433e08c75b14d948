//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its CPUs,
//! the IOAPIC and how legacy IRQs are wired.

use super::layout::{APIC_ADDR, IOAPIC_ADDR, MPTABLE_START, RESERVED_LOW_END};
use crate::memory::{Bytes, GuestAddress, GuestMemory};

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Legacy IRQ lines routed through the IOAPIC (ISA 0-15 plus the virtio GSIs).
pub const IRQ_LINES: u8 = 24;
/// CPU flags in a processor entry.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINTR: u8 = 3;
const ENTRY_LINTR: u8 = 4;
/// Sizes from the specification.
pub const FLOATING_POINTER_LEN: usize = 16;
pub const CONFIG_HEADER_LEN: usize = 44;
pub const PROCESSOR_ENTRY_LEN: usize = 20;
pub const SMALL_ENTRY_LEN: usize = 8;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit the MP table (at most 254)")]
    TooManyCpus(u32),
    #[error("MP table does not fit below {RESERVED_LOW_END:#x}")]
    TooBig,
    #[error("writing the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's id: one past the last CPU's APIC id.
fn ioapic_id(num_cpus: u32) -> u8 {
    num_cpus as u8 + 1
}

fn config_entries(num_cpus: u32) -> Vec<u8> {
    let mut e = Vec::new();
    for cpu in 0..num_cpus {
        e.push(ENTRY_PROCESSOR);
        e.push(cpu as u8); // local APIC id
        e.push(APIC_VERSION);
        e.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        e.extend_from_slice(&0x600u32.to_le_bytes()); // cpu signature: family 6
        e.extend_from_slice(&0x201u32.to_le_bytes()); // feature flags: FPU | APIC
        e.extend_from_slice(&[0u8; 8]);
    }
    // One ISA bus, id 0.
    e.extend_from_slice(&[ENTRY_BUS, 0]);
    e.extend_from_slice(b"ISA   ");
    // The IOAPIC.
    e.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id(num_cpus), IOAPIC_VERSION, 1]);
    e.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    // IRQ 0 arrives as ExtINT (the PIC), the others as plain interrupts on their own pin.
    for irq in 0..IRQ_LINES {
        let kind = if irq == 0 { MP_EXTINT } else { MP_INT };
        e.extend_from_slice(&[ENTRY_IOINTR, kind, 0, 0, 0, irq, ioapic_id(num_cpus), irq]);
    }
    // LINT0 = ExtINT, LINT1 = NMI, on every local APIC (0xff).
    e.extend_from_slice(&[ENTRY_LINTR, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    e.extend_from_slice(&[ENTRY_LINTR, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    e
}

/// Builds the floating pointer followed by the configuration table, as placed at `base`.
pub fn build(num_cpus: u32, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let entries = config_entries(num_cpus);
    let entry_count = num_cpus as u16 + 2 + u16::from(IRQ_LINES) + 2;

    let mut table = Vec::with_capacity(CONFIG_HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((CONFIG_HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"FORKD   ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    debug_assert_eq!(table.len(), CONFIG_HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((base + FLOATING_POINTER_LEN as u64) as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(MPC_SPEC_REV);
    fp.push(0); // checksum, patched below
    fp.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = configuration table present
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    if base + fp.len() as u64 > RESERVED_LOW_END {
        return Err(MptableError::TooBig);
    }
    Ok(fp)
}

/// Writes the MP table for `num_cpus` CPUs at [`MPTABLE_START`].
pub fn write(mem: &GuestMemory, num_cpus: u32) -> Result<(), MptableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_points_at_a_valid_table() {
        let t = build(4, MPTABLE_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        let cfg = &t[16..];
        assert_eq!(&cfg[0..4], b"PCMP");
        let len = u16::from_le_bytes(cfg[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(sum(cfg), 0, "configuration table checksum");
        assert_eq!(cfg[6], 4, "spec revision 1.4");
        let lapic = u32::from_le_bytes(cfg[36..40].try_into().unwrap()) as u64;
        assert_eq!(lapic, APIC_ADDR);
    }

    #[test]
    fn entries_list_every_cpu_with_bsp_first() {
        let t = build(3, MPTABLE_START).unwrap();
        let cfg = &t[16..];
        let count = u16::from_le_bytes(cfg[34..36].try_into().unwrap());
        assert_eq!(count, 3 + 1 + 1 + 24 + 2);
        let mut off = CONFIG_HEADER_LEN;
        for cpu in 0..3u8 {
            assert_eq!(cfg[off], ENTRY_PROCESSOR);
            assert_eq!(cfg[off + 1], cpu);
            let bsp = cfg[off + 3] & CPU_BOOTPROCESSOR != 0;
            assert_eq!(bsp, cpu == 0);
            off += PROCESSOR_ENTRY_LEN;
        }
        assert_eq!(&cfg[off..off + 8], b"\x01\x00ISA   ");
        off += 8;
        assert_eq!(cfg[off], ENTRY_IOAPIC);
        assert_eq!(cfg[off + 1], 4, "IOAPIC id after the CPUs");
        assert_eq!(
            u32::from_le_bytes(cfg[off + 4..off + 8].try_into().unwrap()) as u64,
            IOAPIC_ADDR
        );
    }

    #[test]
    fn cpu_count_limits() {
        assert!(matches!(
            build(0, MPTABLE_START),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(build(254, MPTABLE_START).is_ok());
        assert!(matches!(
            build(255, MPTABLE_START),
            Err(MptableError::TooManyCpus(255))
        ));
    }
}
