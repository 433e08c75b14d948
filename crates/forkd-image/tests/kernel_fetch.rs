//! `forkd kernel fetch` against Debian's real archive, through apt. The download (~27 MB) runs
//! once per kernel version: the entry is cached under the forkd cache (FORKD_CACHE or
//! ~/.cache/forkd), and later runs check the cached entry.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use forkd_image::bzimage::check_bzimage;
use forkd_image::cache::cache_root;
use forkd_image::kernel::{self, INITRAMFS_MODULES};
use forkd_image::modules::{canonical_name, ModuleTree};

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {why}");
}

fn apt_has_kernel() -> bool {
    Command::new("apt-cache")
        .args(["show", "--no-all-versions", kernel::KERNEL_METAPACKAGE])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

/// Unpacks the initramfs with the host's own tools (zstd/gzip + cpio), independent of our code.
fn unpack_with_host_tools(initramfs: &Path, compression: &str, dest: &Path) {
    let decompressor = if compression == "zstd" {
        "zstd"
    } else {
        "gzip"
    };
    let script = format!(
        "{decompressor} -dc '{}' | cpio -idm --quiet --no-absolute-filenames",
        initramfs.display()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "unpacking the initramfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kernel_fetch_yields_a_bootable_bzimage_and_an_initramfs_with_modules_and_init() {
    if !apt_has_kernel() {
        skip("apt does not know linux-image-cloud-amd64 (no apt, or no Debian bookworm sources)");
        return;
    }
    for tool in ["zstd", "gzip", "cpio"] {
        if Command::new(tool).arg("--version").output().is_err() {
            skip(&format!(
                "{tool} not installed: cannot unpack the initramfs independently"
            ));
            return;
        }
    }
    let cache = cache_root();
    let first = kernel::fetch(&cache).unwrap();
    let k = &first.kernel;

    // The loader's check accepts the kernel.
    let image = std::fs::read(&k.vmlinuz).unwrap();
    let header = check_bzimage(&image).unwrap();
    assert!(header.protocol >= 0x020c);
    assert!(header
        .kernel_version
        .as_deref()
        .unwrap()
        .starts_with(&k.info.release));
    assert_eq!(header, k.info.bzimage);

    // The VMM's own kernel loader (linux-loader underneath) accepts and places it.
    load_with_the_vmm_loader(&image);

    // Fetching again is a no-op on the same entry.
    let mtime = std::fs::metadata(&k.initramfs).unwrap().modified().unwrap();
    let second = kernel::fetch(&cache).unwrap();
    assert!(second.already_present);
    assert_eq!(second.kernel, first.kernel);
    assert_eq!(
        std::fs::metadata(&k.initramfs).unwrap().modified().unwrap(),
        mtime
    );

    // The status the doctor reads lists it.
    let status = kernel::status(&cache).unwrap();
    assert!(status.kernels.iter().any(|s| s.dir == k.dir));

    let dir = tempfile::tempdir().unwrap();
    let compression = serde_json::to_value(k.info.initramfs_compression).unwrap();
    unpack_with_host_tools(&k.initramfs, compression.as_str().unwrap(), dir.path());
    let root = dir.path();
    assert!(root.join("init").is_file());
    assert!(root.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let init = std::fs::read_to_string(root.join("init")).unwrap();
    assert!(init.contains("switch_root /newroot"));
    let syntax = Command::new("sh")
        .arg("-n")
        .arg(root.join("init"))
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );

    // Every wanted module is there, and each loads after everything it depends on.
    let modules_dir = root.join("lib/modules").join(&k.info.release);
    let tree = ModuleTree::open(&modules_dir).unwrap();
    let order = tree.load_order(INITRAMFS_MODULES).unwrap();
    let names: Vec<String> = order.iter().map(|m| m.name.clone()).collect();
    for wanted in INITRAMFS_MODULES {
        assert!(
            names.contains(&canonical_name(wanted)),
            "{wanted} missing from {names:?}"
        );
    }
    for (i, module) in order.iter().enumerate() {
        for dep in tree.depends(module).unwrap() {
            let at = names.iter().position(|n| *n == dep).unwrap();
            assert!(
                at < i,
                "{} is loaded before its dependency {dep}",
                module.name
            );
        }
    }
    // A module the kernel does not have is refused by name.
    let err = tree
        .load_order(&["no_such_module"])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("kernel module no_such_module: not in"),
        "{err}"
    );
    // The kernel opens /dev/console before /init runs, so the archive must carry the node.
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(root.join("dev/console"))
        .unwrap()
        .file_type()
        .is_char_device());

    // /init loads exactly that list, in that order.
    let rel: Vec<String> = order
        .iter()
        .map(|m| m.rel_path.to_string_lossy().into_owned())
        .collect();
    assert_eq!(rel, k.info.modules);
    assert!(init.contains(&format!("for m in {}; do", rel.join(" "))));
}

fn load_with_the_vmm_loader(image: &[u8]) {
    use forkd_vmm::arch::x86_64::boot::{load_kernel, KernelFormat};
    use forkd_vmm::memory::{GuestAddress, GuestMemory};
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
    let loaded = load_kernel(&mem, image).unwrap();
    assert_eq!(loaded.format, KernelFormat::BzImage);
    // The 64-bit entry point: protected-mode code at 1 MiB, entered at +0x200.
    assert_eq!(loaded.entry, 0x10_0000 + 0x200);
    let hdr = loaded.setup_header.unwrap();
    assert!(hdr.version >= 0x020c && hdr.xloadflags & 1 == 1);
}
