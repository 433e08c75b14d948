//! What a daemon is told at start.

use std::net::SocketAddr;
use std::path::PathBuf;

pub use crate::tls::TlsFiles;

/// Largest request body accepted by default (JSON requests; uploads get their own limit).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The data directory (the store) the daemon serves.
    pub data_dir: PathBuf,
    /// The Unix socket to listen on; its directory is created private to this user.
    pub socket: PathBuf,
    /// An optional TCP listener. A non-loopback address requires `token`.
    pub listen: Option<SocketAddr>,
    /// Bearer token TCP clients must present (Unix socket clients are trusted by the socket's
    /// permissions).
    pub token: Option<String>,
    /// Serve the TCP listener as HTTPS with this certificate and key (needs `listen`).
    pub tls: Option<TlsFiles>,
    /// Where each request is logged as one JSON line; reopened on SIGHUP.
    pub audit_log: Option<PathBuf>,
    pub max_body_bytes: usize,
    /// Most sandboxes alive at once; a create beyond it is refused (429).
    pub max_sandboxes: usize,
    /// VM shells each snapshot's zygote keeps prepared ahead of demand (its warm pool).
    pub warm: usize,
    /// How long a request waits for a sandbox's agent to accept a connection and answer (a
    /// guest that is busy, or dead).
    pub agent_timeout: std::time::Duration,
    /// The forkd binary the daemon runs its zygotes with (`forkd __zygote`).
    pub forkd_exe: PathBuf,
    /// The registry's records, zygote sockets and sandboxes' files (default:
    /// `<data_dir>/daemon`).
    pub state_dir: PathBuf,
    /// Each sandbox's VMM process runs jailed (seccomp, no privileges, its own mount view);
    /// `forkd serve --no-jail` turns it off for debugging.
    pub jail: bool,
}

/// How long a request waits for a sandbox's agent, by default.
pub const DEFAULT_AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Shells a zygote keeps prepared, by default.
pub const DEFAULT_WARM: usize = 2;

/// Sandboxes a daemon runs at most, by default.
pub const DEFAULT_MAX_SANDBOXES: usize = 1000;

impl DaemonConfig {
    pub fn new(data_dir: PathBuf) -> DaemonConfig {
        DaemonConfig {
            data_dir: data_dir.clone(),
            socket: default_socket_path(),
            listen: None,
            token: None,
            tls: None,
            audit_log: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_sandboxes: DEFAULT_MAX_SANDBOXES,
            warm: DEFAULT_WARM,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            forkd_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("forkd")),
            state_dir: data_dir.join("daemon"),
            jail: true,
        }
    }
}

/// `$XDG_RUNTIME_DIR/forkd/forkd.sock`; for root without one `/run/forkd/forkd.sock`; else
/// `/tmp/forkd-<uid>/forkd.sock` (created private to the user).
pub fn default_socket_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("forkd").join("forkd.sock");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/forkd/forkd.sock")
    } else {
        std::env::temp_dir()
            .join(format!("forkd-{uid}"))
            .join("forkd.sock")
    }
}
