//! The bare KVM floor: what creating the cheapest possible VM costs on this host
//! (KVM_CREATE_VM + irqchip-free vCPU creation + one memory slot). Restore times are reported
//! as a ratio of it, measured in the same run.

use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

/// Time to create one VM with `vcpus` vCPUs and one memory slot of `mem_bytes` (anonymous,
/// untouched), then nothing else. The VM is torn down outside the timed part.
pub fn measure_once(kvm: &Kvm, vcpus: u32, mem_bytes: usize) -> std::io::Result<Duration> {
    // SAFETY: a fresh anonymous private mapping at an address the kernel picks (no hint, no
    // MAP_FIXED), so it cannot replace any existing mapping; the result is checked below.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mem_bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = Instant::now();
    let result = (|| {
        let vm = kvm.create_vm().map_err(std::io::Error::other)?;
        let cpus = (0..vcpus)
            .map(|i| vm.create_vcpu(u64::from(i)))
            .collect::<Result<Vec<_>, _>>();
        let cpus = cpus.map_err(std::io::Error::other)?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_bytes as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: `host..+mem_bytes` is the live mapping above, the VM's only slot (no
        // overlap), and it is unmapped only after the VM is dropped.
        unsafe { vm.set_user_memory_region(region) }.map_err(std::io::Error::other)?;
        Ok((vm, cpus, start.elapsed()))
    })();
    let out = result.map(|(vm, cpus, elapsed)| {
        drop(cpus);
        drop(vm);
        elapsed
    });
    // SAFETY: `host`/`mem_bytes` are exactly the mapping made above, and its only user, the
    // VM (and its vCPUs), has been dropped on every path; no Rust reference points into it.
    unsafe { libc::munmap(host, mem_bytes) };
    out
}

/// `runs` measurements of the floor.
pub fn measure(
    kvm: &Kvm,
    vcpus: u32,
    mem_bytes: usize,
    runs: usize,
) -> std::io::Result<Vec<Duration>> {
    (0..runs)
        .map(|_| measure_once(kvm, vcpus, mem_bytes))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_creates_and_tears_down_vms() {
        let Ok(kvm) = Kvm::new() else {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: floor_creates_and_tears_down_vms: /dev/kvm unavailable"
            );
            return;
        };
        let samples = measure(&kvm, 2, 64 << 20, 3).unwrap();
        assert_eq!(samples.len(), 3);
        assert!(samples.iter().all(|d| !d.is_zero()));
    }
}
