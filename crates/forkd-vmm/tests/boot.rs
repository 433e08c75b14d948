//! Boots the test guests through real KVM and checks what they produce.

mod common;

use common::*;
use forkd_vmm::StopReason;

#[test]
fn hello_guest_prints_and_exits_cleanly() {
    if !kvm_available("hello_guest_prints_and_exits_cleanly") {
        return;
    }
    let (mut vmm, serial) = start(builtin("hello"), 1, Some("console=ttyS0 forkd.test=1"));
    let reason = wait(&mut vmm);
    let out = serial.text();
    assert_eq!(reason, StopReason::GuestExit(0), "serial output:\n{out}");
    assert!(reason.is_clean());
    assert!(out.contains("Hello from forkd guest!"), "{out}");
    // The guest read these from the zero page and the MP table the VMM wrote.
    assert!(out.contains("e820 entries: 3"), "{out}");
    assert!(out.contains("e820: 0-9fc00 type 1\n"), "{out}");
    assert!(out.contains("e820: 9fc00-100000 type 2\n"), "{out}");
    assert!(
        out.contains("e820: 100000-4000000 type 1\n"),
        "64 MiB of RAM: {out}"
    );
    assert!(
        out.contains("cmdline: console=ttyS0 forkd.test=1\n"),
        "{out}"
    );
    assert!(out.contains("cpus in MP table: 1"), "{out}");
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(16_777_619)
    })
}

#[test]
fn initrd_is_loaded_page_aligned_high_in_ram_and_announced_in_the_zero_page() {
    if !kvm_available("initrd_is_loaded_page_aligned_high_in_ram_and_announced_in_the_zero_page") {
        return;
    }
    use forkd_vmm::memory::{Bytes, GuestAddress};
    let content: Vec<u8> = (0..65_536 + 123u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, &content).unwrap();
    let serial = forkd_vmm::SharedBuffer::new();
    let mut config = forkd_vmm::VmConfig::new(builtin("hello"));
    config.mem_mib = 64;
    config.initrd = Some(file.path().into());
    config.serial = forkd_vmm::SerialOutput::Buffer(serial.clone());
    let mut vmm = forkd_vmm::build(&config).expect("build");
    vmm.start().unwrap();
    assert_eq!(
        wait(&mut vmm),
        StopReason::GuestExit(0),
        "{}",
        serial.text()
    );
    let out = serial.text();
    let line = out
        .lines()
        .find(|l| l.starts_with("initrd: at "))
        .unwrap_or_else(|| panic!("the guest saw no initrd:\n{out}"));
    let fields: Vec<&str> = line.split(' ').collect();
    let addr = u64::from_str_radix(fields[2], 16).unwrap();
    assert_eq!(fields[4], content.len().to_string(), "{line}");
    assert_eq!(
        fields[6],
        format!("{:x}", fnv1a(&content)),
        "the guest read other bytes: {line}"
    );
    assert_eq!(addr % 4096, 0, "{line}");
    // As high as it goes: within the last page below the top of the 64 MiB of RAM.
    let end = addr + content.len() as u64;
    assert!(end <= 64 << 20 && end + 4096 > 64 << 20, "{line}");
    let mut back = vec![0u8; content.len()];
    vmm.memory()
        .read_slice(&mut back, GuestAddress(addr))
        .unwrap();
    assert!(back == content);
}

#[test]
fn memory_above_the_hole_is_mapped_past_4gib() {
    if !kvm_available("memory_above_the_hole_is_mapped_past_4gib") {
        return;
    }
    let serial = forkd_vmm::SharedBuffer::new();
    let mut config = forkd_vmm::VmConfig::new(builtin("hello"));
    config.mem_mib = 3584; // 3.5 GiB: 3 GiB below the hole, 512 MiB above 4 GiB
    config.serial = forkd_vmm::SerialOutput::Buffer(serial.clone());
    let mut vmm = forkd_vmm::build(&config).expect("build");
    assert_eq!(vmm.mem_size(), 3584 << 20);
    vmm.start().unwrap();
    assert_eq!(
        wait(&mut vmm),
        StopReason::GuestExit(0),
        "{}",
        serial.text()
    );
    let out = serial.text();
    assert!(out.contains("e820: 100000-c0000000 type 1\n"), "{out}");
    assert!(out.contains("e820: 100000000-120000000 type 1\n"), "{out}");
}

#[test]
fn guest_exit_code_is_reported() {
    if !kvm_available("guest_exit_code_is_reported") {
        return;
    }
    let (mut vmm, serial) = start(builtin("exit_code"), 1, Some("exit=42"));
    let reason = wait(&mut vmm);
    assert_eq!(reason, StopReason::GuestExit(42), "{}", serial.text());
    assert!(!reason.is_clean());
}

#[test]
fn i8042_reset_stops_the_vm() {
    if !kvm_available("i8042_reset_stops_the_vm") {
        return;
    }
    let (mut vmm, serial) = start(builtin("reset"), 1, None);
    assert_eq!(wait(&mut vmm), StopReason::Reset);
    assert!(serial.text().contains("resetting via i8042"));
}

#[test]
fn every_vcpu_reports_in() {
    if !kvm_available("every_vcpu_reports_in") {
        return;
    }
    let (mut vmm, serial) = start(builtin("smp"), 4, None);
    let reason = wait(&mut vmm);
    let out = serial.text();
    assert_eq!(reason, StopReason::GuestExit(0), "serial output:\n{out}");
    assert!(
        out.contains("cpu 0 online (boot cpu) x2apic 0 hypervisor 1\n"),
        "{out}"
    );
    for cpu in 1..4 {
        // Each AP ran the trampoline and sees its own APIC id in CPUID leaves 1 and 0xB.
        let line = format!("cpu {cpu} online x2apic {cpu} hypervisor 1\n");
        assert!(out.contains(&line), "{line:?} missing:\n{out}");
    }
    assert!(out.contains("4 cpus in MP table, 3 of 3"), "{out}");
    assert!(out.contains("all 4 cpus online"), "{out}");
}

#[test]
fn host_input_reaches_the_guest_serial_port() {
    if !kvm_available("host_input_reaches_the_guest_serial_port") {
        return;
    }
    let (mut vmm, serial) = start(builtin("serial_echo"), 1, None);
    wait_until("the guest to ask for input", || {
        serial.text().contains("ready for input")
    });
    // More than the 64-byte receive FIFO, so the input thread has to wait for the guest.
    let line = format!("{}\n", "forkd-".repeat(15));
    vmm.spawn_serial_input(Box::new(std::io::Cursor::new(line.clone().into_bytes())))
        .unwrap();
    assert_eq!(
        wait(&mut vmm),
        StopReason::GuestExit(0),
        "{}",
        serial.text()
    );
    assert!(
        serial.text().contains(&format!("echo: {line}")),
        "{}",
        serial.text()
    );
}

#[test]
fn standalone_guest_runs_its_first_instruction() {
    if !kvm_available("standalone_guest_runs_its_first_instruction") {
        return;
    }
    let (mut vmm, _serial) = start(builtin("first_exit"), 1, None);
    assert_eq!(wait(&mut vmm), StopReason::GuestExit(0));
}

struct PanickingDevice;

impl forkd_vmm::devices::BusDevice for PanickingDevice {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        panic!("device model bug (deliberate, from the test)");
    }
}

#[test]
fn a_panicking_device_stops_the_vm_instead_of_hanging_it() {
    if !kvm_available("a_panicking_device_stops_the_vm_instead_of_hanging_it") {
        return;
    }
    let mut config = forkd_vmm::VmConfig::new(builtin("first_exit"));
    config.mem_mib = 16;
    let mut vmm = forkd_vmm::build(&config).unwrap();
    vmm.add_pio_device(
        0x80,
        1,
        std::sync::Arc::new(std::sync::Mutex::new(PanickingDevice)),
    )
    .unwrap();
    vmm.start().unwrap();
    match wait(&mut vmm) {
        StopReason::VcpuError { vcpu: 0, message } => {
            assert!(message.contains("ended unexpectedly"), "{message}")
        }
        other => panic!("unexpected stop: {other:?}"),
    }
}

#[test]
fn a_triple_fault_stops_the_vm_with_the_vcpu_registers() {
    if !kvm_available("a_triple_fault_stops_the_vm_with_the_vcpu_registers") {
        return;
    }
    let (mut vmm, serial) = start(builtin("triple_fault"), 1, None);
    let reason = wait(&mut vmm);
    let out = serial.text();
    let ud2 = out
        .lines()
        .find_map(|l| l.strip_prefix("triple_fault: ud2 at "))
        .and_then(|a| u64::from_str_radix(a.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no ud2 address in the guest output:\n{out}"));
    let StopReason::TripleFault { vcpu: 0, regs } = &reason else {
        panic!("expected a triple fault on vCPU 0, got {reason}\n{out}");
    };
    let regs = regs
        .as_deref()
        .unwrap_or_else(|| panic!("no registers: {reason}"));
    assert!(!reason.is_clean());
    assert_eq!(reason.registers(), Some(regs));
    // Intel and PVM keep the faulting context; AMD's KVM puts the vCPU through INIT at a
    // shutdown, so there the registers are the reset state.
    let at_reset = regs.rip == 0xfff0 && regs.cs == 0xf000;
    if !at_reset {
        assert_eq!(regs.rip, ud2, "{reason}");
        // Long mode with paging, as the guest ran: PG | PE, LME | LMA, PAE, the boot CR3.
        assert_eq!(regs.cr0 & 0x8000_0001, 0x8000_0001, "{reason}");
        assert_eq!(regs.efer & 0x500, 0x500, "{reason}");
        assert_ne!(regs.cr4 & 0x20, 0, "{reason}");
        assert_eq!(regs.cr3, 0x9000, "{reason}");
    }
    assert_ne!(regs.cr0, 0, "{reason}");
    // One line naming the vCPU, the exit and the registers.
    let line = reason.to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.starts_with("vCPU 0 triple fault, KVM_EXIT_SHUTDOWN (rip=0x"),
        "{line}"
    );
    for field in [
        format!("rip={:#x}", regs.rip),
        format!("rsp={:#x}", regs.rsp),
        format!("cr0={:#x}", regs.cr0),
        format!("cr3={:#x}", regs.cr3),
        format!("cr4={:#x}", regs.cr4),
        format!("efer={:#x}", regs.efer),
    ] {
        assert!(line.contains(&field), "{line} lacks {field}");
    }
}

#[test]
fn a_kvm_internal_error_carries_the_vcpu_registers() {
    if !kvm_available("a_kvm_internal_error_carries_the_vcpu_registers") {
        return;
    }
    // `fault` executes int3 with no IDT: an internal error where KVM emulates the guest (PVM),
    // a triple fault on VT-x/AMD-V. Either way the stop carries the registers.
    let (mut vmm, serial) = start(builtin("fault"), 1, None);
    let reason = wait(&mut vmm);
    let out = serial.text();
    assert!(out.contains("about to fault"), "{out}");
    match &reason {
        StopReason::InternalError { vcpu: 0, .. } | StopReason::TripleFault { vcpu: 0, .. } => {}
        other => panic!("unexpected stop {other}"),
    }
    let regs = reason.registers().unwrap_or_else(|| panic!("{reason}"));
    assert_ne!(regs.cr0, 0, "{reason}");
    assert!(reason.to_string().contains(&format!("rip={:#x}", regs.rip)));
}
