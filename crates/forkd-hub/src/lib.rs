//! Hub: snapshot packs, registry.json, pull / push and the static hub server.
//!
//! - [`pack`]: pack format v1 (`*.forkd-snapshot.tar.zst`), sparse-aware writer.
//! - [`unpack`]: hostile-input-proof unpacker into the store.

pub mod error;
pub mod names;
pub mod pack;
pub mod unpack;

pub use error::{HubError, Result};
pub use names::PackageRef;
pub use pack::{write_pack, PackInfo, PackOptions, DEFAULT_LEVEL, PACK_SUFFIX};
pub use unpack::{unpack, UnpackOptions, UnpackOutcome};
