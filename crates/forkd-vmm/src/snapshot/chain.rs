//! Chains of diff snapshots: the link a diff snapshot records to its parent, and the walk from
//! a snapshot up to its root that checks every link and collects the memory layers a restore
//! maps (the root's memory.bin, then each diff's pages over it).
//!
//! The walk reads files only (manifests, each ancestor's vmstate.json), never KVM.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use forkd_store::{Store, StoreError, Tag, TagError, MEMORY_FILE, VMSTATE_FILE};
use serde::{Deserialize, Serialize};

use super::memory_file::{Extent, RegionSpec};
use super::vmstate_file::{check_version, VmStateError};

/// Longest chain of diff snapshots followed (also stops a cycle of hand-edited manifests).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// A diff snapshot's link to its parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    pub parent_tag: String,
    /// sha256 of the parent's manifest.toml when this link was created: the manifest lists
    /// the sha256 of every parent file, so a replaced parent shows up here without re-hashing
    /// its memory.
    pub parent_manifest_sha256: String,
    /// The parent's [`forkd_store::Manifest::content_sha256`]: the parent is still the one
    /// this link was made against when its files are, even if its manifest changed (installed
    /// from a pack under another package name, re-tagged). Empty in links of older forkd.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_content_sha256: String,
    /// The pages (memory.bin byte ranges) this link stores; everything else is the parent's.
    pub extents: Vec<Extent>,
}

/// What a chain walk needs from an ancestor's vmstate.json.
#[derive(Debug, Deserialize)]
pub struct ChainView {
    pub memory: Vec<RegionSpec>,
    pub chain: Option<ChainLink>,
}

/// One memory.bin of a chain and the pages it provides (None: all of them, the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayer {
    pub path: PathBuf,
    pub extents: Option<Vec<Extent>>,
}

/// A snapshot's chain, every link checked.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Parent, grandparent, ... up to the root (empty for a self-contained snapshot).
    pub ancestors: Vec<Tag>,
    /// The memory files to map, root first; the last is the snapshot's own.
    pub layers: Vec<MemoryLayer>,
}

/// Why a snapshot's chain cannot be followed. Each names the link at fault.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("snapshot {tag:?}: broken chain: its parent {parent:?} does not exist")]
    MissingParent { tag: Tag, parent: String },
    #[error("snapshot {tag:?}: broken chain: parent {parent:?} was replaced after this snapshot was taken (its manifest sha256 is {actual}, the link recorded {expected})")]
    ParentReplaced {
        tag: Tag,
        parent: Tag,
        expected: String,
        actual: String,
    },
    #[error("snapshot {tag:?}: broken chain: its parent tag {parent:?} is not a valid tag")]
    BadParentTag {
        tag: Tag,
        parent: String,
        #[source]
        source: TagError,
    },
    #[error("snapshot {tag:?}: broken chain: {parent:?} appears twice (a cycle)")]
    Cycle { tag: Tag, parent: Tag },
    #[error("snapshot {tag:?}: broken chain: deeper than {max} links")]
    TooDeep { tag: Tag, max: usize },
    #[error("snapshot {tag:?}: broken chain: its manifest lists no {VMSTATE_FILE}")]
    NoVmState { tag: Tag },
    #[error("snapshot {tag:?}: broken chain: parent {parent:?} has a different memory layout")]
    LayoutMismatch { tag: Tag, parent: Tag },
    #[error("snapshot {tag:?}")]
    VmState {
        tag: Tag,
        #[source]
        source: VmStateError,
    },
    #[error(transparent)]
    Store(StoreError),
}

/// Reads an ancestor's vmstate.json for a chain walk. The file must hash to `sha256`, the
/// entry in the ancestor's manifest (whose own hash the link recorded): the same guarantee as
/// the embedded checksum, without decoding and re-serializing the whole state. Only the
/// memory layout and the ancestor's own link are parsed. A spawn of a deep chain pays this
/// once per link.
pub fn load_chain_view(path: &Path, sha256: &str) -> Result<ChainView, VmStateError> {
    #[derive(Deserialize)]
    struct Partial {
        format_version: u64,
        state: ChainView,
    }
    let display = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| VmStateError::Read {
        path: display.clone(),
        source,
    })?;
    let actual = forkd_store::hash::sha256_hex(&bytes);
    if actual != sha256 {
        return Err(VmStateError::NotAsManifested {
            path: display,
            expected: sha256.to_string(),
            actual,
        });
    }
    let partial: Partial =
        serde_json::from_slice(&bytes).map_err(|source| VmStateError::Malformed {
            path: display.clone(),
            source,
        })?;
    check_version(&display, partial.format_version)?;
    Ok(partial.state)
}

/// Follows `tag`'s chain (its memory layout `memory`, its link `link`, its directory `dir`)
/// up to the root: every parent must exist, be the snapshot the link was made against (its
/// manifest's sha256), have an intact vmstate.json and the same memory layout.
pub fn walk(
    store: &Store,
    tag: &Tag,
    dir: &Path,
    memory: &[RegionSpec],
    link: Option<&ChainLink>,
) -> Result<Chain, ChainError> {
    walk_limited(store, tag, dir, memory, link, MAX_CHAIN_DEPTH)
}

pub(super) fn walk_limited(
    store: &Store,
    tag: &Tag,
    dir: &Path,
    memory: &[RegionSpec],
    link: Option<&ChainLink>,
    max_depth: usize,
) -> Result<Chain, ChainError> {
    // Collected top first, reversed at the end.
    let mut layers = vec![MemoryLayer {
        path: dir.join(MEMORY_FILE),
        extents: link.map(|l| l.extents.clone()),
    }];
    let mut ancestors = Vec::new();
    let mut seen: HashSet<Tag> = HashSet::from([tag.clone()]);
    let mut link = link.cloned();
    let mut child = tag.clone();
    while let Some(l) = link {
        if ancestors.len() >= max_depth {
            return Err(ChainError::TooDeep {
                tag: tag.clone(),
                max: max_depth,
            });
        }
        let parent = Tag::parse(&l.parent_tag).map_err(|source| ChainError::BadParentTag {
            tag: child.clone(),
            parent: l.parent_tag.clone(),
            source,
        })?;
        if !seen.insert(parent.clone()) {
            return Err(ChainError::Cycle {
                tag: tag.clone(),
                parent,
            });
        }
        let psnap = match store.get(&parent) {
            Ok(p) => p,
            Err(StoreError::NotFound(_)) => {
                return Err(ChainError::MissingParent {
                    tag: child,
                    parent: l.parent_tag,
                })
            }
            Err(e) => return Err(ChainError::Store(e)),
        };
        let actual = psnap.manifest_sha256().map_err(ChainError::Store)?;
        let same_content = !l.parent_content_sha256.is_empty()
            && psnap.manifest.content_sha256() == l.parent_content_sha256;
        if actual != l.parent_manifest_sha256 && !same_content {
            return Err(ChainError::ParentReplaced {
                tag: child,
                parent,
                expected: l.parent_manifest_sha256,
                actual,
            });
        }
        let Some(entry) = psnap.manifest.file(VMSTATE_FILE) else {
            return Err(ChainError::NoVmState { tag: parent });
        };
        let view =
            load_chain_view(&psnap.dir.join(VMSTATE_FILE), &entry.sha256).map_err(|source| {
                ChainError::VmState {
                    tag: parent.clone(),
                    source,
                }
            })?;
        if view.memory != memory {
            return Err(ChainError::LayoutMismatch { tag: child, parent });
        }
        layers.push(MemoryLayer {
            path: psnap.dir.join(MEMORY_FILE),
            extents: view.chain.as_ref().map(|c| c.extents.clone()),
        });
        ancestors.push(parent.clone());
        child = parent;
        link = view.chain;
    }
    layers.reverse();
    Ok(Chain { ancestors, layers })
}
