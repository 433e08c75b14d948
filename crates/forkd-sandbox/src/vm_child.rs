//! The VM body of a pool child: a VM shell prepared ahead of time, restored from the
//! zygote's loaded snapshot (whose memory mapping the child inherited) on `go`.

use forkd_vmm::snapshot::{self, LoadedSnapshot, Machine, PreparedShell, RestoreError};
use forkd_vmm::{SerialOutput, StopReason, VmmError};

use crate::pool::{ChildBody, ChildIdentity, RunningChild};

/// Restores children of one loaded snapshot.
pub struct VmBody<'a> {
    pub loaded: &'a LoadedSnapshot,
    /// KVM dirty logging in each child (needed for diff BRANCH; costs a little on writes).
    pub track_dirty_pages: bool,
}

/// Why a child VM did not start, or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum VmChildError {
    #[error("creating the VM shell")]
    Shell(#[source] RestoreError),
    #[error("restore")]
    Restore(#[source] RestoreError),
    /// The VM stopped for a reason that is not a clean stop (a fatal vCPU exit, a guest exit
    /// with a non-zero code). `on_pvm`: KVM itself gave up on a PVM host.
    #[error("{reason}{}", if *on_pvm { PVM_NOTE } else { "" })]
    Stopped { reason: StopReason, on_pvm: bool },
    #[error("waiting for the VM")]
    Wait(#[source] VmmError),
}

const PVM_NOTE: &str =
    "; this host's KVM is PVM, whose instruction emulator cannot run every guest";

/// A running child VM inside its own process.
pub struct VmRunning {
    machine: Machine,
}

impl ChildBody for VmBody<'_> {
    type Shell = PreparedShell;
    type Running = VmRunning;
    type Error = VmChildError;

    fn prepare(&self) -> Result<PreparedShell, VmChildError> {
        self.loaded
            .prepare_shell(self.track_dirty_pages)
            .map_err(VmChildError::Shell)
    }

    fn start(&self, shell: PreparedShell, id: &ChildIdentity) -> Result<VmRunning, VmChildError> {
        let identity = snapshot::RestoreIdentity {
            vsock_uds: id.vsock_uds.clone(),
            disk_overlay: id.disk_overlay.clone(),
            serial: SerialOutput::File(id.serial_log.clone()),
            track_dirty_pages: self.track_dirty_pages,
        };
        let machine = self
            .loaded
            .restore_into(shell, &identity)
            .map_err(VmChildError::Restore)?;
        Ok(VmRunning { machine })
    }
}

impl RunningChild for VmRunning {
    type Error = VmChildError;

    fn stopper(&self) -> Box<dyn Fn() -> bool + Send> {
        let control = self.machine.vmm.control().clone();
        // The first stop reason wins: if the guest powered off (or anything else stopped the
        // VM) before this request, the VM keeps that reason and the request changed nothing.
        Box::new(move || {
            control.request_stop(StopReason::Requested);
            control.stop_reason() == Some(StopReason::Requested)
        })
    }

    fn wait(mut self) -> Result<String, VmChildError> {
        let outcome = match self.machine.vmm.wait() {
            // "guest powered off", "guest requested a reset", "stopped on request".
            Ok(reason) if reason.is_clean() => Ok(reason.to_string()),
            Ok(reason) => Err(failure(reason)),
            Err(e) => Err(VmChildError::Wait(e)),
        };
        self.machine.stop();
        outcome
    }
}

/// The error for a child that stopped abnormally: the stop reason (a fatal vCPU exit carries
/// the vCPU's registers), noting a PVM host where KVM itself gave up.
fn failure(reason: StopReason) -> VmChildError {
    let kvm_failure = matches!(
        reason,
        StopReason::InternalError { .. }
            | StopReason::FailEntry { .. }
            | StopReason::TripleFault { .. }
    );
    let on_pvm =
        kvm_failure && forkd_vmm::host::KvmFlavour::detect() == forkd_vmm::host::KvmFlavour::Pvm;
    VmChildError::Stopped { reason, on_pvm }
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
        let line = failure(reason).to_string();
        assert!(
            line.starts_with("vCPU 1 triple fault, KVM_EXIT_SHUTDOWN (rip=0x100560 "),
            "{line}"
        );
        assert!(line.contains("cr0=0xe0000031"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        let exited = failure(StopReason::GuestExit(3)).to_string();
        assert_eq!(exited, "guest exited with code 3");
    }
}
