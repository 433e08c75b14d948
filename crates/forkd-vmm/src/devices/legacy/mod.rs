//! Legacy PC devices: 8250 serial, i8042 (reset only) and the test-guest debug-exit port.

mod debug_exit;
mod i8042;
mod serial;

pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use serial::{IrqTrigger, SerialDevice, SerialOutput, SharedBuffer};
