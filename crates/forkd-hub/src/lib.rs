//! Hub: snapshot packs, registry.json, pull / push and the static hub server.
//!
//! - [`pack`]: pack format v1 (`*.forkd-snapshot.tar.zst`), sparse-aware writer.
//! - [`unpack`]: hostile-input-proof unpacker into the store.
//! - [`registry`]: registry.json schema v1.
//! - [`pull`]: resolve + streaming, resumable, verified download and install.
//! - [`sign`]: minisign-compatible signatures and the trust policy.

pub mod error;
pub mod fetch;
pub mod names;
pub mod pack;
pub mod publish;
pub mod pull;
pub mod push;
pub mod registry;
pub mod serve;
pub mod sign;
pub mod unpack;

pub use error::{HubError, Result};
pub use fetch::FetchConfig;
pub use names::PackageRef;
pub use pack::{write_pack, PackInfo, PackOptions, DEFAULT_LEVEL, PACK_SUFFIX};
pub use pull::{pull, PullOptions, PullReport};
pub use registry::{Registry, VersionEntry};
pub use sign::TrustPolicy;
pub use unpack::{unpack, UnpackOptions, UnpackOutcome};
