//! The zygote pattern with real processes: load a snapshot once, fork children that each
//! prepare a shell over the inherited mapping (no remap) and restore into it. Each child's
//! writes stay in its own copy-on-write pages.
//!
//! One test in this binary so that fork() happens with no other test threads running.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use common::*;
use forkd_store::{Store, Tag};
use forkd_vmm::devices::virtio::{VirtioConfig, VsockConfig};
use forkd_vmm::memory::{Bytes, GuestAddress};
use forkd_vmm::snapshot::{AfterSnapshot, LoadedSnapshot, Machine, RestoreIdentity, SnapshotMode};
use forkd_vmm::VmConfig;
use vm_memory::GuestMemoryBackend;

const MARKER_ADDR: u64 = 0x100_0000;

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

fn counter(uds: &Path, nonce: &str) -> Option<u64> {
    let mut s = UnixStream::connect(uds).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    writeln!(s, "CONNECT 1024").ok()?;
    if !read_line(&mut s).starts_with("OK ") {
        return None;
    }
    writeln!(s, "COUNTER {nonce}").ok()?;
    let reply = read_line(&mut s);
    let parts: Vec<&str> = reply.split(' ').collect();
    (parts.len() == 3 && parts[2] == nonce).then(|| parts[1].parse().ok())?
}

/// The child process: returns its exit code (0 = all checks passed).
fn child(loaded: &LoadedSnapshot, dir: &Path, index: u64, at_snapshot: u64) -> i32 {
    let id = RestoreIdentity::in_dir(dir);
    let Ok(shell) = loaded.prepare_shell(true) else {
        return 11;
    };
    let Ok(machine) = loaded.restore_into(shell, &id) else {
        return 12;
    };
    // The inherited mapping is used as is: same host address as the zygote's.
    let same_mapping = machine
        .vmm
        .memory()
        .iter()
        .zip(loaded.memory().iter())
        .all(|(a, b)| a.as_ptr() == b.as_ptr());
    if !same_mapping {
        return 13;
    }
    // The restored guest serves again once it has handled its vsock transport reset.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let answered = loop {
        match counter(&id.vsock_uds, &format!("child-{index}")) {
            Some(v) => break Some(v),
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            None => break None,
        }
    };
    match answered {
        Some(v) if v >= at_snapshot => {}
        _ => return 16,
    }
    // A write of this child's own; a sibling must not see it.
    if machine
        .vmm
        .memory()
        .write_obj(0xc0de_0000 + index, GuestAddress(MARKER_ADDR))
        .is_err()
    {
        return 17;
    }
    std::thread::sleep(Duration::from_millis(200));
    let mine: u64 = machine
        .vmm
        .memory()
        .read_obj(GuestAddress(MARKER_ADDR))
        .unwrap_or(0);
    machine.stop();
    if mine != 0xc0de_0000 + index {
        return 18;
    }
    0
}

#[test]
fn forked_children_restore_over_the_inherited_mapping_in_isolation() {
    if !kvm_available("forked_children_restore_over_the_inherited_mapping_in_isolation") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let uds = dir.path().join("boot.sock");
    let ready = UnixListener::bind(format!("{}_1025", uds.display())).unwrap();
    let mut config = VmConfig::new(builtin("demo"));
    config.mem_mib = 32;
    let virtio = VirtioConfig {
        vsock: Some(VsockConfig::new(uds)),
        ..VirtioConfig::default()
    };
    let mut m = Machine::boot(&config, &virtio).unwrap();
    let (mut conn, _) = ready.accept().unwrap();
    assert_eq!(read_line_unix(&mut conn), "READY demo");
    let t = Tag::parse("zygote").unwrap();
    m.snapshot(&store, &t, SnapshotMode::Full, AfterSnapshot::StayPaused)
        .unwrap();
    let at_snapshot = forkd_vmm::guests::demo_counter(m.vmm.memory()).unwrap();
    m.stop();

    let loaded = LoadedSnapshot::load(&store, &t).unwrap();
    let mut pids = Vec::new();
    for index in 0..2u64 {
        let cdir = dir.path().join(format!("child{index}"));
        std::fs::create_dir_all(&cdir).unwrap();
        // SAFETY: fork(2) takes no pointers; the child never returns into this test's frames
        // (it runs `child` under catch_unwind and leaves with _exit), and glibc's fork resets
        // the allocator's locks, so the child may allocate although the harness has threads.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                child(&loaded, &cdir, index, at_snapshot)
            }))
            .unwrap_or(101);
            // SAFETY: _exit takes an integer and does not return; it skips the destructors
            // and the harness's exit path, which belong to the parent.
            unsafe { libc::_exit(code) };
        }
        pids.push(pid);
    }
    for pid in pids {
        let mut status = 0;
        // SAFETY: waitpid only writes the status through the pointer, an exclusive borrow of
        // the local `status`.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child {pid} failed: status {status:#x} (exit code {})",
            libc::WEXITSTATUS(status)
        );
    }
    // The zygote's mapping and memory.bin never saw the children's writes.
    let zygote: u64 = loaded.memory().read_obj(GuestAddress(MARKER_ADDR)).unwrap();
    assert_eq!(zygote, 0);
    assert!(store.verify(&t).unwrap().is_empty());
}

fn read_line_unix(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    read_line(s)
}
