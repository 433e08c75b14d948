//! VM creation to first guest instruction.
//!
//! Each sample builds a VM from scratch (open /dev/kvm, KVM_CREATE_VM, TSS, irqchip, PIT2,
//! vCPU, memory slot, ELF load, boot structures, CPUID/MSRs/registers), starts it, and stops
//! the clock when the guest's first instruction (a write to port 0x80 in the `first_exit`
//! guest) reaches the VMM. The baseline, measured in the same run, is the bare floor: open
//! /dev/kvm, KVM_CREATE_VM and one KVM_CREATE_VCPU.
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
    let mut full = Vec::with_capacity(samples);
    let mut bare = Vec::with_capacity(samples);
    for _ in 0..samples {
        full.push(boot_to_first_instruction(&config));
        bare.push(bare_create_vm_and_vcpu());
    }
    println!("VM creation to first guest instruction (1 vCPU, 128 MiB, ELF guest)");
    let (bare_median, bare_p99) = report("baseline: open + KVM_CREATE_VM + 1 vCPU", bare);
    let (median, p99) = report("forkd-vmm: build + start to first PIO exit", full);
    println!(
        "ratio vs baseline: median {:.1}x, p99 {:.1}x",
        median.as_secs_f64() / bare_median.as_secs_f64(),
        p99.as_secs_f64() / bare_p99.as_secs_f64()
    );
}
