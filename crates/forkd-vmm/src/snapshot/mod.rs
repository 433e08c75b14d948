//! Snapshot files: guest memory as a sparse `memory.bin` with copy-on-write child mappings,
//! and the versioned, checksummed `vmstate.json` envelope with host facts.

pub mod memory_file;
pub mod vmstate_file;

pub use memory_file::{Extent, MemoryFileError, RegionSpec};
pub use vmstate_file::{HostFacts, VmStateError, VMSTATE_FORMAT_VERSION};
