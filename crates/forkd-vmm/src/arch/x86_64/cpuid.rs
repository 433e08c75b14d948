//! Per-vCPU CPUID normalization, starting from KVM_GET_SUPPORTED_CPUID.
//!
//! Each vCPU gets its own APIC id (= vCPU index), the topology of `count` single-thread cores in
//! one package, the hypervisor bit, TSC-deadline, and no PMU or WAITPKG (not virtualized here).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

pub const LEAF_FEATURES: u32 = 0x1;
pub const LEAF_CACHE_PARAMS: u32 = 0x4;
pub const LEAF_EXT_FEATURES: u32 = 0x7;
/// AMD: address sizes and core count (ECX).
pub const LEAF_AMD_SIZES: u32 = 0x8000_0008;
pub const LEAF_PMU: u32 = 0xa;
pub const LEAF_TOPOLOGY: u32 = 0xb;
pub const LEAF_TOPOLOGY_V2: u32 = 0x1f;

pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
pub const ECX_HYPERVISOR: u32 = 1 << 31;
pub const EDX_HTT: u32 = 1 << 28;
/// Leaf 7 subleaf 0 ECX: WAITPKG (umwait/tpause), not supported by KVM's emulator.
pub const ECX7_WAITPKG: u32 = 1 << 5;

/// Topology level types (leaf 0xB/0x1F ECX[15:8]).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Errors normalizing CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("vCPU count {0} is outside 1..=254")]
    BadVcpuCount(u32),
    #[error("vCPU index {index} is not below the vCPU count {count}")]
    BadIndex { index: u32, count: u32 },
    #[error("CPUID has no room for the topology leaves: {0:?}")]
    Full(vmm_sys_util::fam::Error),
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn topology_entries(function: u32, index: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    let level = |subleaf: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index: subleaf,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: subleaf | (level_type << 8),
        edx: index,
        ..Default::default()
    };
    [
        // SMT level: one thread per core, so the core id starts at bit 0.
        level(0, 0, 1, LEVEL_TYPE_SMT),
        // Core level: `count` cores; the package id starts above them.
        level(1, id_bits(count), count, LEVEL_TYPE_CORE),
        // Terminating (invalid) level.
        level(2, 0, 0, 0),
    ]
}

/// Returns the CPUID for vCPU `index` of `count`, derived from KVM's supported CPUID.
pub fn normalize(supported: &CpuId, index: u32, count: u32) -> Result<CpuId, CpuidError> {
    if count == 0 || count > 254 {
        return Err(CpuidError::BadVcpuCount(count));
    }
    if index >= count {
        return Err(CpuidError::BadIndex { index, count });
    }
    let max_basic = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map(|e| e.eax)
        .unwrap_or(0);

    let mut entries: Vec<kvm_cpuid_entry2> = Vec::new();
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            LEAF_FEATURES => {
                let logical = count.next_power_of_two().min(255);
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | (logical << 16);
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing this cache - 1:
                // L1/L2 belong to one single-thread core, L3 is shared by the package.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            LEAF_EXT_FEATURES if e.index == 0 => e.ecx &= !ECX7_WAITPKG,
            LEAF_AMD_SIZES => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC id bits used for the core id.
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (id_bits(count) << 12);
            }
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // Rebuilt below.
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => continue,
            _ => {}
        }
        entries.push(e);
    }
    if max_basic >= LEAF_TOPOLOGY {
        entries.extend(topology_entries(LEAF_TOPOLOGY, index, count));
    }
    if max_basic >= LEAF_TOPOLOGY_V2 {
        entries.extend(topology_entries(LEAF_TOPOLOGY_V2, index, count));
    }
    CpuId::from_entries(&entries).map_err(CpuidError::Full)
}

/// Finds leaf `function` / subleaf `index` in `cpuid`.
pub fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| {
            e.function == function
                && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
        })
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, 0, 0, 0),
            entry(1, 0, 0x806f8, 0xff00_0800, 0, 1 << 28),
            entry(4, 0, 0x1c00_4121, 0x01c0_003f, 0x3f, 0), // L1d, 8 cores, 2 threads
            entry(4, 3, 0x1c0f_c163, 0x03c0_003f, 0x3fff, 6), // L3
            entry(4, 4, 0, 0, 0, 0),                        // no more caches
            entry(7, 0, 0, 0, ECX7_WAITPKG | 1, 0),
            entry(0x8000_0008, 0, 0x3030, 0, 0x700f, 0),
            entry(0xa, 0, 0x0804_8302, 7, 0, 0x603),
            entry(0xb, 0, 1, 2, 0x100, 99),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        ])
        .unwrap()
    }

    #[test]
    fn leaf1_has_apic_id_count_and_hypervisor_bit() {
        let c = normalize(&supported(), 2, 3).unwrap();
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 2, "APIC id");
        assert_eq!(
            (l1.ebx >> 16) & 0xff,
            4,
            "logical processors, next power of two"
        );
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = normalize(&supported(), 0, 1).unwrap();
        assert_eq!(find(&c, 1, 0).unwrap().edx & EDX_HTT, 0);
    }

    #[test]
    fn pmu_and_waitpkg_are_cleared() {
        let c = normalize(&supported(), 0, 1).unwrap();
        let pmu = find(&c, 0xa, 0).unwrap();
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        let l7 = find(&c, 7, 0).unwrap();
        assert_eq!(l7.ecx & ECX7_WAITPKG, 0);
        assert_eq!(l7.ecx & 1, 1, "other leaf 7 bits kept");
    }

    #[test]
    fn topology_leaves_carry_x2apic_id_and_core_count() {
        let c = normalize(&supported(), 5, 6).unwrap();
        for leaf in [0xb, 0x1f] {
            let smt = find(&c, leaf, 0).unwrap();
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            let core = find(&c, leaf, 1).unwrap();
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
            let end = find(&c, leaf, 2).unwrap();
            assert_eq!((end.ebx, end.ecx & 0xff00), (0, 0));
        }
        let old = c.as_slice().iter().filter(|e| e.function == 0xb).count();
        assert_eq!(old, 3, "KVM's own 0xB entries are replaced");
    }

    #[test]
    fn cache_leaves_describe_single_thread_cores() {
        let c = normalize(&supported(), 1, 6).unwrap();
        let l1 = c
            .as_slice()
            .iter()
            .find(|e| e.function == 4 && e.index == 0)
            .unwrap();
        assert_eq!(l1.eax >> 26, 5, "cores per package - 1");
        assert_eq!((l1.eax >> 14) & 0xfff, 0, "L1 not shared");
        assert_eq!(l1.eax & 0x3fff, 0x0121, "cache type and level kept");
        let l3 = c
            .as_slice()
            .iter()
            .find(|e| e.function == 4 && e.index == 3)
            .unwrap();
        assert_eq!((l3.eax >> 14) & 0xfff, 5, "L3 shared by all 6");
        let end = c
            .as_slice()
            .iter()
            .find(|e| e.function == 4 && e.index == 4)
            .unwrap();
        assert_eq!(end.eax, 0, "terminating subleaf untouched");
    }

    #[test]
    fn amd_core_count_matches_vcpus() {
        let c = normalize(&supported(), 0, 6).unwrap();
        let e = find(&c, 0x8000_0008, 0).unwrap();
        assert_eq!(e.ecx & 0xff, 5);
        assert_eq!((e.ecx >> 12) & 0xf, 3);
        assert_eq!(e.eax, 0x3030, "address sizes kept");
    }

    #[test]
    fn hypervisor_leaves_are_kept() {
        let c = normalize(&supported(), 0, 1).unwrap();
        assert_eq!(find(&c, 0x4000_0000, 0).unwrap().ebx, 0x4b4d_564b);
    }

    #[test]
    fn bad_counts_are_rejected() {
        assert!(matches!(
            normalize(&supported(), 0, 0),
            Err(CpuidError::BadVcpuCount(0))
        ));
        assert!(matches!(
            normalize(&supported(), 3, 3),
            Err(CpuidError::BadIndex { .. })
        ));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
