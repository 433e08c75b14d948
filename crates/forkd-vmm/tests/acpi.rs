//! ACPI as a booted guest sees it: the tables the VMM writes at start are read back from the
//! guest's own memory by independent parsers (the `acpi` crate, ACPICA's `iasl -d`), and by a
//! guest (`acpi_probe`) that follows the zero page's `acpi_rsdp_addr` like a kernel does; a
//! guest (`acpi_power`) powers off and resets through the FADT's registers and `\_S5_`.

mod common;

use std::io::Write;
use std::process::Command;
use std::ptr::NonNull;

use ::acpi::address::{AccessSize, AddressSpace, GenericAddress};
use ::acpi::fadt::Fadt;
use ::acpi::madt::{Madt, MadtEntry};
use ::acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use common::*;
use forkd_vmm::arch::x86_64::layout::ACPI_PM_PORT_BASE;
use forkd_vmm::devices::legacy::acpi_pm::{
    RESET_OFFSET, RESET_VALUE, S5_SLP_TYP, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET,
};
use forkd_vmm::devices::virtio::{attach, VirtioConfig, VsockConfig};
use forkd_vmm::memory::{Bytes, GuestAddress, GuestMemory};
use forkd_vmm::{build, SerialOutput, SharedBuffer, StopReason, VmConfig, Vmm};
use vm_memory::GuestMemoryBackend;

/// Hands the `acpi` crate pointers straight into guest memory as the VMM maps it.
#[derive(Clone)]
struct GuestTables {
    memory: GuestMemory,
}

impl AcpiHandler for GuestTables {
    unsafe fn map_physical_region<T>(&self, addr: usize, size: usize) -> PhysicalMapping<Self, T> {
        let gpa = GuestAddress(addr as u64);
        let end = GuestAddress((addr + size - 1) as u64);
        assert!(
            self.memory.find_region(gpa).is_some(),
            "the parser followed a pointer outside guest memory: {addr:#x}"
        );
        assert!(
            self.memory.find_region(end).is_some(),
            "{addr:#x}+{size:#x} runs past guest memory"
        );
        let host = self.memory.get_host_address(gpa).unwrap();
        // SAFETY: the 32 MiB guest is one region, so with both ends inside guest memory
        // (asserted above) `host..+size` lies in that region's single host mapping; the handler
        // clone the mapping holds keeps `memory` (and so the mapping) alive. The acpi crate's
        // table types are `repr(C, packed)`, so any address is aligned for them, and the test
        // only reads through the mapping while the guest is paused.
        unsafe {
            PhysicalMapping::new(
                addr,
                NonNull::new(host as *mut T).unwrap(),
                size,
                size,
                self.clone(),
            )
        }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {why}");
}

/// Boots `acpi_probe` with `cmdline`, `vcpus` and `virtio` devices; returns the running VM.
fn boot_probe(
    vcpus: u32,
    cmdline: &str,
    acpi: bool,
    virtio: &VirtioConfig,
) -> (Vmm, forkd_vmm::devices::virtio::VirtioDevices, SharedBuffer) {
    let serial = SharedBuffer::new();
    let mut config = VmConfig::new(builtin("acpi_probe"));
    config.vcpus = vcpus;
    config.mem_mib = 32;
    config.cmdline = cmdline.to_string();
    config.acpi = acpi;
    config.serial = SerialOutput::Buffer(serial.clone());
    let mut vmm = build(&config).unwrap();
    let devices = attach(&mut vmm, virtio).unwrap();
    vmm.start().unwrap();
    (vmm, devices, serial)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

fn read_table(memory: &GuestMemory, addr: u64) -> Vec<u8> {
    let len: u32 = memory.read_obj(GuestAddress(addr + 4)).unwrap();
    let mut bytes = vec![0u8; len as usize];
    memory.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

#[test]
fn tables_in_guest_memory_describe_the_vcpus_and_every_attached_virtio_slot() {
    if !kvm_available("tables_in_guest_memory_describe_the_vcpus_and_every_attached_virtio_slot") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let virtio = VirtioConfig {
        vsock: Some(VsockConfig::new(dir.path().join("v.sock"))),
        rng: true,
        ..VirtioConfig::default()
    };
    let (vmm, mut devices, serial) = boot_probe(2, "console=ttyS0 wait", true, &virtio);
    wait_for_line(&serial, "acpi_probe: waiting id ");
    vmm.pause().unwrap();
    let slots = vmm.mmio_slots().to_vec();
    assert_eq!(slots.len(), 2, "vsock and rng");
    let memory = vmm.memory().clone();

    // The zero page points at the RSDP.
    let rsdp: u64 = memory.read_obj(GuestAddress(0x7000 + 0x70)).unwrap();
    assert_eq!(rsdp, 0xe0000);

    // The acpi crate: RSDP (signature, both checksums) → XSDT → every table, checksummed.
    // SAFETY: the zero page says the RSDP is at `rsdp` (asserted above), which the VMM wrote
    // there; every pointer the parser follows is bounds-checked by map_physical_region.
    let parsed = unsafe {
        AcpiTables::from_rsdp(
            GuestTables {
                memory: memory.clone(),
            },
            rsdp as usize,
        )
    }
    .unwrap();
    let sigs: Vec<String> = parsed
        .headers()
        .map(|h| h.signature.as_str().to_string())
        .collect();
    assert_eq!(sigs, ["FACP", "APIC"]);
    // headers() skips tables whose checksum fails, so the list above already shows both are
    // valid; walk the XSDT by hand as well, checksumming it and every entry.
    let xsdt_addr: u64 = memory.read_obj(GuestAddress(rsdp + 24)).unwrap();
    let xsdt = read_table(&memory, xsdt_addr);
    assert_eq!(byte_sum(&xsdt), 0, "XSDT checksum");
    for entry in xsdt[36..].chunks(8) {
        let table = read_table(&memory, u64::from_le_bytes(entry.try_into().unwrap()));
        let sig = String::from_utf8_lossy(&table[..4]).to_string();
        assert_eq!(byte_sum(&table), 0, "{sig} checksum");
    }
    // The FADT in guest memory points at the ACPI PM device's ports: sleep control and
    // status (how a hardware-reduced guest enters S5) and the reset register.
    let fadt = parsed.find_table::<Fadt>().unwrap();
    let pm = ACPI_PM_PORT_BASE;
    let io8 = |address| GenericAddress {
        address_space: AddressSpace::SystemIo,
        bit_width: 8,
        bit_offset: 0,
        access_size: AccessSize::ByteAccess,
        address,
    };
    assert_eq!(
        fadt.sleep_control_register().unwrap(),
        Some(io8(pm + SLEEP_CONTROL_OFFSET))
    );
    assert_eq!(
        fadt.sleep_status_register().unwrap(),
        Some(io8(pm + SLEEP_STATUS_OFFSET))
    );
    assert_eq!(fadt.reset_register().unwrap(), io8(pm + RESET_OFFSET));
    assert_eq!({ fadt.reset_value }, RESET_VALUE);
    assert!({ fadt.flags }.supports_system_reset_via_fadt());
    let madt = parsed.find_table::<Madt>().unwrap();
    let lapics: Vec<u8> = madt
        .get()
        .entries()
        .filter_map(|e| match e {
            MadtEntry::LocalApic(l) => Some(l.apic_id),
            _ => None,
        })
        .collect();
    assert_eq!(lapics, [0, 1], "one local APIC per vCPU");
    let dsdt = parsed.dsdt().unwrap();
    let dsdt_bytes = read_table(&memory, dsdt.address as u64 - 36);
    assert_eq!(&dsdt_bytes[..4], b"DSDT");
    assert_eq!(byte_sum(&dsdt_bytes), 0, "DSDT checksum");

    // The guest found the same through its own walk, and the same VMGenID id.
    let id = vmm.vmgenid().expect("booted with ACPI: a VMGenID");
    assert_ne!(id, [0u8; 16]);
    let out = serial.text();
    for needle in [
        "acpi_probe: RSDP at e0000 revision 2 checksums ok".to_string(),
        "acpi_probe: table XSDT".to_string(),
        "acpi_probe: table FACP".to_string(),
        "acpi_probe: table APIC".to_string(),
        "acpi_probe: table DSDT".to_string(),
        "acpi_probe: MADT local APICs 2".to_string(),
        "acpi_probe: LNRO0005 devices 2".to_string(),
        format!("acpi_probe: vmgenid addr a2000 ged gsi 23 id {}", hex(&id)),
        format!("acpi_probe: waiting id {}", hex(&id)),
    ] {
        assert!(
            out.contains(&needle),
            "guest output lacks {needle:?}:\n{out}"
        );
    }
    for (i, s) in slots.iter().enumerate() {
        let line = format!(
            "acpi_probe: virtio-mmio {i} base {:x} size 1000 gsi {}",
            s.base, s.gsi
        );
        assert!(out.contains(&line), "guest output lacks {line:?}:\n{out}");
    }

    // iasl decompiles the DSDT read back from guest memory: one LNRO0005 per slot, with its
    // window and line.
    if Command::new("iasl").arg("-v").output().is_err() {
        skip("iasl not installed (Debian acpica-tools): guest DSDT decompile check not run");
    } else {
        let work = tempfile::tempdir().unwrap();
        std::fs::write(work.path().join("dsdt.dat"), &dsdt_bytes).unwrap();
        let run = Command::new("iasl")
            .args(["-d", "dsdt.dat"])
            .current_dir(work.path())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&run.stdout).to_string()
            + &String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success() && !log.contains("Error"), "{log}");
        let dsl = std::fs::read_to_string(work.path().join("dsdt.dsl")).unwrap();
        assert_eq!(dsl.matches("\"LNRO0005\"").count(), slots.len(), "{dsl}");
        let devices: Vec<&str> = dsl.split("Device (VR").skip(1).collect();
        assert_eq!(devices.len(), slots.len(), "{dsl}");
        for (s, text) in slots.iter().zip(&devices) {
            let base = format!("0x{:08X},         // Address Base", s.base);
            let gsi = format!("0x{:08X},", s.gsi);
            assert!(text.contains(&base), "slot {s:?} window missing:\n{text}");
            assert!(text.contains(&gsi), "slot {s:?} GSI missing:\n{text}");
        }
        assert!(
            dsl.contains("\"VMGENCTR\"") && dsl.contains("\"ACPI0013\""),
            "{dsl}"
        );
        // \_S5_ names SLP_TYP 5, the value the guest writes with SLP_EN to power off.
        let s5 = format!(
            "Name (_S5, Package (0x02)  // _S5_: S5 System State\n    {{\n        0x{S5_SLP_TYP:02X}, "
        );
        assert!(dsl.contains(&s5), "{dsl}");
    }
    vmm.request_stop();
    drop(vmm);
    devices.stop();
}

#[test]
fn probe_without_devices_exits_cleanly_and_acpi_can_be_turned_off() {
    if !kvm_available("probe_without_devices_exits_cleanly_and_acpi_can_be_turned_off") {
        return;
    }
    let (mut vmm, mut devices, serial) =
        boot_probe(1, "console=ttyS0", true, &VirtioConfig::default());
    assert_eq!(
        wait(&mut vmm),
        StopReason::GuestExit(0),
        "{}",
        serial.text()
    );
    let out = serial.text();
    assert!(out.contains("acpi_probe: LNRO0005 devices 0"), "{out}");
    assert!(out.contains("acpi_probe: MADT local APICs 1"), "{out}");
    assert!(out.contains("acpi_probe: ok"), "{out}");
    devices.stop();

    // acpi = false: no tables, acpi_rsdp_addr stays 0, no VMGenID.
    let (mut vmm, mut devices, serial) =
        boot_probe(1, "console=ttyS0", false, &VirtioConfig::default());
    assert_eq!(
        wait(&mut vmm),
        StopReason::GuestExit(10),
        "{}",
        serial.text()
    );
    assert!(serial.text().contains("acpi_rsdp_addr is 0"));
    assert_eq!(vmm.vmgenid(), None);
    devices.stop();
}

#[test]
fn every_boot_gets_its_own_vmgenid() {
    if !kvm_available("every_boot_gets_its_own_vmgenid") {
        return;
    }
    let ids: Vec<[u8; 16]> = (0..2)
        .map(|_| {
            let (mut vmm, mut devices, serial) =
                boot_probe(1, "console=ttyS0", true, &VirtioConfig::default());
            assert_eq!(
                wait(&mut vmm),
                StopReason::GuestExit(0),
                "{}",
                serial.text()
            );
            let id = vmm.vmgenid().unwrap();
            assert!(serial.text().contains(&hex(&id)), "{}", serial.text());
            devices.stop();
            id
        })
        .collect();
    assert_ne!(ids[0], ids[1]);
}

/// Boots `acpi_power` with `action` on its command line; returns why it stopped and its output.
fn run_acpi_power(action: &str) -> (StopReason, String) {
    let (mut vmm, serial) = start(
        builtin("acpi_power"),
        1,
        Some(&format!("console=ttyS0 {action}")),
    );
    let reason = wait(&mut vmm);
    (reason, serial.text())
}

/// What `acpi_power` reads from the FADT: the registers of our ACPI PM device.
const POWER_REGISTERS_LINE: &str =
    "acpi_power: hw-reduced 1 sleep control io 600 status io 601 reset io 602 value fe supported 1";

#[test]
fn a_guest_powering_off_through_the_fadt_and_s5_stops_the_vm_with_poweroff() {
    if !kvm_available("a_guest_powering_off_through_the_fadt_and_s5_stops_the_vm_with_poweroff") {
        return;
    }
    let (reason, out) = run_acpi_power("poweroff");
    assert_eq!(reason, StopReason::PowerOff, "{out}");
    assert!(reason.is_clean());
    assert!(out.contains(POWER_REGISTERS_LINE), "{out}");
    assert!(
        out.contains("acpi_power: S5 SLP_TYP 5, powering off"),
        "{out}"
    );
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn a_guest_writing_the_fadt_reset_register_stops_the_vm_with_reset() {
    if !kvm_available("a_guest_writing_the_fadt_reset_register_stops_the_vm_with_reset") {
        return;
    }
    let (reason, out) = run_acpi_power("reboot");
    assert_eq!(reason, StopReason::Reset, "{out}");
    assert!(out.contains(POWER_REGISTERS_LINE), "{out}");
    assert!(out.contains("acpi_power: resetting"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn sleep_states_other_than_s5_are_ignored_and_the_guest_stays_awake() {
    if !kvm_available("sleep_states_other_than_s5_are_ignored_and_the_guest_stays_awake") {
        return;
    }
    let (reason, out) = run_acpi_power("s1");
    // The S1 request did nothing, the status register read awake, then S5 powered off.
    assert!(
        out.contains("acpi_power: S1 request ignored, status 80"),
        "{out}"
    );
    assert_eq!(reason, StopReason::PowerOff, "{out}");
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn without_acpi_tables_the_guest_finds_no_power_registers() {
    if !kvm_available("without_acpi_tables_the_guest_finds_no_power_registers") {
        return;
    }
    let serial = SharedBuffer::new();
    let mut config = VmConfig::new(builtin("acpi_power"));
    config.mem_mib = 32;
    config.cmdline = "console=ttyS0 poweroff".into();
    config.acpi = false;
    config.serial = SerialOutput::Buffer(serial.clone());
    let mut vmm = build(&config).unwrap();
    vmm.start().unwrap();
    assert_eq!(
        wait(&mut vmm),
        StopReason::GuestExit(20),
        "{}",
        serial.text()
    );
}
