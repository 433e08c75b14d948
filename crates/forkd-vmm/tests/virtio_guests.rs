//! Boots the virtio test guests (guests/blk.c, rng.c, vsock.c) through real KVM with the
//! virtio-mmio devices attached, and checks what they did from the host side.

mod common;

use std::path::Path;

use common::*;
use forkd_vmm::devices::virtio::block::CowDisk;
use forkd_vmm::devices::virtio::{attach, BlockConfig, VirtioConfig, VirtioDevices, VsockConfig};
use forkd_vmm::{build, SerialOutput, SharedBuffer, StopReason, VmConfig, Vmm};

/// Builds `guest`, attaches `virtio`, starts it.
fn start_with(guest: &str, virtio: &VirtioConfig) -> (Vmm, VirtioDevices, SharedBuffer) {
    let serial = SharedBuffer::new();
    let mut config = VmConfig::new(builtin(guest));
    config.mem_mib = 64;
    config.serial = SerialOutput::Buffer(serial.clone());
    let mut vmm = build(&config).expect("build VM");
    let devices = attach(&mut vmm, virtio).expect("attach virtio devices");
    vmm.start().expect("start VM");
    (vmm, devices, serial)
}

fn base_pattern(o: usize) -> u8 {
    (o ^ (o >> 9) ^ 0x5a) as u8
}

fn written_pattern(o: usize) -> u8 {
    ((o * 7) ^ 0xc3) as u8
}

fn make_base(path: &Path, sectors: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..sectors * 512).map(base_pattern).collect();
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn block_guest_writes_land_in_the_overlay_and_never_in_the_base() {
    if !kvm_available("block_guest_writes_land_in_the_overlay_and_never_in_the_base") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let overlay = dir.path().join("vm.overlay");
    let base_before = make_base(&base, 2048);
    let virtio = VirtioConfig {
        block: Some(BlockConfig {
            base: base.clone(),
            overlay: overlay.clone(),
            read_only: false,
            id: "forkd-blk-test".into(),
        }),
        ..VirtioConfig::default()
    };
    let (mut vmm, mut devices, serial) = start_with("blk", &virtio);
    let reason = wait(&mut vmm);
    devices.stop();
    let out = serial.text();
    assert_eq!(reason, StopReason::GuestExit(0), "serial output:\n{out}");
    assert!(out.contains("capacity 2048 sectors"), "{out}");
    assert!(out.contains("blk: id forkd-blk-test\n"), "{out}");
    assert!(out.contains("blk: all checks passed"), "{out}");

    assert_eq!(std::fs::read(&base).unwrap(), base_before, "the base image changed");
    drop(devices);
    let disk = CowDisk::open(&base, &overlay).expect("overlay persisted by the guest's flush");
    let mut seen = vec![0u8; 16 * 512];
    disk.read_at(0, &mut seen).unwrap();
    for (o, byte) in seen.iter().enumerate() {
        let written = (3 * 512..4 * 512).contains(&o) || o >= 8 * 512;
        let want = if written { written_pattern(o) } else { base_pattern(o) };
        assert_eq!(*byte, want, "disk offset {o}");
    }
    // Sector 3 and sectors 8-15 live in 4 KiB blocks 0 and 1.
    assert_eq!(disk.allocated_blocks(), 2);
}

#[test]
fn rng_guest_gets_non_constant_bytes() {
    if !kvm_available("rng_guest_gets_non_constant_bytes") {
        return;
    }
    let virtio = VirtioConfig {
        rng: true,
        ..VirtioConfig::default()
    };
    let (mut vmm, _devices, serial) = start_with("rng", &virtio);
    let reason = wait(&mut vmm);
    let out = serial.text();
    assert_eq!(reason, StopReason::GuestExit(0), "serial output:\n{out}");
    let hex = out
        .lines()
        .find_map(|l| l.strip_prefix("rng: bytes "))
        .unwrap_or_else(|| panic!("no bytes line:\n{out}"));
    assert_eq!(hex.len(), 128);
    let distinct: std::collections::HashSet<char> = hex.chars().collect();
    assert!(distinct.len() > 4, "guest saw near-constant bytes: {hex}");
}

#[test]
fn guest_without_the_device_reports_it() {
    if !kvm_available("guest_without_the_device_reports_it") {
        return;
    }
    let (mut vmm, _devices, serial) = start_with("rng", &VirtioConfig::default());
    assert_eq!(wait(&mut vmm), StopReason::GuestExit(10), "{}", serial.text());
}
