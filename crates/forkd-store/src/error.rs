use std::path::{Path, PathBuf};

use crate::tag::{Tag, TagError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(Tag),
    #[error("no snapshot tagged {0:?}")]
    NotFound(Tag),
    #[error("{}", path.display())]
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
    #[error("cannot remove {tag:?}: {} name it as parent_tag", list(dependents))]
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

/// `err` and its sources on one line, outermost first (`a: b: c`), as `anyhow` renders `{:#}`:
/// for reports and logs that keep an error as text. Each layer's message names only its own
/// problem, so nothing repeats.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
