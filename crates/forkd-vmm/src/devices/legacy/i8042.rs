//! i8042 keyboard controller, reduced to what guests use it for: the CPU reset command
//! (0xFE to port 0x64), which stops the VM with [`StopReason::Reset`].

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::devices::BusDevice;
use crate::vstate::control::{StopReason, VmControl};

/// Stops the VM when the guest resets through the i8042.
pub struct ResetTrigger(Arc<VmControl>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_stop(StopReason::Reset);
        Ok(())
    }
}

/// The i8042 on ports 0x60-0x64.
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(control: Arc<VmControl>) -> I8042 {
        I8042(I8042Device::new(ResetTrigger(control)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.0.read(offset as u8);
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            let _ = self.0.write(offset as u8, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm() {
        let control = Arc::new(VmControl::new(1).unwrap());
        let mut dev = I8042::new(control.clone());
        dev.write(0, &[0xfe]); // data port: ignored
        assert_eq!(control.stop_reason(), None);
        dev.write(4, &[0x20]); // other command: ignored
        assert_eq!(control.stop_reason(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(control.stop_reason(), Some(StopReason::Reset));
    }
}
