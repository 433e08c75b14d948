//! Pause/resume/stop of a running guest (the demo guest's in-memory counter shows whether it
//! runs), and vCPU state access while paused.

mod common;

use std::time::Duration;

use common::*;
use forkd_vmm::guests::demo_counter;
use forkd_vmm::StopReason;

#[test]
fn paused_guest_stops_counting_and_resumes() {
    if !kvm_available("paused_guest_stops_counting_and_resumes") {
        return;
    }
    let (mut vmm, serial) = start(builtin("demo"), 2, None);
    wait_until("the demo counter to start", || {
        demo_counter(vmm.memory()).is_some_and(|c| c > 1000)
    });

    vmm.pause().expect("pause");
    assert!(vmm.control().is_paused());
    let frozen = demo_counter(vmm.memory()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        demo_counter(vmm.memory()).unwrap(),
        frozen,
        "counter moved while paused"
    );

    // While paused, each vCPU's state is readable on its own thread.
    let rip = vmm
        .run_on_vcpu(0, |v| v.save_state(&[0x10]).map(|s| s.regs.rip))
        .expect("job ran")
        .expect("state read");
    assert!(
        (0x10_0000..0x20_0000).contains(&rip),
        "boot vCPU RIP {rip:#x} in the guest image"
    );
    let ap_state = vmm
        .run_on_vcpu(1, |v| v.fd().get_mp_state().map(|m| m.mp_state))
        .expect("job ran")
        .expect("mp state read");
    // The demo never starts the AP: it waits for INIT/SIPI (KVM_MP_STATE_UNINITIALIZED = 1).
    assert_eq!(ap_state, kvm_bindings::KVM_MP_STATE_UNINITIALIZED);

    vmm.resume().expect("resume");
    wait_until("the counter to move after resume", || {
        demo_counter(vmm.memory()).unwrap() > frozen
    });

    // Pause/resume repeatedly: every cycle must see all vCPUs acknowledge.
    for _ in 0..20 {
        vmm.pause().expect("pause");
        vmm.resume().expect("resume");
    }
    let before = demo_counter(vmm.memory()).unwrap();
    wait_until("the counter to move after the cycles", || {
        demo_counter(vmm.memory()).unwrap() > before
    });

    vmm.request_stop();
    assert_eq!(wait(&mut vmm), StopReason::Requested);
    assert!(serial.text().contains("forkd demo guest running"));
    let after_stop = demo_counter(vmm.memory()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(demo_counter(vmm.memory()).unwrap(), after_stop);
    assert!(vmm.pause().is_err(), "a stopped VM cannot be paused");
}

#[test]
fn stop_while_paused_ends_the_vm() {
    if !kvm_available("stop_while_paused_ends_the_vm") {
        return;
    }
    let (mut vmm, _serial) = start(builtin("demo"), 1, None);
    vmm.pause().expect("pause");
    vmm.request_stop();
    assert_eq!(wait(&mut vmm), StopReason::Requested);
    assert!(vmm.resume().is_err());
}

#[test]
fn state_access_needs_a_pause() {
    if !kvm_available("state_access_needs_a_pause") {
        return;
    }
    let (vmm, _serial) = start(builtin("demo"), 1, None);
    assert!(vmm.run_on_vcpu(0, |v| v.index()).is_err());
    vmm.pause().unwrap();
    assert!(vmm.run_on_vcpu(5, |v| v.index()).is_err(), "no vCPU 5");
    assert_eq!(vmm.run_on_vcpu(0, |v| v.index()).unwrap(), 0);
    // Dropping a running or paused Vmm stops and joins its threads.
}

#[test]
fn vcpu_state_round_trips_while_paused() {
    if !kvm_available("vcpu_state_round_trips_while_paused") {
        return;
    }
    let (mut vmm, _serial) = start(builtin("demo"), 2, None);
    wait_until("the demo counter to start", || {
        demo_counter(vmm.memory()).is_some_and(|c| c > 0)
    });
    vmm.pause().unwrap();
    let msrs: Vec<u32> = forkd_vmm::arch::x86_64::regs::boot_msr_entries()
        .iter()
        .map(|m| m.index)
        .collect();
    for index in 0..2 {
        let wanted = msrs.clone();
        let (before, after) = vmm
            .run_on_vcpu(index, move |v| {
                let state = v.save_state(&wanted)?;
                v.restore_state(&state)?;
                let again = v.save_state(&wanted)?;
                Ok::<_, forkd_vmm::vstate::vcpu::VcpuError>((state, again))
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("vCPU {index}: {e}"));
        assert_eq!(before.regs.rip, after.regs.rip, "vCPU {index} RIP");
        assert_eq!(before.sregs.cr3, after.sregs.cr3);
        assert_eq!(before.mp_state.mp_state, after.mp_state.mp_state);
        assert_eq!(before.msrs.len(), msrs.len());
        let misc = after.msrs.iter().find(|m| m.index == 0x1a0).unwrap();
        assert_eq!(misc.data & 1, 1, "MISC_ENABLE fast strings as booted");
        let apic_id = forkd_vmm::arch::x86_64::regs::lapic_register(&after.lapic, 0x20) >> 24;
        assert_eq!(apic_id, index, "LAPIC id = vCPU index");
    }
    // VM-wide state (PIT, clock, PIC x2, IOAPIC) round-trips too.
    let vm_state = vmm.vm().save_state().expect("save VM state");
    vmm.vm().restore_state(&vm_state).expect("restore VM state");
    let again = vmm.vm().save_state().unwrap();
    assert_eq!(again.ioapic.chip_id, kvm_bindings::KVM_IRQCHIP_IOAPIC);
    // SAFETY: reading the IOAPIC member of the union KVM filled for chip_id IOAPIC.
    let (a, b) = unsafe { (vm_state.ioapic.chip.ioapic, again.ioapic.chip.ioapic) };
    assert_eq!(a.base_address, b.base_address);
    assert_eq!(a.base_address, 0xfec0_0000);
    assert!(
        again.clock.clock >= vm_state.clock.clock,
        "guest clock does not go back"
    );

    vmm.resume().unwrap();
    let now = demo_counter(vmm.memory()).unwrap();
    wait_until("the counter to move after restoring", || {
        demo_counter(vmm.memory()).unwrap() > now
    });
    vmm.request_stop();
    assert_eq!(wait(&mut vmm), StopReason::Requested);
}

#[test]
fn dirty_log_shows_the_pages_the_guest_writes() {
    if !kvm_available("dirty_log_shows_the_pages_the_guest_writes") {
        return;
    }
    let mut config = forkd_vmm::VmConfig::new(builtin("demo"));
    config.mem_mib = 32;
    config.track_dirty_pages = true;
    let mut vmm = forkd_vmm::build(&config).unwrap();
    vmm.start().unwrap();
    wait_until("the demo counter to start", || {
        demo_counter(vmm.memory()).is_some_and(|c| c > 0)
    });
    vmm.pause().unwrap();
    let first = vmm.vm().dirty_pages().unwrap();
    assert!(
        first.contains(&forkd_vmm::guests::STATUS_ADDR),
        "status page dirty: {first:x?}"
    );
    // The log is cleared by reading: while paused nothing new is written.
    let again = vmm.vm().dirty_pages().unwrap();
    assert!(again.is_empty(), "{again:x?}");
    vmm.resume().unwrap();
    let before = demo_counter(vmm.memory()).unwrap();
    wait_until("the counter to move", || {
        demo_counter(vmm.memory()).unwrap() > before
    });
    vmm.pause().unwrap();
    let after = vmm.vm().dirty_pages().unwrap();
    assert!(
        after.contains(&forkd_vmm::guests::STATUS_ADDR),
        "{after:x?}"
    );
    assert!(
        after.len() < 64,
        "only the pages the loop touches: {after:x?}"
    );
    vmm.request_stop();
    wait(&mut vmm);

    // Without tracking the call is a clear error.
    let (vmm, _serial) = start(builtin("demo"), 1, None);
    let err = vmm.vm().dirty_pages().unwrap_err().to_string();
    assert!(err.contains("dirty-page tracking is off"), "{err}");
}

/// The nice value of each of this process's vCPU threads (`vcpu<N>`; the test's own thread
/// is named after the test, which may start with "vcpu" too).
fn vcpu_thread_nices() -> Vec<i64> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let is_vcpu = comm
            .trim()
            .strip_prefix("vcpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !is_vcpu {
            continue;
        }
        // Fields after the parenthesised name: state is field 3, nice is field 19.
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some((_, rest)) = stat.rsplit_once(')') {
            if let Some(nice) = rest.split_whitespace().nth(16) {
                out.push(nice.parse().unwrap());
            }
        }
    }
    out
}

#[test]
fn vcpu_threads_run_below_the_vmm_threads() {
    if !kvm_available("vcpu_threads_run_below_the_vmm_threads") {
        return;
    }
    let (mut vmm, _serial) = start(builtin("demo"), 2, None);
    wait_until("the demo counter to start", || {
        demo_counter(vmm.memory()).is_some()
    });
    // SAFETY: getpriority on this thread; -1 is a valid nice, so errno is not consulted: the
    // test process runs at a normal priority.
    let ours = i64::from(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) });
    let expected = match std::env::var("FORKD_VCPU_NICE") {
        Ok(_) => None, // set by whoever runs the tests: only check it is not raised
        Err(_) => Some((ours + i64::from(forkd_vmm::vstate::vcpu::DEFAULT_VCPU_NICE)).min(19)),
    };
    // Sibling tests start VMs concurrently: a vCPU thread that has just been spawned has not
    // lowered itself yet, so wait until every one has (one that never does fails here).
    wait_until("every vCPU thread to run below the VMM's threads", || {
        let nices = vcpu_thread_nices();
        nices.len() >= 2
            && nices.iter().all(|&nice| match expected {
                Some(e) => nice == e,
                None => nice >= ours,
            })
    });
    vmm.request_stop();
    assert_eq!(wait(&mut vmm), StopReason::Requested);
}
