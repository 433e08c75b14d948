//! Pack format v1: `NAME.forkd-snapshot.tar.zst`.
//!
//! A tar stream (GNU format) compressed with multithreaded zstd. The first entry is
//! `manifest.toml` (the store manifest plus the package `name` / `version`), then
//! `vmstate.json`, `rootfs.ext4`, `memory.bin` and any other listed file. Files with holes are
//! written as GNU sparse entries ('S', old GNU sparse map): only their data extents are read
//! and stored, so a 1 GiB memory.bin with 256 MiB of data costs 256 MiB of reads and GNU tar
//! restores it sparse too.
//!
//! A chain pack holds one diff snapshot (a link): only the pages it stores, and in its
//! manifest `parent_package` (the pack holding its parent) and `parent_content_sha256` (which
//! snapshot that parent must be). Pulling it fetches a missing parent first.

use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;

use forkd_store::sparse::data_extents;
use forkd_store::{
    Manifest, Snapshot, Store, MANIFEST_FILE, MEMORY_FILE, ROOTFS_FILE, VMSTATE_FILE,
};
use sha2::{Digest, Sha256};

use crate::error::{HubError, Result};
use crate::names::{check_package_name, check_version, PackageRef};

/// Pack file suffix.
pub const PACK_SUFFIX: &str = ".forkd-snapshot.tar.zst";

/// Default zstd level, chosen by measurement (`cargo bench -p forkd-hub --bench pull`, 2 cores,
/// zstdmt): a 1280 MiB-logical snapshot holding 256 MiB of random pages and 48 MiB of
/// guest-like pages (host binaries and libraries) packed in
///   level 1: 0.36 s → 273.5 MiB   level 3: 0.47 s → 270.5 MiB
///   level 6: 0.70 s → 269.3 MiB   level 9: 1.86 s → 268.8 MiB
/// Random memory does not compress at any level and holes are never stored, so the level
/// only acts on the compressible pages: level 3 shrinks them 17 % more than level 1 for
/// +0.1 s, while 6 and 9 save another 1-2 MiB for 1.5-4x the time. Unpack speed is the same
/// at every level. Level 3 is the knee.
pub const DEFAULT_LEVEL: i32 = 3;

/// Options for `write_pack`.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// `namespace/name`, or empty: a pack that declares no package can be listed in a
    /// registry under any name.
    pub name: String,
    pub version: String,
    pub description: Option<String>,
    pub base_image: Option<String>,
    pub level: i32,
    /// Compression worker threads; 0 = one per core.
    pub threads: u32,
    /// For a diff snapshot: the pack that holds its parent.
    pub parent: Option<ParentPack>,
}

/// The pack a chain pack's parent comes from, recorded in the link's manifest so a pull can
/// fetch the parent first and check it is the right one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentPack {
    /// `namespace/name@version`.
    pub package: String,
    /// The parent snapshot's [`forkd_store::Manifest::content_sha256`].
    pub content_sha256: String,
}

/// The [`ParentPack`] of diff snapshot `snap`, whose parent is published as `package`
/// (`namespace/name@version`: pinned, so a later `latest` cannot change what the link sits on).
pub fn parent_pack(store: &Store, snap: &Snapshot, package: &str) -> Result<ParentPack> {
    let pref = PackageRef::parse(package)?;
    if pref.version.is_none() {
        return Err(HubError::Invalid(format!(
            "--parent {package:?}: give the parent pack's version (NS/NAME@VERSION)"
        )));
    }
    let Some(parent_tag) = snap.manifest.parent() else {
        return Err(HubError::Invalid(format!(
            "--parent {package:?}: snapshot {:?} is self-contained (not a diff snapshot)",
            snap.manifest.tag.as_str()
        )));
    };
    let parent = store.get(&parent_tag)?;
    if parent.manifest_sha256()? != snap.manifest.parent_sha256 {
        return Err(HubError::Invalid(format!(
            "snapshot {:?}: its parent {:?} was replaced after it was taken",
            snap.manifest.tag.as_str(),
            parent_tag.as_str()
        )));
    }
    Ok(ParentPack {
        package: pref.to_string(),
        content_sha256: parent.manifest.content_sha256(),
    })
}

impl PackOptions {
    pub fn new(name: &str, version: &str) -> PackOptions {
        PackOptions {
            name: name.to_string(),
            version: version.to_string(),
            description: None,
            base_image: None,
            level: DEFAULT_LEVEL,
            threads: 0,
            parent: None,
        }
    }
}

/// What `write_pack` produced.
#[derive(Debug, Clone)]
pub struct PackInfo {
    /// The manifest stored as the pack's first entry.
    pub manifest: Manifest,
    /// Compressed size of the pack.
    pub size_bytes: u64,
    /// sha256 of the compressed pack.
    pub sha256: String,
}

/// Order of files in a pack: the well-known ones first, the rest by name.
fn pack_order(manifest: &Manifest) -> Vec<forkd_store::FileEntry> {
    let rank = |n: &str| match n {
        VMSTATE_FILE => 0,
        ROOTFS_FILE => 1,
        MEMORY_FILE => 2,
        _ => 3,
    };
    let mut files = manifest.files.clone();
    files.sort_by(|a, b| (rank(&a.name), &a.name).cmp(&(rank(&b.name), &b.name)));
    files
}

/// The manifest a pack of `snap` carries.
pub fn pack_manifest(snap: &Snapshot, opts: &PackOptions) -> Result<Manifest> {
    if !opts.name.is_empty() {
        check_package_name(&opts.name)?;
    }
    check_version(&opts.version)?;
    let mut m = snap.manifest.clone();
    match (&opts.parent, m.parent_tag.is_empty()) {
        (None, false) => {
            return Err(HubError::Invalid(format!(
                "snapshot {:?} is a diff against {:?}: name the pack that holds {:?} with \
                 --parent NS/NAME@VERSION (or pack a self-contained copy made by forkd compact)",
                m.tag.as_str(),
                m.parent_tag,
                m.parent_tag
            )))
        }
        (Some(_), true) => {
            return Err(HubError::Invalid(format!(
                "snapshot {:?} is self-contained: --parent is only for a diff snapshot",
                m.tag.as_str()
            )))
        }
        (Some(p), false) => {
            m.parent_package = p.package.clone();
            m.parent_content_sha256 = p.content_sha256.clone();
        }
        (None, true) => {}
    }
    m.name = opts.name.clone();
    m.version = opts.version.clone();
    if let Some(d) = &opts.description {
        m.description = d.clone();
    }
    if let Some(b) = &opts.base_image {
        m.base_image = b.clone();
    }
    m.files = pack_order(&snap.manifest);
    Ok(m)
}

/// Writes a pack of `snap` to `out` and returns its manifest, size and sha256.
pub fn write_pack<W: Write>(snap: &Snapshot, opts: &PackOptions, out: W) -> Result<PackInfo> {
    let manifest = pack_manifest(snap, opts)?;
    let mut hashed = HashingWriter::new(out);
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        opts.threads
    };
    let write_err = |e: io::Error| HubError::Io {
        path: "pack output".into(),
        source: e,
    };
    {
        let mut enc =
            zstd::stream::write::Encoder::new(&mut hashed, opts.level).map_err(write_err)?;
        enc.multithread(threads).map_err(write_err)?;
        let mut tar = tar::Builder::new(enc);
        tar.mode(tar::HeaderMode::Deterministic);
        let mtime = chrono::DateTime::parse_from_rfc3339(&manifest.created_at)
            .map_or(0, |t| t.timestamp().max(0) as u64);
        let text = manifest.to_toml();
        let header = regular_header(MANIFEST_FILE, text.len() as u64, mtime)?;
        tar.append(&header, text.as_bytes()).map_err(write_err)?;
        for f in &manifest.files {
            let path = snap.file(&f.name);
            append_file(&mut tar, &path, f, mtime)?;
        }
        let enc = tar.into_inner().map_err(write_err)?;
        enc.finish().map_err(write_err)?;
    }
    hashed.flush().map_err(write_err)?;
    let (size_bytes, sha256) = hashed.finish();
    Ok(PackInfo {
        manifest,
        size_bytes,
        sha256,
    })
}

fn regular_header(name: &str, size: u64, mtime: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_gnu();
    h.set_path(name)
        .map_err(|e| HubError::Invalid(format!("{name}: {e}")))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(h)
}

/// Appends one snapshot file: a regular entry when it has no holes, else a GNU sparse entry
/// whose data is only the file's data extents.
fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &std::path::Path,
    entry: &forkd_store::FileEntry,
    mtime: u64,
) -> Result<()> {
    let io_err = |e: io::Error| HubError::io(path, e);
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len != entry.size {
        return Err(HubError::Invalid(format!(
            "{}: {len} bytes but the snapshot manifest says {}: the file changed after the snapshot was made",
            path.display(),
            entry.size
        )));
    }
    let extents = data_extents(&file).map_err(io_err)?;
    let stored: u64 = extents.iter().map(|r| r.end - r.start).sum();
    if stored == len {
        let header = regular_header(&entry.name, len, mtime)?;
        let reader = ExtentReader::new(&file, std::iter::once(0..len).collect());
        return tar.append(&header, reader).map_err(io_err);
    }
    let (header, ext_blocks) = sparse_header(&entry.name, len, stored, &extents, mtime)?;
    let reader = io::Cursor::new(ext_blocks).chain(ExtentReader::new(&file, extents));
    tar.append(&header, reader).map_err(io_err)
}

/// A GNU sparse header ('S') for `extents` plus its extension blocks (21 extents each).
/// A file ending in a hole gets a final zero-length extent at its end, as GNU tar writes.
fn sparse_header(
    name: &str,
    len: u64,
    stored: u64,
    extents: &[Range<u64>],
    mtime: u64,
) -> Result<(tar::Header, Vec<u8>)> {
    let mut map: Vec<(u64, u64)> = extents.iter().map(|r| (r.start, r.end - r.start)).collect();
    if map.last().is_none_or(|&(o, l)| o + l < len) {
        map.push((len, 0));
    }
    let mut header = regular_header(name, stored, mtime)?;
    header.set_entry_type(tar::EntryType::GNUSparse);
    let gnu = header.as_gnu_mut().expect("built as a GNU header");
    gnu.set_real_size(len);
    let (first, rest) = map.split_at(map.len().min(4));
    for (slot, &(off, n)) in gnu.sparse.iter_mut().zip(first) {
        slot.set_offset(off);
        slot.set_length(n);
    }
    gnu.isextended[0] = u8::from(!rest.is_empty());
    let mut ext_bytes = Vec::new();
    let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, &(off, n)) in ext.sparse.iter_mut().zip(chunk.iter()) {
            slot.set_offset(off);
            slot.set_length(n);
        }
        ext.isextended[0] = u8::from(i + 1 < chunks.len());
        ext_bytes.extend_from_slice(ext.as_bytes());
    }
    header.set_cksum();
    Ok((header, ext_bytes))
}

/// Reads the given extents of a file back to back with pread (no seeks through holes).
struct ExtentReader<'a> {
    file: &'a File,
    extents: std::vec::IntoIter<Range<u64>>,
    current: Range<u64>,
}

impl<'a> ExtentReader<'a> {
    fn new(file: &'a File, extents: Vec<Range<u64>>) -> ExtentReader<'a> {
        ExtentReader {
            file,
            extents: extents.into_iter(),
            current: 0..0,
        }
    }
}

impl Read for ExtentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.extents.next() {
                Some(r) => self.current = r,
                None => return Ok(0),
            }
        }
        let n = ((self.current.end - self.current.start) as usize).min(buf.len());
        let got = self.file.read_at(&mut buf[..n], self.current.start)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while packing",
            ));
        }
        self.current.start += got as u64;
        Ok(got)
    }
}

/// Counts and sha256-hashes everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// (bytes written, hex sha256).
    pub fn finish(self) -> (u64, String) {
        (self.count, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
