//! What a snapshot saves, assembled from the parts that own it.
//!
//! Each part keeps its saved form beside itself: the vCPU's in [`crate::vstate::vcpu`]
//! ([`VcpuState`]), the VM-wide KVM state in [`crate::vstate::vm`] ([`VmState`]), the serial
//! port's beside it ([`SerialDeviceState`]), the virtio transports' and devices' in
//! [`crate::devices::virtio`]. Devices implement [`Persist`]; the KVM objects keep their
//! `save_state` / `restore_state` (their state is read through shared fds, a vCPU's only on its
//! own thread, and a vCPU's save needs the host's MSR list). [`MachineState`] is what
//! `vmstate.json` holds, inside the envelope of [`super::vmstate_file`].

use serde::{Deserialize, Serialize};

use super::chain::ChainLink;
use super::memory_file::RegionSpec;
use crate::acpi::VmGenIdConfig;
use crate::devices::legacy::SerialDeviceState;
use crate::devices::virtio::net::MacAddr;
use crate::devices::virtio::VirtioDevicesState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// A part of a machine whose state a snapshot carries.
///
/// `save` reads the state of a paused machine; `restore` applies it to a freshly built
/// instance of the same part (same kind, same configuration), before the machine runs.
pub trait Persist {
    /// The saved form, as vmstate.json holds it.
    type State: Serialize + for<'de> Deserialize<'de>;
    type Error: std::error::Error + Send + Sync + 'static;

    fn save(&self) -> Result<Self::State, Self::Error>;

    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// The whole saved machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// Where each guest RAM region lives in memory.bin.
    pub memory: Vec<RegionSpec>,
    /// Saved per vCPU, index order.
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialDeviceState,
    /// Which virtio devices the machine had (a restore recreates the same list).
    pub devices: DeviceList,
    /// The block device's GET_ID string.
    pub block_id: String,
    pub virtio: VirtioDevicesState,
    /// What the machine was booted from (informational).
    pub kernel: String,
    /// The initrd the machine was booted with (informational; it lives in guest memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    pub cmdline: String,
    /// Set for a diff snapshot: the parent it overlays and the pages it stores.
    pub chain: Option<ChainLink>,
    /// Where the guest's VMGenID lives and its event line, when it has one (booted with ACPI).
    /// Absent for a machine booted without ACPI (and then omitted): such snapshots restore
    /// without a new id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmgenid: Option<VmGenIdConfig>,
}

/// Which virtio devices a machine has, in attachment order: block, vsock, rng, net.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    pub block: bool,
    pub block_read_only: bool,
    pub vsock: bool,
    pub vsock_cid: u64,
    pub rng: bool,
    /// The network interface, when the machine has one (absent in snapshots without one,
    /// and in those taken before virtio-net existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetDevice>,
}

/// A machine's network interface as a snapshot records it. The tap itself is not saved: a
/// restored child opens a tap of this name (or the one its restore names) in its own network
/// namespace, and keeps the MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDevice {
    pub mac: MacAddr,
    pub tap: String,
}
