//! The zygote pattern with a network: the net guest is booted on the tap of one namespace and
//! snapshotted; the snapshot is loaded once; forked child processes each enter a namespace of
//! their own and restore there, on that namespace's `tap0`, with the snapshot's IP and MAC.
//! Each answers ping in its namespace.
//!
//! One test in this binary so that fork() happens with no other test threads running.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::netns::*;
use common::*;
use forkd_store::{Store, Tag};
use forkd_vmm::devices::virtio::net::DEFAULT_MAC;
use forkd_vmm::snapshot::{AfterSnapshot, LoadedSnapshot, Machine, RestoreIdentity, SnapshotMode};
use forkd_vmm::SharedBuffer;

/// The child process: enters `ns`, restores, and keeps the child running until `dir/stop`
/// appears. Returns its exit code (0 = all went well).
fn child(loaded: &LoadedSnapshot, ns: &str, dir: &Path) -> i32 {
    // The process has one thread now: entering the namespace moves everything it opens and
    // every thread it starts from here on (the tap is opened by restore_into, on this thread).
    enter_netns(ns);
    let id = RestoreIdentity::in_dir(dir);
    let Ok(shell) = loaded.prepare_shell(false) else {
        return 11;
    };
    let machine = match loaded.restore_into(shell, &id) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("child in {ns}: {}", forkd_store::error_chain(&e));
            return 12;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("stop").exists() {
        if Instant::now() > deadline {
            return 13;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let answered = machine
        .devices
        .net
        .as_ref()
        .map_or(0, |n| n.lock().unwrap().stats().tx_frames);
    machine.stop();
    if answered == 0 {
        return 14;
    }
    0
}

#[test]
fn forked_children_answer_ping_each_on_its_own_namespace_tap() {
    let test = "forked_children_answer_ping_each_on_its_own_namespace_tap";
    if !kvm_available(test) {
        return;
    }
    let Some(boot_ns) = netns_or_skip(test, 10) else {
        return;
    };
    let child_ns: Vec<NetNs> = (11..13)
        .map(|n| NetNs::create(n).expect("a child namespace"))
        .collect();

    let serial = SharedBuffer::new();
    let (config, virtio) = net_vm(&serial);
    let mut m = boot_ns
        .run(|| Machine::boot(&config, &virtio))
        .expect("boot the net guest");
    wait_for_line(&serial, "READY net");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let tag = Tag::parse("net-zygote").unwrap();
    m.snapshot(&store, &tag, SnapshotMode::Full, AfterSnapshot::StayPaused)
        .unwrap();
    m.stop();

    let loaded = LoadedSnapshot::load(&store, &tag).unwrap();
    let mut pids = Vec::new();
    for (index, ns) in child_ns.iter().enumerate() {
        let cdir = dir.path().join(format!("child{index}"));
        std::fs::create_dir_all(&cdir).unwrap();
        // SAFETY: fork(2) takes no pointers; the child never returns into this test's frames
        // (it runs `child` under catch_unwind and leaves with _exit), and glibc's fork resets
        // the allocator's locks, so the child may allocate although the harness has threads.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                child(&loaded, &ns.name, &cdir)
            }))
            .unwrap_or(101);
            // SAFETY: _exit takes an integer and does not return; it skips the destructors
            // (the namespace guards belong to the parent) and the harness's exit path.
            unsafe { libc::_exit(code) };
        }
        pids.push((pid, cdir));
    }
    // Each child answers in its own namespace, with the snapshot's MAC.
    let pinged: Vec<Result<(), String>> = child_ns
        .iter()
        .map(|ns| ns.run(|| ping(GUEST_IP, 3, PING_TIMEOUT)))
        .collect();
    let neighbours: Vec<String> = child_ns.iter().map(|ns| ns.neighbours()).collect();
    for (_, cdir) in &pids {
        std::fs::write(cdir.join("stop"), b"").unwrap();
    }
    for (pid, _) in &pids {
        let mut status = 0;
        // SAFETY: waitpid only writes the status through the pointer, an exclusive borrow of
        // the local `status`.
        assert_eq!(unsafe { libc::waitpid(*pid, &mut status, 0) }, *pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child {pid} failed: status {status:#x} (exit code {})",
            libc::WEXITSTATUS(status)
        );
    }
    for (n, (p, neigh)) in pinged.iter().zip(&neighbours).enumerate() {
        assert!(p.is_ok(), "child {n}: {p:?}");
        assert!(
            neigh.contains("10.0.2.15") && neigh.contains(&DEFAULT_MAC.to_string()),
            "child {n}: {neigh}"
        );
    }
}
