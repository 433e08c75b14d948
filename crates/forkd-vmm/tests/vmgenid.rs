//! VMGenID across snapshot and restore: every restored child gets a fresh random id in its own
//! (copy-on-write) memory and its guest is told through the Generic Event Device's interrupt;
//! snapshots without a VMGenID (ACPI off, or older forkd) restore without one.

mod common;

use std::path::Path;

use common::*;
use forkd_store::{Store, Tag, MEMORY_FILE, VMSTATE_FILE};
use forkd_vmm::devices::virtio::VirtioConfig;
use forkd_vmm::guests::demo_counter;
use forkd_vmm::snapshot::{
    restore, AfterSnapshot, LoadedSnapshot, Machine, RestoreIdentity, SnapshotMode,
};
use forkd_vmm::{SerialOutput, SharedBuffer, VmConfig};

fn tag(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The id at the end of an `acpi_probe: ... id <hex>` line.
fn last_word(line: &str) -> String {
    line.rsplit(' ').next().unwrap_or_default().to_string()
}

fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Boots `acpi_probe` in wait mode, waits until it idles, snapshots it into `t` and stops it.
/// Returns the parent's id.
fn snapshot_probe(store: &Store, t: &str) -> [u8; 16] {
    let serial = SharedBuffer::new();
    let mut config = VmConfig::new(builtin("acpi_probe"));
    config.mem_mib = 32;
    config.cmdline = "console=ttyS0 wait".into();
    config.serial = SerialOutput::Buffer(serial.clone());
    let mut m = Machine::boot(&config, &VirtioConfig::default()).unwrap();
    let line = wait_for_line(&serial, "acpi_probe: waiting id ");
    let parent = m.vmgenid().expect("booted with ACPI");
    assert_eq!(
        last_word(&line),
        hex(&parent),
        "the guest reads the id the VMM wrote"
    );
    m.snapshot(
        store,
        &tag(t),
        SnapshotMode::Full,
        AfterSnapshot::StayPaused,
    )
    .unwrap();
    m.stop();
    parent
}

struct Child {
    machine: Machine,
    serial: SharedBuffer,
}

fn identity(dir: &Path, name: &str) -> (RestoreIdentity, SharedBuffer) {
    let cdir = dir.join(name);
    std::fs::create_dir_all(&cdir).unwrap();
    let serial = SharedBuffer::new();
    let mut id = RestoreIdentity::in_dir(&cdir);
    id.serial = SerialOutput::Buffer(serial.clone());
    (id, serial)
}

/// The id the child's guest printed when the GED interrupt told it about the new one (the
/// guest counts interrupts since boot: a child of a child prints `notified 2`).
fn notified_id(child: &Child) -> String {
    last_word(&wait_for_line(&child.serial, "acpi_probe: notified "))
}

#[test]
fn every_restored_child_gets_a_fresh_vmgenid_and_its_guest_is_notified() {
    if !kvm_available("every_restored_child_gets_a_fresh_vmgenid_and_its_guest_is_notified") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let parent = snapshot_probe(&store, "probe");
    let memory_bin = store.get(&tag("probe")).unwrap().dir.join(MEMORY_FILE);
    let memory_sha = sha256_file(&memory_bin);

    let loaded = LoadedSnapshot::load(&store, &tag("probe")).unwrap();
    let cfg = loaded
        .vmgenid_config()
        .expect("the snapshot records its VMGenID");
    assert_eq!((cfg.addr, cfg.gsi), (0xa2000, 23));

    let children: Vec<Child> = ["a", "b"]
        .iter()
        .map(|name| {
            let (id, serial) = identity(dir.path(), name);
            let shell = loaded.prepare_shell(true).unwrap();
            Child {
                machine: loaded.restore_into(shell, &id).unwrap(),
                serial,
            }
        })
        .collect();
    let ids: Vec<[u8; 16]> = children
        .iter()
        .map(|c| c.machine.vmgenid().expect("restored with a VMGenID"))
        .collect();
    assert_ne!(ids[0], parent, "child a kept the parent's id");
    assert_ne!(ids[1], parent, "child b kept the parent's id");
    assert_ne!(ids[0], ids[1], "siblings share an id");
    // Each guest took the GED interrupt and read its own new id from its own memory.
    for (child, id) in children.iter().zip(&ids) {
        assert_eq!(notified_id(child), hex(id), "{}", child.serial.text());
    }
    for c in children {
        c.machine.stop();
    }
    // The new ids went into the children's private copies, never into memory.bin.
    assert_eq!(sha256_file(&memory_bin), memory_sha);

    // A BRANCH of a child records the VMGenID too, and its children get fresh ids again.
    let (id, serial) = identity(dir.path(), "c");
    let mut c = Child {
        machine: restore(&store, &tag("probe"), &id).unwrap(),
        serial,
    };
    let c_id = notified_id(&c);
    c.machine
        .snapshot(
            &store,
            &tag("branch"),
            SnapshotMode::Diff,
            AfterSnapshot::Resume,
        )
        .unwrap();
    let (id, serial) = identity(dir.path(), "d");
    let d = Child {
        machine: restore(&store, &tag("branch"), &id).unwrap(),
        serial,
    };
    let d_id = notified_id(&d);
    assert!(
        d.serial.text().contains("acpi_probe: notified 2 id"),
        "{}",
        d.serial.text()
    );
    assert_ne!(d_id, c_id);
    assert_eq!(d_id, hex(&d.machine.vmgenid().unwrap()));
    c.machine.stop();
    d.machine.stop();
}

#[test]
fn a_snapshot_without_vmgenid_restores_without_one() {
    if !kvm_available("a_snapshot_without_vmgenid_restores_without_one") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let mut config = VmConfig::new(builtin("demo"));
    config.mem_mib = 32;
    config.acpi = false;
    let mut m = Machine::boot(&config, &VirtioConfig::default()).unwrap();
    wait_until("the demo to count", || {
        demo_counter(m.vmm.memory()).is_some_and(|c| c > 0)
    });
    assert_eq!(m.vmgenid(), None);
    m.snapshot(
        &store,
        &tag("plain"),
        SnapshotMode::Full,
        AfterSnapshot::StayPaused,
    )
    .unwrap();
    let at_snapshot = demo_counter(m.vmm.memory()).unwrap();
    m.stop();

    // The state file has no vmgenid key at all: the same shape older forkd wrote.
    let snap_dir = store.get(&tag("plain")).unwrap().dir;
    let text = std::fs::read_to_string(snap_dir.join(VMSTATE_FILE)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(json["state"].get("vmgenid").is_none(), "{}", json["state"]);
    assert!(json["state"].get("kernel").is_some());

    let loaded = LoadedSnapshot::load(&store, &tag("plain")).unwrap();
    assert_eq!(loaded.vmgenid_config(), None);
    let (id, _serial) = identity(dir.path(), "child");
    let child = restore(&store, &tag("plain"), &id).unwrap();
    assert_eq!(child.vmgenid(), None);
    wait_until("the restored demo to count on", || {
        demo_counter(child.vmm.memory()).is_some_and(|c| c > at_snapshot)
    });
    child.stop();
}
