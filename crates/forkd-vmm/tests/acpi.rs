//! ACPI as a booted guest sees it: the tables the VMM writes at start are read back from the
//! guest's own memory by independent parsers (the `acpi` crate, ACPICA's `iasl -d`), and by a
//! guest (`acpi_probe`) that follows the zero page's `acpi_rsdp_addr` like a kernel does.

mod common;

use std::io::Write;
use std::process::Command;
use std::ptr::NonNull;

use ::acpi::madt::{Madt, MadtEntry};
use ::acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use common::*;
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
        // SAFETY: the mapping lives as long as `self.memory` (held by the handler clone).
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
