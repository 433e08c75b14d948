//! Hub: snapshot packs, registry.json, pull / push and the static hub server.
//!
//! Entry points: [`write_pack`] / [`publish::write_pack_file`] (pack), [`unpack`] (install a
//! pack stream), [`pull`] (hub reference, URL or path → verified install, resumable),
//! [`push::push`] (presigned PUT or hub server), [`publish::publish`] (static hub directory),
//! [`serve::Server`] (`forkd hub serve`), [`sign`] (minisign keys, signatures, trust policy).
//!
//! Trust policy file (`FORKD_TRUST_FILE`, else `$XDG_CONFIG_HOME/forkd/trust.toml`):
//! `require_signatures = true`, `trusted_keys = ["RWQ…"]`, `trusted_key_files = ["k.pub"]`.
//! The hub: `--hub`, else `FORKD_HUB_URL`, else `hub = "URL"` in
//! `$XDG_CONFIG_HOME/forkd/config.toml` ([`config`]); there is no compiled-in default.
//! Env: `FORKD_HUB_URL`, `FORKD_HUB_RETRIES`, `FORKD_HUB_BACKOFF_MS`,
//! `FORKD_SIGN_PASSWORD` (encrypted minisign secret keys).
//!
//! - [`pack`]: pack format v1 (`*.forkd-snapshot.tar.zst`), sparse-aware writer.
//! - [`unpack`]: hostile-input-proof unpacker into the store.
//! - [`registry`]: registry.json schema v1.
//! - [`pull`]: resolve + streaming, resumable, verified download and install.
//! - [`sign`]: minisign-compatible signatures and the trust policy.

pub mod cache;
pub mod config;
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
pub use fetch::{FetchConfig, Notifier};
/// The progress bar type pulls advance (see [`PullOptions::progress_bar`]).
pub use indicatif::ProgressBar;
pub use names::PackageRef;
pub use pack::{write_pack, PackInfo, PackOptions, DEFAULT_LEVEL, PACK_SUFFIX};
pub use pull::{pull, PullOptions, PullReport};
pub use registry::{Registry, VersionEntry};
pub use sign::TrustPolicy;
pub use unpack::{unpack, UnpackOptions, UnpackOutcome};
