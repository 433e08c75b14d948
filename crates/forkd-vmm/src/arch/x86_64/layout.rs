//! Guest physical memory layout (x86_64). Values follow the Linux 64-bit boot protocol and the
//! layout Firecracker uses, so a Linux kernel finds everything where it expects it.

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty; the guest installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT, PD.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line accepted (Linux's COMMAND_LINE_SIZE on x86_64).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the low RAM usable by the guest: the EBDA starts here.
pub const EBDA_START: u64 = 0x9fc00;
/// MP table goes at the start of the EBDA (reserved in e820).
pub const MPTABLE_START: u64 = EBDA_START;
/// Start of the BIOS area that stays reserved in e820 (up to, not including, 1 MiB).
pub const BIOS_END: u64 = 0x10_0000;
/// End of the low region the MP table may use (EBDA + MP table + ACPI tables).
pub const RESERVED_LOW_END: u64 = 0xe0000;
/// End of the range e820 reserves below 1 MiB: the EBDA, MP table, VMGenID id, ACPI tables
/// and the RSDP at [`RSDP_ADDR`] (which lies past [`RESERVED_LOW_END`]), so the guest never
/// uses any of them as RAM.
pub const E820_RESERVED_END: u64 = BIOS_END;
/// RSDP location (ACPI), the first address Linux scans.
pub const RSDP_ADDR: u64 = 0xe0000;
/// Kernel load address / start of high memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// Where the 32-bit device hole starts; RAM above this is relocated above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// The 4 GiB boundary, where RAM continues after the hole.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// KVM's TSS needs three pages in guest physical space outside RAM (below the IOAPIC).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Virtio-mmio windows: 4 KiB each, allocated upward from here inside the hole.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// Maximum number of virtio-mmio slots (and GSIs 5..5+N).
pub const VIRTIO_MMIO_MAX_SLOTS: u32 = 18;
/// First GSI handed to virtio devices (0-4 are legacy: PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// The VMGenID's Generic Event Device line: the first IOAPIC pin past every virtio slot, so it
/// is free whatever devices a VM has and stays the same in every snapshot.
pub const VMGENID_GSI: u32 = VIRTIO_FIRST_GSI + VIRTIO_MMIO_MAX_SLOTS;
/// Pins on KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
/// IOAPIC and LAPIC MMIO.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// Legacy device ports and lines.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_GSI: u32 = 4;
pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
/// The test-guest power-off port: a write of value `v` stops the VM with exit code `v`
/// (same port QEMU's isa-debug-exit uses by default).
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
pub const DEBUG_EXIT_PORT_LEN: u64 = 4;
/// The ACPI power-management registers the FADT points at (sleep control, sleep status,
/// reset; see `devices::legacy::acpi_pm`), one byte each. Nothing else in a PC uses 0x600.
pub const ACPI_PM_PORT_BASE: u64 = 0x600;
pub const ACPI_PM_PORT_LEN: u64 = crate::devices::legacy::acpi_pm::PORT_COUNT;

/// RAM ranges for `mem_size` bytes of guest memory: low RAM up to the hole, the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (FIRST_ADDR_PAST_32BITS, mem_size - MMIO_HOLE_START),
        ]
    }
}

// The boot structures must not overlap; checked at compile time.
const _: () = {
    assert!(GDT_ADDR + 4 * 8 <= IDT_ADDR);
    assert!(ZERO_PAGE_ADDR + 4096 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_ADDR);
    assert!(PD_ADDR + 4096 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(VIRTIO_MMIO_START >= MMIO_HOLE_START);
    assert!(VMGENID_GSI < IOAPIC_PINS);
    assert!(RSDP_ADDR + 36 <= E820_RESERVED_END);
    assert!(ACPI_PM_PORT_BASE + ACPI_PM_PORT_LEN <= 0x1_0000);
    assert!(
        VIRTIO_MMIO_START + VIRTIO_MMIO_SLOT_SIZE * VIRTIO_MMIO_MAX_SLOTS as u64 <= KVM_TSS_ADDR
    );
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn memory_above_the_hole_moves_past_4gib() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }
}
