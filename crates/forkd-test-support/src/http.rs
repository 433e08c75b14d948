//! A minimal HTTP/1.1 client for tests of forkd's daemon: one request per connection
//! (`Connection: close`), over a Unix socket, TCP or TLS, with chunked bodies decoded.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
    /// HTTPS, trusting only the certificate(s) in `ca_pem`; the server's certificate must name
    /// `addr`'s IP address.
    Tls {
        addr: std::net::SocketAddr,
        ca_pem: String,
    },
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (naming the body) when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }
}

/// Sends one request and reads the whole response (each read may wait up to 60 s).
pub fn request(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    request_within(
        endpoint,
        method,
        path,
        headers,
        body,
        Duration::from_secs(60),
    )
}

/// [`request`] for a server that may be silent for up to `patience` (a slow lab guest).
pub fn request_within(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    patience: Duration,
) -> std::io::Result<Response> {
    let mut stream: Box<dyn ReadWrite> = match endpoint {
        Endpoint::Unix(path) => Box::new(UnixStream::connect(path)?),
        Endpoint::Tcp(addr) => Box::new(std::net::TcpStream::connect(addr)?),
        Endpoint::Tls { addr, ca_pem } => Box::new(tls_connect(*addr, ca_pem)?),
    };
    stream.set_timeout(patience)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        head.push_str("Host: forkd\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    // A server may answer before the body is all sent (413 for a body over its limit) and
    // close: the answer is still there to read, so a failed write is only the error when no
    // answer came.
    let sent = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body));
    match (read_response(BufReader::new(stream)), sent) {
        (Ok(response), _) => Ok(response),
        (Err(_), Err(write)) => Err(write),
        (Err(read), Ok(())) => Err(read),
    }
}

trait ReadWrite: Read + Write {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()>;
}

impl ReadWrite for UnixStream {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

impl ReadWrite for std::net::TcpStream {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

fn tls_connect(addr: std::net::SocketAddr, ca_pem: &str) -> std::io::Result<TlsStream> {
    let invalid = |e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| invalid(&e))?)
            .map_err(|e| invalid(&e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connection = rustls::ClientConnection::new(Arc::new(config), ServerName::from(addr.ip()))
        .map_err(|e| invalid(&e))?;
    Ok(rustls::StreamOwned::new(
        connection,
        std::net::TcpStream::connect(addr)?,
    ))
}

impl ReadWrite for TlsStream {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.sock.set_read_timeout(Some(t))
    }
}

fn read_response(mut reader: impl BufRead) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed
            .split_once(':')
            .ok_or_else(|| bad(&format!("bad header {trimmed:?}")))?;
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        read_chunked(&mut reader)?
    } else {
        let mut body = Vec::new();
        reader.read_to_end(&mut body)?;
        body
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, line.clone()))?;
        if size == 0 {
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        line.clear();
        reader.read_line(&mut line)?; // the CRLF after the chunk
    }
}
