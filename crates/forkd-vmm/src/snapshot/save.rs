//! Taking snapshots of a running [`Machine`]: `forkd snapshot` (full, then stop) and BRANCH
//! (full or diff, then resume).
//!
//! Order while paused: quiesce the device thread, save device state (this flushes the disk),
//! then the KVM state (vCPUs, then PIT/clock/irqchips), then guest memory; resume; then the
//! slow parts that no longer need the guest stopped (exporting the disk, hashing, publishing).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkd_store::{SnapshotMeta, Store, StoreError, Tag, MEMORY_FILE, ROOTFS_FILE, VMSTATE_FILE};
use vm_memory::GuestMemoryBackend;

use super::chain::ChainLink;
use super::machine::{Machine, Origin};
use super::memory_file::{self, extents_from_pages, layout_of, MemoryFileError};
use super::persist::{MachineState, Persist};
use super::restore::RestoreError;
use super::vmstate_file::{self, HostFacts};
use crate::devices::legacy::SerialStateError;
use crate::devices::virtio::attach::AttachError;
use crate::devices::virtio::block::{CowDisk, DiskError};
use crate::devices::virtio::mmio::lock;
use crate::memory::PAGE_SIZE;
use crate::vmm::{Vmm, VmmError};
use crate::vstate::vcpu::{snapshot_msr_indices, VcpuError};
use crate::vstate::vm::VmError;
use crate::vstate::KvmError;

/// What a snapshot stores of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Every non-zero page: a self-contained snapshot.
    Full,
    /// Only the pages written since the machine was restored from (or last snapshotted into)
    /// its origin tag, which becomes the new snapshot's parent.
    Diff,
}

/// What happens to the machine once its state is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// Keep running (BRANCH).
    Resume,
    /// Stay paused (`forkd snapshot` stops the machine next).
    StayPaused,
}

/// What a snapshot did and how long the guest was stopped for it.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    pub snapshot: forkd_store::Snapshot,
    pub mode: SnapshotMode,
    /// From the pause request until the vCPUs run again (or until the state was saved, for
    /// [`AfterSnapshot::StayPaused`]).
    pub paused: Duration,
    /// Whole call, including disk export, hashing and publishing.
    pub total: Duration,
    /// Pages written into memory.bin.
    pub pages_written: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot snapshot: the VM is not running ({0})")]
    NotRunning(String),
    #[error("a diff snapshot needs a machine restored from a snapshot (this one was booted); take a full snapshot")]
    NoOrigin,
    #[error("a diff snapshot needs dirty-page tracking (restore with track_dirty_pages)")]
    NoDirtyTracking,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Devices(#[from] AttachError),
    #[error(transparent)]
    Serial(#[from] SerialStateError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("writing memory.bin")]
    Memory(#[from] MemoryFileError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding vmstate.json")]
    Encode(#[from] serde_json::Error),
    #[error("cannot compact {from:?}")]
    Compact {
        from: Tag,
        #[source]
        source: Box<RestoreError>,
    },
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Machine {
    /// BRANCH: snapshots the running machine into `tag` and lets it run on. After success the
    /// new tag is the machine's origin (a later diff is taken against it).
    pub fn branch(
        &mut self,
        store: &Store,
        tag: &Tag,
        mode: SnapshotMode,
    ) -> Result<SnapshotReport, SnapshotError> {
        self.snapshot(store, tag, mode, AfterSnapshot::Resume)
    }

    /// Pauses the machine (if it is not paused already), saves it into a new snapshot `tag`
    /// and, with [`AfterSnapshot::Resume`], resumes it. On error the machine is resumed when
    /// asked to be and nothing is published.
    pub fn snapshot(
        &mut self,
        store: &Store,
        tag: &Tag,
        mode: SnapshotMode,
        after: AfterSnapshot,
    ) -> Result<SnapshotReport, SnapshotError> {
        let started = Instant::now();
        if let Some(reason) = self.vmm.stop_reason() {
            return Err(SnapshotError::NotRunning(format!("{reason:?}")));
        }
        if mode == SnapshotMode::Diff {
            if self.info.origin.is_none() {
                return Err(SnapshotError::NoOrigin);
            }
            if !self.vmm.vm().dirty_tracking() {
                return Err(SnapshotError::NoDirtyTracking);
            }
        }
        let staging = store.begin(tag)?;
        let was_paused = self.vmm.control().is_paused();
        if !was_paused {
            self.vmm.pause()?;
        }
        let saved = self.save_paused(staging.path(), mode);
        let paused = started.elapsed();
        if after == AfterSnapshot::Resume && !was_paused {
            self.vmm.resume()?;
        }
        let (state, memory, disk_fork) = saved?;
        let stats = match memory {
            PendingMemory::Written(stats) => stats,
            PendingMemory::Copied(bytes) => {
                let path = staging.path().join(MEMORY_FILE);
                let out = File::create(&path).map_err(io_err(&path))?;
                let extents = state.chain.as_ref().map_or(&[][..], |c| &c.extents[..]);
                memory_file::write_copied(
                    &out,
                    memory_file::total_size(&state.memory),
                    extents,
                    &bytes,
                )?
            }
        };
        let pages_written = stats.pages_written;

        // Off the pause path: vmstate.json, the disk as the guest saw it, then publish.
        let tsc_khz = state.vcpus.first().and_then(|v| v.tsc_khz).unwrap_or(0);
        let host = HostFacts::current(self.vmm.kvm(), tsc_khz);
        let vmstate_path = staging.path().join(VMSTATE_FILE);
        std::fs::write(&vmstate_path, vmstate_file::encode(&state, &host)?)
            .map_err(io_err(&vmstate_path))?;
        if let Some(fork) = disk_fork {
            let dest = staging.path().join(ROOTFS_FILE);
            let exported = export_sparse(&fork, &dest);
            let overlay = fork.overlay_path().to_path_buf();
            let map = fork.map_path();
            drop(fork);
            let _ = std::fs::remove_file(&overlay);
            let _ = std::fs::remove_file(&map);
            exported?;
        }
        let meta = SnapshotMeta {
            memory_mib: self.vmm.mem_size() >> 20,
            vcpus: self.vmm.vcpu_count(),
            description: match mode {
                SnapshotMode::Full => "full snapshot".into(),
                SnapshotMode::Diff => "diff snapshot".into(),
            },
            base_image: String::new(),
            kernel: self.info.kernel.clone(),
            parent_tag: match &state.chain {
                Some(link) => Some(Tag::parse(&link.parent_tag).map_err(StoreError::from)?),
                None => None,
            },
            parent_sha256: state
                .chain
                .as_ref()
                .map(|link| link.parent_manifest_sha256.clone())
                .unwrap_or_default(),
            net: self.info.net_policy.clone(),
        };
        let snapshot = staging.commit(meta)?;
        self.info.origin = Some(Origin {
            tag: tag.clone(),
            manifest_sha256: snapshot.manifest_sha256()?,
            content_sha256: snapshot.manifest.content_sha256(),
        });
        self.info.carried_dirty.clear();
        Ok(SnapshotReport {
            snapshot,
            mode,
            paused,
            total: started.elapsed(),
            pages_written,
        })
    }

    /// Everything that needs the guest stopped. Returns the state, memory write counts and
    /// (when there is a disk) a private copy of the disk overlay to export after resuming.
    fn save_paused(
        &mut self,
        dir: &Path,
        mode: SnapshotMode,
    ) -> Result<(MachineState, PendingMemory, Option<CowDisk>), SnapshotError> {
        let _quiet = self.devices.quiesce();
        // Reading the dirty logs also clears them: from here on they count from this snapshot.
        // Kept in `carried_dirty` until the snapshot is published, in case that fails.
        let carried = std::mem::take(&mut self.info.carried_dirty);
        let dirty = take_dirty_pages(&self.vmm, carried)?;
        self.info.carried_dirty = dirty.clone();
        let mut virtio = self.devices.save()?;
        // Connections never survive a snapshot: every child starts with a transport reset
        // pending, so its guest drops stale streams and reconnects. The running machine's own
        // connections are left alone.
        if let Some(v) = virtio.vsock.as_mut() {
            v.pending_transport_reset = true;
        }
        let serial = lock(self.vmm.serial()).save()?;
        let disk_fork = match &self.devices.block {
            Some(block) => {
                let tmp = dir.join(".disk-overlay.tmp");
                Some(lock(block).disk_mut().fork_to(&tmp)?)
            }
            None => None,
        };

        let msrs = snapshot_msr_indices(self.vmm.kvm())?;
        let mut vcpus = Vec::with_capacity(self.vmm.vcpu_count() as usize);
        for index in 0..self.vmm.vcpu_count() {
            let wanted = msrs.clone();
            let state = self
                .vmm
                .run_on_vcpu(index, move |v| v.save_state(&wanted))??;
            vcpus.push(state);
        }
        let vm = self.vmm.vm().save_state()?;

        let mem = self.vmm.memory();
        let layout = layout_of(mem);
        let (memory, chain) = match mode {
            SnapshotMode::Full => {
                let memory_path = dir.join(MEMORY_FILE);
                let out = File::create(&memory_path).map_err(io_err(&memory_path))?;
                (
                    PendingMemory::Written(memory_file::write_full(mem, &out)?),
                    None,
                )
            }
            SnapshotMode::Diff => {
                let origin = self.info.origin.clone().ok_or(SnapshotError::NoOrigin)?;
                let extents = extents_from_pages(dirty.iter().copied().collect());
                let bytes = memory_file::copy_extents(mem, &extents)?;
                (
                    PendingMemory::Copied(bytes),
                    Some(ChainLink {
                        parent_tag: origin.tag.to_string(),
                        parent_manifest_sha256: origin.manifest_sha256,
                        parent_content_sha256: origin.content_sha256,
                        extents,
                    }),
                )
            }
        };
        let state = MachineState {
            memory: layout,
            vcpus,
            vm,
            serial,
            devices: self.info.devices.clone(),
            block_id: self.info.block_id.clone(),
            virtio,
            kernel: self.info.kernel.clone(),
            initrd: self.info.initrd.clone(),
            cmdline: self.info.cmdline.clone(),
            chain,
            vmgenid: self.vmm.vmgenid_config(),
        };
        Ok((state, memory, disk_fork))
    }
}

/// memory.bin offsets of every page written since the origin: KVM's dirty log (guest writes),
/// the memory's own bitmap (writes by the VMM: used rings, block reads), and `carried` pages
/// from a failed snapshot. Both logs are cleared.
fn take_dirty_pages(vmm: &Vmm, carried: BTreeSet<u64>) -> Result<BTreeSet<u64>, SnapshotError> {
    let mut pages = carried;
    let mem = vmm.memory();
    let layout = layout_of(mem);
    if vmm.vm().dirty_tracking() {
        for gpa in vmm.vm().dirty_pages()? {
            if let Some(spec) = layout
                .iter()
                .find(|s| gpa >= s.guest_addr && gpa < s.guest_addr + s.size)
            {
                pages.insert(spec.file_offset + (gpa - spec.guest_addr));
            }
        }
    }
    for (region, spec) in mem.iter().zip(&layout) {
        for (word_index, word) in std::ops::Deref::deref(region)
            .bitmap()
            .get_and_reset()
            .iter()
            .enumerate()
        {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                let page = word_index as u64 * 64 + bit;
                if page * (PAGE_SIZE as u64) < spec.size {
                    pages.insert(spec.file_offset + page * PAGE_SIZE as u64);
                }
                bits &= bits - 1;
            }
        }
    }
    Ok(pages)
}

/// Guest memory as saved during the pause: already in memory.bin (full), or the dirtied pages
/// copied aside to be written once the guest runs again (diff).
enum PendingMemory {
    Written(memory_file::WriteStats),
    Copied(Vec<u8>),
}

/// Writes the disk `disk` shows (base + overlay) to `dest`, keeping holes: the base is copied
/// sparsely, then the overlay's blocks are written over it.
fn export_sparse(disk: &CowDisk, dest: &Path) -> Result<(), SnapshotError> {
    forkd_store::sparse::copy_sparse(disk.base_path(), dest).map_err(io_err(dest))?;
    disk.write_allocated_into(dest)?;
    Ok(())
}
