//! `forkd image build`: a recipe becomes an ext4 image, built as a directory tree and turned
//! into a filesystem with `mkfs.ext4 -d` (no loop device, no mount).
//!
//! Cache entry `<cache>/images/<recipe-hash>/`: `rootfs.ext4` and `image.json` ([`ImageInfo`]).
//! The hash covers the recipe, the contents of every file it copies, the agent binary and the
//! busybox version, so any change to an input builds a new image.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::cache::{publish, staging_dir, Published};
use crate::debian::{self, run, AptPackage};
use crate::error::{Error, IoContext, Result};
use crate::kernel::sha256_file;
use crate::recipe::{Base, LoadedRecipe, Recipe, NPM_PREFIX};

/// Where the agent lives in every image.
pub const AGENT_PATH: &str = "/usr/bin/forkd-agent";
/// Recipe metadata inside the image, for the host tools and the guest.
pub const IMAGE_INFO_PATH: &str = "/etc/forkd/image.json";
const INFO_FILE: &str = "image.json";
const IMAGE_FILE: &str = "rootfs.ext4";
/// Bump when the image layout changes, so old cache entries are not reused.
const FORMAT_VERSION: u32 = 1;

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The cache root (images go to `<cache_root>/images/`).
    pub cache_root: PathBuf,
    /// The static forkd-agent binary to install.
    pub agent: PathBuf,
    /// Also copy the image here (sparse), atomically.
    pub output: Option<PathBuf>,
}

/// What `image.json` records about a built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub format_version: u32,
    pub recipe_hash: String,
    pub recipe: Recipe,
    pub agent_sha256: String,
    pub busybox: Option<AptPackage>,
    pub size_bytes: u64,
    pub image_sha256: String,
}

/// A built image.
#[derive(Debug, Clone, Serialize)]
pub struct BuiltImage {
    /// The cached image.
    pub image: PathBuf,
    /// Where it was copied with `-o`, if asked.
    pub output: Option<PathBuf>,
    pub already_present: bool,
    pub info: ImageInfo,
}

pub fn images_dir(cache_root: &Path) -> PathBuf {
    cache_root.join("images")
}

/// Checks that `path` is a statically linked x86-64 ELF executable: the busybox image has no
/// libc for a dynamic binary to load, and the agent must not depend on the image's.
pub fn check_static_executable(path: &Path) -> Result<()> {
    use object::Object;
    let bad = |why: &str| Error::Other(format!("agent binary {}: {why}", path.display()));
    let data = std::fs::read(path).at(path)?;
    let elf = object::File::parse(&*data).map_err(|_| bad("not an ELF executable"))?;
    if elf.architecture() != object::Architecture::X86_64 {
        return Err(bad("not an x86-64 binary"));
    }
    if elf.kind() != object::ObjectKind::Executable && elf.kind() != object::ObjectKind::Dynamic {
        return Err(bad("not an executable"));
    }
    // A PT_INTERP segment names the dynamic loader: the binary is dynamically linked.
    if has_interp(&data) {
        return Err(bad(
            "dynamically linked; build a static one (crates/forkd-agent/build-static.sh)",
        ));
    }
    Ok(())
}

/// Whether the ELF program headers include PT_INTERP (object does not expose segment types).
fn has_interp(data: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if data.len() < 64 || data[4] != 2 {
        return false; // not ELF64
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        data.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) == PT_INTERP)
    })
}

/// The cache key: everything that changes what the image contains.
pub fn recipe_hash(
    loaded: &LoadedRecipe,
    agent_sha256: &str,
    busybox: Option<&AptPackage>,
) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("forkd-image v{FORMAT_VERSION}\n"));
    // How the snapshot is taken changes nothing in the image.
    let image_part = crate::recipe::Recipe {
        snapshot: None,
        ..loaded.recipe.clone()
    };
    h.update(serde_json::to_vec(&image_part).map_err(|e| Error::Other(e.to_string()))?);
    for spec in &loaded.recipe.files {
        h.update(sha256_file(&loaded.file_source(spec))?);
    }
    h.update(agent_sha256);
    if let Some(b) = busybox {
        h.update(b.pinned());
    }
    Ok(hex::encode(&h.finalize()[..12]))
}

/// Builds (or finds cached) the image for `loaded`.
pub fn build(loaded: &LoadedRecipe, opts: &BuildOptions) -> Result<BuiltImage> {
    let recipe = &loaded.recipe;
    let build_err = |why: String| Error::Build {
        recipe: recipe.name.clone(),
        why,
    };
    debian::require_tool(
        "mkfs.ext4",
        "e2fsprogs",
        "images are made with mkfs.ext4 -d",
    )?;
    if let Some(output) = &opts.output {
        output_parent(output)?;
    }
    check_static_executable(&opts.agent)?;
    let agent_sha256 = sha256_file(&opts.agent)?;
    let busybox_pkg = match recipe.base {
        Base::Busybox => Some(debian::resolve(crate::kernel::BUSYBOX_PACKAGE)?),
        Base::Debian => None,
    };
    let hash = recipe_hash(loaded, &agent_sha256, busybox_pkg.as_ref())?;
    let dest = images_dir(&opts.cache_root).join(&hash);
    if let Ok(info) = load_info(&dest) {
        let output = copy_out(&dest.join(IMAGE_FILE), opts.output.as_deref())?;
        return Ok(BuiltImage {
            image: dest.join(IMAGE_FILE),
            output,
            already_present: true,
            info,
        });
    }

    if recipe.base == Base::Debian {
        // Only needed when the image is not cached yet.
        debian::require_tool(
            "debootstrap",
            "debootstrap",
            "Debian-based images start from debootstrap",
        )?;
        // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
        if unsafe { libc::geteuid() } != 0 {
            return Err(build_err("debootstrap and chroot need root".into()));
        }
    }
    let stage = staging_dir(&images_dir(&opts.cache_root))?;
    let root = stage.path().join("root");
    std::fs::create_dir_all(&root).at(&root)?;
    match recipe.base {
        Base::Busybox => {
            let busybox_pkg = busybox_pkg.as_ref().expect("resolved above");
            populate_busybox(&root, busybox_pkg, stage.path())?;
        }
        Base::Debian => populate_debian(&root, recipe)?,
    }
    install_common(&root, loaded, &opts.agent)?;
    if recipe.base == Base::Debian {
        run_in_image(&root, recipe)?;
    }

    let entry = stage.path().join("entry");
    std::fs::create_dir_all(&entry).at(&entry)?;
    let image = entry.join(IMAGE_FILE);
    let size_mib = recipe.size_mib.unwrap_or_else(|| fitted_size_mib(&root));
    make_ext4(&root, &image, size_mib)
        .map_err(|e| build_err(format!("{e} (size_mib = {size_mib})")))?;
    let info = ImageInfo {
        format_version: FORMAT_VERSION,
        recipe_hash: hash,
        recipe: recipe.clone(),
        agent_sha256,
        busybox: busybox_pkg,
        size_bytes: std::fs::metadata(&image).at(&image)?.len(),
        image_sha256: sha256_file(&image)?,
    };
    write_info(&entry, &info)?;
    let already_present = publish(&entry, &dest)? == Published::AlreadyPresent;
    let info = load_info(&dest)?;
    let output = copy_out(&dest.join(IMAGE_FILE), opts.output.as_deref())?;
    Ok(BuiltImage {
        image: dest.join(IMAGE_FILE),
        output,
        already_present,
        info,
    })
}

/// A complete image in the cache.
#[derive(Debug, Clone, Serialize)]
pub struct CachedImage {
    pub image: PathBuf,
    pub info: ImageInfo,
    /// When the entry was published (its directory's mtime), for picking the newest.
    #[serde(skip)]
    pub modified: Option<std::time::SystemTime>,
}

/// Every complete image in the cache, oldest first; incomplete or foreign entries are skipped.
pub fn list(cache_root: &Path) -> Result<Vec<CachedImage>> {
    let dir = images_dir(cache_root);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut images: Vec<CachedImage> = entries
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let path = e.path();
            let info = load_info(&path).ok()?;
            Some(CachedImage {
                image: path.join(IMAGE_FILE),
                info,
                modified: e.metadata().and_then(|m| m.modified()).ok(),
            })
        })
        .collect();
    images
        .sort_by(|a, b| (a.modified, &a.info.recipe_hash).cmp(&(b.modified, &b.info.recipe_hash)));
    Ok(images)
}

/// The most recently built image of the recipe named `name`, if any (what `--rootfs NAME`
/// style options can resolve to).
pub fn latest_for_recipe(cache_root: &Path, name: &str) -> Result<Option<CachedImage>> {
    Ok(list(cache_root)?
        .into_iter()
        .rfind(|i| i.info.recipe.name == name))
}

fn load_info(dir: &Path) -> Result<ImageInfo> {
    let path = dir.join(INFO_FILE);
    let text = std::fs::read_to_string(&path).at(&path)?;
    let info: ImageInfo = serde_json::from_str(&text)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    if !dir.join(IMAGE_FILE).is_file() {
        return Err(Error::Other(format!("{}: no {IMAGE_FILE}", dir.display())));
    }
    Ok(info)
}

fn write_info(dir: &Path, info: &ImageInfo) -> Result<()> {
    let path = dir.join(INFO_FILE);
    let json = serde_json::to_string_pretty(info).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(&path, json).at(&path)
}

/// The directory `output` goes into, which must exist (checked before any work is done).
fn output_parent(output: &Path) -> Result<PathBuf> {
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Other(format!(
            "output {}: directory {} does not exist",
            output.display(),
            parent.display()
        )));
    }
    if output.is_dir() {
        return Err(Error::Other(format!(
            "output {} is a directory",
            output.display()
        )));
    }
    Ok(parent)
}

/// Copies the cached image to `output` (sparse, through a temporary name, then renamed).
fn copy_out(image: &Path, output: Option<&Path>) -> Result<Option<PathBuf>> {
    let Some(output) = output else {
        return Ok(None);
    };
    let parent = output_parent(output)?;
    // copy_sparse creates its destination, so copy into a fresh directory next to the output.
    let tmp = tempfile::Builder::new()
        .prefix(".forkd-image-")
        .tempdir_in(&parent)
        .at(&parent)?;
    let staged = tmp.path().join("image");
    forkd_store::sparse::copy_sparse(image, &staged).at(output)?;
    std::fs::rename(&staged, output).at(output)?;
    Ok(Some(output.to_path_buf()))
}

/// Size for content of this tree: 30% headroom plus 32 MiB for metadata and the guest's writes.
fn fitted_size_mib(root: &Path) -> u32 {
    let bytes = tree_bytes(root);
    let mib = bytes.div_ceil(1 << 20) * 13 / 10 + 32;
    mib.clamp(
        u64::from(crate::recipe::MIN_SIZE_MIB),
        u64::from(crate::recipe::MAX_SIZE_MIB),
    ) as u32
}

fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()) + 4096,
            Ok(t) if t.is_file() => e
                .metadata()
                .map(|m| m.len().next_multiple_of(4096))
                .unwrap_or(0),
            _ => 4096,
        })
        .sum()
}

fn make_ext4(root: &Path, image: &Path, size_mib: u32) -> Result<()> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "forkd-root", "-E", "root_owner=0:0", "-d"])
        .arg(root)
        .arg(image)
        .arg(format!("{size_mib}M"));
    run(&mut cmd).map(|_| ())
}

/// Busybox base: the static binary, a symlink per applet, and the directories a system needs.
fn populate_busybox(root: &Path, busybox: &AptPackage, work: &Path) -> Result<()> {
    let debs = work.join("debs");
    std::fs::create_dir_all(&debs).at(&debs)?;
    let deb = debian::download(std::slice::from_ref(busybox), &debs)?.remove(0);
    let unpacked = work.join("busybox-pkg");
    debian::extract(&deb, &unpacked)?;
    let binary = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| unpacked.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Other(format!("{}: no bin/busybox", deb.display())))?;
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "tmp", "run", "root",
        "var/tmp", "var/log", "mnt", "home",
    ] {
        mkdir(root, dir)?;
    }
    let target = root.join("bin/busybox");
    std::fs::copy(&binary, &target).at(&target)?;
    set_mode(&target, 0o755)?;
    // `--list-full` prints every applet with its install path (bin/ls, sbin/ifconfig, ...).
    let list = run(Command::new(&target).arg("--list-full"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let link = root.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).at(parent)?;
        }
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link).at(&link)?;
        }
    }
    write_file(
        root,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    )?;
    write_file(root, "etc/group", b"root:x:0:\n", 0o644)?;
    write_file(root, "etc/hostname", b"forkd\n", 0o644)?;
    Ok(())
}

/// Debian base: debootstrap with the recipe's apt packages included, pip and npm packages
/// installed in a chroot, apt caches dropped.
fn populate_debian(root: &Path, recipe: &Recipe) -> Result<()> {
    let debian = recipe.debian_base();
    let include = recipe.apt_packages();
    // debootstrap lays the base only: its own resolver cannot pick between alternatives or
    // virtual packages (python3-matplotlib's fonts, npm's node-* dependencies), so apt
    // installs the rest.
    let mut cmd = Command::new("debootstrap");
    cmd.arg(format!("--variant={}", debian.variant));
    cmd.arg(&debian.suite).arg(root).arg(&debian.mirror);
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    tracing::info!(suite = %debian.suite, "debootstrap (takes minutes)");
    run(&mut cmd).map_err(|e| Error::Build {
        recipe: recipe.name.clone(),
        why: format!(
            "debootstrap failed: {e}{}",
            log_tail(&root.join("debootstrap/debootstrap.log"))
        ),
    })?;
    if !include.is_empty() {
        with_resolv_conf(root, || apt_install(root, recipe, &include)).map_err(|e| {
            Error::Build {
                recipe: recipe.name.clone(),
                why: format!("apt-get install {}: {e}", include.join(" ")),
            }
        })?;
    }
    if !recipe.pip.is_empty() {
        with_resolv_conf(root, || pip_install(root, recipe))?;
    }
    if !recipe.npm.is_empty() {
        with_resolv_conf(root, || npm_install(root, recipe))?;
    }
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        clear_dir_files(&root.join(dir))?;
    }
    write_file(root, "etc/hostname", b"forkd\n", 0o644)?;
    Ok(())
}

/// Host settings a command in the image may need to reach the network: proxies and pip's index.
const PASSED_THROUGH_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_DEFAULT_TIMEOUT",
    "npm_config_registry",
    "NPM_CONFIG_REGISTRY",
];

/// `chroot ROOT ...` with a clean environment: the image's PATH, the recipe's environment
/// ([`Recipe::image_env`]) and only the host settings in [`PASSED_THROUGH_ENV`] (host paths
/// such as PIP_FIND_LINKS mean nothing inside the image).
fn chroot_command(root: &Path, recipe: &Recipe) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(root)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive");
    for var in PASSED_THROUGH_ENV {
        if let Some(value) = std::env::var_os(var) {
            cmd.env(var, value);
        }
    }
    cmd.envs(recipe.image_env());
    cmd
}

/// The host's CA bundle, which pip and npm in the image trust (hosts behind a TLS proxy
/// configure theirs there).
fn host_ca_bundle() -> Option<&'static Path> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ]
    .iter()
    .map(Path::new)
    .find(|p| p.is_file())
}

/// Where the host's CA bundle is placed in the image while pip runs.
const HOST_CA_IN_IMAGE: &str = "tmp/forkd-host-ca.crt";

/// Makes services' install scripts leave them stopped (Debian's policy-rc.d convention): a
/// package's postinst must not start a daemon in the build chroot.
const POLICY_RC_D: &[u8] =
    b"#!/bin/sh\n# forkd image build: start no services in the chroot\nexit 101\n";

/// The recipe's apt packages, installed in the image's chroot (no recommends, as debootstrap).
fn apt_install(root: &Path, recipe: &Recipe, packages: &[String]) -> Result<()> {
    write_file(root, "usr/sbin/policy-rc.d", POLICY_RC_D, 0o755)?;
    let result =
        run(chroot_command(root, recipe).args(["apt-get", "update", "-q"])).and_then(|_| {
            run(chroot_command(root, recipe)
                .args(["apt-get", "install", "-y", "-q", "--no-install-recommends"])
                .args(packages))
        });
    let _ = std::fs::remove_file(root.join("usr/sbin/policy-rc.d"));
    result.map(|_| ())
}

/// The last lines of a build log, for an error that would otherwise say only "exit status 1".
fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    format!(" (last lines of {}: {tail})", path.display())
}

/// `pip install` in a chroot of the image. pip trusts the host's CA bundle (hosts behind a TLS
/// proxy configure theirs there), and host-only pip settings that name host paths are dropped.
fn pip_install(root: &Path, recipe: &Recipe) -> Result<()> {
    let mut pip = chroot_command(root, recipe);
    pip.args([
        "python3",
        "-m",
        "pip",
        "install",
        "--no-cache-dir",
        "--break-system-packages",
    ])
    .args(&recipe.pip);
    run_with_host_ca(root, &mut pip, "PIP_CERT")
}

/// `npm install -g` of the recipe's packages in a chroot of the image, under [`NPM_PREFIX`]
/// (so `require` finds them through NODE_PATH, see [`Recipe::image_env`]), trusting the host's
/// CA bundle like pip.
fn npm_install(root: &Path, recipe: &Recipe) -> Result<()> {
    let mut npm = chroot_command(root, recipe);
    npm.args([
        "npm",
        "install",
        "--global",
        "--prefix",
        NPM_PREFIX,
        "--no-audit",
        "--no-fund",
        "--no-update-notifier",
    ])
    .args(&recipe.npm);
    // npm's cache would stay in the image; a throw-away one is removed with the CA copy.
    npm.env("npm_config_cache", "/tmp/forkd-npm-cache");
    let result = run_with_host_ca(root, &mut npm, "npm_config_cafile");
    let _ = std::fs::remove_dir_all(root.join("tmp/forkd-npm-cache"));
    result.map_err(|e| Error::Build {
        recipe: recipe.name.clone(),
        why: format!("field `npm`: npm install failed: {e}"),
    })
}

/// Runs `cmd` (a chroot of the image) with the host's CA bundle copied in and named by the
/// variable `ca_var`, then removes the copy.
fn run_with_host_ca(root: &Path, cmd: &mut Command, ca_var: &str) -> Result<()> {
    let ca_copy = root.join(HOST_CA_IN_IMAGE);
    if let Some(ca) = host_ca_bundle() {
        std::fs::copy(ca, &ca_copy).at(&ca_copy)?;
        cmd.env(ca_var, format!("/{HOST_CA_IN_IMAGE}"));
    }
    let result = run(cmd).map(|_| ());
    let _ = std::fs::remove_file(&ca_copy);
    result
}

/// Runs `f` with the host's resolv.conf in the image (pip needs DNS), then restores it.
fn with_resolv_conf(root: &Path, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let target = root.join("etc/resolv.conf");
    let saved = std::fs::read(&target).ok();
    if let Ok(host) = std::fs::read("/etc/resolv.conf") {
        let _ = std::fs::remove_file(&target);
        std::fs::write(&target, host).at(&target)?;
    }
    let result = f();
    let _ = std::fs::remove_file(&target);
    if let Some(saved) = saved {
        std::fs::write(&target, saved).at(&target)?;
    }
    result
}

fn clear_dir_files(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(|e| e.ok()) {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(entry.path()).at(entry.path())?;
        }
    }
    Ok(())
}

/// The recipe's build-time commands, each in a chroot of the image.
fn run_in_image(root: &Path, recipe: &Recipe) -> Result<()> {
    for command in &recipe.run {
        let mut cmd = chroot_command(root, recipe);
        cmd.args(["/bin/sh", "-c", command]);
        let out = run(&mut cmd).map_err(|e| Error::Build {
            recipe: recipe.name.clone(),
            why: format!("field `run` command \"{command}\" failed: {e}"),
        })?;
        tracing::info!(command, output = %String::from_utf8_lossy(&out.stdout).trim(), "ran");
    }
    Ok(())
}

/// What every image gets: the agent, our /sbin/init, the recipe's files, image.json.
fn install_common(root: &Path, loaded: &LoadedRecipe, agent: &Path) -> Result<()> {
    let recipe = &loaded.recipe;
    let agent_dst = root.join(AGENT_PATH.trim_start_matches('/'));
    mkdir(root, "usr/bin")?;
    std::fs::copy(agent, &agent_dst).at(&agent_dst)?;
    set_mode(&agent_dst, 0o755)?;
    mkdir(root, "sbin")?;
    let init = root.join("sbin/init");
    // debootstrap may leave /sbin/init as a symlink (e.g. to systemd); ours replaces it.
    if init.symlink_metadata().is_ok() {
        std::fs::remove_file(&init).at(&init)?;
    }
    write_file(
        root,
        "sbin/init",
        guest_init_script(recipe).as_bytes(),
        0o755,
    )?;
    for spec in &recipe.files {
        let src = loaded.file_source(spec);
        let dst = root.join(spec.dest.trim_start_matches('/'));
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).at(parent)?;
        }
        std::fs::copy(&src, &dst).at(&dst)?;
        let executable = std::fs::metadata(&src)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
            .unwrap_or(false);
        set_mode(
            &dst,
            spec.mode.unwrap_or(if executable { 0o755 } else { 0o644 }),
        )?;
    }
    mkdir(root, "etc/forkd")?;
    let meta = serde_json::json!({
        "recipe": recipe.name,
        "memory_mib": recipe.memory_mib,
        "eval": recipe.eval,
    });
    write_file(
        root,
        IMAGE_INFO_PATH.trim_start_matches('/'),
        serde_json::to_string_pretty(&meta)
            .unwrap_or_default()
            .as_bytes(),
        0o644,
    )
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The agent's command line for this recipe: eval interpreter and warm-up, or no eval.
pub fn agent_args(recipe: &Recipe) -> Vec<String> {
    match &recipe.eval {
        Some(eval) => {
            let mut args = vec!["--eval-interpreter".to_string(), eval.interpreter.clone()];
            if !eval.warmup.is_empty() {
                args.push("--eval-warmup".into());
                args.push(eval.warmup.join("\n"));
            }
            args
        }
        None => vec!["--no-eval".to_string()],
    }
}

/// `export NAME='value'` lines for the recipe's environment (empty without one).
fn env_exports(recipe: &Recipe) -> String {
    recipe
        .image_env()
        .iter()
        .map(|(name, value)| format!("export {name}={}\n", sh_quote(value)))
        .collect()
}

/// The image's /sbin/init: mounts the kernel filesystems and keeps the agent running.
pub fn guest_init_script(recipe: &Recipe) -> String {
    let args: Vec<String> = agent_args(recipe).iter().map(|a| sh_quote(a)).collect();
    format!(
        r#"#!/bin/sh
# forkd guest init for recipe "{name}", generated by forkd image build.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
{env}mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
mount -t tmpfs tmpfs /tmp 2>/dev/null
mount -t tmpfs tmpfs /run 2>/dev/null
hostname forkd 2>/dev/null
# PID 1 must never exit: restart the agent if it does.
while true; do
    {agent} {args}
    echo "forkd-init: forkd-agent exited with status $?, restarting" >/dev/console
    sleep 1
done
"#,
        name = recipe.name,
        env = env_exports(recipe),
        agent = AGENT_PATH,
        args = args.join(" ")
    )
}

fn mkdir(root: &Path, rel: &str) -> Result<()> {
    let path = root.join(rel);
    std::fs::create_dir_all(&path).at(&path)
}

fn write_file(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<()> {
    let path = root.join(rel);
    std::fs::write(&path, data).at(&path)?;
    set_mode(&path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).at(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::parse;

    #[test]
    fn init_runs_the_agent_with_the_recipes_eval_settings() {
        let r = parse(
            "name = \"p\"\nbase = \"debian\"\n[eval]\nwarmup = [\"import numpy\", \"x = 'a'\"]\n",
        )
        .unwrap();
        let script = guest_init_script(&r);
        assert!(script.contains(
            "/usr/bin/forkd-agent '--eval-interpreter' 'python3' '--eval-warmup' 'import numpy\nx = '\\''a'\\'''"
        ), "{script}");
        let m = parse("name = \"m\"\nbase = \"busybox\"\n").unwrap();
        assert!(guest_init_script(&m).contains("/usr/bin/forkd-agent '--no-eval'"));
        let sh = Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(sh.status.success());
    }

    #[test]
    fn init_exports_the_recipes_environment_for_the_agent() {
        let r = parse(
            "name = \"j\"\nbase = \"debian\"\nnpm = [\"playwright@1.50.1\"]\n[env]\nGREETING = \"it's\"\n[eval]\ninterpreter = \"node\"\n",
        )
        .unwrap();
        let script = guest_init_script(&r);
        let exports =
            "export GREETING='it'\\''s'\nexport NODE_PATH='/usr/local/lib/node_modules'\n";
        assert!(script.contains(exports), "{script}");
        assert!(
            script.find(exports) < script.find("forkd-agent"),
            "set before the agent starts"
        );
        assert!(script.contains("'--eval-interpreter' 'node'"), "{script}");
        let sh = Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(sh.status.success());
    }

    #[test]
    fn static_and_dynamic_binaries_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("text");
        std::fs::write(&text, b"#!/bin/sh\n").unwrap();
        assert!(check_static_executable(&text)
            .unwrap_err()
            .to_string()
            .contains("not an ELF"));
        // /bin/sh on any Linux host is dynamically linked.
        let err = check_static_executable(Path::new("/bin/sh"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dynamically linked"), "{err}");
    }
}
