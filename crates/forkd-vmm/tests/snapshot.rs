//! Snapshot → restore → fork through real KVM with the demo guest: the restored child carries
//! on counting from the snapshot and answers over its own vsock socket; children are isolated
//! from each other and from the snapshot files; BRANCH (full and diff), chains, bad inputs.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use forkd_store::{Store, Tag};
use forkd_vmm::devices::legacy::acpi_pm::{
    RESET_OFFSET, RESET_VALUE, S5_SLEEP_CONTROL, SLEEP_CONTROL_OFFSET,
};
use forkd_vmm::devices::virtio::{BlockConfig, VirtioConfig, VsockConfig};
use forkd_vmm::guests::demo_counter;
use forkd_vmm::memory::{Bytes, GuestAddress};
use forkd_vmm::snapshot::{
    restore, AfterSnapshot, ChainError, LoadedSnapshot, Machine, RestoreError, RestoreIdentity,
    SnapshotMode,
};
use forkd_vmm::{StopReason, VmConfig, VmShell};

const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn tag(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

fn ready_listener(uds: &Path) -> UnixListener {
    let _ = std::fs::remove_file(format!("{}_1025", uds.display()));
    UnixListener::bind(format!("{}_1025", uds.display())).unwrap()
}

fn accept_ready(listener: &UnixListener) -> String {
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    read_line(&mut conn)
}

/// Asks the demo guest behind `uds` for its counter with `nonce`; returns the value.
fn ask_counter(uds: &Path, nonce: &str) -> u64 {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    writeln!(s, "CONNECT 1024").unwrap();
    let ok = read_line(&mut s);
    assert!(ok.starts_with("OK "), "{ok:?}");
    writeln!(s, "COUNTER {nonce}").unwrap();
    let reply = read_line(&mut s);
    let parts: Vec<&str> = reply.split(' ').collect();
    assert_eq!(parts.len(), 3, "{reply:?}");
    assert_eq!((parts[0], parts[2]), ("COUNTER", nonce), "{reply:?}");
    parts[1].parse().unwrap()
}

/// Boots the demo with vsock in `dir`, waits for READY, snapshots it into `t` and stops it.
/// Returns the counter value at the snapshot.
fn snapshot_demo(store: &Store, dir: &Path, t: &str) -> u64 {
    snapshot_demo_with_disk(store, dir, t, None)
}

fn snapshot_demo_with_disk(store: &Store, dir: &Path, t: &str, disk: Option<&Path>) -> u64 {
    let uds = dir.join(format!("boot-{t}.sock"));
    let ready = ready_listener(&uds);
    let mut config = VmConfig::new(builtin("demo"));
    config.mem_mib = 32;
    let virtio = VirtioConfig {
        vsock: Some(VsockConfig::new(uds.clone())),
        block: disk.map(|base| BlockConfig {
            base: base.to_path_buf(),
            overlay: dir.join(format!("boot-{t}.overlay")),
            read_only: false,
            id: "root".into(),
        }),
        ..VirtioConfig::default()
    };
    let mut m = Machine::boot(&config, &virtio).unwrap();
    assert_eq!(accept_ready(&ready), "READY demo");
    // Let it count a while so the snapshot value is clearly non-zero.
    ask_counter(&uds, "boot");
    m.snapshot(
        store,
        &tag(t),
        SnapshotMode::Full,
        AfterSnapshot::StayPaused,
    )
    .unwrap();
    let at_snapshot = demo_counter(m.vmm.memory()).unwrap();
    m.stop();
    at_snapshot
}

struct Child {
    machine: Machine,
    uds: PathBuf,
}

impl Child {
    /// Waits until the restored demo accepts connections on its port again.
    fn wait_ready(&self) {
        wait_answering(&self.uds);
    }
}

/// Retries `CONNECT 1024` on `uds` until the guest accepts it (a restored child serves again
/// once it has handled its vsock transport reset; it does not announce itself).
fn wait_answering(uds: &Path) {
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    loop {
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            if writeln!(s, "CONNECT 1024").is_ok() && read_line(&mut s).starts_with("OK ") {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest behind {} never accepted a connection",
            uds.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

const COUNTER_ADDR: u64 = forkd_vmm::guests::STATUS_ADDR + 8;
/// Pages of the demo's 32 MiB RAM the guest never touches; tests write markers there.
const PAGE_X: u64 = 0x100_0000;
const PAGE_Y: u64 = 0x120_0000;

fn read_u64(m: &Machine, gpa: u64) -> u64 {
    m.vmm.memory().read_obj(GuestAddress(gpa)).unwrap()
}

fn write_u64(m: &Machine, gpa: u64, v: u64) {
    m.vmm.memory().write_obj(v, GuestAddress(gpa)).unwrap()
}

fn child_identity(dir: &Path, name: &str) -> RestoreIdentity {
    let cdir = dir.join(name);
    std::fs::create_dir_all(&cdir).unwrap();
    RestoreIdentity::in_dir(&cdir)
}

fn restore_child(store: &Store, dir: &Path, t: &str, name: &str) -> Child {
    let id = child_identity(dir, name);
    let machine = restore(store, &tag(t), &id).unwrap();
    Child {
        machine,
        uds: id.vsock_uds,
    }
}

#[test]
fn restored_demo_continues_counting_and_echoes_the_nonce() {
    if !kvm_available("restored_demo_continues_counting_and_echoes_the_nonce") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let at_snapshot = snapshot_demo(&store, dir.path(), "demo");
    assert!(at_snapshot > 0);

    // Through the zygote-style API: load once, shell ahead of time, restore.
    let loaded = LoadedSnapshot::load(&store, &tag("demo")).unwrap();
    assert!(loaded.ancestors().is_empty());
    let shell = loaded.prepare_shell(true).unwrap();
    let id = child_identity(dir.path(), "c1");
    let child = loaded.restore_into(shell, &id).unwrap();
    // The transport reset was pending: the guest drops its old streams and serves again.
    wait_answering(&id.vsock_uds);
    let value = ask_counter(&id.vsock_uds, "child-1-nonce");
    assert!(
        value >= at_snapshot,
        "counter {value} restarted below the snapshot's {at_snapshot}"
    );
    assert!(child.machine_running());

    // A second child of the same process from a bare shell (memory mapped afresh at restore).
    let id2 = child_identity(dir.path(), "c2");
    let child2 = loaded
        .restore_into(
            loaded
                .prepare(VmShell::new(loaded.vcpus()).unwrap(), true)
                .unwrap(),
            &id2,
        )
        .unwrap();
    wait_answering(&id2.vsock_uds);
    assert!(ask_counter(&id2.vsock_uds, "child-2-nonce") >= at_snapshot);

    // Both children have the ACPI power-management registers a Linux guest's tables point at:
    // a power-off (S5) ends one, the reset register the other.
    let mut child = child;
    let mut child2 = child2;
    let pm = forkd_vmm::arch::x86_64::layout::ACPI_PM_PORT_BASE;
    assert!(child
        .vmm
        .pio_bus()
        .write(pm + SLEEP_CONTROL_OFFSET, &[S5_SLEEP_CONTROL]));
    assert!(child2
        .vmm
        .pio_bus()
        .write(pm + RESET_OFFSET, &[RESET_VALUE]));
    assert_eq!(wait(&mut child.vmm), StopReason::PowerOff);
    assert_eq!(wait(&mut child2.vmm), StopReason::Reset);
    child.stop();
    child2.stop();

    // A shell prepared with another snapshot's memory is refused.
    snapshot_demo(&store, dir.path(), "other");
    let other = LoadedSnapshot::load(&store, &tag("other")).unwrap();
    let id3 = child_identity(dir.path(), "c3");
    let err = loaded
        .restore_into(other.prepare_shell(false).unwrap(), &id3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another snapshot's memory"), "{err}");
}

#[test]
fn children_in_one_process_do_not_see_each_others_memory_and_memory_bin_is_unchanged() {
    if !kvm_available("children_in_one_process_do_not_see_each_others_memory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let at_snapshot = snapshot_demo(&store, dir.path(), "iso");
    let a = restore_child(&store, dir.path(), "iso", "a");
    let b = restore_child(&store, dir.path(), "iso", "b");
    a.wait_ready();
    b.wait_ready();

    // A guest-visible write in A: its counter jumps far ahead.
    const JUMP: u64 = 1 << 40;
    // (A vCPU paused between the guest's load and store of the counter overwrites the host's
    // write once; write again until the jump sticks.)
    for _ in 0..50 {
        a.machine.vmm.pause().unwrap();
        write_u64(&a.machine, COUNTER_ADDR, JUMP);
        write_u64(&a.machine, PAGE_X, 0xdead_beef);
        a.machine.vmm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(10));
        if read_u64(&a.machine, COUNTER_ADDR) >= JUMP {
            break;
        }
    }
    assert!(ask_counter(&a.uds, "a") >= JUMP);
    let b_value = ask_counter(&b.uds, "b");
    assert!(
        (at_snapshot..JUMP).contains(&b_value),
        "B saw A's write: {b_value}"
    );
    assert_eq!(read_u64(&b.machine, PAGE_X), 0, "B sees A's marker");
    a.machine.stop();
    b.machine.stop();
    // memory.bin (and every other file) still hashes to what the manifest recorded.
    let problems = store.verify(&tag("iso")).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn childrens_disk_writes_stay_in_their_own_overlays() {
    if !kvm_available("childrens_disk_writes_stay_in_their_own_overlays") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let base = dir.path().join("base.img");
    let pattern: Vec<u8> = (0..1 << 20).map(|i: usize| (i % 251) as u8).collect();
    std::fs::write(&base, &pattern).unwrap();
    snapshot_demo_with_disk(&store, dir.path(), "disk", Some(&base));
    let rootfs = store.get(&tag("disk")).unwrap().file("rootfs.ext4");
    assert_eq!(
        std::fs::read(&rootfs).unwrap(),
        pattern,
        "disk as the guest saw it"
    );

    let a = restore_child(&store, dir.path(), "disk", "a");
    let b = restore_child(&store, dir.path(), "disk", "b");
    a.wait_ready();
    b.wait_ready();
    // What the block device does for a guest write request.
    let block_a = a.machine.devices.block.as_ref().unwrap();
    block_a
        .lock()
        .unwrap()
        .disk_mut()
        .write_at(4096, &[0xab; 512])
        .unwrap();
    let mut seen_a = vec![0u8; 512];
    let mut seen_b = vec![0u8; 512];
    block_a
        .lock()
        .unwrap()
        .disk()
        .read_at(4096, &mut seen_a)
        .unwrap();
    let block_b = b.machine.devices.block.as_ref().unwrap();
    block_b
        .lock()
        .unwrap()
        .disk()
        .read_at(4096, &mut seen_b)
        .unwrap();
    assert_eq!(seen_a, vec![0xab; 512]);
    assert_eq!(seen_b, pattern[4096..4608], "B sees A's disk write");
    assert_eq!(
        block_a.lock().unwrap().disk().base_path(),
        rootfs.as_path(),
        "children's overlays sit over the snapshot's rootfs"
    );
    // A BRANCH of A carries A's disk as A saw it; B and the original snapshot do not.
    let mut a = a;
    a.machine
        .branch(&store, &tag("disk-a"), SnapshotMode::Diff)
        .unwrap();
    let branch_rootfs = store.get(&tag("disk-a")).unwrap().file("rootfs.ext4");
    let mut expected = pattern.clone();
    expected[4096..4608].fill(0xab);
    assert_eq!(std::fs::read(&branch_rootfs).unwrap(), expected);
    a.machine.stop();
    b.machine.stop();
    let c = restore_child(&store, dir.path(), "disk-a", "c");
    c.wait_ready();
    let mut seen_c = vec![0u8; 512];
    let block_c = c.machine.devices.block.as_ref().unwrap();
    block_c
        .lock()
        .unwrap()
        .disk()
        .read_at(4096, &mut seen_c)
        .unwrap();
    assert_eq!(seen_c, vec![0xab; 512], "the branch's child sees A's write");
    c.machine.stop();
    assert_eq!(
        std::fs::read(&rootfs).unwrap(),
        pattern,
        "rootfs.ext4 written"
    );
    assert!(store.verify(&tag("disk")).unwrap().is_empty());
}

#[test]
fn two_vcpu_snapshot_restores() {
    if !kvm_available("two_vcpu_snapshot_restores") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let uds = dir.path().join("boot.sock");
    let ready = ready_listener(&uds);
    let mut config = VmConfig::new(builtin("demo"));
    config.mem_mib = 32;
    config.vcpus = 2;
    let virtio = VirtioConfig {
        vsock: Some(VsockConfig::new(uds.clone())),
        ..VirtioConfig::default()
    };
    let mut m = Machine::boot(&config, &virtio).unwrap();
    assert_eq!(accept_ready(&ready), "READY demo");
    m.snapshot(
        &store,
        &tag("smp"),
        SnapshotMode::Full,
        AfterSnapshot::StayPaused,
    )
    .unwrap();
    let at_snapshot = demo_counter(m.vmm.memory()).unwrap();
    m.stop();
    let loaded = LoadedSnapshot::load(&store, &tag("smp")).unwrap();
    assert_eq!(loaded.vcpus(), 2);
    let c = restore_child(&store, dir.path(), "smp", "c");
    c.wait_ready();
    assert!(ask_counter(&c.uds, "smp") >= at_snapshot);
    c.machine.stop();
}

/// Pauses `m`, reads its counter, and BRANCHes it into `t` (the machine stays paused through
/// the branch since it was paused before), then resumes. Returns (counter, paused time).
fn branch_paused(m: &mut Machine, store: &Store, t: &str, mode: SnapshotMode) -> u64 {
    m.vmm.pause().unwrap();
    let counter = read_u64(m, COUNTER_ADDR);
    let report = m.branch(store, &tag(t), mode).unwrap();
    assert_eq!(report.mode, mode);
    m.vmm.resume().unwrap();
    counter
}

#[test]
fn full_and_diff_branch_chains_of_depth_three_and_compact() {
    if !kvm_available("full_and_diff_branch_chains_of_depth_three_and_compact") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    snapshot_demo(&store, dir.path(), "c0");

    // c0 -> c1 (diff): marker X=1 written by the VMM (through its memory bitmap).
    let mut m = restore_child(&store, dir.path(), "c0", "r0");
    m.wait_ready();
    write_u64(&m.machine, PAGE_X, 1);
    let counter1 = branch_paused(&mut m.machine, &store, "c1", SnapshotMode::Diff);
    // The running machine is unaffected by its branch and keeps answering.
    assert!(ask_counter(&m.uds, "after-branch") >= counter1);
    // A full branch of the same machine is self-contained.
    let report = m
        .machine
        .branch(&store, &tag("full"), SnapshotMode::Full)
        .unwrap();
    assert!(report.paused > Duration::ZERO);
    m.machine.stop();
    let c1 = store.get(&tag("c1")).unwrap();
    assert_eq!(c1.manifest.parent_tag, "c0");
    // The link records its parent's identity: the sha256 of the parent's manifest.toml.
    let parent_manifest =
        std::fs::read(store.get(&tag("c0")).unwrap().dir.join("manifest.toml")).unwrap();
    assert_eq!(
        c1.manifest.parent_sha256,
        forkd_store::hash::sha256_hex(&parent_manifest)
    );
    assert!(store
        .get(&tag("full"))
        .unwrap()
        .manifest
        .parent_sha256
        .is_empty());
    // The diff holds the guest-written status page (KVM's dirty log) and the VMM-written
    // marker page (the memory bitmap), and is far smaller than the guest.
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c1.file("vmstate.json")).unwrap()).unwrap();
    let extents: Vec<(u64, u64)> = v["state"]["chain"]["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["len"].as_u64().unwrap()))
        .collect();
    let covers = |addr: u64| extents.iter().any(|&(o, l)| (o..o + l).contains(&addr));
    assert!(covers(forkd_vmm::guests::STATUS_ADDR), "{extents:x?}");
    assert!(covers(PAGE_X), "{extents:x?}");
    let stored: u64 = extents.iter().map(|e| e.1).sum();
    assert!(stored < 4 << 20, "diff stores {stored} bytes");
    assert_eq!(v["state"]["chain"]["parent_tag"], "c0");
    assert!(store
        .get(&tag("full"))
        .unwrap()
        .manifest
        .parent_tag
        .is_empty());

    // c1 -> c2: X=2, Y=7.
    let mut m = restore_child(&store, dir.path(), "c1", "r1");
    m.wait_ready();
    assert_eq!(read_u64(&m.machine, PAGE_X), 1);
    assert!(ask_counter(&m.uds, "r1") >= counter1);
    write_u64(&m.machine, PAGE_X, 2);
    write_u64(&m.machine, PAGE_Y, 7);
    branch_paused(&mut m.machine, &store, "c2", SnapshotMode::Diff);
    m.machine.stop();

    // c2 -> c3: X becomes zero again (a diff must record it, or c2's 2 would show through).
    let mut m = restore_child(&store, dir.path(), "c2", "r2");
    m.wait_ready();
    assert_eq!(
        (read_u64(&m.machine, PAGE_X), read_u64(&m.machine, PAGE_Y)),
        (2, 7)
    );
    write_u64(&m.machine, PAGE_X, 0);
    let counter3 = branch_paused(&mut m.machine, &store, "c3", SnapshotMode::Diff);
    m.machine.stop();

    let loaded = LoadedSnapshot::load(&store, &tag("c3")).unwrap();
    assert_eq!(loaded.ancestors(), &[tag("c2"), tag("c1"), tag("c0")]);
    drop(loaded);
    for (t, name) in [("c3", "r3"), ("flat", "rf")] {
        if t == "flat" {
            let flat = forkd_vmm::snapshot::compact(&store, &tag("c3"), &tag("flat")).unwrap();
            assert!(flat.manifest.parent_tag.is_empty());
            assert!(LoadedSnapshot::load(&store, &tag("flat"))
                .unwrap()
                .ancestors()
                .is_empty());
        }
        let m = restore_child(&store, dir.path(), t, name);
        m.wait_ready();
        assert_eq!(
            (read_u64(&m.machine, PAGE_X), read_u64(&m.machine, PAGE_Y)),
            (0, 7),
            "{t}"
        );
        assert!(ask_counter(&m.uds, name) >= counter3, "{t}");
        m.machine.stop();
    }
    // The full branch restores too, with X=1 from its machine.
    let m = restore_child(&store, dir.path(), "full", "rfull");
    m.wait_ready();
    assert_eq!(read_u64(&m.machine, PAGE_X), 1);
    m.machine.stop();
    // A booted machine has no origin to diff against.
    let mut config = VmConfig::new(builtin("demo"));
    config.mem_mib = 32;
    let mut booted = Machine::boot(&config, &VirtioConfig::default()).unwrap();
    let err = booted
        .branch(&store, &tag("nodiff"), SnapshotMode::Diff)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("diff snapshot needs a machine restored"),
        "{err}"
    );
    assert!(!store.exists(&tag("nodiff")));
    booted.stop();

    // A child restored without dirty tracking cannot take a diff; a stopped one nothing.
    let cdir = dir.path().join("untracked");
    std::fs::create_dir_all(&cdir).unwrap();
    let mut id = RestoreIdentity::in_dir(&cdir);
    id.track_dirty_pages = false;
    let mut m = restore(&store, &tag("c0"), &id).unwrap();
    let err = m
        .branch(&store, &tag("nodiff"), SnapshotMode::Diff)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dirty-page tracking"), "{err}");
    m.vmm.request_stop();
    m.vmm.wait().unwrap();
    let err = m
        .branch(&store, &tag("nodiff"), SnapshotMode::Full)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not running"), "{err}");
    assert!(!store.exists(&tag("nodiff")));
    // An existing tag is refused before the machine is paused.
    let xdir = dir.path().join("x");
    std::fs::create_dir_all(&xdir).unwrap();
    let mut m = restore(&store, &tag("c0"), &RestoreIdentity::in_dir(&xdir)).unwrap();
    let err = m
        .branch(&store, &tag("c1"), SnapshotMode::Full)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert!(!m.vmm.control().is_paused());
    m.stop();
}

trait Running {
    fn machine_running(&self) -> bool;
}

impl Running for Machine {
    fn machine_running(&self) -> bool {
        self.vmm.stop_reason().is_none()
    }
}

/// Makes a snapshot's files writable (the store may publish them read-only).
fn writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mut p = meta.permissions();
        p.set_mode(p.mode() | 0o200);
        std::fs::set_permissions(path, p).unwrap();
    }
}

/// Restores `t` into a fresh child directory, expecting an error; checks that the error names
/// `expect` and that the child directory stays empty (nothing left behind).
fn restore_fails(store: &Store, dir: &Path, t: &str, expect: &[&str]) -> RestoreError {
    let cdir = dir.join(format!("child-of-{t}"));
    std::fs::create_dir_all(&cdir).unwrap();
    let err = restore(store, &tag(t), &RestoreIdentity::in_dir(&cdir)).unwrap_err();
    let text = forkd_test_support::assert_renders_once(&err);
    for e in expect {
        assert!(text.contains(e), "{t}: {text:?} does not mention {e:?}");
    }
    assert!(!text.contains('\n'), "one line: {text:?}");
    assert_eq!(
        std::fs::read_dir(&cdir).unwrap().count(),
        0,
        "{t}: files left behind"
    );
    err
}

#[test]
fn every_bad_snapshot_is_refused_before_a_vm_exists() {
    if !kvm_available("every_bad_snapshot_is_refused_before_a_vm_exists") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let d = dir.path();
    let snap_dir = |t: &str| store.snapshot_dir(&tag(t));

    let err = restore_fails(&store, d, "nope", &["no snapshot tagged", "nope"]);
    assert!(matches!(err, RestoreError::UnknownTag(_)));

    snapshot_demo(&store, d, "novmstate");
    let path = snap_dir("novmstate").join("vmstate.json");
    std::fs::remove_file(&path).unwrap();
    restore_fails(&store, d, "novmstate", &["vmstate.json", "cannot read"]);

    snapshot_demo(&store, d, "corrupt");
    let path = snap_dir("corrupt").join("vmstate.json");
    writable(&path);
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replacen("\"vsock_cid\": 3", "\"vsock_cid\": 4", 1);
    assert_ne!(text, edited, "the edit must change something");
    std::fs::write(&path, edited).unwrap();
    restore_fails(&store, d, "corrupt", &["vmstate.json", "checksum mismatch"]);

    snapshot_demo(&store, d, "short");
    let path = snap_dir("short").join("memory.bin");
    writable(&path);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(16 << 20).unwrap();
    restore_fails(
        &store,
        d,
        "short",
        &["memory.bin", "16777216 bytes", "needs 33554432"],
    );

    snapshot_demo(&store, d, "otherhost");
    let path = snap_dir("otherhost").join("vmstate.json");
    writable(&path);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["host"]["cpu_vendor"] = serde_json::json!("SomeOtherVendor");
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    restore_fails(
        &store,
        d,
        "otherhost",
        &["incompatible host", "SomeOtherVendor"],
    );

    // Chains: parent removed, parent replaced by a different snapshot of the same tag.
    snapshot_demo(&store, d, "parent");
    let mut m = restore_child(&store, d, "parent", "p");
    m.wait_ready();
    m.machine
        .branch(&store, &tag("kid"), SnapshotMode::Diff)
        .unwrap();
    m.machine.stop();
    LoadedSnapshot::load(&store, &tag("kid")).expect("intact chain loads");
    // The parent's vmstate.json edited in place (its manifest untouched): the chain walk checks
    // the file against the parent's manifest.
    let parent_state = store.get(&tag("parent")).unwrap().dir.join("vmstate.json");
    let original = std::fs::read_to_string(&parent_state).unwrap();
    let edited = original.replacen("\"cmdline\": \"", "\"cmdline\": \" ", 1);
    assert_ne!(edited, original, "the test must change the file");
    std::fs::write(&parent_state, edited).unwrap();
    restore_fails(
        &store,
        d,
        "kid",
        &[
            "\"parent\"",
            "vmstate.json",
            "does not match its snapshot's manifest",
        ],
    );
    std::fs::write(&parent_state, original).unwrap();
    LoadedSnapshot::load(&store, &tag("kid")).expect("the restored file loads again");
    store
        .remove(&[tag("parent")], forkd_store::RemoveMode::Orphan)
        .unwrap();
    let err = restore_fails(
        &store,
        d,
        "kid",
        &["broken chain", "\"parent\"", "does not exist"],
    );
    assert!(matches!(
        err,
        RestoreError::Chain(ChainError::MissingParent { .. })
    ));
    snapshot_demo(&store, d, "parent");
    let err = restore_fails(&store, d, "kid", &["broken chain", "was replaced"]);
    assert!(matches!(
        err,
        RestoreError::Chain(ChainError::ParentReplaced { .. })
    ));

    // A shell with the wrong vCPU count is refused without touching the child's files.
    let loaded = LoadedSnapshot::load(&store, &tag("parent")).unwrap();
    let cdir = d.join("wrong-shell");
    std::fs::create_dir_all(&cdir).unwrap();
    let err = loaded
        .prepare(VmShell::new(2).unwrap(), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 vCPUs but the VM shell has 2"), "{err}");
    assert_eq!(std::fs::read_dir(&cdir).unwrap().count(), 0);
    // So is a shell that already has memory (the snapshot's shell gets the snapshot's).
    let mut shell = VmShell::new(1).unwrap();
    shell.attach_memory(loaded.memory().clone(), false).unwrap();
    let err = loaded.prepare(shell, true).unwrap_err().to_string();
    assert!(err.contains("already has memory"), "{err}");
}
