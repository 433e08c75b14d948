//! forkd's local snapshot store.
//!
//! Layout (see DESIGN.md): `<root>/snapshots/<tag>/{manifest.toml, memory.bin, vmstate.json,
//! rootfs.ext4}` and `<root>/cache/`. Snapshots are immutable once published; holes in large
//! files are never inflated.

mod error;
pub mod hash;
pub mod manifest;
pub mod owner;
pub mod sparse;
mod store;
pub mod tag;

pub use error::{error_chain, Result, StoreError};
pub use manifest::{
    FileEntry, Manifest, NetRecord, FORMAT_VERSION, MANIFEST_FILE, MEMORY_FILE, ROOTFS_FILE,
    VMSTATE_FILE,
};
pub use store::{
    file_entry, rename_exchange, rename_noreplace, verify_dir, FileProblem, RemoveMode, Snapshot,
    SnapshotMeta, Staging, Store, UnfinishedWrite,
};
pub use tag::{Tag, TagError};
