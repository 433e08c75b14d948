//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::Duration;

use forkd_vmm::{build, KernelSource, SerialOutput, SharedBuffer, StopReason, VmConfig, Vmm};

pub use forkd_test_support::kvm_available;

pub mod netns;

pub fn builtin(name: &str) -> KernelSource {
    KernelSource::parse(&format!("builtin:{name}")).expect("guest compiled by build.rs")
}

/// Builds and starts `kernel` with `vcpus`, capturing serial output.
pub fn start(kernel: KernelSource, vcpus: u32, cmdline: Option<&str>) -> (Vmm, SharedBuffer) {
    let serial = SharedBuffer::new();
    let mut config = VmConfig::new(kernel);
    config.vcpus = vcpus;
    config.mem_mib = 64;
    config.serial = SerialOutput::Buffer(serial.clone());
    if let Some(c) = cmdline {
        config.cmdline = c.to_string();
    }
    let mut vmm = build(&config).expect("build VM");
    vmm.start().expect("start VM");
    (vmm, serial)
}

/// Waits for the VM to stop; a generous bound so a hung guest fails the test instead of
/// hanging it (the bound is not an assertion on speed).
pub fn wait(vmm: &mut Vmm) -> StopReason {
    vmm.wait_timeout(Duration::from_secs(120))
        .expect("VM was started")
        .expect("guest did not stop within 120 s")
}

/// Polls `cond` until it holds (bounded like [`wait`]).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `serial` holds a complete (newline-terminated) line starting with `prefix`, and
/// returns the last such line (a guest may still be printing the next one).
pub fn wait_for_line(serial: &SharedBuffer, prefix: &str) -> String {
    let complete = |text: &str| {
        text.split_inclusive('\n')
            .rev()
            .find(|l| l.ends_with('\n') && l.starts_with(prefix))
            .map(|l| l.trim_end().to_string())
    };
    wait_until(&format!("a serial line starting with {prefix:?}"), || {
        complete(&serial.text()).is_some()
    });
    complete(&serial.text()).expect("seen above")
}
