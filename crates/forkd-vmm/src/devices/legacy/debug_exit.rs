//! The test-guest power-off port (0xf4): a write of value `v` (8, 16 or 32 bits, little
//! endian) stops the VM with [`StopReason::GuestExit`]`(v)`. Linux never touches this port.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::vstate::control::{StopReason, VmControl};

pub struct DebugExit(Arc<VmControl>);

impl DebugExit {
    pub fn new(control: Arc<VmControl>) -> DebugExit {
        DebugExit(control)
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 4 {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        self.0
            .request_stop(StopReason::GuestExit(u32::from_le_bytes(bytes)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_stops_with_the_code() {
        let control = Arc::new(VmControl::new(1).unwrap());
        let mut dev = DebugExit::new(control.clone());
        dev.write(1, &[3]);
        assert_eq!(control.stop_reason(), None, "only offset 0 counts");
        dev.write(0, &[0x2a, 0x01]);
        assert_eq!(control.stop_reason(), Some(StopReason::GuestExit(0x12a)));
    }
}
