//! Segment descriptors for the boot GDT and their KVM segment-register equivalents.

use kvm_bindings::kvm_segment;

/// Access/flags word for a 64-bit code segment: present, DPL 0, execute/read, accessed; L=1, G=1.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Data segment: present, DPL 0, read/write, accessed; D/B=1, G=1.
pub const DATA_FLAGS: u16 = 0xc093;
/// 64-bit TSS, busy.
pub const TSS_FLAGS: u16 = 0x808b;

/// Indices of the boot GDT entries.
pub const CODE_INDEX: u8 = 1;
pub const DATA_INDEX: u8 = 2;
pub const TSS_INDEX: u8 = 3;

/// Encodes a GDT descriptor from `flags` (access byte in bits 0-7, flags nibble in bits 12-15),
/// a 32-bit base and a 20-bit limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        descriptor(CODE64_FLAGS, 0, 0xfffff),
        descriptor(DATA_FLAGS, 0, 0xfffff),
        descriptor(TSS_FLAGS, 0, 0xfffff),
    ]
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32
}

fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

/// The segment register KVM expects for GDT entry `index` holding `entry`. The limit is scaled
/// to bytes when the granularity bit is set, as the CPU does when loading a selector.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = bit(entry, 55);
    let raw_limit = limit(entry);
    kvm_segment {
        base: base(entry),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(entry, 47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g,
        avl: bit(entry, 52),
        padding: 0,
        unusable: if bit(entry, 47) == 1 { 0 } else { 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_architectural_encoding() {
        // Well-known flat descriptors (e.g. Linux's GDT_ENTRY_KERNEL_CS / _DS).
        assert_eq!(descriptor(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(descriptor(TSS_FLAGS, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segment_fields_round_trip() {
        let e = descriptor(0xc093, 0x1234_5678, 0xabcde);
        let s = kvm_segment_from_gdt(e, 2);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcd_efff);
        assert_eq!(s.selector, 0x10);
        assert_eq!(
            (s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g),
            (3, 1, 0, 1, 1, 0, 1)
        );
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn code_segment_is_64_bit() {
        let s = kvm_segment_from_gdt(boot_gdt()[1], CODE_INDEX);
        assert_eq!((s.l, s.db, s.type_, s.selector), (1, 0, 0xb, 8));
        let t = kvm_segment_from_gdt(boot_gdt()[3], TSS_INDEX);
        assert_eq!((t.type_, t.s, t.selector), (0xb, 0, 0x18));
    }
}
