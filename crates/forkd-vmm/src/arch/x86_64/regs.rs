//! Initial register state for entering a kernel in 64-bit mode: general registers, segment and
//! control registers, FPU, boot MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};

use super::gdt;
use super::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};
use crate::memory::{Bytes, GuestAddress, GuestMemory};

pub const X86_CR0_PE: u64 = 1 << 0;
pub const X86_CR0_ET: u64 = 1 << 4;
pub const X86_CR0_NE: u64 = 1 << 5;
pub const X86_CR0_PG: u64 = 1 << 31;
pub const X86_CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MTRRdefType: MTRRs enabled (bit 11), default memory type write-back (6).
pub const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// LAPIC register offsets and delivery modes for LINT0/LINT1.
pub const APIC_LVT0: usize = 0x350;
pub const APIC_LVT1: usize = 0x360;
pub const APIC_MODE_NMI: u32 = 0x4;
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// A page-table entry flag set: present | writable (| page size for 2 MiB pages).
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;

/// Boot-time state written into guest memory failed (address outside RAM).
#[derive(Debug, thiserror::Error)]
#[error("writing {what} at guest address {addr:#x}")]
pub struct BootWriteError {
    pub what: &'static str,
    pub addr: u64,
    #[source]
    pub source: vm_memory::GuestMemoryError,
}

fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemory,
    val: T,
    addr: u64,
    what: &'static str,
) -> Result<(), BootWriteError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| BootWriteError { what, addr, source })
}

/// General registers for the 64-bit entry: rip at the kernel entry, rsi at the zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// Writes the boot GDT and an empty IDT into guest memory.
pub fn write_gdt_and_idt(mem: &GuestMemory) -> Result<(), BootWriteError> {
    for (i, entry) in gdt::boot_gdt().iter().enumerate() {
        write_obj(mem, *entry, GDT_ADDR + (i as u64) * 8, "GDT entry")?;
    }
    write_obj(mem, 0u64, IDT_ADDR, "IDT")
}

/// Writes identity page tables mapping the first 1 GiB with 2 MiB pages.
pub fn write_identity_page_tables(mem: &GuestMemory) -> Result<(), BootWriteError> {
    write_obj(mem, PDPT_ADDR | PTE_PRESENT_RW, PML4_ADDR, "PML4 entry")?;
    write_obj(mem, PD_ADDR | PTE_PRESENT_RW, PDPT_ADDR, "PDPT entry")?;
    for i in 0..512u64 {
        write_obj(
            mem,
            (i << 21) | PDE_HUGE | PTE_PRESENT_RW,
            PD_ADDR + i * 8,
            "PD entry",
        )?;
    }
    Ok(())
}

/// Segment and control registers for long mode with paging through the identity tables.
/// `sregs` is the vCPU's current state (so fields KVM fills, like the APIC base, are kept).
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt_table = gdt::boot_gdt();
    let code = gdt::kvm_segment_from_gdt(gdt_table[gdt::CODE_INDEX as usize], gdt::CODE_INDEX);
    let data = gdt::kvm_segment_from_gdt(gdt_table[gdt::DATA_INDEX as usize], gdt::DATA_INDEX);
    let tss = gdt::kvm_segment_from_gdt(gdt_table[gdt::TSS_INDEX as usize], gdt::TSS_INDEX);

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt_table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_NE;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// FPU state after reset as Linux expects it: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The MSRs the boot vCPU state resets (Linux assumes a clean slate for these).
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// Boot MSRs as the FAM wrapper KVM_SET_MSRS takes.
pub fn boot_msrs() -> Msrs {
    // Cannot fail: the list is far below KVM_MAX_MSR_ENTRIES.
    Msrs::from_entries(&boot_msr_entries()).expect("boot MSR list fits a kvm_msrs")
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 as ExtINT (the legacy PIC's output) and LINT1 as NMI, as the MP spec's
/// virtual-wire mode requires.
pub fn set_lint(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    lapic
}

/// Reads a LAPIC register (used by tests and state inspection).
pub fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    lapic_reg(lapic, offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn regs_enter_at_entry_with_zero_page_in_rsi() {
        let r = boot_regs(0x1000000);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x1000000, 0x7000, 0x8ff0, 2)
        );
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let m = mem();
        write_identity_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pdpt: u64 = m.read_obj(GuestAddress(PDPT_ADDR)).unwrap();
        assert_eq!(pdpt, PD_ADDR | 3);
        let last: u64 = m.read_obj(GuestAddress(PD_ADDR + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn sregs_are_long_mode() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(
            (s.cs.l, s.cs.selector, s.ss.selector, s.tr.selector),
            (1, 8, 16, 24)
        );
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn gdt_is_written_where_sregs_point() {
        let m = mem();
        write_gdt_and_idt(&m).unwrap();
        let code: u64 = m.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn lint_pins_are_extint_and_nmi() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000); // masked, fixed
        let l = set_lint(l);
        assert_eq!(lapic_register(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_register(&l, APIC_LVT1), 0x0000_0400);
    }

    #[test]
    fn boot_msrs_include_mtrr_and_misc_enable() {
        let e = boot_msr_entries();
        assert!(e
            .iter()
            .any(|m| m.index == MSR_MTRR_DEF_TYPE && m.data == 0x806));
        assert!(e
            .iter()
            .any(|m| m.index == MSR_IA32_MISC_ENABLE && m.data == 1));
    }
}
