//! `forkd kernel fetch` / `forkd kernel status`: Debian's cloud kernel, unpacked and paired with
//! an initramfs that can reach a virtio-mmio root disk and the vsock agent.
//!
//! Cache entry `<cache>/kernels/<release>_<debian-version>/`:
//! `vmlinuz` (bzImage), `initramfs.img`, `config` (the kernel's build config), `kernel.json`
//! ([`KernelInfo`]). `kernel.json` is written last, so its presence marks a complete entry.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bzimage::{check_bzimage, BzImageInfo};
use crate::cache::{replace, staging_dir};
use crate::debian::{self, AptPackage};
use crate::error::{Error, IoContext, Result};
use crate::initramfs::{self, Compression, Entry};
use crate::modules::ModuleTree;

/// The metapackage whose current kernel we fetch.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Where busybox comes from (statically linked, so it runs with nothing else in the initramfs).
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Modules the initramfs loads (plus their dependencies), so the guest sees its virtio-mmio
/// devices: the transport, the root disk, vsock for the agent, the entropy device and the
/// network interface (configured by /init from `ip=` before the root's init starts).
pub const INITRAMFS_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_blk",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "virtio_rng",
    "virtio_net",
];

/// Kernel command line for booting a fetched kernel with its initramfs: Firecracker's defaults
/// (reset through the i8042, reboot on panic, no PS/2 aux/mux probing, no bounce buffers) but
/// keeping the modules and a serial console, plus what our /init reads (root disk, rw).
pub const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux \
     i8042.dumbkbd swiotlb=noforce quiet root=/dev/vda rootfstype=ext4 rw";

const INFO_FILE: &str = "kernel.json";
/// The names of an entry's kernel and initramfs.
const VMLINUZ_FILE: &str = "vmlinuz";
const INITRAMFS_FILE: &str = "initramfs.img";
/// Bump when the entry's contents change (e.g. the initramfs /init), so older entries of the
/// same kernel version are rebuilt.
const FORMAT_VERSION: u32 = 3;

/// What a cached kernel entry holds (`kernel.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub format_version: u32,
    /// The versioned kernel package, e.g. linux-image-6.1.0-28-cloud-amd64 6.1.119-1.
    pub package: AptPackage,
    pub busybox: AptPackage,
    /// `uname -r` of the kernel, e.g. 6.1.0-28-cloud-amd64.
    pub release: String,
    pub bzimage: BzImageInfo,
    pub initramfs_compression: Compression,
    /// Modules in /init's load order, relative to lib/modules/<release>.
    pub modules: Vec<String>,
    pub vmlinuz_sha256: String,
    pub initramfs_sha256: String,
}

/// A complete kernel entry in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstalledKernel {
    pub dir: PathBuf,
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
    pub info: KernelInfo,
}

impl InstalledKernel {
    fn load(dir: &Path) -> Result<Self> {
        let info_path = dir.join(INFO_FILE);
        let text = std::fs::read_to_string(&info_path).at(&info_path)?;
        let info: KernelInfo = serde_json::from_str(&text)
            .map_err(|e| Error::Other(format!("{}: {e}", info_path.display())))?;
        let kernel = InstalledKernel {
            dir: dir.to_path_buf(),
            vmlinuz: dir.join(VMLINUZ_FILE),
            initramfs: dir.join(INITRAMFS_FILE),
            info,
        };
        for file in [&kernel.vmlinuz, &kernel.initramfs] {
            if !file.is_file() {
                return Err(Error::Other(format!("{}: missing", file.display())));
            }
        }
        Ok(kernel)
    }
}

/// The initramfs that belongs with `kernel` when `kernel` is the `vmlinuz` of a complete cache
/// entry (the stock kernel needs it to load its virtio modules); None for any other kernel.
pub fn cached_initramfs(kernel: &Path) -> Option<PathBuf> {
    if kernel.file_name()? != VMLINUZ_FILE {
        return None;
    }
    let dir = kernel.parent()?;
    let initramfs = dir.join(INITRAMFS_FILE);
    (dir.join(INFO_FILE).is_file() && initramfs.is_file()).then_some(initramfs)
}

/// The result of [`fetch`].
#[derive(Debug, Clone, Serialize)]
pub struct FetchOutcome {
    pub kernel: InstalledKernel,
    /// True when the entry was already cached and nothing was downloaded.
    pub already_present: bool,
}

/// `forkd kernel status`: the cached kernels, newest entry name last.
#[derive(Debug, Clone, Serialize)]
pub struct KernelStatus {
    pub cache_dir: PathBuf,
    pub kernels: Vec<InstalledKernel>,
}

impl KernelStatus {
    /// The kernel `forkd` uses by default: the highest-sorting entry.
    pub fn current(&self) -> Option<&InstalledKernel> {
        self.kernels.last()
    }
}

pub fn kernels_dir(cache_root: &Path) -> PathBuf {
    cache_root.join("kernels")
}

fn entry_name(package: &AptPackage) -> Result<String> {
    let release = release_of(package)?;
    Ok(format!(
        "{release}_{}",
        package.version.replace([':', '/'], "_")
    ))
}

/// linux-image-6.1.0-28-cloud-amd64 → 6.1.0-28-cloud-amd64.
fn release_of(package: &AptPackage) -> Result<String> {
    package
        .name
        .strip_prefix("linux-image-")
        .filter(|r| !r.is_empty() && !r.contains('/'))
        .map(str::to_string)
        .ok_or_else(|| Error::KernelPackage {
            package: package.name.clone(),
            why: "name does not look like linux-image-<release>".into(),
        })
}

/// Resolves the current cloud kernel through apt; if that version is cached returns it,
/// otherwise downloads, unpacks and builds the entry.
pub fn fetch(cache_root: &Path) -> Result<FetchOutcome> {
    // Check every tool first so a missing one fails before anything is downloaded.
    debian::require_tool(
        "apt-get",
        "apt",
        "fetching a kernel downloads it with apt-get",
    )?;
    debian::require_tool("apt-cache", "apt", "fetching a kernel resolves its version")?;
    debian::require_tool(
        "dpkg-deb",
        "dpkg",
        "fetching a kernel unpacks .deb packages",
    )?;
    let package = debian::resolve_metapackage(KERNEL_METAPACKAGE, "linux-image-")?;
    let dest = kernels_dir(cache_root).join(entry_name(&package)?);
    match InstalledKernel::load(&dest) {
        Ok(kernel) if kernel.info.format_version == FORMAT_VERSION => {
            return Ok(FetchOutcome {
                kernel,
                already_present: true,
            })
        }
        Ok(old) => tracing::info!(
            old = old.info.format_version,
            new = FORMAT_VERSION,
            "rebuilding a cache entry made by an older forkd"
        ),
        Err(_) => {}
    }
    let busybox = debian::resolve(BUSYBOX_PACKAGE)?;
    let stage = staging_dir(&kernels_dir(cache_root))?;
    let debs_dir = stage.path().join("debs");
    std::fs::create_dir_all(&debs_dir).at(&debs_dir)?;
    tracing::info!(package = %package.pinned(), busybox = %busybox.pinned(), "downloading");
    let debs = debian::download(&[package.clone(), busybox.clone()], &debs_dir)?;
    let out = stage.path().join("entry");
    build_entry(&debs[0], &package, &debs[1], &busybox, stage.path(), &out)?;
    // The entry dir is inside the staging dir, so it is staging itself after a swap.
    replace(&out, &dest)?;
    Ok(FetchOutcome {
        kernel: InstalledKernel::load(&dest)?,
        already_present: false,
    })
}

/// Unpacks the kernel and busybox .debs under `work` and writes a complete entry into `out`.
pub fn build_entry(
    kernel_deb: &Path,
    package: &AptPackage,
    busybox_deb: &Path,
    busybox: &AptPackage,
    work: &Path,
    out: &Path,
) -> Result<()> {
    let release = release_of(package)?;
    let kernel_root = work.join("kernel-pkg");
    debian::extract(kernel_deb, &kernel_root)?;
    let busybox_root = work.join("busybox-pkg");
    debian::extract(busybox_deb, &busybox_root)?;
    std::fs::create_dir_all(out).at(out)?;

    let pkg_err = |why: String| Error::KernelPackage {
        package: package.name.clone(),
        why,
    };
    let vmlinuz_src = kernel_root.join(format!("boot/vmlinuz-{release}"));
    let image = std::fs::read(&vmlinuz_src)
        .map_err(|e| pkg_err(format!("no boot/vmlinuz-{release}: {e}")))?;
    let bzimage = check_bzimage(&image).map_err(|source| Error::BzImage {
        path: vmlinuz_src.clone(),
        source,
    })?;
    let config_src = kernel_root.join(format!("boot/config-{release}"));
    let config = std::fs::read_to_string(&config_src)
        .map_err(|e| pkg_err(format!("no boot/config-{release}: {e}")))?;
    let compression = Compression::for_kernel_config(&config)
        .ok_or_else(|| pkg_err("kernel supports neither gzip nor zstd initramfs".into()))?;

    let modules_root = ["lib", "usr/lib"]
        .iter()
        .map(|d| kernel_root.join(d).join("modules").join(&release))
        .find(|p| p.is_dir())
        .ok_or_else(|| pkg_err(format!("no lib/modules/{release}")))?;
    let tree = ModuleTree::open(&modules_root)?;
    let order = tree.load_order(INITRAMFS_MODULES)?;
    let busybox_bin = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| busybox_root.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::KernelPackage {
            package: busybox.name.clone(),
            why: "no bin/busybox in the package".into(),
        })?;

    let module_paths: Vec<String> = order
        .iter()
        .map(|m| m.rel_path.to_string_lossy().into_owned())
        .collect();
    let mut entries = vec![
        Entry::Dir { path: "bin".into() },
        Entry::Dir { path: "dev".into() },
        Entry::CharDev {
            path: "dev/console".into(),
            major: 5,
            minor: 1,
            mode: 0o600,
        },
        Entry::CharDev {
            path: "dev/null".into(),
            major: 1,
            minor: 3,
            mode: 0o666,
        },
        Entry::Dir {
            path: "proc".into(),
        },
        Entry::Dir { path: "sys".into() },
        Entry::Dir {
            path: "newroot".into(),
        },
        Entry::File {
            path: "bin/busybox".into(),
            source: busybox_bin,
            mode: 0o755,
        },
        Entry::Symlink {
            path: "bin/sh".into(),
            target: "busybox".into(),
        },
        Entry::Data {
            path: "init".into(),
            data: initramfs::init_script(&release, &module_paths).into_bytes(),
            mode: 0o755,
        },
    ];
    for (module, rel) in order.iter().zip(&module_paths) {
        let path = format!("lib/modules/{release}/{rel}");
        initramfs::with_parents(&mut entries, &path);
        entries.push(Entry::File {
            path,
            source: modules_root.join(&module.rel_path),
            mode: 0o644,
        });
    }
    let initramfs_path = out.join(INITRAMFS_FILE);
    initramfs::write_archive(&entries, compression, &initramfs_path)?;
    let vmlinuz = out.join(VMLINUZ_FILE);
    std::fs::write(&vmlinuz, &image).at(&vmlinuz)?;
    let config_dst = out.join("config");
    std::fs::write(&config_dst, &config).at(&config_dst)?;

    let info = KernelInfo {
        format_version: FORMAT_VERSION,
        package: package.clone(),
        busybox: busybox.clone(),
        release,
        bzimage,
        initramfs_compression: compression,
        modules: module_paths,
        vmlinuz_sha256: sha256_file(&vmlinuz)?,
        initramfs_sha256: sha256_file(&initramfs_path)?,
    };
    let info_path = out.join(INFO_FILE);
    let json = serde_json::to_string_pretty(&info).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(&info_path, json).at(&info_path)?;
    Ok(())
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path).at(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).at(path)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The complete kernel entries in the cache (incomplete or foreign directories are skipped).
pub fn status(cache_root: &Path) -> Result<KernelStatus> {
    let dir = kernels_dir(cache_root);
    let mut kernels = Vec::new();
    if dir.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .at(&dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            match InstalledKernel::load(&dir.join(&name)) {
                Ok(k) => kernels.push(k),
                Err(e) => tracing::debug!(entry = ?name, error = %e, "skipping cache entry"),
            }
        }
    }
    Ok(KernelStatus {
        cache_dir: dir,
        kernels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_the_root_disk_our_init_expects() {
        let args: Vec<&str> = LINUX_CMDLINE.split_whitespace().collect();
        for arg in [
            "root=/dev/vda",
            "rootfstype=ext4",
            "rw",
            "console=ttyS0",
            "reboot=k",
        ] {
            assert!(args.contains(&arg), "{arg} missing from {LINUX_CMDLINE}");
        }
        assert!(!args.contains(&"nomodule"), "the initramfs loads modules");
    }

    #[test]
    fn only_a_complete_cache_entry_gives_its_initramfs() {
        let dir = tempfile::tempdir().unwrap();
        let vmlinuz = dir.path().join(VMLINUZ_FILE);
        std::fs::write(&vmlinuz, b"k").unwrap();
        std::fs::write(dir.path().join(INITRAMFS_FILE), b"i").unwrap();
        // No kernel.json yet: an entry still being written, or a vmlinuz of another origin.
        assert_eq!(cached_initramfs(&vmlinuz), None);
        std::fs::write(dir.path().join(INFO_FILE), b"{}").unwrap();
        assert_eq!(
            cached_initramfs(&vmlinuz),
            Some(dir.path().join(INITRAMFS_FILE))
        );
        let elsewhere = dir.path().join("bzImage");
        std::fs::write(&elsewhere, b"k").unwrap();
        assert_eq!(cached_initramfs(&elsewhere), None);
    }

    #[test]
    fn entry_names_come_from_the_versioned_package() {
        let p = AptPackage {
            name: "linux-image-6.1.0-28-cloud-amd64".into(),
            version: "6.1.119-1".into(),
        };
        assert_eq!(entry_name(&p).unwrap(), "6.1.0-28-cloud-amd64_6.1.119-1");
        let bad = AptPackage {
            name: "linux-headers-6.1".into(),
            version: "1".into(),
        };
        assert!(entry_name(&bad)
            .unwrap_err()
            .to_string()
            .contains("linux-headers-6.1"));
    }

    #[test]
    fn status_of_an_empty_cache_lists_nothing_and_skips_partial_entries() {
        let root = tempfile::tempdir().unwrap();
        assert!(status(root.path()).unwrap().kernels.is_empty());
        let partial = kernels_dir(root.path()).join("6.1.0-1-cloud-amd64_1");
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("vmlinuz"), b"x").unwrap();
        let s = status(root.path()).unwrap();
        assert!(s.kernels.is_empty());
        assert!(s.current().is_none());
    }
}
