//! Restoring snapshots, split for a zygote + pool of VM shells:
//! [`LoadedSnapshot::load`] does everything that can fail before a VM exists (and maps memory
//! once), [`VmShell::new`] is the identity-free VM, [`LoadedSnapshot::restore_into`] turns a
//! shell into a running child with its own identity.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use forkd_store::{Manifest, Store, StoreError, Tag, MEMORY_FILE, ROOTFS_FILE, VMSTATE_FILE};

use super::chain::{self, ChainError, MemoryLayer};
use super::machine::{Machine, MachineInfo, Origin};
use super::memory_file::{self, MemoryFileError};
use super::persist::{MachineState, Persist};
use super::vmstate_file::{self, check_host, HostFacts, VmStateError};
use crate::builder::{open_serial, BuildError, VmShell};
use crate::devices::legacy::{SerialOutput, SerialStateError};
use crate::devices::virtio::attach::{
    attach_reserved_with_net, reserve, AttachError, DeviceKind, ReservedSlots,
};
use crate::devices::virtio::mmio::lock;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::{BlockConfig, NetConfig, VirtioConfig, VsockConfig};
use crate::memory::GuestMemory;
use crate::vmm::{Vmm, VmmError};
use crate::vstate::vcpu::VcpuError;
use crate::vstate::KvmError;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no snapshot tagged {0:?}")]
    UnknownTag(Tag),
    #[error(transparent)]
    Store(StoreError),
    #[error("snapshot {tag:?}")]
    VmState {
        tag: Tag,
        #[source]
        source: VmStateError,
    },
    #[error("snapshot {tag:?}: {}", path.display())]
    Memory {
        tag: Tag,
        path: PathBuf,
        #[source]
        source: MemoryFileError,
    },
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("snapshot {tag:?}: {msg}")]
    BadState { tag: Tag, msg: String },
    #[error("snapshot {tag:?} has {snapshot} vCPUs but the VM shell has {shell}")]
    VcpuCount { tag: Tag, snapshot: u32, shell: u32 },
    #[error("snapshot {tag:?}: the guest's TSC runs at {saved} kHz, this host at {here} kHz, and it cannot be scaled")]
    Tsc {
        tag: Tag,
        saved: u32,
        here: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Devices(#[from] AttachError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Serial(#[from] SerialStateError),
}

/// What a restore gives the machine so that it is distinct from its siblings: its own
/// sockets, disk overlay and console. (The sandbox manager's `ChildIdentity` names a pool
/// child by index and the paths it derives this from.)
#[derive(Debug, Clone)]
pub struct RestoreIdentity {
    /// Its vsock Unix socket (guest port P connects to `<vsock_uds>_P`); unused when the
    /// snapshot has no vsock device.
    pub vsock_uds: PathBuf,
    /// Its copy-on-write disk overlay over the snapshot's rootfs.ext4 (must not exist; created
    /// sparse, with `<path>.map`); unused when the snapshot has no disk.
    pub disk_overlay: PathBuf,
    pub serial: SerialOutput,
    /// KVM dirty-page logging, needed for diff BRANCH of this child.
    pub track_dirty_pages: bool,
    /// The tap its network interface attaches to, looked up in the network namespace of the
    /// thread that restores it; None: the tap name the snapshot was taken with. Unused when
    /// the snapshot has no network interface.
    pub net_tap: Option<String>,
}

impl RestoreIdentity {
    /// An identity whose files live in `dir` (`vsock.sock`, `disk.overlay`), serial discarded,
    /// dirty tracking on.
    pub fn in_dir(dir: &Path) -> RestoreIdentity {
        RestoreIdentity {
            vsock_uds: dir.join("vsock.sock"),
            disk_overlay: dir.join("disk.overlay"),
            serial: SerialOutput::Sink,
            track_dirty_pages: true,
            net_tap: None,
        }
    }
}

/// A VM prepared for a child of one snapshot by [`LoadedSnapshot::prepare_shell`]: memory
/// attached, legacy devices in place, virtio slots reserved. Like a [`VmShell`] it only works
/// in the process that created it.
pub struct PreparedShell {
    vmm: Vmm,
    slots: ReservedSlots,
    /// The identity (manifest sha256) of the snapshot whose memory is attached.
    memory_label: String,
    /// The network device on the snapshot's tap, built ahead by
    /// [`LoadedSnapshot::open_tap_ahead`] (None: the restore opens the tap by name).
    net: Option<Net>,
}

impl PreparedShell {
    /// Whether the network device's tap is already open (see
    /// [`LoadedSnapshot::open_tap_ahead`]).
    pub fn has_tap(&self) -> bool {
        self.net.is_some()
    }
}

impl std::fmt::Debug for PreparedShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedShell")
            .field("vmm", &self.vmm)
            .finish_non_exhaustive()
    }
}

/// A snapshot checked and mapped, ready to restore any number of children.
///
/// Memory is mapped once here, MAP_PRIVATE: children forked from the process that loaded it
/// inherit the mapping copy-on-write, so a restore in a forked child does not map anything.
/// Within one process, the first restore uses that mapping and every later restore maps a
/// fresh private copy (two VMs of one process never share memory). A process should therefore
/// not restore from a LoadedSnapshot itself and then fork children that restore from it.
pub struct LoadedSnapshot {
    tag: Tag,
    dir: PathBuf,
    manifest: Manifest,
    manifest_sha256: String,
    /// The host the snapshot was taken on.
    saved_host: HostFacts,
    state: MachineState,
    ancestors: Vec<Tag>,
    layers: Vec<MemoryLayer>,
    memory: GuestMemory,
    /// pid of the process whose VM took `memory` (0: none). An atomic rather than a lock so
    /// a child forked while another thread held it cannot deadlock.
    memory_taken_by: AtomicU32,
}

impl std::fmt::Debug for LoadedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedSnapshot")
            .field("tag", &self.tag)
            .field("ancestors", &self.ancestors)
            .finish_non_exhaustive()
    }
}

/// This host's facts, probed once per process (the TSC frequency needs a throwaway vCPU).
fn host_facts() -> Result<&'static HostFacts, RestoreError> {
    static FACTS: OnceLock<HostFacts> = OnceLock::new();
    if let Some(f) = FACTS.get() {
        return Ok(f);
    }
    let shell = VmShell::new(1)?;
    let tsc_khz = shell.vcpu_tsc_khz(0).unwrap_or(0);
    let facts = HostFacts::current(shell.kvm(), tsc_khz);
    Ok(FACTS.get_or_init(|| facts))
}

fn store_err(tag: &Tag, e: StoreError) -> RestoreError {
    match e {
        StoreError::NotFound(_) => RestoreError::UnknownTag(tag.clone()),
        other => RestoreError::Store(other),
    }
}

fn read_state(tag: &Tag, dir: &Path) -> Result<(HostFacts, MachineState), RestoreError> {
    vmstate_file::load(&dir.join(VMSTATE_FILE)).map_err(|source| RestoreError::VmState {
        tag: tag.clone(),
        source,
    })
}

fn memory_error(tag: &Tag, path: &Path, source: MemoryFileError) -> RestoreError {
    RestoreError::Memory {
        tag: tag.clone(),
        path: path.to_path_buf(),
        source,
    }
}

/// Maps `layers` (root first) as one private guest memory.
fn map_layers(
    tag: &Tag,
    layers: &[MemoryLayer],
    layout: &[memory_file::RegionSpec],
) -> Result<GuestMemory, RestoreError> {
    let root = &layers[0];
    let open = |p: &Path| File::open(p).map_err(|e| memory_error(tag, p, e.into()));
    let mem = memory_file::map_private(&open(&root.path)?, layout)
        .map_err(|e| memory_error(tag, &root.path, e))?;
    for layer in &layers[1..] {
        let extents = layer.extents.as_deref().unwrap_or(&[]);
        memory_file::overlay_private(&mem, &open(&layer.path)?, extents)
            .map_err(|e| memory_error(tag, &layer.path, e))?;
    }
    Ok(mem)
}

impl LoadedSnapshot {
    /// Checks everything a restore needs before any VM exists, and maps memory: the
    /// manifest, vmstate.json (format version, checksum, compatibility with this host), memory.bin
    /// sizes, and for a diff snapshot the chain up to its root (each parent must exist and be
    /// the one the link was made against — its manifest's sha256, not a re-hash of its memory).
    /// This host's facts are probed once per process (with a throwaway VM).
    pub fn load(store: &Store, tag: &Tag) -> Result<LoadedSnapshot, RestoreError> {
        LoadedSnapshot::load_for_host(store, tag, host_facts()?)
    }

    /// [`LoadedSnapshot::load`] against `here`, the facts of the host the snapshot will be
    /// restored on. Reads files and maps memory only: no KVM.
    pub fn load_for_host(
        store: &Store,
        tag: &Tag,
        here: &HostFacts,
    ) -> Result<LoadedSnapshot, RestoreError> {
        let snap = store.get(tag).map_err(|e| store_err(tag, e))?;
        let (saved_host, state) = read_state(tag, &snap.dir)?;
        check_host(&saved_host, here).map_err(|source| RestoreError::VmState {
            tag: tag.clone(),
            source,
        })?;
        memory_file::validate_layout(&state.memory)
            .map_err(|e| memory_error(tag, &snap.dir.join(MEMORY_FILE), e))?;
        if state.vcpus.is_empty() {
            return Err(RestoreError::BadState {
                tag: tag.clone(),
                msg: "vmstate.json holds no vCPUs".into(),
            });
        }
        if state.devices.block && !snap.dir.join(ROOTFS_FILE).is_file() {
            return Err(RestoreError::BadState {
                tag: tag.clone(),
                msg: format!("the VM had a disk but {ROOTFS_FILE} is missing"),
            });
        }
        let manifest_sha256 = snap.manifest_sha256().map_err(|e| store_err(tag, e))?;
        let chain = chain::walk(store, tag, &snap.dir, &state.memory, state.chain.as_ref())?;
        let memory = map_layers(tag, &chain.layers, &state.memory)?;
        Ok(LoadedSnapshot {
            tag: tag.clone(),
            dir: snap.dir,
            manifest: snap.manifest,
            manifest_sha256,
            saved_host,
            state,
            ancestors: chain.ancestors,
            layers: chain.layers,
            memory,
            memory_taken_by: AtomicU32::new(0),
        })
    }

    pub fn tag(&self) -> &Tag {
        &self.tag
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The snapshot's directory in the store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved machine, as vmstate.json holds it.
    pub fn state(&self) -> &MachineState {
        &self.state
    }

    /// The facts of the host the snapshot was taken on.
    pub fn saved_host(&self) -> &HostFacts {
        &self.saved_host
    }

    /// The snapshot's memory as mapped in this process (copy-on-write; read it, e.g. to learn
    /// the demo counter the children must continue from).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// A new VM prepared for a child of this snapshot: everything of a restore that is the
    /// same for every child, done ahead of time (e.g. in a pool process forked from the zygote,
    /// which attaches the inherited mapping). `restore_into` then only builds the devices that
    /// need the child's identity, gives it a fresh VMGenID and lets its vCPUs run.
    pub fn prepare_shell(&self, track_dirty_pages: bool) -> Result<PreparedShell, RestoreError> {
        // Memory first: a slot registered before the irqchip exists costs no grace period.
        let memory = self.memory_for_child()?;
        let shell = VmShell::with_memory(self.vcpus(), memory, track_dirty_pages)?;
        self.finish_prepare(shell)
    }

    /// Prepares `shell`, which must have no memory yet (see [`LoadedSnapshot::prepare_shell`]):
    /// matches the TSC rate, attaches the snapshot's memory, adds the legacy devices, reserves the
    /// virtio slots with their ioeventfds and irqfds registered, writes the snapshot's KVM
    /// state and spawns the vCPU threads, parked before their first KVM_RUN.
    pub fn prepare(
        &self,
        mut shell: VmShell,
        track_dirty_pages: bool,
    ) -> Result<PreparedShell, RestoreError> {
        if shell.vcpu_count() != self.vcpus() {
            return Err(RestoreError::VcpuCount {
                tag: self.tag.clone(),
                snapshot: self.vcpus(),
                shell: shell.vcpu_count(),
            });
        }
        if shell.has_memory() {
            return Err(RestoreError::BadState {
                tag: self.tag.clone(),
                msg: "the VM shell already has memory; a snapshot's shell gets the snapshot's"
                    .into(),
            });
        }
        shell.attach_memory(self.memory_for_child()?, track_dirty_pages)?;
        self.finish_prepare(shell)
    }

    /// The rest of preparing a shell that has this snapshot's memory.
    fn finish_prepare(&self, shell: VmShell) -> Result<PreparedShell, RestoreError> {
        if let Some(saved) = self.state.vcpus.first().and_then(|v| v.tsc_khz) {
            shell
                .match_tsc_khz(saved)
                .map_err(|(here, source)| RestoreError::Tsc {
                    tag: self.tag.clone(),
                    saved,
                    here,
                    source,
                })?;
        }
        let mut vmm = shell.finish_attached(&SerialOutput::Sink)?;
        let slots = reserve(&mut vmm, &self.device_kinds())?;
        self.restore_kvm_state(&vmm)?;
        vmm.start_paused()?;
        Ok(PreparedShell {
            vmm,
            slots,
            memory_label: self.manifest_sha256.clone(),
            net: None,
        })
    }

    /// Opens the snapshot's tap for `shell` now, by its name, in the calling thread's network
    /// namespace, and builds the network device on it (its buffers written, so their pages
    /// are this process's own): a pool does it before `go` (the thread already in the
    /// child's namespace), so the restore only attaches the device. A snapshot without a
    /// network device: nothing to open.
    pub fn open_tap_ahead(&self, shell: &mut PreparedShell) -> Result<(), RestoreError> {
        if let Some(n) = &self.state.devices.net {
            let net = Net::open(&n.tap, n.mac).map_err(AttachError::from)?;
            shell.net = Some(net);
        }
        Ok(())
    }

    /// The snapshot's vCPU, VM (PIT, clock, irqchips) and serial state: the same for every
    /// child, so a pool writes it ahead of time. The guest clocks keep running from here, as
    /// in a VM paused at the snapshot and resumed at `go`.
    fn restore_kvm_state(&self, vmm: &Vmm) -> Result<(), RestoreError> {
        for (vcpu, state) in vmm.vcpus().iter().zip(&self.state.vcpus) {
            vcpu.restore_state(state)?;
        }
        vmm.vm().restore_state(&self.state.vm)?;
        lock(vmm.serial()).restore(&self.state.serial)?;
        Ok(())
    }

    /// The virtio devices the snapshot's VM had, in slot order.
    fn device_kinds(&self) -> Vec<DeviceKind> {
        let d = &self.state.devices;
        DeviceKind::of(d.block, d.vsock, d.rng, d.net.is_some())
    }

    /// The snapshot's VMGenID placement (None: taken without ACPI or before VMGenID existed;
    /// its children then get no new id).
    pub fn vmgenid_config(&self) -> Option<crate::acpi::VmGenIdConfig> {
        self.state.vmgenid
    }

    /// vCPUs a shell for this snapshot must have.
    pub fn vcpus(&self) -> u32 {
        self.state.vcpus.len() as u32
    }

    /// Parent, grandparent, ... up to the root (empty for a self-contained snapshot).
    pub fn ancestors(&self) -> &[Tag] {
        &self.ancestors
    }

    /// The memory a VM of this process gets: the preloaded mapping the first time (inherited
    /// copy-on-write by forked children), a fresh private mapping after that.
    fn memory_for_child(&self) -> Result<GuestMemory, RestoreError> {
        let pid = std::process::id();
        if self.memory_taken_by.swap(pid, Ordering::SeqCst) == pid {
            return map_layers(&self.tag, &self.layers, &self.state.memory);
        }
        Ok(self.memory.clone())
    }

    /// Turns a prepared shell (memory attached, vCPU state — CPUID, MP state, regs, sregs,
    /// XSAVE, XCRs, debug regs, LAPIC, MSRs with TSC_DEADLINE last, events — then
    /// PIT/clock/irqchips and serial registers already written) into a running child: builds
    /// the devices into the reserved slots with the child's own disk overlay, vsock socket and
    /// tap (opened by name in the calling thread's network namespace, with the snapshot's MAC),
    /// restores the virtio transports and queues (a transport reset pending), re-raises device
    /// interrupts, re-processes queues, gives the guest a fresh random VMGenID (when the
    /// snapshot has one: written into the child's copy-on-write memory, announced on the GED's
    /// line), and starts the vCPUs. The returned machine runs.
    pub fn restore_into(
        &self,
        shell: PreparedShell,
        identity: &RestoreIdentity,
    ) -> Result<Machine, RestoreError> {
        let overlay_created = self.state.devices.block && !identity.disk_overlay.exists();
        let machine = self.restore_into_held(shell, identity)?;
        if let Err(e) = machine.vmm.resume() {
            drop(machine);
            if overlay_created {
                remove_overlay(&identity.disk_overlay);
            }
            return Err(e.into());
        }
        Ok(machine)
    }

    /// [`LoadedSnapshot::restore_into`] up to, not including, letting the vCPUs run: the
    /// machine's devices are built with the child's identity (files opened, sockets bound) and
    /// its vCPUs wait at their first checkpoint until `machine.vmm.resume()`. A sandbox
    /// confines its process in between (what needed privileges is open by then).
    pub fn restore_into_held(
        &self,
        shell: PreparedShell,
        identity: &RestoreIdentity,
    ) -> Result<Machine, RestoreError> {
        if shell.memory_label != self.manifest_sha256 {
            return Err(RestoreError::BadState {
                tag: self.tag.clone(),
                msg: "the VM shell was prepared with another snapshot's memory".into(),
            });
        }
        let overlay_created = self.state.devices.block && !identity.disk_overlay.exists();
        let result = self.restore_inner(shell, identity);
        if result.is_err() && overlay_created {
            remove_overlay(&identity.disk_overlay);
        }
        result
    }

    fn restore_inner(
        &self,
        shell: PreparedShell,
        identity: &RestoreIdentity,
    ) -> Result<Machine, RestoreError> {
        let PreparedShell {
            mut vmm,
            slots,
            net,
            ..
        } = shell;
        lock(vmm.serial()).set_output(open_serial(&identity.serial)?);
        let d = &self.state.devices;
        let virtio = VirtioConfig {
            block: d.block.then(|| BlockConfig {
                base: self.dir.join(ROOTFS_FILE),
                overlay: identity.disk_overlay.clone(),
                read_only: d.block_read_only,
                id: self.state.block_id.clone(),
            }),
            vsock: d.vsock.then(|| VsockConfig {
                guest_cid: d.vsock_cid,
                uds_path: identity.vsock_uds.clone(),
            }),
            rng: d.rng,
            net: d.net.as_ref().map(|n| NetConfig {
                tap: match &net {
                    Some(built) => built.tap_name().to_string(),
                    None => identity.net_tap.clone().unwrap_or_else(|| n.tap.clone()),
                },
                mac: n.mac,
            }),
        };
        let mut devices = attach_reserved_with_net(&vmm, slots, &virtio, net)?;
        // What this child runs with (its own tap name), for snapshots of it.
        let mut device_list = self.state.devices.clone();
        if let (Some(n), Some(cfg)) = (device_list.net.as_mut(), &virtio.net) {
            n.tap = cfg.tap.clone();
        }
        devices.restore(&self.state.virtio)?;
        // A fresh identity for the guest's RNG: after the irqchips (their restore would drop
        // the event's edge), before the vCPUs run.
        if let Some(cfg) = self.state.vmgenid {
            vmm.refresh_vmgenid(cfg)?;
        }
        Ok(Machine {
            vmm,
            devices,
            info: MachineInfo {
                kernel: self.state.kernel.clone(),
                initrd: self.state.initrd.clone(),
                cmdline: self.state.cmdline.clone(),
                devices: device_list,
                block_id: self.state.block_id.clone(),
                origin: Some(Origin {
                    tag: self.tag.clone(),
                    manifest_sha256: self.manifest_sha256.clone(),
                    content_sha256: self.manifest.content_sha256(),
                }),
                net_policy: self.manifest.net.clone(),
                carried_dirty: Default::default(),
            },
        })
    }
}

/// Nothing of a failed child is left behind: its overlay and the overlay's map go.
fn remove_overlay(overlay: &Path) {
    let _ = std::fs::remove_file(overlay);
    let mut map = overlay.to_path_buf().into_os_string();
    map.push(".map");
    let _ = std::fs::remove_file(map);
}

/// In-process convenience: load `tag`, create a shell, restore into it.
pub fn restore(
    store: &Store,
    tag: &Tag,
    identity: &RestoreIdentity,
) -> Result<Machine, RestoreError> {
    let loaded = LoadedSnapshot::load(store, tag)?;
    let shell = loaded.prepare_shell(identity.track_dirty_pages)?;
    loaded.restore_into(shell, identity)
}
