//! HTTPS for the TCP listener: the certificate and key loaded into a rustls server config
//! (checked before anything is bound, so a bad file leaves nothing behind), and a listener
//! that completes each TLS handshake off the accept path, so one slow or broken client
//! delays and stops no one else.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which of the two files a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Certificate,
    Key,
}

impl std::fmt::Display for TlsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsFile::Certificate => "TLS certificate",
            TlsFile::Key => "TLS key",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{file} {}", path.display())]
    Read {
        file: TlsFile,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file} {}: not a PEM file", path.display())]
    NotPem { file: TlsFile, path: PathBuf },
    #[error("{file} {}: malformed PEM ({problem})", path.display())]
    BadPem {
        file: TlsFile,
        path: PathBuf,
        problem: String,
    },
    #[error("TLS certificate {}: no certificate in it", .0.display())]
    NoCertificate(PathBuf),
    #[error("TLS key {}: no private key in it", .0.display())]
    NoKey(PathBuf),
    #[error("TLS key {} does not match the certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS certificate {} with key {}", cert.display(), key.display())]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The certificate chain (PEM, leaf first) and its private key (PEM: PKCS#8, PKCS#1 or SEC1).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads both files and builds the server config, with the ring provider and rustls's
    /// safe default protocol versions. rustls checks that the key belongs to the certificate.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let certs: Vec<CertificateDer<'static>> = read_sections(TlsFile::Certificate, &self.cert)?
            .into_iter()
            .filter(|(kind, _)| *kind == SectionKind::Certificate)
            .map(|(_, der)| CertificateDer::from(der))
            .collect();
        if certs.is_empty() {
            return Err(TlsError::NoCertificate(self.cert.clone()));
        }
        let key = read_sections(TlsFile::Key, &self.key)?
            .into_iter()
            .find_map(|(kind, der)| match kind {
                SectionKind::PrivateKey => Some(PrivateKeyDer::Pkcs8(der.into())),
                SectionKind::RsaPrivateKey => Some(PrivateKeyDer::Pkcs1(der.into())),
                SectionKind::EcPrivateKey => Some(PrivateKeyDer::Sec1(der.into())),
                _ => None,
            })
            .ok_or_else(|| TlsError::NoKey(self.key.clone()))?;
        let config_error = |source| match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                }
            }
            source => TlsError::Config {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            },
        };
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(config_error)?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(config_error)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Every PEM section of the file that rustls knows, in order.
fn read_sections(file: TlsFile, path: &Path) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        file,
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = bytes.as_slice();
    let mut sections = Vec::new();
    loop {
        match pem::from_buf(&mut reader) {
            Ok(Some(section)) => sections.push(section),
            Ok(None) => break,
            Err(e) => {
                return Err(TlsError::BadPem {
                    file,
                    path: path.to_path_buf(),
                    problem: pem_problem(&e),
                })
            }
        }
    }
    // Sections rustls does not know are skipped; a file with no section at all is not PEM.
    if sections.is_empty() && !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            file,
            path: path.to_path_buf(),
        });
    }
    Ok(sections)
}

/// What is wrong with a PEM file, in words (pki-types prints the offending bytes as numbers).
fn pem_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "no END line for its {} section",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "bad BEGIN line {:?}",
            String::from_utf8_lossy(line).trim_end()
        ),
        e => e.to_string(),
    }
}

/// A TCP listener whose connections come out of a finished TLS handshake. A background task
/// accepts TCP connections and handshakes each in its own task; a failed or timed-out
/// handshake is logged at debug and dropped, and the listener goes on.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Must be called within the Tokio runtime (it spawns the accept task).
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx));
        Ok(TlsListener { ready, local })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let accepted = tokio::select! {
            // The server stopped (and dropped the listener): stop accepting.
            _ = ready.closed() => return,
            accepted = tcp.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::error!("accepting a TCP connection: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept task only ends once this receiver is gone, so this cannot happen;
            // if it ever did, never yielding a connection is the honest answer.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
