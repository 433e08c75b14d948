//! 8250 UART on 0x3f8 (vm-superio), interrupting on GSI 4 through an irqfd. Output goes to
//! stdout, a file, a shared buffer (tests) or nowhere; input is pushed in by the host.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;
use crate::snapshot::Persist;

/// Raises an interrupt by writing to an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// A growable byte buffer shared between the serial device and a reader (tests, the CLI).
#[derive(Clone, Default, Debug)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    pub fn new() -> SharedBuffer {
        SharedBuffer::default()
    }

    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.contents()).into_owned()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the guest's serial output goes.
#[derive(Debug, Clone, Default)]
pub enum SerialOutput {
    /// Discarded.
    #[default]
    Sink,
    Stdout,
    /// Created or truncated when the VM is built.
    File(std::path::PathBuf),
    Buffer(SharedBuffer),
}

/// Unbuffered stdout writer: guest output should appear as it is produced.
struct StdoutWriter;

impl Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

impl SerialOutput {
    /// Opens the writer this output describes.
    pub fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            SerialOutput::Sink => Box::new(std::io::sink()),
            SerialOutput::Stdout => Box::new(StdoutWriter),
            SerialOutput::File(path) => Box::new(std::fs::File::create(path)?),
            SerialOutput::Buffer(b) => Box::new(b.clone()),
        })
    }
}

/// The serial port as a bus device.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialDevice {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Sends the guest's output to `out` from now on (a prepared VM gets its child's log).
    pub fn set_output(&mut self, out: Box<dyn Write + Send>) {
        *self.serial.writer_mut() = out;
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }
}

/// The serial port's registers and receive FIFO, as a snapshot saves them (vm-superio's
/// [`SerialState`], which has no serde of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState(#[serde(with = "SerialStateDef")] pub SerialState);

/// serde's view of [`SerialState`] (field for field).
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Why saved serial state could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    #[error("serial state: cannot duplicate the interrupt eventfd")]
    Irq(#[source] std::io::Error),
    #[error("serial state: the saved registers are not valid")]
    Invalid(#[source] vm_superio::serial::Error<std::io::Error>),
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type Error = SerialStateError;

    fn save(&self) -> Result<SerialDeviceState, SerialStateError> {
        Ok(SerialDeviceState(self.serial.state()))
    }

    /// Replaces the registers, keeping the interrupt line and the output (a failed restore
    /// leaves a silent placeholder: the machine being restored is discarded anyway).
    fn restore(&mut self, state: &SerialDeviceState) -> Result<(), SerialStateError> {
        let irq = self
            .serial
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(SerialStateError::Irq)?;
        let placeholder = Serial::new(
            IrqTrigger(irq.try_clone().map_err(SerialStateError::Irq)?),
            Box::new(std::io::sink()) as _,
        );
        let out = std::mem::replace(&mut self.serial, placeholder).into_writer();
        self.serial = Serial::from_state(&state.0, IrqTrigger(irq), NoEvents, out)
            .map_err(SerialStateError::Invalid)?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset < 8 {
            if let Some(first) = data.first_mut() {
                *first = self.serial.read(offset as u8);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 8 {
            return;
        }
        if let Some(&value) = data.first() {
            if let Err(e) = self.serial.write(offset as u8, value) {
                tracing::warn!("serial output: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_reach_the_output_and_raise_the_irq() {
        let buf = SharedBuffer::new();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(buf.clone()));
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(buf.text(), "hi");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn registers_survive_save_and_restore() {
        let buf = SharedBuffer::new();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(buf.clone()));
        dev.write(3, &[0x03]); // LCR: 8N1
        dev.write(7, &[0x5a]); // scratch
        dev.write(1, &[0x01]); // IER: receive interrupt
        let saved = dev.save().unwrap();
        let json = serde_json::to_value(&saved).unwrap();
        assert_eq!(json["scratch"], 0x5a, "registers by name: {json}");
        let saved: SerialDeviceState = serde_json::from_value(json).unwrap();
        let mut other = SerialDevice::new(irq, Box::new(buf.clone()));
        other.restore(&saved).unwrap();
        for (reg, want) in [(3u64, 0x03u8), (7, 0x5a), (1, 0x01)] {
            let mut b = [0u8];
            other.read(reg, &mut b);
            assert_eq!(b[0], want, "register {reg}");
        }
        other.write(0, b"!");
        assert_eq!(buf.text(), "!", "output kept after restore");
    }

    #[test]
    fn host_input_is_readable_by_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(std::io::sink()));
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'o');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'k');
        // Oversized input only takes what fits.
        let big = vec![b'x'; 1000];
        let n = dev.enqueue_input(&big);
        assert!(n > 0 && n < 1000);
        assert_eq!(dev.enqueue_input(b"more"), 0);
    }
}
