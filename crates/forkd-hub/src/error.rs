use std::path::{Path, PathBuf};

use forkd_store::StoreError;

/// Everything the Hub can refuse or fail at. Each variant renders as one line naming the input.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A pack whose content is malformed or hostile.
    #[error("pack {origin}: {msg}")]
    BadPack { origin: String, msg: String },
    /// A registry.json that cannot be used.
    #[error("registry {origin}: {msg}")]
    Registry { origin: String, msg: String },
    /// A package reference that does not resolve.
    #[error("{0}")]
    NotFound(String),
    /// HTTP status or transport failure.
    #[error("{url}: {msg}")]
    Http {
        url: String,
        msg: String,
        transient: bool,
    },
    /// A chain pack whose parent is not installed here.
    #[error("pack {origin}: is a diff of {package} (tag {tag:?}), which is not installed here; pull {package} first")]
    MissingParent {
        origin: String,
        package: String,
        tag: String,
    },
    #[error("signature: {0}")]
    Signature(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;

impl HubError {
    pub fn io(path: &Path, source: std::io::Error) -> HubError {
        HubError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn bad_pack(origin: &str, msg: impl Into<String>) -> HubError {
        HubError::BadPack {
            origin: origin.to_string(),
            msg: msg.into(),
        }
    }

    pub fn registry(origin: &str, msg: impl Into<String>) -> HubError {
        HubError::Registry {
            origin: origin.to_string(),
            msg: msg.into(),
        }
    }

    /// Whether retrying the same request later might succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HubError::Http {
                transient: true,
                ..
            }
        )
    }
}
