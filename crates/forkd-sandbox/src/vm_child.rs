//! The VM body of a pool child: a VM shell prepared ahead of time, restored from the
//! zygote's loaded snapshot (whose memory mapping the child inherited) on `go`.

use forkd_vmm::snapshot::{self, LoadedSnapshot, Machine, PreparedShell};
use forkd_vmm::{SerialOutput, StopReason};

use crate::pool::{ChildBody, ChildIdentity, RunningChild};

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
            .map_err(|e| format!("creating the VM shell: {e}"))
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
            .map_err(|e| format!("restore: {e}"))?;
        Ok(VmRunning { machine })
    }
}

impl RunningChild for VmRunning {
    fn stopper(&self) -> Box<dyn Fn() + Send> {
        let control = self.machine.vmm.control().clone();
        Box::new(move || control.request_stop(StopReason::Requested))
    }

    fn wait(mut self) -> Result<String, String> {
        let outcome = match self.machine.vmm.wait() {
            Ok(reason) if reason.is_clean() => Ok(format!("{reason:?}")),
            Ok(reason) => Err(describe_failure(&reason)),
            Err(e) => Err(e.to_string()),
        };
        self.machine.stop();
        outcome
    }
}

fn describe_failure(reason: &StopReason) -> String {
    match reason {
        StopReason::InternalError {
            vcpu,
            suberror,
            rip,
        } => format!(
            "KVM internal error on vCPU {vcpu} (suberror {suberror}, RIP {rip:#x}){}",
            if forkd_vmm::host::KvmFlavour::detect() == forkd_vmm::host::KvmFlavour::Pvm {
                "; this host's KVM is PVM: see `forkd doctor`"
            } else {
                ""
            }
        ),
        other => format!("{other:?}"),
    }
}
