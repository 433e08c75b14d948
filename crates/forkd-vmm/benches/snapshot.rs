//! Restore and BRANCH costs of the demo guest.
//!
//! - restore (in process: load + shell + restore_into, until the vCPUs run) of a flat snapshot
//!   and of a depth-3 diff chain; baseline: the bare KVM floor (KVM_CREATE_VM + one vCPU + one
//!   memory slot) measured in the same run.
//! - BRANCH pause (pause request until the vCPUs run again) of a 512 MiB guest with 16 MiB
//!   dirtied, diff vs full mode; the full mode is the baseline of the diff ratio.
//!
//! Run: cargo bench -p forkd-vmm --bench snapshot [-- SAMPLES]

use std::time::{Duration, Instant};

use forkd_store::{Store, Tag};
use forkd_vmm::devices::virtio::{VirtioConfig, VsockConfig};
use forkd_vmm::memory::{Bytes, GuestAddress};
use forkd_vmm::snapshot::{
    restore, AfterSnapshot, LoadedSnapshot, Machine, RestoreIdentity, SnapshotMode,
};
use forkd_vmm::{KernelSource, VmConfig, VmShell};

fn stats(name: &str, mut v: Vec<Duration>, baseline: Option<Duration>) -> Duration {
    v.sort();
    let p50 = v[v.len() / 2];
    let p99 = v[((v.len() * 99).div_ceil(100)).saturating_sub(1)];
    let ratio = baseline
        .map(|b| format!("  ({:.2}x baseline)", p50.as_secs_f64() / b.as_secs_f64()))
        .unwrap_or_default();
    println!(
        "{name:<44} p50 {:>9.3} ms  p99 {:>9.3} ms{ratio}",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    p50
}

fn kvm_floor() -> Duration {
    kvm_floor_with(2 << 20)
}

fn kvm_floor_with(size: usize) -> Duration {
    let t0 = Instant::now();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    // SAFETY: a fresh anonymous private mapping at an address the kernel picks (no hint, no
    // MAP_FIXED), so it cannot replace any existing mapping.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: addr as u64,
    };
    // SAFETY: `addr..+size` is the live mapping above, the VM's only slot, and it is unmapped
    // only after the VM is dropped below.
    unsafe { vm.set_user_memory_region(region).unwrap() };
    let t = t0.elapsed();
    drop(vcpu);
    drop(vm);
    // SAFETY: exactly the mapping made above; the VM and vCPU that used it are dropped.
    unsafe { libc::munmap(addr, size) };
    t
}

fn boot_snapshot(store: &Store, dir: &std::path::Path, tag: &str, mem_mib: u32) {
    let mut config = VmConfig::new(KernelSource::parse("builtin:demo").unwrap());
    config.mem_mib = mem_mib;
    let virtio = VirtioConfig {
        vsock: Some(VsockConfig::new(dir.join(format!("{tag}.sock")))),
        ..VirtioConfig::default()
    };
    let mut m = Machine::boot(&config, &virtio).unwrap();
    while forkd_vmm::guests::demo_counter(m.vmm.memory()).unwrap_or(0) == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    m.snapshot(
        store,
        &Tag::parse(tag).unwrap(),
        SnapshotMode::Full,
        AfterSnapshot::StayPaused,
    )
    .unwrap();
    m.stop();
}

fn restore_time(store: &Store, dir: &std::path::Path, tag: &str, i: usize) -> Duration {
    let cdir = dir.join(format!("child-{tag}-{i}"));
    std::fs::create_dir_all(&cdir).unwrap();
    let id = RestoreIdentity::in_dir(&cdir);
    let t0 = Instant::now();
    let m = restore(store, &Tag::parse(tag).unwrap(), &id).unwrap();
    let t = t0.elapsed();
    m.stop();
    t
}

fn restore_into_time(
    loaded: &LoadedSnapshot,
    dir: &std::path::Path,
    i: usize,
    prepared: bool,
) -> Duration {
    let cdir = dir.join(format!("pool-{}-{i}-{prepared}", loaded.tag()));
    std::fs::create_dir_all(&cdir).unwrap();
    let id = RestoreIdentity::in_dir(&cdir);
    // Unprepared: the VM exists, but attaching memory and devices is on the clock.
    let ready = prepared.then(|| loaded.prepare_shell(true).unwrap());
    let bare = (!prepared).then(|| VmShell::new(loaded.vcpus()).unwrap());
    let t0 = Instant::now();
    let shell = ready.unwrap_or_else(|| loaded.prepare(bare.unwrap(), true).unwrap());
    let m = loaded.restore_into(shell, &id).unwrap();
    let t = t0.elapsed();
    m.stop();
    t
}

fn main() {
    let samples: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    if std::fs::File::open("/dev/kvm").is_err() {
        println!("SKIP: snapshot bench: /dev/kvm is not usable here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let tag = |s: &str| Tag::parse(s).unwrap();

    // Restore: flat vs depth-3 chain (128 MiB guest).
    boot_snapshot(&store, dir.path(), "flat", 128);
    let mut parent = "flat".to_string();
    for depth in 1..=3 {
        let cdir = dir.path().join(format!("branch-{depth}"));
        std::fs::create_dir_all(&cdir).unwrap();
        let mut m = restore(&store, &tag(&parent), &RestoreIdentity::in_dir(&cdir)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let name = format!("d{depth}");
        m.branch(&store, &tag(&name), SnapshotMode::Diff).unwrap();
        m.stop();
        parent = name;
    }
    let floor = stats(
        "KVM floor (VM + vCPU + slot)",
        (0..samples).map(|_| kvm_floor()).collect(),
        None,
    );
    stats(
        "KVM floor with a 128 MiB slot",
        (0..samples).map(|_| kvm_floor_with(128 << 20)).collect(),
        Some(floor),
    );
    stats(
        "restore flat (load+shell+restore_into)",
        (0..samples)
            .map(|i| restore_time(&store, dir.path(), "flat", i))
            .collect(),
        Some(floor),
    );
    stats(
        "prepare + restore_into flat (VmShell::new shell)",
        {
            let loaded = LoadedSnapshot::load(&store, &tag("flat")).unwrap();
            (0..samples)
                .map(|i| restore_into_time(&loaded, dir.path(), i, false))
                .collect()
        },
        Some(floor),
    );
    let flat = stats(
        "restore_into flat (prepare_shell)",
        {
            let loaded = LoadedSnapshot::load(&store, &tag("flat")).unwrap();
            (0..samples)
                .map(|i| restore_into_time(&loaded, dir.path(), i, true))
                .collect()
        },
        Some(floor),
    );
    stats(
        "restore depth 3 (load+shell+restore_into)",
        (0..samples)
            .map(|i| restore_time(&store, dir.path(), "d3", i))
            .collect(),
        Some(floor),
    );
    let d3 = stats(
        "restore_into depth 3 (prepare_shell)",
        {
            let loaded = LoadedSnapshot::load(&store, &tag("d3")).unwrap();
            (0..samples)
                .map(|i| restore_into_time(&loaded, dir.path(), i, true))
                .collect()
        },
        Some(floor),
    );
    println!(
        "depth-3 / flat restore_into: {:.2}x",
        d3.as_secs_f64() / flat.as_secs_f64()
    );

    // BRANCH pause: 512 MiB guest, 16 MiB dirtied before each branch.
    boot_snapshot(&store, dir.path(), "big", 512);
    let cdir = dir.path().join("big-child");
    std::fs::create_dir_all(&cdir).unwrap();
    let mut m = restore(&store, &tag("big"), &RestoreIdentity::in_dir(&cdir)).unwrap();
    let branch_samples = samples.min(10);
    let mut pauses = |mode: SnapshotMode, prefix: &str| -> Vec<Duration> {
        (0..branch_samples)
            .map(|i| {
                // 16 MiB written by the VMM at 64 MiB.. (the demo never touches it).
                let page = vec![i as u8 + 1; 4096];
                for p in 0..4096u64 {
                    m.vmm
                        .memory()
                        .write_slice(&page, GuestAddress((64 << 20) + p * 4096))
                        .unwrap();
                }
                let r = m
                    .branch(&store, &tag(&format!("{prefix}{i}")), mode)
                    .unwrap();
                r.paused
            })
            .collect()
    };
    let full = pauses(SnapshotMode::Full, "full");
    let diff = pauses(SnapshotMode::Diff, "diff");
    let full_p50 = stats("BRANCH pause full (512 MiB, 16 MiB dirty)", full, None);
    stats(
        "BRANCH pause diff (512 MiB, 16 MiB dirty)",
        diff,
        Some(full_p50),
    );
    m.stop();
}
