use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong fetching a kernel or building an image. Messages are one line
/// and name the input that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{tool}` not found on PATH: {why} (install the Debian package {package})")]
    ToolMissing {
        tool: String,
        package: String,
        why: String,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error(
        "apt knows no package {package} (run `apt-get update`, or add a Debian source that has it)"
    )]
    AptUnknownPackage { package: String },
    #[error("apt metadata for {package} is unusable: {why}")]
    AptMetadata { package: String, why: String },
    #[error("{path}: not a usable bzImage")]
    BzImage {
        path: PathBuf,
        #[source]
        source: crate::bzimage::BzImageError,
    },
    #[error("kernel package {package}: {why}")]
    KernelPackage { package: String, why: String },
    #[error("kernel module {module}: {why}")]
    Module { module: String, why: String },
    #[error("{path}: {why}")]
    Recipe { path: PathBuf, why: String },
    #[error("image build for recipe {recipe}: {why}")]
    Build { recipe: String, why: String },
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Adds the path to an io::Result's error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
