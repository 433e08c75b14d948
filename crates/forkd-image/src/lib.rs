//! Guest kernels and root filesystem images for forkd's Linux guests.
//!
//! - [`kernel`]: `forkd kernel fetch` — Debian's `linux-image-cloud-amd64` through apt, its
//!   `vmlinuz`, and an initramfs (busybox-static + the virtio/vsock modules + a small `/init`).
//! - [`bzimage`]: the setup-header check a loader applies to a bzImage.
//! - [`recipe`] and [`rootfs`]: `forkd image build` — declarative TOML recipes turned into ext4
//!   images with `mkfs.ext4 -d`, never mounting anything.
//!
//! Everything lands in the cache ([`cache::cache_root`]) through a staging directory and a
//! rename, so an interrupted build leaves nothing half-written behind.

pub mod agent;
pub mod bzimage;
pub mod cache;
pub mod debian;
mod error;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod recipe;
pub mod rootfs;

pub use error::{Error, Result};
