//! The VM body of a pool child: a VM shell prepared ahead of time, restored from the
//! zygote's loaded snapshot (whose memory mapping the child inherited) on `go`.

use std::sync::{Arc, Mutex, MutexGuard};

use forkd_store::{Store, Tag};
use forkd_vmm::snapshot::{
    self, AfterSnapshot, LoadedSnapshot, Machine, PreparedShell, RestoreError, SnapshotMode,
};
use forkd_vmm::{SerialOutput, StopReason, VmmError};

use crate::pool::{
    ChildBody, ChildIdentity, RunningChild, SnapshotDone, SnapshotFailure, SnapshotRequest,
    Snapshotter,
};

/// Restores children of one loaded snapshot.
pub struct VmBody<'a> {
    pub loaded: &'a LoadedSnapshot,
    /// KVM dirty logging in each child (needed for diff BRANCH; costs a little on writes).
    pub track_dirty_pages: bool,
    /// The store children may BRANCH into (none: they cannot snapshot themselves).
    pub store: Option<&'a Store>,
    /// Networks prepared for the children: a child enters its namespace before its restore
    /// opens the tap (none: children open the snapshot's tap where they are).
    pub net: Option<&'a crate::net::NetPool>,
    /// The jail of each child's process (None: `--no-jail`).
    pub jail: Option<crate::jail::Jail>,
}

impl VmBody<'_> {
    /// The jail for children of `loaded` that see `view` besides the snapshot's directory
    /// (read-only) and, when they may BRANCH, the store: read-only when forkd runs as root
    /// (they become the jail's user and BRANCH through [`crate::inbox`]), else writable.
    pub fn jail_for(
        config: &crate::jail::JailConfig,
        loaded: &LoadedSnapshot,
        store: Option<&Store>,
        mut view: crate::jail::View,
    ) -> Option<crate::jail::Jail> {
        view.read_only.push(loaded.dir().to_path_buf());
        // SAFETY: geteuid takes no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        match store {
            // Started as root, a child becomes the jail's user and BRANCHes through an inbox
            // its parent adopts (see crate::inbox): the store's snapshots stay read-only to
            // it. Only `snapshots/` is bound, not the data directory: a run directory inside
            // the data directory (`forkd serve --state-dir`) must not be reached through the
            // data directory's own mode (often 0700, which the jail's user cannot traverse).
            Some(store) if root => view.read_only.push(store.snapshots_dir()),
            // Else it keeps forkd's user and writes into the store itself.
            Some(store) => view.writable.push(store.root().to_path_buf()),
            None => {}
        }
        crate::jail::Jail::new(config, view)
    }
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
    #[error("child {index} has no network prepared")]
    NoNetwork { index: usize },
    #[error("entering the child's network namespace")]
    Net(#[source] std::io::Error),
    #[error("starting the device thread ahead of the restore")]
    Reserve(#[source] std::io::Error),
    #[error("letting the restored VM run")]
    Resume(#[source] VmmError),
}

const PVM_NOTE: &str =
    "; this host's KVM is PVM, whose instruction emulator cannot run every guest";

/// Why a running child could not snapshot itself (besides the VMM's own errors).
#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    #[error("this sandbox's process was started without a store to snapshot into")]
    NoStore,
    #[error("the VM has stopped")]
    Stopped,
}

/// A running child VM inside its own process. The control thread snapshots it while the main
/// thread waits for it to stop, hence the lock; `wait` takes the machine out at the end.
pub struct VmRunning {
    machine: Arc<Mutex<Option<Machine>>>,
    control: Arc<forkd_vmm::vstate::control::VmControl>,
    store: Option<Store>,
}

impl ChildBody for VmBody<'_> {
    type Shell = PreparedShell;
    type Running = VmRunning;
    type Error = VmChildError;

    fn resolvers(&self) -> Option<Vec<std::net::IpAddr>> {
        self.net.and_then(crate::net::NetPool::resolvers)
    }

    fn prepare(&self) -> Result<PreparedShell, VmChildError> {
        let d = &self.loaded.state().devices;
        // The restore's device event loop runs on a thread started (and, jailed, confined)
        // now rather than on the fork path. Not for a child with a network: its device
        // thread starts in the child's network namespace, which it enters on its start.
        if (d.block || d.vsock || d.rng) && d.net.is_none() {
            forkd_vmm::thread_jail::reserve(
                forkd_vmm::thread_jail::ThreadKind::Devices,
                forkd_vmm::devices::virtio::event_loop::DEVICES_THREAD,
            )
            .map_err(VmChildError::Reserve)?;
        }
        self.loaded
            .prepare_shell(self.track_dirty_pages)
            .map_err(VmChildError::Shell)
    }

    /// With networks: enters child `index`'s namespace and opens its tap there now, before
    /// `go` (this process stays in the namespace: the threads it starts later belong to it),
    /// so the restore only wraps the open tap.
    fn prepare_for(&self, index: usize) -> Result<PreparedShell, VmChildError> {
        let mut shell = self.prepare()?;
        if let Some(net) = self.net {
            let fd = net
                .netns_fd(index)
                .ok_or(VmChildError::NoNetwork { index })?;
            crate::net::enter_netns_fd(fd).map_err(VmChildError::Net)?;
            self.loaded
                .open_tap_ahead(&mut shell)
                .map_err(VmChildError::Shell)?;
        }
        Ok(shell)
    }

    /// In the namespace the pool made for this child: its tap opens there now.
    fn prepare_in_netns(&self, _index: usize) -> Result<PreparedShell, VmChildError> {
        let mut shell = self.prepare()?;
        self.loaded
            .open_tap_ahead(&mut shell)
            .map_err(VmChildError::Shell)?;
        Ok(shell)
    }

    fn start(&self, shell: PreparedShell, id: &ChildIdentity) -> Result<VmRunning, VmChildError> {
        if let Some(net) = self.net.filter(|_| !shell.has_tap()) {
            // This thread opens the tap and starts the device thread: both then live in the
            // child's namespace, on its own tap with the snapshot's name.
            // By its handle, inherited from the parent: a jailed child's mount view has no
            // /run/netns. This runs before the jail locks the process down.
            let fd = net
                .netns_fd(id.index)
                .ok_or(VmChildError::NoNetwork { index: id.index })?;
            crate::net::enter_netns_fd(fd).map_err(VmChildError::Net)?;
        }
        let identity = snapshot::RestoreIdentity {
            vsock_uds: id.vsock_uds.clone(),
            disk_overlay: id.disk_overlay.clone(),
            serial: SerialOutput::File(id.serial_log.clone()),
            track_dirty_pages: self.track_dirty_pages,
            net_tap: None,
        };
        // Held: the pool locks the process down before the vCPUs run (`resume`).
        let mut machine = self
            .loaded
            .restore_into_held(shell, &identity)
            .map_err(VmChildError::Restore)?;
        if let Some(policy) = &id.net_policy {
            // Its snapshots (BRANCH, pause) record the policy it runs with.
            machine.set_net_policy(Some(policy.clone()));
        }
        Ok(VmRunning {
            control: machine.vmm.control().clone(),
            machine: Arc::new(Mutex::new(Some(machine))),
            store: self.store.cloned(),
        })
    }

    fn jail(&self) -> Option<&crate::jail::Jail> {
        self.jail.as_ref()
    }

    fn inbox(&self) -> Option<crate::inbox::Inbox> {
        let user = self.jail.as_ref()?.user()?;
        Some(crate::inbox::Inbox::new(self.store?.clone(), user))
    }
}

impl RunningChild for VmRunning {
    type Error = VmChildError;

    fn resume(&self) -> Result<(), VmChildError> {
        match lock(&self.machine).as_ref() {
            Some(machine) => machine.vmm.resume().map_err(VmChildError::Resume),
            None => Err(VmChildError::Stopped {
                reason: StopReason::Requested,
                on_pvm: false,
            }),
        }
    }

    fn stopper(&self) -> Box<dyn Fn() -> bool + Send> {
        let control = self.control.clone();
        // The first stop reason wins: if the guest powered off (or anything else stopped the
        // VM) before this request, the VM keeps that reason and the request changed nothing.
        Box::new(move || {
            control.request_stop(StopReason::Requested);
            control.stop_reason() == Some(StopReason::Requested)
        })
    }

    fn snapshotter(&self) -> Snapshotter {
        let machine = self.machine.clone();
        let store = self.store.clone();
        Box::new(move |request| {
            let inbox;
            let store = match &request.inbox {
                // A store of its own, which its parent adopts (see crate::inbox).
                Some(dir) => {
                    inbox = Store::open_unowned(dir)?;
                    &inbox
                }
                None => store.as_ref().ok_or(BranchError::NoStore)?,
            };
            let mut guard = lock(&machine);
            let machine = guard.as_mut().ok_or(BranchError::Stopped)?;
            snapshot_self(machine, store, request)
        })
    }

    fn wait(self) -> Result<String, VmChildError> {
        // Not under the lock: a snapshot in progress must be able to finish meanwhile.
        self.control.wait_stopped();
        let Some(mut machine) = lock(&self.machine).take() else {
            return Err(VmChildError::Stopped {
                reason: StopReason::Requested,
                on_pvm: false,
            });
        };
        let outcome = match machine.vmm.wait() {
            // "guest powered off", "guest requested a reset", "stopped on request".
            Ok(reason) if reason.is_clean() => Ok(reason.to_string()),
            Ok(reason) => Err(failure(reason)),
            Err(e) => Err(VmChildError::Wait(e)),
        };
        machine.stop();
        outcome
    }
}

fn lock(machine: &Mutex<Option<Machine>>) -> MutexGuard<'_, Option<Machine>> {
    machine.lock().unwrap_or_else(|e| e.into_inner())
}

/// BRANCH (the machine runs on) or pause to disk (it stays paused; the control thread stops
/// it next).
fn snapshot_self(
    machine: &mut Machine,
    store: &Store,
    request: &SnapshotRequest,
) -> Result<SnapshotDone, SnapshotFailure> {
    let tag = Tag::parse(&request.tag)?;
    let mode = if request.diff {
        SnapshotMode::Diff
    } else {
        SnapshotMode::Full
    };
    let after = if request.stop_after {
        AfterSnapshot::StayPaused
    } else {
        AfterSnapshot::Resume
    };
    let report = match machine.snapshot(store, &tag, mode, after) {
        Ok(report) => report,
        Err(e) => {
            // A failed pause must not leave the sandbox frozen: it keeps running, unpaused.
            if request.stop_after && machine.vmm.control().is_paused() {
                let _ = machine.vmm.resume();
            }
            return Err(e.into());
        }
    };
    Ok(SnapshotDone {
        tag: request.tag.clone(),
        parent: report.snapshot.manifest.parent().map(|t| t.to_string()),
        paused_us: report.paused.as_micros() as u64,
        total_us: report.total.as_micros() as u64,
        pages_written: report.pages_written,
    })
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
