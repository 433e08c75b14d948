use std::path::{Path, PathBuf};

use crate::tag::{Tag, TagError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error("snapshot {0:?} already exists (remove it with `forkd rmi {0}` or pick another tag)")]
    AlreadyExists(Tag),
    #[error("no snapshot tagged {0:?} (see `forkd images`)")]
    NotFound(Tag),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: manifest format_version {found} is newer than this forkd supports ({supported}); upgrade forkd", path.display())]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{}: malformed manifest: {msg}", path.display())]
    Manifest { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    BadContent { path: PathBuf, msg: String },
    #[error("cannot remove {tag:?}: {} name it as parent_tag (--force orphans them, --cascade removes them too)", list(dependents))]
    HasDependents { tag: Tag, dependents: Vec<Tag> },
}

fn list(tags: &[Tag]) -> String {
    let names: Vec<String> = tags.iter().map(|t| format!("{:?}", t.as_str())).collect();
    let noun = if tags.len() == 1 {
        "snapshot"
    } else {
        "snapshots"
    };
    format!("{noun} {}", names.join(", "))
}

impl StoreError {
    pub fn io(path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
