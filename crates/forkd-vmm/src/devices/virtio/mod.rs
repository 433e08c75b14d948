//! Virtio devices over the virtio-mmio transport (virtio 1.x, split virtqueues).
//!
//! Layout:
//! - [`mmio`]: the register window the guest driver programs ([`MmioTransport`]).
//! - [`VirtioDevice`]: what a device model (block, vsock, rng, net) implements; the transport hands it
//!   guest memory, its queues and an [`Interrupt`] when the driver sets DRIVER_OK.
//! - [`event_loop`]: the one device thread; it processes a queue when its notify EventFd fires
//!   (written by KVM through an ioeventfd, or by the transport on a plain notify write) and
//!   services host-side file descriptors (vsock sockets, the net device's tap).
//!
//! Threading: vCPU threads touch only the transport (and through it the device's config space
//! and activation); queue processing happens on the event-loop thread under the device's mutex.
//! The device never locks the transport, so the lock order is always transport → device.

pub mod attach;
pub mod block;
pub mod event_loop;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
pub mod vsock;

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestMemory;

pub use attach::{
    attach, BlockConfig, NetConfig, VirtioConfig, VirtioDevices, VirtioDevicesState, VsockConfig,
};
pub use event_loop::{DeviceEventLoop, VirtioEventSource};
pub use mmio::{MmioTransport, MmioTransportState};
pub use queue::QueueSnapshot;

/// Feature bit every device offers: this is a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Ring feature: the driver and the device suppress each other's notifications with the
/// `used_event` / `avail_event` indices instead of the flags fields (spec 2.7.7, 2.7.10). When
/// the driver accepts it, the transport enables it on every queue at activation.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device type ids (virtio spec 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bits (the 0x60 register).
pub const INTERRUPT_USED_RING: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// Errors a device reports when it cannot start or continue.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("virtio device expects {expected} queues, the driver set up {actual}")]
    QueueCount { expected: usize, actual: usize },
    #[error("virtio queue {0} is not ready or its rings lie outside guest memory")]
    InvalidQueue(usize),
    #[error("virtio queue {index}: {reason}")]
    QueueAccess { index: usize, reason: String },
    #[error("virtio device is not activated")]
    NotActivated,
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("{0}")]
    Device(String),
}

/// What an activated device works with: guest memory, its queues, its interrupt.
pub(crate) struct Active {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
}

impl Active {
    /// Checks the driver set up exactly `expected` queues.
    pub(crate) fn new(
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        expected: usize,
    ) -> Result<Active, VirtioError> {
        if queues.len() != expected {
            return Err(VirtioError::QueueCount {
                expected,
                actual: queues.len(),
            });
        }
        Ok(Active {
            mem,
            queues,
            interrupt,
        })
    }
}

/// A device's interrupt line: the interrupt-status register plus the irqfd KVM injects from.
///
/// Shared between the transport (guest reads/acks the status) and the device (sets bits when it
/// puts buffers in a used ring). Also carries the "device needs reset" flag a device raises when
/// the driver broke the protocol (e.g. an impossible avail index), which the transport reflects
/// in the status register as DEVICE_NEEDS_RESET.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new() -> Result<Self, VirtioError> {
        Ok(Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irqfd: EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd)?,
        })
    }

    /// The eventfd the VMM registers as an irqfd for this device's GSI.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits` (write to 0x64).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn signal_used_queue(&self) {
        self.raise(INTERRUPT_USED_RING);
    }

    pub fn signal_config_change(&self) {
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    /// The device cannot go on until the driver resets it.
    pub fn mark_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio: writing the irqfd failed: {e}");
        }
    }

    /// Restores the status register (snapshot restore) without injecting.
    pub(crate) fn set_status(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// A virtio device model. The transport owns the registers; the model owns the queues once
/// activated and does the device-specific work.
pub trait VirtioDevice: Send {
    /// Virtio device id (e.g. [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Features offered to the driver (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;

    /// The driver accepted `features` (a subset of `avail_features`), at FEATURES_OK.
    fn set_acked_features(&mut self, _features: u64) {}

    /// Reads device configuration space (offset from 0x100 of the window). Out-of-range bytes
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Starts the device: from now on it owns `queues` and raises `interrupt`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), VirtioError>;

    /// Back to the state before activation (driver wrote status 0); drops queues and host
    /// connections.
    fn reset(&mut self);

    fn is_activated(&self) -> bool;

    /// Processes the available buffers of queue `index` (its notify EventFd fired). A driver
    /// protocol violation that the device cannot recover from is reported through
    /// [`Interrupt::mark_needs_reset`], never by panicking.
    fn process_queue(&mut self, index: usize);

    /// The activated device's queues (for snapshots); empty before activation.
    fn queues(&self) -> &[Queue];

    /// A pollable fd the event loop watches for host-side work (vsock's socket epoll); it must
    /// stay the same for the device's lifetime.
    fn host_event_fd(&self) -> Option<RawFd> {
        None
    }

    /// The host fd returned by [`VirtioDevice::host_event_fd`] is readable.
    fn process_host_events(&mut self) {}
}
