//! The tables are checked with independent parsers: the `acpi` crate walks RSDP → XSDT → every
//! table from a fake physical memory, and ACPICA's `iasl` disassembles (and recompiles) them.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::ptr::NonNull;
use std::sync::Arc;

use ::acpi::address::{AccessSize, AddressSpace, GenericAddress};
use ::acpi::fadt::Fadt;
use ::acpi::madt::{Madt, MadtEntry};
use ::acpi::sdt::Signature;
use ::acpi::{AcpiHandler, AcpiTables as ParsedTables, PhysicalMapping};

use super::*;

const FAKE_MEMORY_SIZE: usize = 1 << 20;

/// Guest physical memory below 1 MiB, backed by a Vec, that the `acpi` crate maps from.
#[derive(Clone)]
struct FakeMemory {
    bytes: Arc<Vec<u8>>,
}

impl FakeMemory {
    fn with_tables(tables: &AcpiTables) -> Self {
        let mut bytes = vec![0u8; FAKE_MEMORY_SIZE];
        for piece in &tables.pieces {
            let start = piece.addr as usize;
            bytes[start..start + piece.bytes.len()].copy_from_slice(&piece.bytes);
        }
        FakeMemory {
            bytes: Arc::new(bytes),
        }
    }
}

impl AcpiHandler for FakeMemory {
    unsafe fn map_physical_region<T>(&self, addr: usize, size: usize) -> PhysicalMapping<Self, T> {
        assert!(
            addr + size <= self.bytes.len(),
            "the parser followed a pointer outside guest memory: {addr:#x}+{size:#x}"
        );
        let ptr = self.bytes[addr..].as_ptr() as *mut T;
        // SAFETY: `ptr..+size` lies inside the Vec (asserted above), and the handler clone the
        // mapping holds keeps the Arc, so the Vec outlives the mapping. The acpi crate's table
        // types are `repr(C, packed)` (any address is aligned for them) and these tests only
        // read through the mapping, never through DerefMut, so the shared Vec is not written.
        unsafe { PhysicalMapping::new(addr, NonNull::new(ptr).unwrap(), size, size, self.clone()) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

fn full_layout(vcpus: u32) -> AcpiLayout {
    AcpiLayout {
        virtio_mmio: vec![
            VirtioMmioSlot {
                base: 0xd000_0000,
                gsi: 5,
            },
            VirtioMmioSlot {
                base: 0xd000_1000,
                gsi: 6,
            },
            VirtioMmioSlot {
                base: 0xd000_2000,
                gsi: 7,
            },
        ],
        vmgenid: Some(VmGenIdConfig {
            addr: DEFAULT_VMGENID_ADDR,
            gsi: 23,
        }),
        ..AcpiLayout::new(vcpus)
    }
}

fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
}

#[test]
fn acpi_crate_walks_rsdp_xsdt_and_every_table_with_valid_checksums() {
    let tables = build_tables(&full_layout(4)).unwrap();
    let memory = FakeMemory::with_tables(&tables);
    // from_rsdp validates the RSDP's signature, both checksums and revision, then the XSDT.
    // SAFETY: `rsdp_addr` is where build_tables placed the RSDP and with_tables copied it, so it
    // is a readable RSDP inside FakeMemory; every pointer the parser follows from there is
    // bounds-checked by map_physical_region.
    let parsed = unsafe { ParsedTables::from_rsdp(memory, tables.rsdp_addr as usize) }.unwrap();
    assert_eq!(parsed.revision(), 2);

    // headers() silently skips tables with a bad header or checksum, so count what it yields.
    let signatures: Vec<String> = parsed
        .headers()
        .map(|h| h.signature.as_str().to_string())
        .collect();
    assert_eq!(signatures, ["FACP", "APIC"]);

    let fadt = parsed.find_table::<Fadt>().unwrap();
    assert!({ fadt.flags }.system_is_hw_reduced_acpi());
    // The ACPI PM device's registers: byte-wide I/O ports, reset register flagged usable.
    let pm = crate::arch::x86_64::layout::ACPI_PM_PORT_BASE;
    let io8 = |address| GenericAddress {
        address_space: AddressSpace::SystemIo,
        bit_width: 8,
        bit_offset: 0,
        access_size: AccessSize::ByteAccess,
        address,
    };
    assert_eq!(fadt.sleep_control_register().unwrap(), Some(io8(pm)));
    assert_eq!(fadt.sleep_status_register().unwrap(), Some(io8(pm + 1)));
    assert_eq!(fadt.reset_register().unwrap(), io8(pm + 2));
    assert_eq!(
        { fadt.reset_value },
        crate::devices::legacy::acpi_pm::RESET_VALUE
    );
    assert!({ fadt.flags }.supports_system_reset_via_fadt());
    let dsdt = parsed.dsdt().unwrap();
    let dsdt_piece = tables.piece(b"DSDT").unwrap();
    assert_eq!(dsdt.address as u64, dsdt_piece.addr + 36);
    assert_eq!(dsdt.length as usize, dsdt_piece.bytes.len() - 36);

    let madt = parsed.find_table::<Madt>().unwrap();
    assert_eq!({ madt.get().local_apic_address }, LAPIC_ADDR);
    let mut apic_ids = Vec::new();
    let mut ioapics = Vec::new();
    for entry in madt.get().entries() {
        match entry {
            MadtEntry::LocalApic(l) => {
                assert_eq!({ l.flags } & 1, 1, "local APIC {} not enabled", l.apic_id);
                apic_ids.push(l.apic_id);
            }
            MadtEntry::IoApic(io) => {
                ioapics.push(({ io.io_apic_address }, { io.global_system_interrupt_base }))
            }
            other => panic!("unexpected MADT entry {other:?}"),
        }
    }
    assert_eq!(apic_ids, [0, 1, 2, 3]);
    assert_eq!(ioapics, [(IOAPIC_ADDR, 0)]);
}

#[test]
fn every_table_checksums_to_zero_and_stays_inside_its_region() {
    let layout = full_layout(2);
    let tables = build_tables(&layout).unwrap();
    let mut sdt_ranges = Vec::new();
    for piece in &tables.pieces {
        if &piece.signature == b"RSDP" {
            assert_eq!(piece.addr, layout.rsdp_addr);
            assert_eq!(piece.bytes.len(), 36);
            assert_eq!(byte_sum(&piece.bytes[..20]), 0, "RSDP v1 checksum");
            assert_eq!(byte_sum(&piece.bytes), 0, "RSDP extended checksum");
            continue;
        }
        let name = String::from_utf8_lossy(&piece.signature);
        assert_eq!(&piece.bytes[..4], &piece.signature, "{name} signature");
        let len = u32::from_le_bytes(piece.bytes[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, piece.bytes.len(), "{name} length field");
        assert_eq!(byte_sum(&piece.bytes), 0, "{name} checksum");
        assert!(piece.addr >= layout.tables_start && piece.addr + len as u64 <= layout.tables_end);
        sdt_ranges.push((piece.addr, piece.addr + len as u64));
    }
    sdt_ranges.sort();
    for pair in sdt_ranges.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "tables overlap: {pair:?}");
    }
}

#[test]
fn building_is_deterministic() {
    let layout = full_layout(3);
    assert_eq!(
        build_tables(&layout).unwrap(),
        build_tables(&layout).unwrap()
    );
}

#[test]
fn vmgenid_ids_are_random() {
    let a = generate_vmgenid().unwrap();
    let b = generate_vmgenid().unwrap();
    assert_ne!(a, b);
    assert_ne!(a, [0u8; VMGENID_LEN]);
}

/// Writes one line to the real stderr, past cargo's output capture.
fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {why}");
}

fn iasl_available() -> bool {
    Command::new("iasl").arg("-v").output().is_ok()
}

/// Runs `iasl args...` in `dir`, returning its combined output; fails the test on a bad exit.
fn run_iasl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("iasl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
    text
}

#[test]
fn iasl_decompiles_the_dsdt_and_shows_every_device() {
    if !iasl_available() {
        skip("iasl not installed (Debian acpica-tools): DSDT decompile check not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tables = build_tables(&full_layout(2)).unwrap();
    std::fs::write(
        dir.path().join("dsdt.dat"),
        &tables.piece(b"DSDT").unwrap().bytes,
    )
    .unwrap();
    let log = run_iasl(dir.path(), &["-d", "dsdt.dat"]);
    assert!(!log.contains("Error"), "iasl -d reported errors:\n{log}");
    let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();

    assert_eq!(dsl.matches("\"LNRO0005\"").count(), 3, "{dsl}");
    for needle in [
        "EisaId (\"PNP0501\")",
        "EisaId (\"PNP0303\")",
        "\"VMGENCTR\"",
        "\"VM_Gen_Counter\"",
        "\"ACPI0013\"",
        "0xD0002000,         // Address Base",
        "Method (_EVT, 1, Serialized)",
        "Notify (\\_SB.VGEN, 0x80)",
        // \_S5_ at the root: SLP_TYP 5 (Linux registers its ACPI power-off only with it).
        "Name (_S5, Package (0x02)  // _S5_: S5 System State\n    {\n        0x05, \n        0x05\n    })",
    ] {
        assert!(
            dsl.contains(needle),
            "decompiled DSDT lacks {needle:?}:\n{dsl}"
        );
    }
    assert!(dsl.contains("Name (ADDR, Package (0x02)"), "{dsl}");
    assert!(
        dsl.contains(&format!("0x{:08X}, ", DEFAULT_VMGENID_ADDR)),
        "{dsl}"
    );

    // The decompiled source must also compile back: a stricter check of the AML. iasl's one
    // objection is the _HID "VMGENCTR", whose suffix is not hex: that id is not ours to pick,
    // Linux's vmgenid driver matches exactly it. Any other error fails the test.
    let out = Command::new("iasl")
        .args(["-p", "recompiled", "dsdt.dsl"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("Error")).collect();
    assert_eq!(errors.len(), 1, "recompiling the DSDT:\n{log}");
    assert!(
        errors[0].contains("_HID suffix must be all hex digits (NCTR)"),
        "{log}"
    );
    assert!(log.contains("1 Errors, 0 Warnings"), "{log}");
}

#[test]
fn iasl_disassembles_the_data_tables_without_errors() {
    if !iasl_available() {
        skip("iasl not installed (Debian acpica-tools): table disassembly check not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tables = build_tables(&full_layout(2)).unwrap();
    for (sig, expect) in [
        (b"FACP", "Hardware Reduced (V5) : 1"),
        (b"FACP", "8042 Present on ports 60/64 (V2) : 1"),
        (b"FACP", "CMOS RTC Not Present (V5) : 1"),
        (b"FACP", "Control Method Power Button (V1) : 1"),
        (b"FACP", "Reset Register Supported (V2) : 1"),
        (b"FACP", "Value to cause reset : FE"),
        (b"APIC", "Local Apic Address : FEE00000"),
        (b"XSDT", "ACPI Table Address   1"),
    ] {
        let file = format!("{}.dat", String::from_utf8_lossy(sig));
        std::fs::write(dir.path().join(&file), &tables.piece(sig).unwrap().bytes).unwrap();
        let log = run_iasl(dir.path(), &["-d", &file]);
        let dsl = std::fs::read_to_string(dir.path().join(file.replace(".dat", ".dsl"))).unwrap();
        let text = format!("{log}{dsl}");
        assert!(
            !text.contains("Error") && !text.contains("Incorrect checksum"),
            "{text}"
        );
        assert!(dsl.contains(expect), "{sig:?} lacks {expect:?}:\n{dsl}");
    }
}

fn err(layout: AcpiLayout) -> String {
    build_tables(&layout).unwrap_err().to_string()
}

#[test]
fn bad_layouts_are_refused_with_a_message_naming_the_problem() {
    assert!(err(AcpiLayout::new(0)).contains("vCPU count 0"));
    assert!(err(AcpiLayout::new(255)).contains("vCPU count 255"));

    let mut l = full_layout(1);
    l.virtio_mmio[1].base = 0xd000_0800;
    assert!(err(l).contains("virtio-mmio slot 1: base 0xd0000800"));

    let mut l = full_layout(1);
    l.virtio_mmio[2].base = 0x1_0000_0000;
    assert!(err(l).contains("slot 2"));

    let mut l = full_layout(1);
    l.virtio_mmio[2].base = l.virtio_mmio[0].base;
    assert!(err(l).contains("slots 0 and 2 overlap"));

    let mut l = full_layout(1);
    l.virtio_mmio[0].gsi = 4;
    assert!(err(l).contains("virtio-mmio slot 0: GSI 4 is already used by COM1"));

    let mut l = full_layout(1);
    l.vmgenid.as_mut().unwrap().gsi = 6;
    assert!(err(l).contains("VMGenID event device: GSI 6 is already used by virtio-mmio slot 1"));

    let mut l = full_layout(1);
    l.virtio_mmio[0].gsi = 24;
    assert!(err(l).contains("GSI 24 is not an IOAPIC pin"));

    let mut l = full_layout(1);
    l.tables_end = l.tables_start + 64;
    assert!(err(l).contains("holds only 64"));

    let mut l = full_layout(1);
    l.tables_end = l.tables_start;
    assert!(err(l).contains("is empty"));

    let mut l = full_layout(1);
    l.rsdp_addr = 0xe0008;
    assert!(err(l).contains("RSDP address 0xe0008"));

    let mut l = full_layout(1);
    l.rsdp_addr = l.tables_start + 0x100;
    assert!(err(l).contains("overlaps the tables range"));

    let mut l = full_layout(1);
    l.vmgenid.as_mut().unwrap().addr = l.tables_start + 0x40;
    assert!(err(l).contains("VMGenID id at"));

    let mut l = full_layout(1);
    l.vmgenid.as_mut().unwrap().addr = DEFAULT_VMGENID_ADDR + 4;
    assert!(err(l).contains("not 8-byte aligned"));
}

/// The VMM's own layout (virtio-mmio slots and their GSIs, MP table, RSDP) with the most vCPUs
/// and slots it allows: everything fits, nothing overlaps, and the acpi crate parses it.
#[test]
fn the_vmm_layout_at_its_limits_fits_the_default_region() {
    use crate::arch::x86_64::{layout, mptable};
    assert_eq!(DEFAULT_RSDP_ADDR, layout::RSDP_ADDR);
    assert_eq!(u64::from(IOAPIC_ADDR), layout::IOAPIC_ADDR);
    assert_eq!(u64::from(LAPIC_ADDR), layout::APIC_ADDR);
    assert_eq!(COM1_GSI, layout::SERIAL_GSI);

    let slots = layout::VIRTIO_MMIO_MAX_SLOTS;
    let vmgenid_gsi = layout::VIRTIO_FIRST_GSI + slots;
    assert!(
        vmgenid_gsi < IOAPIC_PINS,
        "no IOAPIC pin left for the VMGenID event device"
    );
    let mut layout_acpi = AcpiLayout::new(MAX_VCPUS);
    layout_acpi.virtio_mmio = (0..slots)
        .map(|i| VirtioMmioSlot {
            base: layout::VIRTIO_MMIO_START + u64::from(i) * layout::VIRTIO_MMIO_SLOT_SIZE,
            gsi: layout::VIRTIO_FIRST_GSI + i,
        })
        .collect();
    layout_acpi.vmgenid = Some(VmGenIdConfig {
        addr: DEFAULT_VMGENID_ADDR,
        gsi: vmgenid_gsi,
    });
    let tables = build_tables(&layout_acpi).unwrap();

    // The MP table for the most vCPUs ends before VMGenID and the tables begin.
    let mp = mptable::build(MAX_VCPUS, layout::MPTABLE_START).unwrap();
    assert!(layout::MPTABLE_START + mp.len() as u64 <= DEFAULT_VMGENID_ADDR);
    // Everything ACPI writes stays in the e820-reserved low area or at the RSDP.
    for piece in &tables.pieces {
        let end = piece.addr + piece.bytes.len() as u64;
        assert!(
            piece.addr >= layout::EBDA_START && end <= layout::BIOS_END,
            "{piece:?}"
        );
    }

    let memory = FakeMemory::with_tables(&tables);
    // SAFETY: as above, the RSDP build_tables placed, inside FakeMemory, which bounds-checks
    // every mapping the parser asks for.
    let parsed = unsafe { ParsedTables::from_rsdp(memory, tables.rsdp_addr as usize) }.unwrap();
    let madt = parsed.find_table::<Madt>().unwrap();
    let lapics = madt
        .get()
        .entries()
        .filter(|e| matches!(e, MadtEntry::LocalApic(_)))
        .count();
    assert_eq!(lapics, MAX_VCPUS as usize);
    assert_eq!(Signature::DSDT.as_str(), "DSDT");
}

/// The lines of the generic address structure iasl shows under `title`, whitespace collapsed:
/// "Space ID : 01 [SystemIO]", "Bit Width : 08", ..., "Address : 0000000000000600".
fn gas_fields(dsl: &str, title: &str) -> Vec<String> {
    let collapse = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut lines = dsl.lines().skip_while(|l| !l.contains(title));
    assert!(lines.next().is_some(), "no {title:?} in:\n{dsl}");
    lines
        .take(5)
        .map(|l| collapse(l.split_once(']').map_or(l, |(_, rest)| rest)))
        .collect()
}

#[test]
fn iasl_shows_the_fadt_sleep_and_reset_registers_on_the_acpi_pm_ports() {
    if !iasl_available() {
        skip("iasl not installed (Debian acpica-tools): FADT register check not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tables = build_tables(&full_layout(1)).unwrap();
    std::fs::write(
        dir.path().join("facp.dat"),
        &tables.piece(b"FACP").unwrap().bytes,
    )
    .unwrap();
    run_iasl(dir.path(), &["-d", "facp.dat"]);
    let dsl = std::fs::read_to_string(dir.path().join("facp.dsl")).unwrap();
    let pm = crate::arch::x86_64::layout::ACPI_PM_PORT_BASE;
    for (title, port) in [
        ("Sleep Control Register :", pm),
        ("Sleep Status Register :", pm + 1),
        ("Reset Register :", pm + 2),
    ] {
        assert_eq!(
            gas_fields(&dsl, title),
            [
                "Space ID : 01 [SystemIO]".to_string(),
                "Bit Width : 08".to_string(),
                "Bit Offset : 00".to_string(),
                "Encoded Access Width : 01 [Byte Access:8]".to_string(),
                format!("Address : {port:016X}"),
            ],
            "{title}\n{dsl}"
        );
    }
}
