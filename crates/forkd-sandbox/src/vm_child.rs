//! The VM body of a pool child: a VM shell prepared ahead of time, restored from the
//! zygote's loaded snapshot (whose memory mapping the child inherited) on `go`.

use forkd_vmm::snapshot::{self, LoadedSnapshot, Machine, PreparedShell};
use forkd_vmm::{SerialOutput, StopReason};

use crate::pool::{ChildBody, ChildIdentity, RunningChild};

/// `err` and its causes on one line (forkd-vmm's errors name their own layer only; the cause
/// follows, as the CLI prints it).
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Restores children of one loaded snapshot.
pub struct VmBody<'a> {
    pub loaded: &'a LoadedSnapshot,
    /// KVM dirty logging in each child (needed for diff BRANCH; costs a little on writes).
    pub track_dirty_pages: bool,
}

/// A running child VM inside its own process.
pub struct VmRunning {
    machine: Machine,
}

impl ChildBody for VmBody<'_> {
    type Shell = PreparedShell;
    type Running = VmRunning;

    fn prepare(&self) -> Result<PreparedShell, String> {
        self.loaded
            .prepare_shell(self.track_dirty_pages)
            .map_err(|e| format!("creating the VM shell: {}", with_causes(&e)))
    }

    fn start(&self, shell: PreparedShell, id: &ChildIdentity) -> Result<VmRunning, String> {
        let identity = snapshot::ChildIdentity {
            vsock_uds: id.vsock_uds.clone(),
            disk_overlay: id.disk_overlay.clone(),
            serial: SerialOutput::File(id.serial_log.clone()),
            track_dirty_pages: self.track_dirty_pages,
        };
        let machine = self
            .loaded
            .restore_into(shell, &identity)
            .map_err(|e| format!("restore: {}", with_causes(&e)))?;
        Ok(VmRunning { machine })
    }
}

impl RunningChild for VmRunning {
    fn stopper(&self) -> Box<dyn Fn() -> bool + Send> {
        let control = self.machine.vmm.control().clone();
        // The first stop reason wins: if the guest powered off (or anything else stopped the
        // VM) before this request, the VM keeps that reason and the request changed nothing.
        Box::new(move || {
            control.request_stop(StopReason::Requested);
            control.stop_reason() == Some(StopReason::Requested)
        })
    }

    fn wait(mut self) -> Result<String, String> {
        let outcome = match self.machine.vmm.wait() {
            // "guest powered off", "guest requested a reset", "stopped on request".
            Ok(reason) if reason.is_clean() => Ok(reason.to_string()),
            Ok(reason) => Err(describe_failure(&reason)),
            Err(e) => Err(with_causes(&e)),
        };
        self.machine.stop();
        outcome
    }
}

/// The one-line error for a child that stopped abnormally: the stop reason's Display (a fatal
/// vCPU exit carries the vCPU's registers), plus the PVM hint where KVM itself gave up.
fn describe_failure(reason: &StopReason) -> String {
    let kvm_failure = matches!(
        reason,
        StopReason::InternalError { .. }
            | StopReason::FailEntry { .. }
            | StopReason::TripleFault { .. }
    );
    if kvm_failure && forkd_vmm::host::KvmFlavour::detect() == forkd_vmm::host::KvmFlavour::Pvm {
        format!("{reason}; this host's KVM is PVM: see `forkd doctor`")
    } else {
        reason.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_vmm::RegisterDump;

    #[test]
    fn a_dead_child_is_described_by_the_stop_reason_with_its_registers() {
        let regs = RegisterDump {
            rip: 0x10_0560,
            cr0: 0xe000_0031,
            ..RegisterDump::default()
        };
        let reason = StopReason::TripleFault {
            vcpu: 1,
            regs: Some(Box::new(regs)),
        };
        let line = describe_failure(&reason);
        assert!(
            line.starts_with("vCPU 1 triple fault, KVM_EXIT_SHUTDOWN (rip=0x100560 "),
            "{line}"
        );
        assert!(line.contains("cr0=0xe0000031"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        let exited = describe_failure(&StopReason::GuestExit(3));
        assert_eq!(exited, "guest exited with code 3");
    }
}
