//! Attaching virtio devices to a built [`Vmm`]: one virtio-mmio slot per device (window on the
//! MMIO bus, an ioeventfd per queue on the notify register, an irqfd on the slot's GSI) and one
//! device event-loop thread for all of them.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::block::{Block, CowDisk, DiskError};
use super::event_loop::{DeviceEventLoop, EventLoopError};
use super::mmio::{lock, MmioTransport, MmioTransportState, TransportEvents, NOTIFY_REG_OFFSET};
use super::net::{MacAddr, Net, NetError, DEFAULT_MAC};
use super::rng::Rng;
use super::vsock::{Vsock, VsockError, VsockState, DEFAULT_GUEST_CID};
use super::{VirtioDevice, VirtioError};
use crate::snapshot::Persist;
use crate::vmm::{MmioSlot, Vmm, VmmError};

/// The VM's disk: a read-only base image and this VM's copy-on-write overlay.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    pub base: PathBuf,
    /// Created fresh when it does not exist; reopened (with its `.map`) when it does.
    pub overlay: PathBuf,
    pub read_only: bool,
    /// What the guest gets from GET_ID (at most 20 bytes).
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// The Unix socket host processes connect to; guest connections to port P go to
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    pub fn new(uds_path: PathBuf) -> VsockConfig {
        VsockConfig {
            guest_cid: DEFAULT_GUEST_CID,
            uds_path,
        }
    }
}

/// A network interface backed by a host tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap to attach to. It must exist in the network namespace of the thread that
    /// attaches the devices (boot) or restores the machine; the VMM never creates one.
    pub tap: String,
    /// The guest's MAC address (kept by every child restored from a snapshot).
    pub mac: MacAddr,
}

impl NetConfig {
    /// Tap `tap` with the default MAC ([`DEFAULT_MAC`]).
    pub fn new(tap: impl Into<String>) -> NetConfig {
        NetConfig {
            tap: tap.into(),
            mac: DEFAULT_MAC,
        }
    }
}

/// Which virtio devices a VM gets.
#[derive(Debug, Clone, Default)]
pub struct VirtioConfig {
    pub block: Option<BlockConfig>,
    pub vsock: Option<VsockConfig>,
    pub rng: bool,
    pub net: Option<NetConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
}

/// One attached device.
pub struct AttachedDevice {
    pub slot: MmioSlot,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The VM's virtio devices and their event-loop thread. Keep it alive as long as the VM runs;
/// dropping it stops the device thread.
pub struct VirtioDevices {
    pub block: Option<Arc<Mutex<Block>>>,
    pub vsock: Option<Arc<Mutex<Vsock>>>,
    pub rng: Option<Arc<Mutex<Rng>>>,
    pub net: Option<Arc<Mutex<Net>>>,
    pub attached: Vec<AttachedDevice>,
    event_loop: Option<DeviceEventLoop>,
}

/// Saved state of a VM's virtio devices, in attachment order (see [`VirtioDevices`]'s
/// [`Persist`] impl).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioDevicesState {
    pub transports: Vec<MmioTransportState>,
    pub vsock: Option<VsockState>,
}

impl VirtioDevices {
    /// Stops the device thread (after the vCPUs have stopped).
    pub fn stop(&mut self) {
        if let Some(l) = self.event_loop.take() {
            l.stop();
        }
    }

    /// Keeps the device thread from processing anything until the guard is dropped (see
    /// [`DeviceEventLoop::quiesce`]); None when there are no devices.
    pub fn quiesce(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.event_loop.as_ref().map(|l| l.quiesce())
    }
}

impl Persist for VirtioDevices {
    type State = VirtioDevicesState;
    type Error = AttachError;

    /// Registers and queue positions of every device (take it with the vCPUs paused, before
    /// the KVM state). Flushes the disk so its overlay is "the disk as the guest saw it".
    fn save(&self) -> Result<VirtioDevicesState, AttachError> {
        if let Some(block) = &self.block {
            lock(block).disk_mut().flush()?;
        }
        Ok(VirtioDevicesState {
            transports: self
                .attached
                .iter()
                .map(|a| lock(&a.transport).save())
                .collect::<Result<_, _>>()?,
            vsock: self
                .vsock
                .as_ref()
                .map(|v| unwrap_infallible(lock(v).save())),
        })
    }

    /// Applies `state` to freshly attached devices of the same kinds in the same order (after
    /// the KVM state is restored), then re-raises interrupts and re-processes queues. Nothing
    /// is changed when the device list does not match.
    fn restore(&mut self, state: &VirtioDevicesState) -> Result<(), AttachError> {
        let kinds: Vec<u32> = self
            .attached
            .iter()
            .map(|a| lock(&a.transport).device_type())
            .collect();
        let saved: Vec<u32> = state.transports.iter().map(|t| t.device_type).collect();
        if kinds != saved || state.vsock.is_some() != self.vsock.is_some() {
            return Err(AttachError::Virtio(VirtioError::Device(format!(
                "saved virtio devices (types {saved:?}) do not match this VM's (types {kinds:?})"
            ))));
        }
        for (a, s) in self.attached.iter().zip(&state.transports) {
            lock(&a.transport).restore(s)?;
        }
        if let (Some(v), Some(s)) = (&self.vsock, &state.vsock) {
            unwrap_infallible(lock(v).restore(s));
        }
        for a in &self.attached {
            lock(&a.transport).notify_after_restore();
        }
        Ok(())
    }
}

/// The vsock device's saved state ([`VsockState`]) lives beside it; this impl only delegates
/// (it sits here, not in `vsock/`, to leave that module's files alone).
impl Persist for Vsock {
    type State = VsockState;
    type Error = Infallible;

    fn save(&self) -> Result<VsockState, Infallible> {
        Ok(self.save_state())
    }

    fn restore(&mut self, state: &VsockState) -> Result<(), Infallible> {
        self.restore_state(state);
        Ok(())
    }
}

fn unwrap_infallible<T>(r: Result<T, Infallible>) -> T {
    match r {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

/// The kinds of virtio device a VM gets, in the order [`attach`] gives them slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Block,
    Vsock,
    Rng,
    Net,
}

impl DeviceKind {
    fn queue_count(self) -> usize {
        match self {
            DeviceKind::Block => super::block::QUEUE_COUNT,
            DeviceKind::Vsock => super::vsock::QUEUE_COUNT,
            DeviceKind::Rng => super::rng::QUEUE_COUNT,
            DeviceKind::Net => super::net::QUEUE_COUNT,
        }
    }
}

impl DeviceKind {
    /// The kinds a VM with these devices gets, in slot order (block, vsock, rng, net).
    pub fn of(block: bool, vsock: bool, rng: bool, net: bool) -> Vec<DeviceKind> {
        [
            (block, DeviceKind::Block),
            (vsock, DeviceKind::Vsock),
            (rng, DeviceKind::Rng),
            (net, DeviceKind::Net),
        ]
        .into_iter()
        .filter_map(|(present, kind)| present.then_some(kind))
        .collect()
    }
}

impl VirtioConfig {
    /// The devices this configuration asks for, in slot order.
    pub fn kinds(&self) -> Vec<DeviceKind> {
        DeviceKind::of(
            self.block.is_some(),
            self.vsock.is_some(),
            self.rng,
            self.net.is_some(),
        )
    }
}

/// Virtio-mmio slots whose notify ioeventfds and interrupt irqfd are registered with KVM but
/// whose devices are not built yet: the identity-free part of attaching, which a pool does
/// ahead of time (each registration waits for a kernel grace period), leaving
/// [`attach_reserved`] only what needs the child's identity (its disk overlay, its vsock
/// socket, its tap).
pub struct ReservedSlots {
    slots: Vec<(DeviceKind, MmioSlot, TransportEvents)>,
}

impl ReservedSlots {
    pub fn kinds(&self) -> Vec<DeviceKind> {
        self.slots.iter().map(|(kind, ..)| *kind).collect()
    }
}

/// Reserves one slot per kind on `vmm` (before [`Vmm::start`]).
pub fn reserve(vmm: &mut Vmm, kinds: &[DeviceKind]) -> Result<ReservedSlots, AttachError> {
    let mut slots = Vec::with_capacity(kinds.len());
    for &kind in kinds {
        let events = TransportEvents::new(kind.queue_count())?;
        let slot = vmm.allocate_mmio_slot()?;
        for (index, evt) in events.queue_events().iter().enumerate() {
            vmm.register_ioevent(evt, slot.base + NOTIFY_REG_OFFSET, index as u32)?;
        }
        vmm.register_irqfd(events.interrupt_event(), slot.gsi)?;
        slots.push((kind, slot, events));
    }
    Ok(ReservedSlots { slots })
}

/// Creates the devices `config` asks for and attaches them to `vmm` (before [`Vmm::start`]).
pub fn attach(vmm: &mut Vmm, config: &VirtioConfig) -> Result<VirtioDevices, AttachError> {
    let reserved = reserve(vmm, &config.kinds())?;
    attach_reserved(vmm, reserved, config)
}

/// Builds the devices `config` asks for into `reserved` (which must hold the same kinds, in
/// order) and starts their event loop.
pub fn attach_reserved(
    vmm: &Vmm,
    reserved: ReservedSlots,
    config: &VirtioConfig,
) -> Result<VirtioDevices, AttachError> {
    attach_reserved_with_net(vmm, reserved, config, None)
}

/// [`attach_reserved`], with the network device `net` when it was built ahead (on the tap
/// `config` names); None: built here, its tap opened by name.
pub fn attach_reserved_with_net(
    vmm: &Vmm,
    reserved: ReservedSlots,
    config: &VirtioConfig,
    net: Option<Net>,
) -> Result<VirtioDevices, AttachError> {
    if reserved.kinds() != config.kinds() {
        return Err(AttachError::Virtio(VirtioError::Device(format!(
            "slots were reserved for {:?} but the devices are {:?}",
            reserved.kinds(),
            config.kinds()
        ))));
    }
    let mut devices = VirtioDevices {
        block: None,
        vsock: None,
        rng: None,
        net: None,
        attached: Vec::new(),
        event_loop: None,
    };
    // The tap first: it is the device most likely to be refused (wrong name, wrong network
    // namespace, in use), and opening it leaves nothing behind.
    let mut net = match (&config.net, net) {
        (Some(_), Some(built)) => Some(built),
        (Some(n), None) => Some(Net::open(&n.tap, n.mac)?),
        (None, _) => None,
    };
    let mut sources = Vec::new();
    for (kind, slot, events) in reserved.slots {
        let device: Arc<Mutex<dyn VirtioDevice>> = match kind {
            DeviceKind::Block => {
                let b = config.block.as_ref().expect("kinds match the config");
                let disk = if b.overlay.exists() {
                    CowDisk::open(&b.base, &b.overlay)?
                } else {
                    CowDisk::create(&b.base, &b.overlay)?
                };
                let block = Arc::new(Mutex::new(Block::new(disk, &b.id, b.read_only)));
                devices.block = Some(block.clone());
                block
            }
            DeviceKind::Vsock => {
                let v = config.vsock.as_ref().expect("kinds match the config");
                let vsock = Arc::new(Mutex::new(Vsock::new(v.guest_cid, &v.uds_path)?));
                devices.vsock = Some(vsock.clone());
                vsock
            }
            DeviceKind::Rng => {
                let rng = Arc::new(Mutex::new(Rng::new()));
                devices.rng = Some(rng.clone());
                rng
            }
            DeviceKind::Net => {
                let net = Arc::new(Mutex::new(net.take().expect("kinds match the config")));
                devices.net = Some(net.clone());
                net
            }
        };
        let transport = MmioTransport::with_events(device, vmm.memory().clone(), events)?;
        sources.push(transport.event_source()?);
        let transport = Arc::new(Mutex::new(transport));
        vmm.add_mmio_device(slot.base, slot.len, transport.clone())?;
        devices.attached.push(AttachedDevice { slot, transport });
    }
    if !sources.is_empty() {
        devices.event_loop = Some(DeviceEventLoop::spawn(sources)?);
    }
    Ok(devices)
}
