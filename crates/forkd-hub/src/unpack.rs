//! Unpacking a pack into the store, treating it as hostile until every byte is checked.
//!
//! One pass: zstd decompression, tar parsing, sparse writes into a staging directory and
//! sha256 of every file (on a second thread, so hashing overlaps writing). Nothing is
//! published until every declared file arrived with the declared size and hash; any error
//! drops the staging directory.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel};
use std::sync::Arc;

use forkd_store::{FileEntry, Manifest, Snapshot, Store, Tag, MANIFEST_FILE};
use sha2::{Digest, Sha256};

use crate::error::{HubError, Result};
use crate::names::{check_package_name, check_version, PackageRef};

/// The manifest is small text; anything bigger is not a manifest.
const MANIFEST_MAX: u64 = 1 << 20;
const CHUNK: usize = 1 << 20;
const BLOCK: usize = 4096;
static ZEROS: [u8; CHUNK] = [0u8; CHUNK];

#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// Install under this tag instead of the one the snapshot had when it was packed.
    pub tag: Option<Tag>,
    /// Replace an existing, different snapshot of the same tag.
    pub force: bool,
    /// The package name the pack must declare, if it declares one (when pulled through a
    /// registry: a pack made without a name can be listed under any).
    pub expect_name: Option<String>,
    /// The registry's package and version, recorded in the installed manifest so `images`
    /// and `inspect` say what the snapshot was pulled as.
    pub record_package: Option<(String, String)>,
}

#[derive(Debug)]
pub enum UnpackOutcome {
    Installed(Snapshot),
    /// The tag already holds exactly these files; nothing was written.
    AlreadyPresent(Snapshot),
}

impl UnpackOutcome {
    pub fn snapshot(&self) -> &Snapshot {
        match self {
            UnpackOutcome::Installed(s) | UnpackOutcome::AlreadyPresent(s) => s,
        }
    }
}

/// Unpacks the pack read from `input` (compressed bytes) into `store`.
///
/// `origin` names the pack in errors. `before_commit` runs after every byte was read and every
/// file verified, just before publishing (the pull uses it to check the download's sha256 and
/// signature, which are only known once the stream ended).
pub fn unpack<R: Read>(
    store: &Store,
    input: R,
    origin: &str,
    opts: &UnpackOptions,
    before_commit: &mut dyn FnMut(&Manifest) -> Result<()>,
) -> Result<UnpackOutcome> {
    let (mut archive, limit) = open_pack(input, origin)?;
    let mut entries = archive
        .entries()
        .map_err(|e| stream_error(origin, e, "not a tar stream"))?;

    let manifest = read_manifest(&mut entries, origin)?;
    if let Some(want) = &opts.expect_name {
        if !manifest.name.is_empty() && manifest.name != *want {
            return Err(HubError::bad_pack(
                origin,
                format!(
                    "declares package {:?} but was listed as {want:?}",
                    manifest.name
                ),
            ));
        }
    }
    let parent = local_parent(store, &manifest, origin)?;
    let tag = choose_tag(&manifest, opts);
    if let Some(existing) = identical_snapshot(store, &tag, &manifest)? {
        return Ok(UnpackOutcome::AlreadyPresent(existing));
    }
    if store.exists(&tag) && !opts.force {
        return Err(HubError::Invalid(format!(
            "a different snapshot is already tagged {:?}; install this one beside it with \
             --tag NEW_TAG, or replace it with --force",
            tag.as_str()
        )));
    }
    if store.exists(&tag) {
        // Replacing a parent would silently change what its diff snapshots sit on.
        let dependents = store.dependents(&tag)?;
        if !dependents.is_empty() {
            return Err(forkd_store::StoreError::HasDependents { tag, dependents }.into());
        }
    }
    allow_declared_data(&limit, &manifest);
    let staging = if opts.force {
        store.begin_replace(&tag)?
    } else {
        store.begin(&tag)?
    };
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for entry in entries.by_ref() {
        let mut entry = entry.map_err(|e| stream_error(origin, e, "corrupt tar stream"))?;
        let (name, declared) = declared_entry(&entry, &manifest, &mut seen, origin)?;
        write_verified(&mut entry, &staging.path().join(&name), declared, origin)?;
    }
    finish_pack(&manifest, &seen, archive.into_inner(), origin)?;
    before_commit(&manifest)?;
    // The store lists files by name; the pack's order only served streaming.
    let mut manifest = manifest;
    manifest.files.sort_by(|a, b| a.name.cmp(&b.name));
    // The link now sits on this store's copy of its parent, whose manifest is its own.
    if let Some(parent) = &parent {
        manifest.parent_sha256 = parent.manifest_sha256()?;
    }
    if let Some((name, version)) = &opts.record_package {
        manifest.name = name.clone();
        manifest.version = version.clone();
    }
    let snap = staging.commit_prehashed(manifest)?;
    Ok(UnpackOutcome::Installed(snap))
}

/// Checks a whole pack without installing it (the hub server runs this on every push):
/// the same structure rules as `unpack`, and every file's size and sha256.
pub fn verify_pack<R: Read>(input: R, origin: &str) -> Result<Manifest> {
    let (mut archive, limit) = open_pack(input, origin)?;
    let mut entries = archive
        .entries()
        .map_err(|e| stream_error(origin, e, "not a tar stream"))?;
    let manifest = read_manifest(&mut entries, origin)?;
    allow_declared_data(&limit, &manifest);
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for entry in entries.by_ref() {
        let mut entry = entry.map_err(|e| stream_error(origin, e, "corrupt tar stream"))?;
        let (name, declared) = declared_entry(&entry, &manifest, &mut seen, origin)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = read_full(&mut entry, &mut buf)
                .map_err(|e| stream_error(origin, e, "corrupt data"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let sha = hex::encode(h.finalize());
        if sha != declared.sha256 {
            return Err(HubError::bad_pack(
                origin,
                format!(
                    "{name:?} has sha256 {sha}, the manifest says {}",
                    declared.sha256
                ),
            ));
        }
    }
    finish_pack(&manifest, &seen, archive.into_inner(), origin)?;
    Ok(manifest)
}

type PackArchive<R> =
    tar::Archive<LimitedReader<zstd::stream::read::Decoder<'static, io::BufReader<R>>>>;

/// A pack's tar stream behind zstd, with a decompressed-size limit (first just enough for the
/// manifest; see [`allow_declared_data`]) that stops decompression bombs.
fn open_pack<R: Read>(input: R, origin: &str) -> Result<(PackArchive<R>, Arc<AtomicU64>)> {
    let limit = Arc::new(AtomicU64::new(MANIFEST_MAX + 64 * 1024));
    let decoder = zstd::stream::read::Decoder::new(input)
        .map_err(|e| stream_error(origin, e, "not a zstd stream"))?;
    let archive = tar::Archive::new(LimitedReader {
        inner: decoder,
        read: 0,
        limit: limit.clone(),
    });
    Ok((archive, limit))
}

/// Raises the limit to what the manifest declares: a pack may carry a little tar framing
/// besides the declared files, never more data.
fn allow_declared_data(limit: &AtomicU64, manifest: &Manifest) {
    let logical = manifest.logical_size();
    limit.store(
        MANIFEST_MAX + logical + logical / 64 + (16 << 20),
        Ordering::Relaxed,
    );
}

/// The entry's name and manifest record: it must be a plain file the manifest declares, seen
/// once, of exactly the declared size.
fn declared_entry<'m, R: Read>(
    entry: &tar::Entry<'_, R>,
    manifest: &'m Manifest,
    seen: &mut BTreeSet<String>,
    origin: &str,
) -> Result<(String, &'m FileEntry)> {
    let name = check_entry(entry, origin)?;
    let declared = manifest.file(&name).ok_or_else(|| {
        HubError::bad_pack(
            origin,
            format!("entry {name:?} is not declared in the manifest"),
        )
    })?;
    if !seen.insert(name.clone()) {
        return Err(HubError::bad_pack(
            origin,
            format!("entry {name:?} appears twice"),
        ));
    }
    let size = entry.size();
    if size != declared.size {
        let rel = if size > declared.size {
            "larger"
        } else {
            "smaller"
        };
        return Err(HubError::bad_pack(
            origin,
            format!(
                "entry {name:?} is {size} bytes, {rel} than the {} the manifest declares",
                declared.size
            ),
        ));
    }
    Ok((name, declared))
}

/// Every declared file arrived; the rest of the stream is read so all of it is consumed (and
/// hashed by a caller that hashes the compressed bytes).
fn finish_pack<R: Read>(
    manifest: &Manifest,
    seen: &BTreeSet<String>,
    mut rest: R,
    origin: &str,
) -> Result<()> {
    let missing: Vec<&str> = manifest
        .files
        .iter()
        .map(|f| f.name.as_str())
        .filter(|n| !seen.contains(*n))
        .collect();
    if !missing.is_empty() {
        return Err(HubError::bad_pack(
            origin,
            format!("ends without the declared files {missing:?}"),
        ));
    }
    io::copy(&mut rest, &mut io::sink())
        .map_err(|e| stream_error(origin, e, "corrupt data after the tar stream"))?;
    Ok(())
}

fn read_manifest<R: Read>(entries: &mut tar::Entries<'_, R>, origin: &str) -> Result<Manifest> {
    let first = entries
        .next()
        .ok_or_else(|| HubError::bad_pack(origin, "is empty (no manifest.toml)"))?;
    let mut first = first.map_err(|e| stream_error(origin, e, "corrupt tar stream"))?;
    let name = check_entry(&first, origin)?;
    if name != MANIFEST_FILE {
        return Err(HubError::bad_pack(
            origin,
            format!("first entry is {name:?}; manifest.toml must come first"),
        ));
    }
    if first.size() > MANIFEST_MAX {
        return Err(HubError::bad_pack(
            origin,
            format!(
                "manifest.toml is {} bytes (limit {MANIFEST_MAX})",
                first.size()
            ),
        ));
    }
    let mut text = String::new();
    first
        .read_to_string(&mut text)
        .map_err(|e| stream_error(origin, e, "unreadable manifest.toml"))?;
    let manifest = Manifest::parse(&text, Path::new(&format!("{origin}!manifest.toml")))
        .map_err(|e| HubError::bad_pack(origin, e.to_string()))?;
    if !manifest.name.is_empty() {
        check_package_name(&manifest.name)
            .map_err(|e| HubError::bad_pack(origin, format!("manifest name: {e}")))?;
    }
    if !manifest.version.is_empty() {
        check_version(&manifest.version)
            .map_err(|e| HubError::bad_pack(origin, format!("manifest version: {e}")))?;
    }
    if manifest.file(MANIFEST_FILE).is_some() {
        return Err(HubError::bad_pack(
            origin,
            "manifest lists manifest.toml as one of its files",
        ));
    }
    if !manifest.parent_tag.is_empty() {
        check_chain_link(&manifest, origin)?;
    }
    Ok(manifest)
}

/// `--tag`, else the tag the snapshot had when it was packed.
/// A chain pack names the pack of its parent and which snapshot that must be.
fn check_chain_link(manifest: &Manifest, origin: &str) -> Result<()> {
    if manifest.parent_package.is_empty() || manifest.parent_content_sha256.is_empty() {
        return Err(HubError::bad_pack(
            origin,
            format!(
                "is a diff against {:?} but names no parent pack (parent_package, \
                 parent_content_sha256)",
                manifest.parent_tag
            ),
        ));
    }
    PackageRef::parse(&manifest.parent_package)
        .map_err(|e| HubError::bad_pack(origin, format!("manifest parent_package: {e}")))?;
    Ok(())
}

/// The installed parent a chain pack sits on: under its tag, holding exactly its files.
fn local_parent(store: &Store, manifest: &Manifest, origin: &str) -> Result<Option<Snapshot>> {
    let Some(tag) = manifest.parent() else {
        return Ok(None);
    };
    let parent = match store.get(&tag) {
        Ok(p) => p,
        Err(forkd_store::StoreError::NotFound(_)) => {
            return Err(HubError::MissingParent {
                origin: origin.to_string(),
                package: manifest.parent_package.clone(),
                tag: tag.to_string(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    if parent.manifest.content_sha256() != manifest.parent_content_sha256 {
        return Err(HubError::bad_pack(
            origin,
            format!(
                "is a diff of {}, but the snapshot tagged {:?} here is a different one; \
                 remove it or pull this pack into another data directory",
                manifest.parent_package,
                tag.as_str()
            ),
        ));
    }
    Ok(Some(parent))
}

fn choose_tag(manifest: &Manifest, opts: &UnpackOptions) -> Tag {
    opts.tag.clone().unwrap_or_else(|| manifest.tag.clone())
}

/// The installed snapshot under `tag`, if it holds exactly the pack's files.
fn identical_snapshot(store: &Store, tag: &Tag, manifest: &Manifest) -> Result<Option<Snapshot>> {
    if !store.exists(tag) {
        return Ok(None);
    }
    let existing = store.get(tag)?;
    let key = |files: &[FileEntry]| -> BTreeSet<(String, u64, String)> {
        files
            .iter()
            .map(|f| (f.name.clone(), f.size, f.sha256.clone()))
            .collect()
    };
    Ok((key(&existing.manifest.files) == key(&manifest.files)).then_some(existing))
}

/// Refuses every entry that is not a regular (or GNU sparse) file with a plain name.
fn check_entry<R: Read>(entry: &tar::Entry<'_, R>, origin: &str) -> Result<String> {
    let raw = entry.path_bytes();
    let shown = String::from_utf8_lossy(&raw).into_owned();
    let refuse = |msg: String| Err(HubError::bad_pack(origin, msg));
    let kind = entry.header().entry_type();
    let kind_name = match kind {
        tar::EntryType::Regular | tar::EntryType::GNUSparse => None,
        tar::EntryType::Symlink => Some("a symlink"),
        tar::EntryType::Link => Some("a hard link"),
        tar::EntryType::Char => Some("a character device"),
        tar::EntryType::Block => Some("a block device"),
        tar::EntryType::Fifo => Some("a FIFO"),
        tar::EntryType::Directory => Some("a directory"),
        _ => Some("an unsupported entry type"),
    };
    if let Some(k) = kind_name {
        return refuse(format!(
            "entry {shown:?} is {k}; packs hold regular files only"
        ));
    }
    if raw.starts_with(b"/") {
        return refuse(format!("entry {shown:?} has an absolute path"));
    }
    if raw.split(|&b| b == b'/').any(|c| c == b"..") {
        return refuse(format!("entry {shown:?} climbs out with '..'"));
    }
    if raw.contains(&b'/') {
        return refuse(format!(
            "entry {shown:?} is in a subdirectory; packs are flat"
        ));
    }
    if let Err(e) = forkd_store::manifest::check_file_name(&shown) {
        return refuse(format!("entry {e}"));
    }
    Ok(shown)
}

enum HashMsg {
    Data(Vec<u8>),
    Zeros(usize),
}

/// Writes one entry sparse (all-zero 4 KiB blocks become holes) while a second thread hashes
/// it, then checks size and sha256 against the manifest.
fn write_verified<R: Read>(
    entry: &mut R,
    path: &Path,
    declared: &FileEntry,
    origin: &str,
) -> Result<()> {
    let io_err = |e: io::Error| HubError::io(path, e);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err)?;
    let (tx, rx) = sync_channel::<HashMsg>(8);
    let (recycle_tx, recycle_rx) = channel::<Vec<u8>>();
    let (written, sha) = std::thread::scope(|s| -> Result<(u64, String)> {
        let hasher = s.spawn(move || {
            let mut h = Sha256::new();
            for msg in rx {
                match msg {
                    HashMsg::Data(buf) => {
                        h.update(&buf);
                        let _ = recycle_tx.send(buf);
                    }
                    HashMsg::Zeros(n) => h.update(&ZEROS[..n]),
                }
            }
            hex::encode(h.finalize())
        });
        let mut offset = 0u64;
        loop {
            let mut buf = recycle_rx.try_recv().unwrap_or_default();
            buf.resize(CHUNK, 0);
            let n =
                read_full(entry, &mut buf).map_err(|e| stream_error(origin, e, "corrupt data"))?;
            if n == 0 {
                break;
            }
            if offset + n as u64 > declared.size {
                return Err(HubError::bad_pack(
                    origin,
                    format!(
                        "{:?} holds more than the {} bytes declared",
                        declared.name, declared.size
                    ),
                ));
            }
            buf.truncate(n);
            let msg = if write_sparse(&file, &buf, offset).map_err(io_err)? {
                HashMsg::Data(buf)
            } else {
                HashMsg::Zeros(n)
            };
            offset += n as u64;
            if tx.send(msg).is_err() {
                break;
            }
        }
        drop(tx);
        let sha = hasher.join().expect("hash thread does not panic");
        Ok((offset, sha))
    })?;
    if written != declared.size {
        return Err(HubError::bad_pack(
            origin,
            format!(
                "{:?} ends after {written} of {} bytes",
                declared.name, declared.size
            ),
        ));
    }
    if sha != declared.sha256 {
        return Err(HubError::bad_pack(
            origin,
            format!(
                "{:?} has sha256 {sha}, the manifest says {}",
                declared.name, declared.sha256
            ),
        ));
    }
    file.set_len(declared.size).map_err(io_err)?;
    Ok(())
}

/// Writes the non-zero 4 KiB blocks of `buf` at `offset`; returns whether anything was
/// non-zero.
fn write_sparse(file: &File, buf: &[u8], offset: u64) -> io::Result<bool> {
    let mut any = false;
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    while pos < buf.len() {
        let end = (pos + BLOCK).min(buf.len());
        let zero = is_zero(&buf[pos..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(s)) => {
                file.write_all_at(&buf[s..pos], offset + s as u64)?;
                any = true;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = run_start {
        file.write_all_at(&buf[s..], offset + s as u64)?;
        any = true;
    }
    Ok(any)
}

fn is_zero(buf: &[u8]) -> bool {
    // 16-byte wide compares: as fast as reading aligned u128s, without the unsafe.
    let mut words = buf.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap()) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Turns a read error inside the pack stream into the right error: a transport failure the
/// input reader raised (carried as a `HubError`) stays itself, anything else is a bad pack.
pub(crate) fn stream_error(origin: &str, e: io::Error, what: &str) -> HubError {
    if e.get_ref().is_some_and(|inner| inner.is::<HubError>()) {
        let inner = e.into_inner().expect("checked above");
        return *inner.downcast::<HubError>().expect("checked above");
    }
    if e.get_ref().is_some_and(|inner| inner.is::<BombError>()) {
        return HubError::bad_pack(origin, e.to_string());
    }
    HubError::bad_pack(origin, format!("{what}: {e}"))
}

#[derive(Debug)]
struct BombError(u64);

impl std::fmt::Display for BombError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "decompresses to more than {} bytes, more than its manifest declares (decompression bomb?)",
            self.0
        )
    }
}

impl std::error::Error for BombError {}

/// Fails once more than `limit` decompressed bytes were read.
struct LimitedReader<R> {
    inner: R,
    read: u64,
    limit: Arc<AtomicU64>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = self.limit.load(Ordering::Relaxed);
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > limit {
            return Err(io::Error::other(BombError(limit)));
        }
        Ok(n)
    }
}
