//! Device models. Every device the guest reaches through a port-I/O or MMIO exit implements
//! [`BusDevice`]; the vCPU loop looks the address up on a [`bus::Bus`] and calls it with the
//! offset inside the device's window.

pub mod bus;
pub mod legacy;
pub mod virtio;

/// A device reached through port I/O or MMIO exits.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` within the device's window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` within the device's window.
    fn write(&mut self, offset: u64, data: &[u8]);
}
