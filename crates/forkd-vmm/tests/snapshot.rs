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
use forkd_vmm::devices::virtio::{VirtioConfig, VsockConfig};
use forkd_vmm::guests::demo_counter;
use forkd_vmm::snapshot::{
    restore, AfterSnapshot, ChildIdentity, LoadedSnapshot, Machine, RestoreError, SnapshotMode,
};
use forkd_vmm::{VmConfig, VmShell};

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
    let uds = dir.join(format!("boot-{t}.sock"));
    let ready = ready_listener(&uds);
    let mut config = VmConfig::new(builtin("demo"));
    config.mem_mib = 32;
    let virtio = VirtioConfig {
        vsock: Some(VsockConfig::new(uds.clone())),
        ..VirtioConfig::default()
    };
    let mut m = Machine::boot(&config, &virtio).unwrap();
    assert_eq!(accept_ready(&ready), "READY demo");
    // Let it count a while so the snapshot value is clearly non-zero.
    ask_counter(&uds, "boot");
    m.snapshot(store, &tag(t), SnapshotMode::Full, AfterSnapshot::StayPaused)
        .unwrap();
    let at_snapshot = demo_counter(m.vmm.memory()).unwrap();
    m.stop();
    at_snapshot
}

struct Child {
    machine: forkd_vmm::snapshot::Machine,
    uds: PathBuf,
    ready: UnixListener,
}

fn child_identity(dir: &Path, name: &str) -> (ChildIdentity, UnixListener) {
    let cdir = dir.join(name);
    std::fs::create_dir_all(&cdir).unwrap();
    let id = ChildIdentity::in_dir(&cdir);
    let ready = ready_listener(&id.vsock_uds);
    (id, ready)
}

fn restore_child(store: &Store, dir: &Path, t: &str, name: &str) -> Child {
    let (id, ready) = child_identity(dir, name);
    let machine = restore(store, &tag(t), &id).unwrap();
    Child {
        machine,
        uds: id.vsock_uds,
        ready,
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
    let shell = VmShell::new(loaded.vcpus()).unwrap();
    let (id, ready) = child_identity(dir.path(), "c1");
    let child = loaded.restore_into(shell, &id).unwrap();
    // The transport reset was pending: the guest announces itself again on the child's socket.
    assert_eq!(accept_ready(&ready), "READY demo");
    let value = ask_counter(&id.vsock_uds, "child-1-nonce");
    assert!(
        value >= at_snapshot,
        "counter {value} restarted below the snapshot's {at_snapshot}"
    );
    assert!(child.machine_running());
    child.stop();
}

trait Running {
    fn machine_running(&self) -> bool;
}

impl Running for Machine {
    fn machine_running(&self) -> bool {
        self.vmm.stop_reason().is_none()
    }
}
