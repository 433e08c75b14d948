//! The listeners and the process's life: bind (refusing what is unsafe or already taken),
//! serve until SIGTERM or SIGINT, reopen the audit log on SIGHUP, remove the socket on the way
//! out.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request};
use axum::middleware::{self, Next};
use axum::serve::IncomingStream;
use axum::Router;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::api::{self, AppState, Client};
use crate::audit::AuditLog;
use crate::config::DaemonConfig;
use crate::tls::{TlsError, TlsListener};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("data directory {}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: forkd_store::StoreError,
    },
    #[error("socket {}: another forkd serve is answering there", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("socket {}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to listen on {0} without a token: anyone who reaches it could drive sandboxes (give a token, or listen on a loopback address)")]
    NoToken(SocketAddr),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log {}", path.display())]
    AuditLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox registry")]
    Registry {
        #[source]
        source: crate::registry::RegistryError,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("TLS needs a TCP listener to serve it on")]
    TlsWithoutListen,
    #[error("E2B access-token secret {}", path.display())]
    E2bSecret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// Binds every listener, then serves until SIGTERM or SIGINT. `ready` is called once the
/// listeners are bound (with what they are), before the first request is served.
pub fn serve(config: DaemonConfig, ready: impl FnOnce(&[String])) -> Result<(), DaemonError> {
    // The certificate and key are checked before anything is opened or bound: a bad file
    // leaves nothing behind.
    let tls = match (&config.tls, config.listen) {
        (Some(_), None) => return Err(DaemonError::TlsWithoutListen),
        (Some(files), Some(_)) => Some(files.load()?),
        (None, _) => None,
    };
    let store =
        forkd_store::Store::open(&config.data_dir).map_err(|source| DaemonError::Store {
            path: config.data_dir.clone(),
            source,
        })?;
    if let Some(addr) = config.listen {
        if config.token.is_none() && !addr.ip().is_loopback() {
            return Err(DaemonError::NoToken(addr));
        }
    }
    let audit = match &config.audit_log {
        Some(path) => Some(Arc::new(AuditLog::open(path.clone()).map_err(
            |source| DaemonError::AuditLog {
                path: path.clone(),
                source,
            },
        )?)),
        None => None,
    };
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let store = Arc::new(store);
    let registry = crate::registry::Registry::open(
        store.clone(),
        config.state_dir.clone(),
        config.forkd_exe.clone(),
        config.max_sandboxes,
        config.warm,
    )
    .map_err(|source| DaemonError::Registry { source })?
    .with_jail(config.jail);
    let state = Arc::new(AppState {
        store,
        jobs: crate::jobs::Jobs::default(),
        registry: Arc::new(registry),
        metrics: crate::api::metrics::Metrics::default(),
        agent_timeout: config.agent_timeout,
    });
    let e2b_secret =
        crate::e2b::load_secret(&config.state_dir).map_err(|source| DaemonError::E2bSecret {
            path: config.state_dir.join("e2b-secret"),
            source,
        })?;
    runtime.block_on(async move {
        let unix = bind_unix(&config.socket)?;
        let _socket_file = RemoveOnDrop(config.socket.clone());
        let tcp = match config.listen {
            Some(addr) => Some((
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Listen { addr, source })?,
                addr,
            )),
            None => None,
        };
        let mut listening = vec![format!("unix:{}", config.socket.display())];
        if let Some((listener, addr)) = &tcp {
            let bound = listener.local_addr().unwrap_or(*addr);
            let scheme = if tls.is_some() { "https" } else { "http" };
            listening.push(format!("{scheme}://{bound}"));
        }
        ready(&listening);
        tokio::spawn(reap_expired(state.registry.clone()));
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(stop_on_signals(stop_tx, audit.clone()));
        let audit_for_e2b = audit.clone();
        let unix_router = api::router(state.clone(), None, audit.clone(), config.max_body_bytes);
        let unix_server =
            axum::serve(unix, unix_router).with_graceful_shutdown(stopped(stop_rx.clone()));
        match tcp {
            Some((listener, addr)) => {
                let e2b = crate::e2b::E2b::new(state.clone(), config.token.as_deref(), e2b_secret);
                let api = api::router(state, config.token.as_deref(), audit, config.max_body_bytes);
                let router = crate::e2b::with_e2b(api, Arc::new(e2b), audit_for_e2b)
                    .layer(middleware::from_fn(tag_tcp_client))
                    .into_make_service_with_connect_info::<TcpPeer>();
                let stop = stopped(stop_rx);
                let tcp_server = async move {
                    match tls {
                        Some(tls) => {
                            let listener = TlsListener::new(listener, tls)
                                .map_err(|source| DaemonError::Listen { addr, source })?;
                            axum::serve(listener, router)
                                .with_graceful_shutdown(stop)
                                .await
                        }
                        None => {
                            axum::serve(listener, router)
                                .with_graceful_shutdown(stop)
                                .await
                        }
                    }
                    .map_err(|source| DaemonError::Listen { addr, source })
                };
                let (a, b) = tokio::join!(unix_server, tcp_server);
                a.map_err(|source| DaemonError::Socket {
                    path: config.socket.clone(),
                    source,
                })
                .and(b)
            }
            None => unix_server.await.map_err(|source| DaemonError::Socket {
                path: config.socket.clone(),
                source,
            }),
        }
    })
}

/// Each exec or file transfer in flight holds a client connection and an agent connection:
/// the default soft limit of 1024 open files would refuse the 500th concurrent one, so the
/// daemon takes what the hard limit allows (as dockerd and systemd's services do).
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own; setrlimit reads it.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if !raised {
        tracing::warn!(
            "cannot raise the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Binds the Unix socket in a directory private to this user; a stale socket file (nobody
/// answering) is replaced, a live one is refused.
fn bind_unix(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    // Only this user may connect: the socket is the daemon's whole access control.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// The peer of a TCP connection, plain or TLS.
#[derive(Debug, Clone, Copy)]
struct TcpPeer(SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for TcpPeer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> TcpPeer {
        TcpPeer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for TcpPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> TcpPeer {
        TcpPeer(*stream.remote_addr())
    }
}

/// Marks requests that came over TCP with their peer, for authentication and the audit log.
async fn tag_tcp_client(
    ConnectInfo(TcpPeer(peer)): ConnectInfo<TcpPeer>,
    mut request: Request,
    next: Next,
) -> axum::response::Response {
    request.extensions_mut().insert(Client::Tcp(peer));
    next.run(request).await
}

/// SIGTERM or SIGINT stops the daemon (gracefully: requests in flight finish); SIGHUP reopens
/// the audit log.
async fn stop_on_signals(stop: watch::Sender<bool>, audit: Option<Arc<AuditLog>>) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Some(audit) = &audit {
                    audit.reopen();
                }
            }
        }
    }
    let _ = stop.send(true);
}

/// Kills sandboxes past their timeout, once a second.
async fn reap_expired(registry: Arc<crate::registry::Registry>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let registry = registry.clone();
        let reaped = tokio::task::spawn_blocking(move || registry.reap_expired()).await;
        if let Ok(ids) = reaped {
            for id in ids {
                tracing::info!("sandbox {id}: timed out, killed and removed");
            }
        }
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Routers are built per listener; re-exported for tests that serve one in-process.
pub fn unix_router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    api::router(state, None, None, max_body_bytes)
}
