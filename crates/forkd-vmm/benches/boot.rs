//! VM creation to first guest instruction.
//!
//! Each sample builds a VM from scratch (open /dev/kvm, KVM_CREATE_VM, TSS, irqchip, PIT2,
//! vCPU, memory slot, ELF load, boot structures, CPUID/MSRs/registers), starts it, and stops
//! the clock when the guest's first instruction (a write to port 0x80 in the `first_exit`
//! guest) reaches the VMM. The baseline, measured in the same run, is the bare floor: open
//! /dev/kvm, KVM_CREATE_VM and one KVM_CREATE_VCPU.
//!
//! It also reports pause latency (request until every vCPU has acknowledged) of a running demo
//! guest with 2 vCPUs. Its baseline is a thread wake-up round trip (ask a parked thread over a
//! condvar and wait for its answer), the least any "tell the vCPU threads and wait" can cost.
//!
//! Run: cargo bench -p forkd-vmm --bench boot [-- SAMPLES]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_vmm::devices::BusDevice;
use forkd_vmm::{build, KernelSource, StopReason, VmConfig};

/// Records when the guest first touched it.
struct FirstExit(Arc<Mutex<Option<Instant>>>);

impl BusDevice for FirstExit {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.0.lock().unwrap().get_or_insert_with(Instant::now);
    }
}

fn boot_to_first_instruction(config: &VmConfig) -> Duration {
    let seen = Arc::new(Mutex::new(None));
    let t0 = Instant::now();
    let mut vmm = build(config).expect("build");
    vmm.add_pio_device(0x80, 1, Arc::new(Mutex::new(FirstExit(seen.clone()))))
        .expect("port 0x80");
    vmm.start().expect("start");
    let reason = vmm.wait().expect("wait");
    assert_eq!(reason, StopReason::GuestExit(0));
    let first = seen.lock().unwrap().expect("guest reached port 0x80");
    first - t0
}

fn bare_create_vm_and_vcpu() -> Duration {
    let t0 = Instant::now();
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let elapsed = t0.elapsed();
    drop(vcpu);
    drop(vm);
    elapsed
}

fn pause_latencies(samples: usize) -> Vec<Duration> {
    let mut config = VmConfig::new(KernelSource::parse("builtin:demo").unwrap());
    config.mem_mib = 64;
    config.vcpus = 2;
    let mut vmm = build(&config).expect("build demo");
    vmm.start().expect("start demo");
    while forkd_vmm::guests::demo_counter(vmm.memory()).is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        std::thread::sleep(Duration::from_millis(2));
        let t0 = Instant::now();
        vmm.pause().expect("pause");
        out.push(t0.elapsed());
        vmm.resume().expect("resume");
    }
    vmm.request_stop();
    vmm.wait().expect("wait");
    out
}

fn thread_round_trips(samples: usize) -> Vec<Duration> {
    use std::sync::Condvar;
    let state = Arc::new((Mutex::new((0u64, 0u64)), Condvar::new()));
    let peer = state.clone();
    let responder = std::thread::spawn(move || {
        let (lock, cv) = &*peer;
        let mut s = lock.lock().unwrap();
        loop {
            while s.0 == s.1 {
                s = cv.wait(s).unwrap();
            }
            if s.0 == u64::MAX {
                return;
            }
            s.1 = s.0;
            cv.notify_all();
        }
    });
    let (lock, cv) = &*state;
    let mut out = Vec::with_capacity(samples);
    for i in 1..=samples as u64 {
        std::thread::sleep(Duration::from_millis(2));
        let t0 = Instant::now();
        let mut s = lock.lock().unwrap();
        s.0 = i;
        cv.notify_all();
        while s.1 != i {
            s = cv.wait(s).unwrap();
        }
        out.push(t0.elapsed());
    }
    lock.lock().unwrap().0 = u64::MAX;
    cv.notify_all();
    responder.join().unwrap();
    out
}

/// The bare floor plus one 128 MiB memory slot: on some kernels a memslot update waits for an
/// SRCU grace period, which dominates VM creation; shown so the ratio can be read.
fn bare_with_memory_slot(mem: &forkd_vmm::memory::GuestMemory) -> Duration {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let region = mem.iter().next().expect("one region");
    let t0 = Instant::now();
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let slot = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: the region stays mapped (owned by `mem`) for longer than this VM lives.
    unsafe { vm.set_user_memory_region(slot) }.expect("KVM_SET_USER_MEMORY_REGION");
    let elapsed = t0.elapsed();
    drop(vcpu);
    drop(vm);
    elapsed
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn report(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (median, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!(
        "{name:<44} n={:<4} median {:>9.3} ms   p99 {:>9.3} ms",
        samples.len(),
        median.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    (median, p99)
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("skipping the boot benchmark: /dev/kvm is not usable here");
        return;
    }
    let samples: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let mut config = VmConfig::new(KernelSource::parse("builtin:first_exit").unwrap());
    config.mem_mib = 128;

    // Warm up both paths (page cache, KVM module state), then interleave the measurements so
    // host noise hits both equally.
    for _ in 0..5 {
        boot_to_first_instruction(&config);
        bare_create_vm_and_vcpu();
    }
    let slot_mem =
        forkd_vmm::memory::GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 128 << 20)])
            .expect("mmap 128 MiB");
    let mut full = Vec::with_capacity(samples);
    let mut bare = Vec::with_capacity(samples);
    let mut bare_slot = Vec::with_capacity(samples);
    for _ in 0..samples {
        full.push(boot_to_first_instruction(&config));
        bare.push(bare_create_vm_and_vcpu());
        bare_slot.push(bare_with_memory_slot(&slot_mem));
    }
    println!("VM creation to first guest instruction (1 vCPU, 128 MiB, ELF guest)");
    let (bare_median, bare_p99) = report("baseline: open + KVM_CREATE_VM + 1 vCPU", bare);
    let (slot_median, _) = report("  same + one 128 MiB memory slot", bare_slot);
    let (median, p99) = report("forkd-vmm: build + start to first PIO exit", full);
    println!(
        "ratio vs baseline: median {:.1}x, p99 {:.1}x",
        median.as_secs_f64() / bare_median.as_secs_f64(),
        p99.as_secs_f64() / bare_p99.as_secs_f64()
    );
    println!(
        "ratio vs baseline with the memory slot: median {:.1}x",
        median.as_secs_f64() / slot_median.as_secs_f64()
    );

    println!("\nPause latency of a running guest (2 vCPUs), request to all acknowledged");
    let (floor_median, floor_p99) = report(
        "baseline: thread wake-up round trip",
        thread_round_trips(samples),
    );
    let (pause_median, pause_p99) = report("forkd-vmm: pause()", pause_latencies(samples));
    println!(
        "ratio vs baseline: median {:.1}x, p99 {:.1}x",
        pause_median.as_secs_f64() / floor_median.as_secs_f64(),
        pause_p99.as_secs_f64() / floor_p99.as_secs_f64()
    );
}
