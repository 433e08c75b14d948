//! x86_64 boot: memory layout, GDT, page tables, registers, CPUID, MP table, zero page.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
