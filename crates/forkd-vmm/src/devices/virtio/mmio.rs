//! The virtio-mmio transport, version 2 (virtio spec 4.2.2): a 4 KiB register window per device.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_loop::VirtioEventSource;
use super::queue::{clone_queue, QueueSnapshot};
use super::{Interrupt, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::BusDevice;
use crate::memory::GuestMemory;
use crate::snapshot::Persist;

/// Size of the register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the queue-notify register (where the VMM registers ioeventfds).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the driver ("FRKD").
const VENDOR_ID: u32 = 0x444b_5246;

const REG_MAGIC: u64 = 0x00;
const REG_VERSION: u64 = 0x04;
const REG_DEVICE_ID: u64 = 0x08;
const REG_VENDOR_ID: u64 = 0x0c;
const REG_DEVICE_FEATURES: u64 = 0x10;
const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
const REG_DRIVER_FEATURES: u64 = 0x20;
const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
const REG_QUEUE_SEL: u64 = 0x30;
const REG_QUEUE_NUM_MAX: u64 = 0x34;
const REG_QUEUE_NUM: u64 = 0x38;
const REG_QUEUE_READY: u64 = 0x44;
const REG_QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x60;
const REG_INTERRUPT_ACK: u64 = 0x64;
const REG_STATUS: u64 = 0x70;
const REG_QUEUE_DESC_LOW: u64 = 0x80;
const REG_QUEUE_DESC_HIGH: u64 = 0x84;
const REG_QUEUE_DRIVER_LOW: u64 = 0x90;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x94;
const REG_QUEUE_DEVICE_LOW: u64 = 0xa0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0xa4;
const REG_CONFIG_GENERATION: u64 = 0xfc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (spec 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Transport registers worth saving (the snapshot issue serializes this).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    pub acked_features: u64,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub queue_select: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    /// The activated device's queues when activated, else the transport's (being configured).
    pub queues: Vec<QueueSnapshot>,
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    /// Queue configuration as the driver programs it; handed (cloned) to the device at
    /// DRIVER_OK.
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    avail_features: u64,
    acked_features: u64,
    device_features_select: u32,
    driver_features_select: u32,
    queue_select: u32,
    status: u32,
    config_generation: u32,
}

/// The eventfds a transport signals through: one per queue (the guest's notifications, as
/// ioeventfds) and the interrupt (an irqfd). They exist apart from the device so a VMM can
/// register them with KVM ahead of time (registration waits for a kernel grace period) and
/// build the device, which may need a child's identity, later.
pub struct TransportEvents {
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
}

impl TransportEvents {
    pub fn new(queues: usize) -> Result<TransportEvents, VirtioError> {
        let queue_evts = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TransportEvents {
            queue_evts,
            interrupt: Arc::new(Interrupt::new()?),
        })
    }

    /// Register each as an ioeventfd on `base + NOTIFY_REG_OFFSET` with datamatch = its index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Register as an irqfd on the device's GSI.
    pub fn interrupt_event(&self) -> &EventFd {
        self.interrupt.irqfd()
    }
}

impl MmioTransport {
    /// Wraps `device`; `mem` is the guest memory the device will access once activated.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
    ) -> Result<MmioTransport, VirtioError> {
        let queues = lock(&device).queue_max_sizes().len();
        MmioTransport::with_events(device, mem, TransportEvents::new(queues)?)
    }

    /// Like [`MmioTransport::new`], signalling through `events` (one per device queue).
    pub fn with_events(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        events: TransportEvents,
    ) -> Result<MmioTransport, VirtioError> {
        let (device_type, avail_features, max_sizes) = {
            let dev = lock(&device);
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        if events.queue_evts.len() != max_sizes.len() {
            return Err(VirtioError::Device(format!(
                "device type {device_type} has {} queues but {} queue events were prepared",
                max_sizes.len(),
                events.queue_evts.len()
            )));
        }
        let queues = max_sizes
            .iter()
            .map(|&max| {
                Queue::new(max).map_err(|e| {
                    VirtioError::Device(format!("device queue max size {max} is invalid: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: events.interrupt,
            queues,
            queue_evts: events.queue_evts,
            device_type,
            avail_features: avail_features | VIRTIO_F_VERSION_1,
            acked_features: 0,
            device_features_select: 0,
            driver_features_select: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// One EventFd per queue: register each as an ioeventfd on `base + NOTIFY_REG_OFFSET`
    /// with datamatch = its index (u32).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Register as an irqfd on the device's GSI.
    pub fn interrupt_event(&self) -> &EventFd {
        self.interrupt.irqfd()
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// What the device event loop needs to drive this device.
    pub fn event_source(&self) -> Result<VirtioEventSource, VirtioError> {
        let queue_evts = self
            .queue_evts
            .iter()
            .map(|e| e.try_clone().map_err(VirtioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let host_fd = lock(&self.device).host_event_fd();
        Ok(VirtioEventSource {
            device: self.device.clone(),
            queue_evts,
            host_fd,
        })
    }

    /// The status register as the driver sees it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | STATUS_DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// After a restore (and once the device event loop runs): re-raise the interrupt and make
    /// the device look at every queue again, so work the guest queued just before the snapshot
    /// and interrupts it was waiting for are not lost.
    pub fn notify_after_restore(&self) {
        if !lock(&self.device).is_activated() {
            return;
        }
        if let Err(e) = self.interrupt.irqfd().write(1) {
            tracing::warn!("virtio-mmio: re-raising the interrupt after restore: {e}");
        }
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn queue_config_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown/write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            _ => tracing::debug!("virtio-mmio: write to unknown/read-only register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are negotiated between DRIVER and FEATURES_OK only.
        if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
            tracing::warn!(
                "virtio-mmio: driver features written in status {:#x}",
                self.status
            );
            return;
        }
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => tracing::warn!("virtio-mmio: driver features page {sel} does not exist"),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            tracing::warn!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}",
                self.status
            );
            return;
        }
        let select = self.queue_select;
        let Some(queue) = self.selected_queue() else {
            tracing::warn!("virtio-mmio: queue register {offset:#x} for missing queue {select}");
            return;
        };
        // virtio-queue validates sizes (power of two, <= max) and ring alignment and ignores
        // bad values; activation then checks the rings lie in guest memory.
        match offset {
            REG_QUEUE_NUM => queue.set_size(value as u16),
            REG_QUEUE_READY => queue.set_ready(value == 1),
            REG_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn notify(&mut self, value: u32) {
        match self.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-mmio: signalling queue {value}: {e}");
                }
            }
            None => tracing::warn!("virtio-mmio: notify for missing queue {value}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (spec 2.1.2); anything else is ignored.
        if value & self.status != self.status {
            tracing::warn!(
                "virtio-mmio: status {value:#x} clears bits of {:#x} without a reset",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 && !self.accept_features() {
            // Leaving FEATURES_OK clear tells the driver the features were refused.
            self.status = value & !STATUS_FEATURES_OK & !STATUS_DRIVER_OK;
            return;
        }
        if added & STATUS_DRIVER_OK != 0 {
            if value & STATUS_FEATURES_OK == 0 {
                tracing::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK ignored");
                self.status = value & !STATUS_DRIVER_OK;
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn accept_features(&mut self) -> bool {
        if self.status & STATUS_DRIVER == 0 {
            return false;
        }
        if self.acked_features & !self.avail_features != 0 {
            tracing::warn!(
                "virtio-mmio: driver accepted features {:#x} beyond the offered {:#x}",
                self.acked_features,
                self.avail_features
            );
            return false;
        }
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            tracing::warn!("virtio-mmio: legacy driver (no VERSION_1) refused");
            return false;
        }
        lock(&self.device).set_acked_features(self.acked_features);
        true
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for queue in &mut self.queues {
            queue.set_event_idx(event_idx);
        }
        let invalid = self.queues.iter().position(|q| !q.is_valid(&self.mem));
        let result = match invalid {
            Some(index) => Err(VirtioError::InvalidQueue(index)),
            None => self
                .queues
                .iter()
                .map(clone_queue)
                .collect::<Result<Vec<_>, _>>()
                .and_then(|queues| {
                    lock(&self.device).activate(self.mem.clone(), queues, self.interrupt.clone())
                }),
        };
        if let Err(e) = result {
            tracing::warn!(
                "virtio-mmio: device type {} failed to activate: {e}",
                self.device_type
            );
            self.interrupt.mark_needs_reset();
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        // Drain notifications that arrived for the old queues.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.clear();
        self.acked_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.status = 0;
    }
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type Error = VirtioError;

    fn save(&self) -> Result<MmioTransportState, VirtioError> {
        let dev = lock(&self.device);
        let activated = dev.is_activated();
        let queues = if activated {
            dev.queues().iter().map(QueueSnapshot::of).collect()
        } else {
            self.queues.iter().map(QueueSnapshot::of).collect()
        };
        Ok(MmioTransportState {
            device_type: self.device_type,
            acked_features: self.acked_features,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated,
            queues,
        })
    }

    /// Restores registers and queues saved by [`Persist::save`] into a freshly
    /// created transport for the same kind of device, re-activating the device when it was
    /// active. Nothing changes when the state does not fit this device.
    fn restore(&mut self, state: &MmioTransportState) -> Result<(), VirtioError> {
        if state.device_type != self.device_type {
            return Err(VirtioError::Device(format!(
                "saved virtio state is for device type {}, this device is type {}",
                state.device_type, self.device_type
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(VirtioError::QueueCount {
                expected: self.queues.len(),
                actual: state.queues.len(),
            });
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(VirtioError::Device(format!(
                "saved virtio features {:#x} are not all offered by this device ({:#x})",
                state.acked_features, self.avail_features
            )));
        }
        let queues = state
            .queues
            .iter()
            .map(QueueSnapshot::to_queue)
            .collect::<Result<Vec<_>, _>>()?;
        {
            let mut dev = lock(&self.device);
            dev.reset();
            dev.set_acked_features(state.acked_features);
            if state.activated {
                let copies = queues
                    .iter()
                    .map(clone_queue)
                    .collect::<Result<Vec<_>, _>>()?;
                dev.activate(self.mem.clone(), copies, self.interrupt.clone())?;
            }
        }
        self.queues = queues;
        self.acked_features = state.acked_features;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.queue_select = state.queue_select;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!(
                "virtio-mmio: {}-byte read at {offset:#x} (registers are 32-bit)",
                data.len()
            );
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!(
                "virtio-mmio: {}-byte write at {offset:#x} (registers are 32-bit)",
                data.len()
            );
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, value);
    }
}

/// Locks a device, recovering from a poisoned mutex: a panic on another thread must not turn
/// into a panic on every later register access.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Copies the bytes of `config` at `offset` into `data`; bytes past the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
