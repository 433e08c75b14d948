//! The snapshot store: one immutable directory per tag under `snapshots/`.
//!
//! Writers build a snapshot in a staging directory on the same filesystem and publish it with
//! one `renameat2(RENAME_NOREPLACE)`, so readers only ever see complete snapshots and two
//! writers of one tag cannot both win. Removal renames into a trash name first for the same
//! reason.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, StoreError};
use crate::hash::{hash_file, hash_files};
use crate::manifest::{
    check_file_name, FileEntry, Manifest, NetRecord, FORMAT_VERSION, MANIFEST_FILE,
};
use crate::owner::{self, Owner};
use crate::sparse::disk_usage;
use crate::tag::Tag;

const STAGING_PREFIX: &str = ".staging.";
const TRASH_PREFIX: &str = ".trash.";

/// The data directory: `snapshots/`, `cache/`.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Who new files belong to when root writes into a sudo user's store (see [`owner`]).
    owner: Option<Owner>,
}

/// A published snapshot: its directory and its parsed manifest.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// What a writer says about a snapshot; file names, sizes and hashes are computed on commit.
#[derive(Debug, Clone, Default)]
pub struct SnapshotMeta {
    pub memory_mib: u64,
    pub vcpus: u32,
    pub description: String,
    pub base_image: String,
    pub kernel: String,
    pub parent_tag: Option<Tag>,
    /// sha256 of the parent's manifest.toml (see [`Manifest::parent_sha256`]).
    pub parent_sha256: String,
    /// The network policy children get (see [`Manifest::net`]).
    pub net: Option<NetRecord>,
}

/// A snapshot under construction. Dropped without `commit`, it is removed.
#[derive(Debug)]
pub struct Staging {
    tag: Tag,
    dir: PathBuf,
    target: PathBuf,
    committed: bool,
    /// Publish over an existing snapshot of the same tag (atomic exchange).
    replace: bool,
    owner: Option<Owner>,
}

/// How `remove` treats snapshots that name a removed one as their parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse, naming the dependents.
    Refuse,
    /// Remove anyway and leave the dependents orphaned.
    Orphan,
    /// Remove the dependents too, transitively.
    Cascade,
}

/// One file that does not match the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileProblem {
    Missing {
        name: String,
    },
    SizeMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },
    HashMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    Unreadable {
        name: String,
        error: String,
    },
    Unlisted {
        name: String,
    },
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileProblem::Missing { name } => write!(f, "{name}: missing"),
            FileProblem::SizeMismatch {
                name,
                expected,
                actual,
            } => {
                write!(f, "{name}: size {actual} bytes, manifest says {expected}")
            }
            FileProblem::HashMismatch {
                name,
                expected,
                actual,
            } => {
                write!(
                    f,
                    "{name}: sha256 {actual} does not match the manifest's {expected}"
                )
            }
            FileProblem::Unreadable { name, error } => write!(f, "{name}: unreadable: {error}"),
            FileProblem::Unlisted { name } => write!(f, "{name}: present but not in the manifest"),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store rooted at `root`, and clears staging directories
    /// left behind by writers that died.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        let store = Store {
            owner: owner::owner_for(&root),
            root,
        };
        if let Some(o) = store.owner {
            // Every folder made on the way (~/.local, ~/.local/share) is the user's too: a
            // root-owned ~/.local/share would lock their other programs out.
            owner::create_dir_all_owned(&store.root, o)
                .map_err(|e| StoreError::io(&store.root, e))?;
        }
        for dir in [store.snapshots_dir(), store.cache_dir()] {
            fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        }
        store.give_dirs([store.root.clone(), store.snapshots_dir(), store.cache_dir()])?;
        store.sweep_abandoned();
        Ok(store)
    }

    /// [`Store::open`] for a store whose files stay with the user writing them, whoever
    /// invoked forkd (a jailed child's BRANCH directory, adopted into the real store by its
    /// parent).
    pub fn open_unowned(root: impl Into<PathBuf>) -> Result<Store> {
        let store = Store {
            owner: None,
            root: root.into(),
        };
        for dir in [store.snapshots_dir(), store.cache_dir()] {
            fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        }
        Ok(store)
    }

    /// `FORKD_HOME`, else `$XDG_DATA_HOME/forkd`, else `~/.local/share/forkd`; under `sudo`,
    /// `~` is the invoking user's home (see [`owner`]).
    pub fn default_root() -> PathBuf {
        let invoker_home = owner::sudo_invoker().and_then(|o| owner::home_of(o.uid));
        owner::data_root(&|k| std::env::var_os(k), invoker_home)
    }

    /// Hands files or directories this process created in the store to the store's owner (a
    /// no-op unless root writes into a sudo user's store).
    pub fn give(&self, path: &Path) -> Result<()> {
        match self.owner {
            Some(o) => owner::give(path, o).map_err(|e| StoreError::io(path, e)),
            None => Ok(()),
        }
    }

    /// [`Store::give`] for one directory, not its contents: folders every run shares.
    pub fn give_dir(&self, dir: &Path) -> Result<()> {
        match self.owner {
            Some(o) => std::os::unix::fs::lchown(dir, Some(o.uid), Some(o.gid))
                .map_err(|e| StoreError::io(dir, e)),
            None => Ok(()),
        }
    }

    fn give_dirs(&self, dirs: impl IntoIterator<Item = PathBuf>) -> Result<()> {
        dirs.into_iter().try_for_each(|d| self.give_dir(&d))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    pub fn snapshot_dir(&self, tag: &Tag) -> PathBuf {
        self.snapshots_dir().join(tag.as_str())
    }

    pub fn exists(&self, tag: &Tag) -> bool {
        self.snapshot_dir(tag).join(MANIFEST_FILE).exists()
    }

    /// Starts writing a new snapshot. Fails early if the tag is taken; `commit` checks again.
    pub fn begin(&self, tag: &Tag) -> Result<Staging> {
        let target = self.snapshot_dir(tag);
        if target.exists() {
            return Err(StoreError::AlreadyExists(tag.clone()));
        }
        let dir = self.snapshots_dir().join(format!(
            "{STAGING_PREFIX}{}.{}.{}",
            std::process::id(),
            unique_suffix(),
            tag
        ));
        fs::create_dir(&dir).map_err(|e| StoreError::io(&dir, e))?;
        Ok(Staging {
            tag: tag.clone(),
            dir,
            target,
            committed: false,
            replace: false,
            owner: self.owner,
        })
    }

    /// Like `begin`, but publishing replaces an existing snapshot of the same tag in one atomic
    /// exchange (for `--force` re-installs): readers see the old or the new one, never neither.
    pub fn begin_replace(&self, tag: &Tag) -> Result<Staging> {
        let dir = self.snapshots_dir().join(format!(
            "{STAGING_PREFIX}{}.{}.{}",
            std::process::id(),
            unique_suffix(),
            tag
        ));
        fs::create_dir(&dir).map_err(|e| StoreError::io(&dir, e))?;
        Ok(Staging {
            tag: tag.clone(),
            dir,
            target: self.snapshot_dir(tag),
            committed: false,
            replace: true,
            owner: self.owner,
        })
    }

    pub fn get(&self, tag: &Tag) -> Result<Snapshot> {
        let dir = self.snapshot_dir(tag);
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.exists() {
            return Err(StoreError::NotFound(tag.clone()));
        }
        let manifest = Manifest::load(&manifest_path)?;
        if manifest.tag != *tag {
            return Err(StoreError::Manifest {
                path: manifest_path,
                msg: format!(
                    "records tag {:?} but lives under {:?}",
                    manifest.tag.as_str(),
                    tag.as_str()
                ),
            });
        }
        Ok(Snapshot { dir, manifest })
    }

    /// Every snapshot, sorted by tag; an unreadable one is returned as its error so one bad
    /// directory does not hide the rest.
    pub fn list(&self) -> Result<Vec<Result<Snapshot>>> {
        let dir = self.snapshots_dir();
        let mut tags = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            // Directories that are not tags (made by hand) are not snapshots.
            if let Ok(tag) = Tag::parse(name) {
                tags.push(tag);
            }
        }
        tags.sort();
        Ok(tags.iter().map(|t| self.get(t)).collect())
    }

    /// Snapshots whose `parent_tag` is `tag`.
    pub fn dependents(&self, tag: &Tag) -> Result<Vec<Tag>> {
        Ok(self.children_index()?.remove(tag).unwrap_or_default())
    }

    fn children_index(&self) -> Result<HashMap<Tag, Vec<Tag>>> {
        let mut index: HashMap<Tag, Vec<Tag>> = HashMap::new();
        for snap in self.list()?.into_iter().flatten() {
            if let Some(parent) = snap.manifest.parent() {
                index
                    .entry(parent)
                    .or_default()
                    .push(snap.manifest.tag.clone());
            }
        }
        Ok(index)
    }

    /// Re-hashes every file against the manifest. An empty result means the snapshot is intact.
    pub fn verify(&self, tag: &Tag) -> Result<Vec<FileProblem>> {
        let snap = self.get(tag)?;
        Ok(verify_dir(&snap.dir, &snap.manifest))
    }

    /// Removes snapshots; returns every tag removed (with `Cascade`, descendants included).
    pub fn remove(&self, tags: &[Tag], mode: RemoveMode) -> Result<Vec<Tag>> {
        for tag in tags {
            if !self.snapshot_dir(tag).exists() {
                return Err(StoreError::NotFound(tag.clone()));
            }
        }
        let children = self.children_index()?;
        let mut doomed: BTreeSet<Tag> = tags.iter().cloned().collect();
        match mode {
            RemoveMode::Refuse => {
                for tag in tags {
                    let outside: Vec<Tag> = children
                        .get(tag)
                        .into_iter()
                        .flatten()
                        .filter(|c| !doomed.contains(*c))
                        .cloned()
                        .collect();
                    if !outside.is_empty() {
                        return Err(StoreError::HasDependents {
                            tag: tag.clone(),
                            dependents: outside,
                        });
                    }
                }
            }
            RemoveMode::Orphan => {}
            RemoveMode::Cascade => {
                let mut queue: Vec<Tag> = tags.to_vec();
                while let Some(t) = queue.pop() {
                    for c in children.get(&t).into_iter().flatten() {
                        if doomed.insert(c.clone()) {
                            queue.push(c.clone());
                        }
                    }
                }
            }
        }
        for tag in &doomed {
            self.remove_one(tag)?;
        }
        Ok(doomed.into_iter().collect())
    }

    fn remove_one(&self, tag: &Tag) -> Result<()> {
        let dir = self.snapshot_dir(tag);
        let trash = self.snapshots_dir().join(format!(
            "{TRASH_PREFIX}{}.{}.{}",
            std::process::id(),
            unique_suffix(),
            tag
        ));
        fs::rename(&dir, &trash).map_err(|e| StoreError::io(&dir, e))?;
        fs::remove_dir_all(&trash).map_err(|e| StoreError::io(&trash, e))
    }

    /// Removes staging / trash directories whose writer process is gone.
    fn sweep_abandoned(&self) {
        for w in self.unfinished_writes() {
            if !w.writer_alive {
                let _ = fs::remove_dir_all(&w.path);
            }
        }
    }

    /// Staging and trash directories: snapshots being written or removed right now, or left
    /// by a writer that died (those are swept whenever a store is opened).
    pub fn unfinished_writes(&self) -> Vec<UnfinishedWrite> {
        let Ok(entries) = fs::read_dir(self.snapshots_dir()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let rest = name
                    .strip_prefix(STAGING_PREFIX)
                    .or_else(|| name.strip_prefix(TRASH_PREFIX))?;
                let pid = rest.split('.').next()?.parse::<u32>().ok()?;
                Some(UnfinishedWrite {
                    path: entry.path(),
                    writer: pid,
                    writer_alive: Path::new(&format!("/proc/{pid}")).exists(),
                })
            })
            .collect()
    }
}

/// A snapshot directory on its way in or out of the store (see [`Store::unfinished_writes`]).
#[derive(Debug, Clone)]
pub struct UnfinishedWrite {
    pub path: PathBuf,
    /// The pid of the process writing it.
    pub writer: u32,
    pub writer_alive: bool,
}

impl Snapshot {
    pub fn tag(&self) -> &Tag {
        &self.manifest.tag
    }

    /// sha256 (hex) of the snapshot's manifest.toml: its identity, which a diff link records
    /// for its parent (the manifest lists the sha256 of every file, so this covers them all).
    pub fn manifest_sha256(&self) -> Result<String> {
        let path = self.dir.join(MANIFEST_FILE);
        let bytes = fs::read(&path).map_err(|e| StoreError::io(&path, e))?;
        Ok(crate::hash::sha256_hex(&bytes))
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Bytes the snapshot's files occupy on disk (holes excluded).
    pub fn disk_usage(&self) -> u64 {
        let mut total = disk_usage(&self.dir.join(MANIFEST_FILE)).unwrap_or(0);
        for f in &self.manifest.files {
            total += disk_usage(&self.dir.join(&f.name)).unwrap_or(0);
        }
        total
    }
}

impl Staging {
    pub fn tag(&self) -> &Tag {
        &self.tag
    }

    /// The directory to write snapshot files into.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Hashes every file written into the staging directory, writes the manifest and publishes.
    pub fn commit(self, meta: SnapshotMeta) -> Result<Snapshot> {
        let names = self.file_names()?;
        let paths: Vec<PathBuf> = names.iter().map(|n| self.dir.join(n)).collect();
        let mut files = Vec::with_capacity(names.len());
        for ((name, path), digest) in names.iter().zip(&paths).zip(hash_files(&paths)) {
            let digest = digest.map_err(|e| StoreError::io(path, e))?;
            files.push(FileEntry {
                name: name.clone(),
                size: digest.size,
                sha256: digest.sha256,
            });
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            tag: self.tag.clone(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            forkd_version: env!("CARGO_PKG_VERSION").to_string(),
            memory_mib: meta.memory_mib,
            vcpus: meta.vcpus,
            description: meta.description,
            base_image: meta.base_image,
            kernel: meta.kernel,
            parent_tag: meta.parent_tag.map(String::from).unwrap_or_default(),
            parent_sha256: meta.parent_sha256,
            name: String::new(),
            version: String::new(),
            parent_package: String::new(),
            parent_content_sha256: String::new(),
            net: meta.net,
            files,
        };
        self.publish(manifest)
    }

    /// Publishes with a manifest the caller built from hashes it computed while writing the
    /// files (e.g. while unpacking a pack). Sizes are re-checked here; the hashes are trusted.
    pub fn commit_prehashed(self, mut manifest: Manifest) -> Result<Snapshot> {
        manifest.tag = self.tag.clone();
        let names: BTreeSet<String> = self.file_names()?.into_iter().collect();
        let listed: BTreeSet<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
        if names != listed {
            return Err(StoreError::BadContent {
                path: self.dir.clone(),
                msg: format!("files {names:?} do not match the manifest's {listed:?}"),
            });
        }
        for f in &manifest.files {
            let path = self.dir.join(&f.name);
            let size = fs::metadata(&path)
                .map_err(|e| StoreError::io(&path, e))?
                .len();
            if size != f.size {
                return Err(StoreError::BadContent {
                    path,
                    msg: format!("size {size} bytes, manifest says {}", f.size),
                });
            }
        }
        self.publish(manifest)
    }

    /// Regular files in the staging directory, sorted. Anything else is refused.
    fn file_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| StoreError::io(&self.dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(&self.dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == MANIFEST_FILE {
                continue;
            }
            let kind = entry.file_type().map_err(|e| StoreError::io(&path, e))?;
            if !kind.is_file() {
                return Err(StoreError::BadContent {
                    path,
                    msg: "not a regular file".into(),
                });
            }
            check_file_name(&name).map_err(|e| StoreError::BadContent {
                path,
                msg: e.to_string(),
            })?;
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    fn publish(mut self, manifest: Manifest) -> Result<Snapshot> {
        let manifest_path = self.dir.join(MANIFEST_FILE);
        fs::write(&manifest_path, manifest.to_toml())
            .map_err(|e| StoreError::io(&manifest_path, e))?;
        for f in &manifest.files {
            fsync(&self.dir.join(&f.name))?;
        }
        fsync(&manifest_path)?;
        if let Some(o) = self.owner {
            owner::give(&self.dir, o).map_err(|e| StoreError::io(&self.dir, e))?;
        }
        fsync(&self.dir)?;
        if self.replace && self.target.exists() {
            rename_exchange(&self.dir, &self.target)
                .map_err(|e| StoreError::io(&self.target, e))?;
            self.committed = true;
            // The old snapshot now sits at the staging path.
            let _ = fs::remove_dir_all(&self.dir);
            let parent = self.target.parent().expect("snapshot dir has a parent");
            fsync(parent)?;
            return Ok(Snapshot {
                dir: self.target.clone(),
                manifest,
            });
        }
        rename_noreplace(&self.dir, &self.target).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => {
                StoreError::AlreadyExists(self.tag.clone())
            }
            _ => StoreError::io(&self.target, e),
        })?;
        self.committed = true;
        let parent = self.target.parent().expect("snapshot dir has a parent");
        fsync(parent)?;
        Ok(Snapshot {
            dir: self.target.clone(),
            manifest,
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Checks `dir`'s files against `manifest`: sizes first (cheap), then hashes in parallel.
pub fn verify_dir(dir: &Path, manifest: &Manifest) -> Vec<FileProblem> {
    let mut problems = Vec::new();
    let mut to_hash = Vec::new();
    for f in &manifest.files {
        let path = dir.join(&f.name);
        match fs::metadata(&path) {
            Err(_) => problems.push(FileProblem::Missing {
                name: f.name.clone(),
            }),
            Ok(m) if m.len() != f.size => problems.push(FileProblem::SizeMismatch {
                name: f.name.clone(),
                expected: f.size,
                actual: m.len(),
            }),
            Ok(_) => to_hash.push((f, path)),
        }
    }
    let paths: Vec<PathBuf> = to_hash.iter().map(|(_, p)| p.clone()).collect();
    for ((f, _), digest) in to_hash.iter().zip(hash_files(&paths)) {
        match digest {
            Err(e) => problems.push(FileProblem::Unreadable {
                name: f.name.clone(),
                error: e.to_string(),
            }),
            Ok(d) if d.sha256 != f.sha256 => problems.push(FileProblem::HashMismatch {
                name: f.name.clone(),
                expected: f.sha256.clone(),
                actual: d.sha256,
            }),
            Ok(_) => {}
        }
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != MANIFEST_FILE && manifest.file(&name).is_none() {
                problems.push(FileProblem::Unlisted { name });
            }
        }
    }
    problems
}

/// Hashes one file into a manifest entry.
pub fn file_entry(path: &Path, name: &str) -> Result<FileEntry> {
    let d = hash_file(path).map_err(|e| StoreError::io(path, e))?;
    Ok(FileEntry {
        name: name.to_string(),
        size: d.size,
        sha256: d.sha256,
    })
}

fn fsync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io(path, e))
}

/// Atomically swaps two existing paths (renameat2 RENAME_EXCHANGE).
pub fn rename_exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    renameat2(a, b, libc::RENAME_EXCHANGE)
}

/// rename(2) that fails with EEXIST instead of replacing (or merging into an empty directory).
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    renameat2(from, to, libc::RENAME_NOREPLACE)
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: renameat2(2) only reads the two NUL-terminated paths during the call, and both
    // pointers come from CStrings that live until after it; AT_FDCWD needs no descriptor.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{nanos:x}{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}
