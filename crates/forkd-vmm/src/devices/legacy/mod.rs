//! Legacy PC devices: 8250 serial, i8042 (reset only), the ACPI power-management registers
//! (power-off and reset) and the test-guest debug-exit port.

pub mod acpi_pm;
mod debug_exit;
mod i8042;
mod serial;

pub use acpi_pm::AcpiPm;
pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use serial::{
    IrqTrigger, SerialDevice, SerialDeviceState, SerialOutput, SerialStateError, SharedBuffer,
};
