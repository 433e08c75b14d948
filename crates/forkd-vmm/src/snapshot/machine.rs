//! [`Machine`]: a VM with its virtio devices — what `forkd snapshot` boots, what a restore
//! returns and what BRANCH snapshots (see [`super::save`] and [`super::restore`](mod@super::restore)).

use std::collections::BTreeSet;
use std::time::Duration;

use forkd_store::Tag;

use super::persist::{DeviceList, NetDevice};
use crate::builder::{build, BuildError, VmConfig};
use crate::devices::virtio::attach::AttachError;
use crate::devices::virtio::{attach, VirtioConfig, VirtioDevices};
use crate::vmm::{Vmm, VmmError};

/// The snapshot a machine's memory currently descends from: diff snapshots are taken against
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub tag: Tag,
    /// sha256 of its manifest.toml (hex).
    pub manifest_sha256: String,
    /// Its manifest's content sha256 (see [`forkd_store::Manifest::content_sha256`]).
    pub content_sha256: String,
}

/// A VM with its virtio devices: what `forkd snapshot` boots, what a restore returns, and what
/// BRANCH snapshots. Dropping it stops the vCPUs, then the device thread.
pub struct Machine {
    // Field order is drop order: vCPUs stop before the devices they call into.
    pub vmm: Vmm,
    pub devices: VirtioDevices,
    pub(crate) info: MachineInfo,
}

/// What a machine was made from, for snapshots of it.
#[derive(Debug, Clone)]
pub(crate) struct MachineInfo {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
    pub devices: DeviceList,
    pub block_id: String,
    pub origin: Option<Origin>,
    /// The network policy its snapshots record (see [`forkd_store::Manifest::net`]).
    pub net_policy: Option<forkd_store::NetRecord>,
    /// Guest pages written since `origin` that an earlier, failed snapshot already took out of
    /// the dirty logs (so the next diff still includes them).
    pub carried_dirty: BTreeSet<u64>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vmm", &self.vmm)
            .field("origin", &self.info.origin)
            .finish_non_exhaustive()
    }
}

/// Why a machine could not boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Devices(#[from] AttachError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

impl Machine {
    /// Builds `config`'s kernel with `virtio`'s devices and starts it.
    pub fn boot(config: &VmConfig, virtio: &VirtioConfig) -> Result<Machine, BootError> {
        let mut vmm = build(config)?;
        let devices = attach(&mut vmm, virtio)?;
        let cmdline = vmm.cmdline().to_string();
        vmm.start()?;
        Ok(Machine {
            vmm,
            devices,
            info: MachineInfo {
                kernel: config.kernel.identity(),
                initrd: config.initrd.as_ref().map(|p| p.display().to_string()),
                cmdline,
                devices: DeviceList {
                    block: virtio.block.is_some(),
                    block_read_only: virtio.block.as_ref().is_some_and(|b| b.read_only),
                    vsock: virtio.vsock.is_some(),
                    vsock_cid: virtio.vsock.as_ref().map_or(0, |v| v.guest_cid),
                    rng: virtio.rng,
                    net: virtio.net.as_ref().map(|n| NetDevice {
                        mac: n.mac,
                        tap: n.tap.clone(),
                    }),
                },
                block_id: virtio
                    .block
                    .as_ref()
                    .map(|b| b.id.clone())
                    .unwrap_or_default(),
                origin: None,
                net_policy: None,
                carried_dirty: BTreeSet::new(),
            },
        })
    }

    /// The VMGenID id this machine's guest sees now (None without ACPI, or when restored from
    /// a snapshot taken without one). Every boot and every restore writes a fresh random id.
    pub fn vmgenid(&self) -> Option<crate::vmgenid::VmGenId> {
        self.vmm.vmgenid()
    }

    /// Records the network policy its snapshots carry (a booted machine has none until told;
    /// a restored one has its snapshot's).
    pub fn set_net_policy(&mut self, policy: Option<forkd_store::NetRecord>) {
        self.info.net_policy = policy;
    }

    /// The snapshot this machine's memory descends from (None for a booted machine).
    pub fn origin(&self) -> Option<&Origin> {
        self.info.origin.as_ref()
    }

    /// Stops the machine and waits for its threads.
    pub fn stop(mut self) {
        self.vmm.request_stop();
        let _ = self.vmm.wait_timeout(Duration::from_secs(30));
        self.devices.stop();
    }
}
