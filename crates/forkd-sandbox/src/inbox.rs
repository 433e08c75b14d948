//! BRANCH for a child that runs as an unprivileged user.
//!
//! A jailed child started as root runs as the jail's user, which cannot write the store (its
//! directories belong to forkd's user) and should not: a child that could would be able to
//! rewrite any snapshot in it. So its parent (the zygote, still root) makes a directory
//! owned by that user in the child's run directory for each BRANCH, and the child writes its
//! snapshot there as into a store of its own (staged, hashed, a manifest, published inside
//! that directory). The parent then adopts it: only regular files of the snapshot's manifest
//! with one link each are taken, given to the store's owner, read-only for everyone else, and
//! published into the store under the tag the parent asked for, by the store's own atomic
//! commit. The child never sees the store writable.
//!
//! What this does not cover: a child can keep a file it wrote open and write into it after the
//! adoption (the inode is the same); it can only ever change the snapshot it branched that way,
//! never another one of the store.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use forkd_store::{Manifest, Snapshot, Store, StoreError, Tag, MANIFEST_FILE};

use crate::pool::{Pool, PoolError, SnapshotDone, SnapshotRequest, StopReport};

/// Where a child that cannot write the store snapshots itself.
#[derive(Debug, Clone)]
pub struct Inbox {
    store: Store,
    /// The child's user and group.
    user: (u32, u32),
}

/// Why a BRANCH through an inbox failed.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("making the BRANCH directory {}", path.display())]
    Make {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Child(#[from] PoolError),
    #[error("adopting the child's snapshot {tag} from {}: {msg}", dir.display())]
    Refused {
        tag: String,
        dir: PathBuf,
        msg: String,
    },
    #[error("adopting the child's snapshot {tag}")]
    Store {
        tag: Tag,
        #[source]
        source: StoreError,
    },
}

impl Inbox {
    pub fn new(store: Store, user: (u32, u32)) -> Inbox {
        Inbox { store, user }
    }

    /// BRANCH (or pause) of child `index` of `pool`: it writes into a directory made under
    /// `under` (a directory in its view, e.g. its run directory), which is then adopted into
    /// the store and removed, whatever happened.
    pub fn snapshot(
        &self,
        pool: &mut Pool,
        index: usize,
        request: &SnapshotRequest,
        under: &Path,
        timeout: std::time::Duration,
    ) -> Result<(SnapshotDone, Option<StopReport>), InboxError> {
        let tag = Tag::parse(&request.tag).map_err(|e| InboxError::Refused {
            tag: request.tag.clone(),
            dir: under.to_path_buf(),
            msg: e.to_string(),
        })?;
        let dir = self.make(under)?;
        let request = SnapshotRequest {
            inbox: Some(dir.clone()),
            ..request.clone()
        };
        let result = pool
            .snapshot(index, &request, timeout)
            .map_err(InboxError::from)
            .and_then(|done| self.adopt(&dir, &tag).map(|_| done));
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    /// A new directory under `under` that only the child's user can write.
    fn make(&self, under: &Path) -> Result<PathBuf, InboxError> {
        let path = under.join(format!(
            ".branch.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        let made = std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .and_then(|()| std::os::unix::fs::chown(&path, Some(self.user.0), Some(self.user.1)));
        made.map_err(|source| InboxError::Make {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Moves the snapshot `tag` the child published in `dir` into the store.
    pub fn adopt(&self, dir: &Path, tag: &Tag) -> Result<Snapshot, InboxError> {
        let src = dir.join("snapshots").join(tag.as_str());
        let refused = |msg: String| InboxError::Refused {
            tag: tag.to_string(),
            dir: src.clone(),
            msg,
        };
        let meta = std::fs::symlink_metadata(&src).map_err(|e| refused(e.to_string()))?;
        if !meta.is_dir() {
            return Err(refused("not a directory".into()));
        }
        let manifest_path = src.join(MANIFEST_FILE);
        regular_single_link(&manifest_path).map_err(refused)?;
        let manifest = Manifest::load(&manifest_path).map_err(|e| refused(e.to_string()))?;
        if manifest.tag != *tag {
            return Err(refused(format!("its manifest is of {}", manifest.tag)));
        }
        let store_err = |source| InboxError::Store {
            tag: tag.clone(),
            source,
        };
        let staging = self.store.begin(tag).map_err(store_err)?;
        // SAFETY: geteuid and getegid take no arguments and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        for file in &manifest.files {
            let from = src.join(&file.name);
            regular_single_link(&from).map_err(refused)?;
            let to = staging.path().join(&file.name);
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                    std::fs::copy(&from, &to).map_err(|e| refused(e.to_string()))?;
                }
                Err(e) => return Err(refused(e.to_string())),
            }
            std::os::unix::fs::lchown(&to, Some(uid), Some(gid))
                .and_then(|()| {
                    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))
                })
                .map_err(|e| refused(e.to_string()))?;
        }
        staging.commit_prehashed(manifest).map_err(store_err)
    }
}

/// `path` is a regular file (not a link to one) with no other name.
fn regular_single_link(path: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(format!(
            "{}: not a regular file with a single link",
            path.display()
        ));
    }
    Ok(())
}
