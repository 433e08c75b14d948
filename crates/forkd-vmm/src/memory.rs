//! Guest memory as seen by the VMM and its devices.
//!
//! Every region carries an atomic dirty bitmap so the pages the VMM itself writes (used rings,
//! block reads into guest buffers) can be merged with KVM's dirty log for diff snapshots.

use vm_memory::bitmap::AtomicBitmap;

pub use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryRegion};

/// Guest RAM: regions mapped into the VMM process, each with a dirty bitmap.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;
pub type GuestRegion = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// The page size dirty tracking works in.
pub const PAGE_SIZE: usize = 4096;
