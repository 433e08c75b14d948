//! Talking to `forkd serve` from the CLI: where it is (`FORKD_HOST`: a socket path or an
//! `http://` or `https://` URL, else the default socket), one request at a time, JSON in and
//! out, and bodies streamed both ways (exec output, file downloads and uploads).

use std::io::Read;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Host {
    Unix(PathBuf),
    Tcp {
        authority: String,
        token: Option<String>,
        /// For an `https://` daemon: how to check its certificate.
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

impl Host {
    /// `FORKD_HOST` (a socket path, `unix:PATH`, `http://HOST:PORT` or `https://HOST:PORT`;
    /// `FORKD_TOKEN` is sent to a TCP one), else the default socket. An https daemon's
    /// certificate is checked against the public roots and `FORKD_CA_CERT` (a PEM file).
    pub fn from_env() -> Result<Host> {
        let Some(value) = std::env::var_os("FORKD_HOST").filter(|v| !v.is_empty()) else {
            return Ok(Host::Unix(forkd_daemon::default_socket_path()));
        };
        let value = value.to_string_lossy().into_owned();
        let (rest, https) = match (value.strip_prefix("http://"), value.strip_prefix("https://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ if value.contains("://") => bail!(
                "FORKD_HOST {value:?}: only a socket path, unix:PATH, http://HOST:PORT or https://HOST:PORT is supported"
            ),
            _ => {
                let path = value.strip_prefix("unix:").unwrap_or(&value);
                return Ok(Host::Unix(PathBuf::from(path)));
            }
        };
        let authority = rest.trim_end_matches('/').to_string();
        if authority.is_empty() || authority.contains('/') {
            bail!("FORKD_HOST {value:?}: expected http(s)://HOST:PORT");
        }
        let token = std::env::var("FORKD_TOKEN").ok().filter(|t| !t.is_empty());
        let tls = match https {
            true => Some(tls_config(
                std::env::var_os("FORKD_CA_CERT").map(PathBuf::from),
            )?),
            false => None,
        };
        Ok(Host::Tcp {
            authority,
            token,
            tls,
        })
    }

    fn describe(&self) -> String {
        match self {
            Host::Unix(path) => format!("unix:{}", path.display()),
            Host::Tcp { authority, tls, .. } => {
                let scheme = if tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{authority}")
            }
        }
    }
}

/// A blocking client: each call runs on a small single-threaded runtime. The connection of a
/// request whose answer was read to its end is kept for the next one.
pub struct DaemonClient {
    host: Host,
    runtime: tokio::runtime::Runtime,
    idle: std::sync::Mutex<Option<SendRequest<ClientBody>>>,
}

/// A response whose body is read as it arrives.
pub struct Streaming<'a> {
    pub status: u16,
    body: Incoming,
    runtime: &'a tokio::runtime::Runtime,
}

impl Streaming<'_> {
    /// The next chunk of the body, or None at its end.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        self.runtime.block_on(async {
            loop {
                match self.body.frame().await {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(anyhow!("the daemon's response broke: {e}")),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        })
    }

    /// This response, when its status is a success; else the daemon's one-line message as
    /// the error.
    pub fn error_for_status(self) -> Result<Self> {
        if self.status < 400 {
            return Ok(self);
        }
        let status = self.status;
        let value: serde_json::Value = serde_json::from_slice(&self.collect()?).unwrap_or_default();
        bail!("{}", error_message(&value, status))
    }

    /// The rest of the body.
    pub fn collect(mut self) -> Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(chunk) = self.next_chunk()? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }
}

impl DaemonClient {
    pub fn from_env() -> Result<DaemonClient> {
        DaemonClient::new(Host::from_env()?)
    }

    pub fn new(host: Host) -> Result<DaemonClient> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the client runtime")?;
        Ok(DaemonClient {
            host,
            runtime,
            idle: std::sync::Mutex::new(None),
        })
    }

    /// Sends a request; the response's body is left to read.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Streaming<'_>> {
        let body = match body {
            Some(value) => RequestBody::Json(value),
            None => RequestBody::Empty,
        };
        self.send_body(method, path, body)
    }

    /// Sends `source`'s bytes as an `application/octet-stream` body, read and sent as the
    /// daemon takes them (any size, never all in memory). `length`, when known, is sent as
    /// Content-Length.
    pub fn send_stream(
        &self,
        method: &str,
        path: &str,
        source: Box<dyn Read + Send>,
        length: Option<u64>,
    ) -> Result<Streaming<'_>> {
        self.send_body(method, path, RequestBody::Stream(source, length))
    }

    fn send_body(&self, method: &str, path: &str, body: RequestBody) -> Result<Streaming<'_>> {
        let response = self.runtime.block_on(self.send_async(method, path, body))?;
        Ok(Streaming {
            status: response.status().as_u16(),
            body: response.into_body(),
            runtime: &self.runtime,
        })
    }

    /// A request whose answer is JSON; an error status becomes the error, with the daemon's
    /// one-line message.
    pub fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let response = self.send(method, path, body)?;
        let status = response.status;
        let bytes = response.collect()?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("the daemon's answer to {method} {path} is not JSON"))?;
        if status >= 400 {
            bail!("{}", error_message(&value, status));
        }
        Ok(value)
    }

    async fn send_async(
        &self,
        method: &str,
        path: &str,
        body: RequestBody,
    ) -> Result<Response<Incoming>> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "forkd");
        if let Host::Tcp {
            token: Some(token), ..
        } = &self.host
        {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            RequestBody::Json(value) => {
                request = request.header("content-type", "application/json");
                full(Bytes::from(serde_json::to_vec(&value)?))
            }
            RequestBody::Empty => full(Bytes::new()),
            RequestBody::Stream(source, length) => {
                request = request.header("content-type", "application/octet-stream");
                if let Some(length) = length {
                    request = request.header("content-length", length);
                }
                ReaderBody::start(source).boxed()
            }
        };
        let request = request.body(body)?;
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut sender = match idle.filter(|s| s.is_ready()) {
            Some(sender) => sender,
            None => self.connect().await?,
        };
        let response = sender
            .send_request(request)
            .await
            .context("talking to the daemon")?;
        *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        Ok(response)
    }

    /// A new HTTP/1 connection to the daemon.
    async fn connect(&self) -> Result<SendRequest<ClientBody>> {
        let not_running = |e: std::io::Error| {
            anyhow!(
                "no forkd daemon answers at {} ({e}); start one with `forkd serve`, or point FORKD_HOST at it",
                self.host.describe()
            )
        };
        match &self.host {
            Host::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(not_running)?;
                handshake(TokioIo::new(stream)).await
            }
            Host::Tcp { authority, tls, .. } => {
                let stream = tokio::net::TcpStream::connect(authority)
                    .await
                    .map_err(not_running)?;
                let Some(tls) = tls else {
                    return handshake(TokioIo::new(stream)).await;
                };
                let host = authority_host(authority);
                let name = rustls::pki_types::ServerName::try_from(host.to_string()).with_context(
                    || format!("{}: {host:?} is not a host name", self.host.describe()),
                )?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, stream)
                    .await
                    .with_context(|| format!("TLS with the daemon at {}", self.host.describe()))?;
                handshake(TokioIo::new(stream)).await
            }
        }
    }
}

/// The client side of TLS: the public roots (webpki-roots), and the certificates of `ca` (a
/// PEM file, for a daemon whose certificate no public authority signed).
fn tls_config(ca: Option<PathBuf>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca {
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(&ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow!("FORKD_CA_CERT {}: {e}", ca.display()))?;
        if certs.is_empty() {
            bail!("FORKD_CA_CERT {}: no PEM certificate in it", ca.display());
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| anyhow!("FORKD_CA_CERT {}: {e}", ca.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS settings")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The host of `HOST:PORT` (`[::1]:PORT` gives `::1`).
fn authority_host(authority: &str) -> &str {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What a request carries.
enum RequestBody {
    Empty,
    Json(serde_json::Value),
    Stream(Box<dyn Read + Send>, Option<u64>),
}

type ClientBody = BoxBody<Bytes, std::io::Error>;

fn full(bytes: Bytes) -> ClientBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A request body read from a blocking source on a thread of its own, a bounded channel
/// between them, so a slow daemon pushes back on the reading.
struct ReaderBody {
    chunks: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
}

impl ReaderBody {
    const CHUNK: usize = 256 << 10;

    fn start(mut source: Box<dyn Read + Send>) -> ReaderBody {
        let (tx, chunks) = tokio::sync::mpsc::channel(4);
        std::thread::spawn(move || loop {
            let mut buf = vec![0u8; Self::CHUNK];
            let chunk = match source.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    Ok(Bytes::from(buf))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            // A send error means the request is over (say, the daemon answered early).
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        });
        ReaderBody { chunks }
    }
}

impl Body for ReaderBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.chunks
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| c.map(Frame::data)))
    }
}

async fn handshake<IO>(io: IO) -> Result<SendRequest<ClientBody>>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .context("talking to the daemon")?;
    tokio::spawn(connection);
    Ok(sender)
}

/// `text` for a URL's query: everything but unreserved characters and `/` percent-encoded.
pub fn query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The daemon's `{code, message}` as one line.
pub fn error_message(value: &serde_json::Value, status: u16) -> String {
    match value["message"].as_str() {
        Some(message) => message.to_string(),
        None => format!("the daemon answered HTTP {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_keep_paths_readable_and_escape_the_rest() {
        assert_eq!(query_value("/root/a-b_c.txt"), "/root/a-b_c.txt");
        assert_eq!(query_value("/tmp/a b&c=d%"), "/tmp/a%20b%26c%3Dd%25");
        assert_eq!(query_value("/tmp/é"), "/tmp/%C3%A9");
    }
}
