//! Snapshots: save a running machine into the store, restore children from it, BRANCH.
//!
//! # API (the contract with the fork orchestration in forkd-sandbox)
//!
//! The restore is split in two so that everything that is the same for every child of a
//! snapshot happens in a pool, ahead of the fork request, and the fork path only does what
//! makes a child itself. Measured on this PVM host (`forkd bench fork`, 128 MiB demo):
//! `restore_into` of a prepared shell p50 ~0.15-0.3 ms (about half the KVM floor of
//! VM + vCPU + slot, which the pool pays instead); `prepare_shell` ~0.5-1 ms per child.
//!
//! ```text
//! // Zygote: everything that can fail before a VM exists, memory mapped once (MAP_PRIVATE);
//! // vCPU and VM state decoded once.
//! let loaded = LoadedSnapshot::load(&store, &tag)?;          // Result<_, RestoreError>
//! // (the same checks against given host facts, no KVM: LoadedSnapshot::load_for_host)
//! // Each pool child (a forked process), ahead of time, no identity:
//! let shell = loaded.prepare_shell(true)?; // PreparedShell: KVM_CREATE_VM, TSS, irqchip,
//!     // PIT2, vCPUs; the inherited mapping as memory slots (dirty logging on: diff BRANCH);
//!     // TSC rate matched; legacy devices; virtio slots reserved with their ioeventfds and
//!     // irqfds registered; vCPU, PIT, clock, irqchip and serial state written; vCPU threads
//!     // spawned, parked before their first KVM_RUN. (`loaded.prepare(VmShell, ..)` does the
//!     // same for a shell created elsewhere.)
//! // ...then on "go": the devices that need identity, their state, a fresh VMGenID, resume.
//! let machine = loaded.restore_into(shell, &RestoreIdentity {
//!     vsock_uds, disk_overlay, serial, track_dirty_pages,
//!     net_tap /* None: the snapshot's tap name, in this thread's network namespace */ })?;
//! // -> Machine, already running
//! machine.vmm   // Vmm: pause/resume/stop/wait, memory(), stop_reason()
//! machine.vmgenid() // Option<[u8; 16]>: the child's fresh VMGenID (None: snapshot without one)
//! machine.devices // VirtioDevices (vsock/block/rng/net)
//! machine.stop();
//!
//! // In-process convenience (load + prepare_shell + restore_into):
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
//! listed in its vmstate.json), `vmstate.json` ([`persist::MachineState`] in the checksummed,
//! versioned envelope of [`vmstate_file`], with [`HostFacts`]), `rootfs.ext4` (the disk as the
//! guest saw it at the pause, sparse), `manifest.toml` (with `parent_tag` for a diff link; the
//! parent's identity — its manifest's sha256 — is in the link's vmstate.json).
//!
//! Layout of this module:
//! - [`machine`]: [`Machine`] (a VM with its virtio devices) and its boot.
//! - [`save`]: snapshotting a machine (`forkd snapshot`, BRANCH); [`boot`]: boot → ready →
//!   snapshot.
//! - [`restore`](mod@restore): [`LoadedSnapshot`] (checked and mapped once), prepared shells, children.
//! - [`chain`]: diff-snapshot links and the walk that checks them; [`compact`](mod@compact): flattening a
//!   chain.
//! - [`persist`]: the [`Persist`] trait the devices implement and [`persist::MachineState`],
//!   assembled from the states that live beside their owners (vCPU and VM state in
//!   [`crate::vstate`], serial in [`crate::devices::legacy`], virtio in
//!   [`crate::devices::virtio`]).
//! - [`vmstate_file`]: the file envelope (format version, checksum, host facts);
//!   [`blob`]: KVM structs as base64; [`memory_file`]: memory.bin.

pub mod blob;
pub mod boot;
pub mod chain;
pub mod compact;
pub mod machine;
pub mod memory_file;
pub mod persist;
pub mod restore;
pub mod save;
pub mod vmstate_file;

#[cfg(test)]
mod tests;

pub use boot::{
    snapshot_after_ready, snapshot_after_ready_net, snapshot_after_ready_with, BeforePause,
    BeforePauseError, BootNet, BootSnapshot, BootSnapshotError,
};
pub use chain::{ChainError, ChainLink, MAX_CHAIN_DEPTH};
pub use compact::compact;
pub use machine::{BootError, Machine, Origin};
pub use memory_file::{Extent, MemoryFileError, RegionSpec};
pub use persist::{MachineState, Persist};
pub use restore::{restore, LoadedSnapshot, PreparedShell, RestoreError, RestoreIdentity};
pub use save::{AfterSnapshot, SnapshotError, SnapshotMode, SnapshotReport};
pub use vmstate_file::{HostFacts, VmStateError, VMSTATE_FORMAT_VERSION};

/// `err` and every error under it, joined with ": " (as the CLI prints errors).
#[cfg(test)]
pub(crate) use forkd_store::error_chain;
