//! Static hosting: write a pack into a directory and record it in that directory's
//! registry.json (`forkd hub publish`); the same registry update backs `forkd hub serve`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use forkd_store::Snapshot;

use crate::error::{HubError, Result};
use crate::pack::{write_pack, PackInfo, PackOptions, PACK_SUFFIX};
use crate::registry::{Registry, VersionEntry, REGISTRY_FILE};

/// Where a package version's pack lives inside a hub directory.
pub fn pack_rel_path(name: &str, version: &str) -> String {
    let (ns, n) = name.split_once('/').expect("checked package name");
    format!("packs/{ns}/{n}-{version}{PACK_SUFFIX}")
}

/// Writes a pack of `snap` to `dest` atomically (temp file + fsync + rename); with
/// `sign_key`, also `dest.minisig`. Returns the pack info and the signature text.
pub fn write_pack_file(
    snap: &Snapshot,
    opts: &PackOptions,
    dest: &Path,
    sign_key: Option<&Path>,
) -> Result<(PackInfo, Option<String>)> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
    let tmp = TempPath(dir.join(format!(
        ".{}.tmp.{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    )));
    let file = File::create(&tmp.0).map_err(|e| HubError::io(&tmp.0, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let info = write_pack(snap, opts, &mut out)?;
    let file = out
        .into_inner()
        .map_err(|e| HubError::io(&tmp.0, e.into_error()))?;
    file.sync_all().map_err(|e| HubError::io(&tmp.0, e))?;
    let signature = match sign_key {
        Some(key) => {
            let f = File::open(&tmp.0).map_err(|e| HubError::io(&tmp.0, e))?;
            let comment = format!(
                "forkd pack {}@{} sha256:{}",
                opts.name, opts.version, info.sha256
            );
            let sig = crate::sign::sign(key, std::io::BufReader::new(f), &comment)?;
            let sig_path = PathBuf::from(format!("{}.minisig", dest.display()));
            write_atomic(&sig_path, sig.as_bytes())?;
            Some(sig)
        }
        None => None,
    };
    std::fs::rename(&tmp.0, dest).map_err(|e| HubError::io(dest, e))?;
    std::mem::forget(tmp);
    Ok((info, signature))
}

/// Removes a temporary file unless defused with `mem::forget`.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `path` atomically: temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = TempPath(dir.join(format!(
        ".{}.tmp.{}.{:?}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        std::thread::current().id()
    )));
    let mut f = File::create(&tmp.0).map_err(|e| HubError::io(&tmp.0, e))?;
    f.write_all(data).map_err(|e| HubError::io(&tmp.0, e))?;
    f.sync_all().map_err(|e| HubError::io(&tmp.0, e))?;
    std::fs::rename(&tmp.0, path).map_err(|e| HubError::io(path, e))?;
    std::mem::forget(tmp);
    Ok(())
}

/// Read-modify-writes `dir/registry.json` under an exclusive lock on `dir/.registry.lock`,
/// so concurrent publishers (threads or processes) never lose each other's entries, and
/// readers only ever see a complete file (atomic rename).
pub fn update_registry(
    dir: &Path,
    change: impl FnOnce(&mut Registry) -> Result<()>,
) -> Result<Registry> {
    let lock_path = dir.join(".registry.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| HubError::io(&lock_path, e))?;
    // SAFETY: flock(2) takes only integers and touches no memory of ours; the fd is open,
    // owned by `lock`, and the lock is released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(HubError::io(&lock_path, std::io::Error::last_os_error()));
    }
    let path = dir.join(REGISTRY_FILE);
    let mut registry = match std::fs::read_to_string(&path) {
        Ok(text) => Registry::parse(&text, &path.display().to_string())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry::empty(),
        Err(e) => return Err(HubError::io(&path, e)),
    };
    change(&mut registry)?;
    write_atomic(&path, registry.to_json().as_bytes())?;
    drop(lock);
    Ok(registry)
}

/// Options for `publish`.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub pack: PackOptions,
    /// Absolute URL prefix for the pack; None writes a URL relative to registry.json.
    pub url_base: Option<String>,
    pub sign_key: Option<PathBuf>,
    /// Point `latest` at this version (the first version of a package always is).
    pub make_latest: bool,
    /// Audit trail for the registry entry: the recipe the snapshot was built from, and the
    /// release the pack belongs to.
    pub recipe_path: Option<String>,
    pub release_tag: Option<String>,
}

/// What `publish` wrote.
#[derive(Debug, Clone)]
pub struct PublishReport {
    pub pack_path: PathBuf,
    pub entry: VersionEntry,
}

/// `forkd hub publish`: pack `snap` into `dir` and add it to `dir/registry.json`.
pub fn publish(snap: &Snapshot, dir: &Path, opts: &PublishOptions) -> Result<PublishReport> {
    // A registry key names the package, so a published pack declares it.
    crate::names::check_package_name(&opts.pack.name)?;
    let rel = pack_rel_path(&opts.pack.name, &opts.pack.version);
    let pack_path = dir.join(&rel);
    let (info, signature) =
        write_pack_file(snap, &opts.pack, &pack_path, opts.sign_key.as_deref())?;
    let url = match &opts.url_base {
        Some(base) => format!("{}/{rel}", base.trim_end_matches('/')),
        None => rel.clone(),
    };
    let entry = VersionEntry {
        recipe_path: opts.recipe_path.clone(),
        release_tag: opts.release_tag.clone(),
        ..entry_for(&info, url, signature)
    };
    let description = info.manifest.description.clone();
    update_registry(dir, |reg| {
        reg.upsert(
            &opts.pack.name,
            &opts.pack.version,
            entry.clone(),
            Some(&description),
            opts.make_latest,
        );
        Ok(())
    })?;
    Ok(PublishReport { pack_path, entry })
}

/// The registry entry describing a pack.
pub fn entry_for(info: &PackInfo, url: String, minisig: Option<String>) -> VersionEntry {
    let m = &info.manifest;
    VersionEntry {
        url,
        sha256: Some(info.sha256.clone()),
        size_bytes: Some(info.size_bytes),
        memory_mib: Some(m.memory_mib),
        base_image: (!m.base_image.is_empty()).then(|| m.base_image.clone()),
        created_at: Some(m.created_at.clone()),
        minisig,
        ..Default::default()
    }
}
