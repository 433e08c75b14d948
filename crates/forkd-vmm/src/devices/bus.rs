//! Address-range buses (one for port I/O, one for MMIO) mapping guest accesses to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use super::BusDevice;

/// A device shared between the bus and whoever else needs it (e.g. the serial input thread).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors inserting into a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Devices keyed by the base of their address range. Devices may be added while vCPUs run.
#[derive(Default)]
pub struct Bus {
    entries: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = self
            .entries
            .read()
            .map(|e| e.iter().map(|(b, e)| (*b, e.len)).collect())
            .unwrap_or_default();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Attaches `device` to `[base, base + len)`.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        // The neighbour below must end before `base`; the one above must start at or after `end`.
        let below = entries.range(..end).next_back();
        if let Some((other_base, other)) = below {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base: *other_base,
                    other_len: other.len,
                });
            }
        }
        entries.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = entries.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then(|| (entry.device.clone(), offset))
    }

    /// Dispatches a read; false when no device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; false when no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_offsets() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![0x41])]);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.write(0x3f7, &[0]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        bus.insert(0x1000, 0x1000, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        for (base, len) in [(0x1800, 0x100), (0x800, 0x900), (0x1000, 1), (0x0, 0x2000)] {
            assert!(
                matches!(
                    bus.insert(base, len, Arc::new(Mutex::new(Recorder::default()))),
                    Err(BusError::Overlap { .. })
                ),
                "{base:#x}+{len:#x}"
            );
        }
        assert!(matches!(
            bus.insert(0x5000, 0, Arc::new(Mutex::new(Recorder::default()))),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Recorder::default()))),
            Err(BusError::BadRange { .. })
        ));
        // Adjacent ranges are fine.
        bus.insert(0x2000, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        bus.insert(0xff0, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
    }
}
