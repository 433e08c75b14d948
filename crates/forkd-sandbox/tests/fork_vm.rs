//! Real children of a real snapshot, each in its own process: they continue from the
//! snapshot, their writes stay private, and killing one leaves its siblings answering.

use std::time::{Duration, Instant};

use forkd_sandbox::fork::{ask_counter, fork_snapshot, identity, ForkPlan};
use forkd_store::{Store, Tag};
use forkd_vmm::snapshot::{snapshot_after_ready, BootSnapshot, LoadedSnapshot};
use forkd_vmm::{KernelSource, VmConfig};

use forkd_test_support::kvm_available;

#[test]
fn children_continue_write_privately_and_survive_a_killed_sibling() {
    if !kvm_available("children_continue_write_privately_and_survive_a_killed_sibling") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let tag = Tag::parse("demo").unwrap();
    let mut vm = VmConfig::new(KernelSource::parse("builtin:demo").unwrap());
    vm.mem_mib = 64;
    let what = BootSnapshot {
        vm,
        rootfs: None,
        ready_timeout: Duration::from_secs(60),
    };
    snapshot_after_ready(&store, &tag, &what).unwrap();
    let memory_sha = store
        .get(&tag)
        .unwrap()
        .manifest
        .file("memory.bin")
        .unwrap()
        .sha256
        .clone();

    let loaded = LoadedSnapshot::load(&store, &tag).unwrap();
    let base =
        forkd_vmm::guests::demo_counter(loaded.memory()).expect("demo counter in the snapshot");
    let plan = ForkPlan {
        n: 3,
        run_dir: home.path().join("run").into(),
        snapshot_counter: None,
        timeout: Duration::from_secs(60),
        dirty_kib: Some(4096),
        jail: Default::default(),
    };
    let (mut pool, report) = fork_snapshot(&loaded, &plan, false).unwrap();
    assert_eq!(report.alive, 3, "{report:#?}");
    for c in &report.children {
        assert!(
            c.counter.unwrap() >= base,
            "child {} answered {:?} < snapshot {base}",
            c.index,
            c.counter
        );
        let before = c.memory_after_fork.unwrap().uss_kib;
        let after = c.memory_after_dirty.unwrap().uss_kib;
        assert!(
            after >= before + 3 * 1024,
            "child {}: USS {before} -> {after} KiB after dirtying 4 MiB",
            c.index
        );
    }
    // The children's writes never reach the snapshot.
    assert!(store.verify(&tag).unwrap().is_empty());
    assert_eq!(
        store
            .get(&tag)
            .unwrap()
            .manifest
            .file("memory.bin")
            .unwrap()
            .sha256,
        memory_sha
    );

    let status = pool.kill(1).expect("child 1 exists");
    assert!(status.to_string().contains("SIGKILL"), "{status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in [0, 2] {
        let uds = identity(&plan.run_dir, i).vsock_uds;
        let v = ask_counter(&uds, &format!("after-kill-{i}"), deadline).unwrap();
        assert!(v >= report.children[i].counter.unwrap());
    }
    let stopped = pool.stop_all(Duration::from_secs(10));
    assert_eq!(stopped.len(), 2);
    assert!(
        stopped
            .iter()
            .all(|s| s.outcome.as_deref() == Ok("stopped on request") && !s.by_guest),
        "{stopped:?}"
    );
}
