//! Snapshots: save a running machine into the store, restore children from it, BRANCH.
//!
//! # API (the contract with the fork orchestration in forkd-sandbox)
//!
//! Measured on this PVM host (`cargo bench -p forkd-vmm --bench snapshot`, 128 MiB demo):
//! restore_into with a prepared shell p50 ~0.4-0.7 ms (1.0-1.6x the KVM floor of VM + vCPU +
//! slot); depth-3 chain the same as flat; diff BRANCH pause of a 512 MiB guest with 16 MiB
//! dirtied p50 ~3-5 ms (full: ~90-120 ms). What restore_into still spends: vCPU state
//! ioctls ~170 µs, device attach (ioeventfd/irqfd registration, vsock socket, device thread)
//! ~250 µs, vCPU thread start; moving the identity-free part of attach into prepare_shell is
//! the next step if the floor ratio matters.
//!
//! ```text
//! // Zygote: everything that can fail before a VM exists, memory mapped once (MAP_PRIVATE).
//! let loaded = LoadedSnapshot::load(&store, &tag)?;          // Result<_, RestoreError>
//! // Each pool child (a forked process): create its shell ahead of time...
//! let shell = loaded.prepare_shell(true)?;  // KVM_CREATE_VM, TSS, irqchip, PIT2, vCPUs, and
//!     // the inherited mapping registered as memory slots (dirty logging on: diff BRANCH).
//!     // No identity. Prefer it over VmShell::new(loaded.vcpus())? (which leaves the slot
//!     // registration, ~5-7 ms here once a VM has an irqchip, to restore_into).
//! // ...then on "go": attach the inherited mapping (no remap), restore, give identity, run.
//! let machine = loaded.restore_into(shell, &ChildIdentity {
//!     vsock_uds, disk_overlay, serial, track_dirty_pages })?; // Machine, already running
//! machine.vmm   // Vmm: pause/resume/stop/wait, memory(), stop_reason()
//! machine.vmgenid() // Option<[u8; 16]>: the child's fresh VMGenID (None: snapshot without one)
//! machine.devices // VirtioDevices (vsock/block/rng)
//! machine.stop();
//!
//! // In-process convenience (load + shell + restore_into):
//! let machine = restore(&store, &tag, &identity)?;
//!
//! // forkd snapshot / forkd demo: boot, wait for `READY <name>` on vsock port 1025, snapshot, stop.
//! snapshot_after_ready(&store, &tag, &BootSnapshot { vm, rootfs, ready_timeout })?;
//! // Or by hand:
//! let mut m = Machine::boot(&vm_config, &virtio_config)?;
//! m.snapshot(&store, &tag, SnapshotMode::Full, AfterSnapshot::StayPaused)?;
//!
//! // BRANCH a running (restored) machine; report.paused = how long the guest was stopped.
//! let report = machine.branch(&store, &new_tag, SnapshotMode::Diff /* or Full */)?;
//! ```
//!
//! Memory of a [`LoadedSnapshot`]: the first restore in a process uses the preloaded mapping
//! (children forked from the zygote inherit it copy-on-write); later restores in the same
//! process map a fresh private copy, so two VMs of one process never share memory.
//!
//! Files: `memory.bin` (sparse, holes for zero pages; a diff link stores only its extents,
//! listed in its vmstate.json), `vmstate.json` ([`state::MachineState`] in the checksummed
//! envelope of [`vmstate_file`], with [`HostFacts`]), `rootfs.ext4` (the disk as the guest
//! saw it at the pause, sparse), `manifest.toml` (with `parent_tag` for a diff link; the
//! parent's identity — its manifest's sha256 — is in the link's vmstate.json).

pub mod boot;
pub mod memory_file;
pub mod restore;
pub mod save;
pub mod state;
pub mod vmstate_file;

pub use boot::{
    snapshot_after_ready, snapshot_after_ready_with, BeforePause, BootSnapshot, BootSnapshotError,
};
pub use memory_file::{Extent, MemoryFileError, RegionSpec};
pub use restore::{
    compact, restore, ChildIdentity, LoadedSnapshot, PreparedShell, RestoreError, MAX_CHAIN_DEPTH,
};
pub use save::{
    AfterSnapshot, BootError, Machine, Origin, SnapshotError, SnapshotMode, SnapshotReport,
};
pub use vmstate_file::{HostFacts, VmStateError, VMSTATE_FORMAT_VERSION};
