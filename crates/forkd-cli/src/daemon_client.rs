//! Talking to `forkd serve` from the CLI: where it is (`FORKD_HOST`: a socket path or an
//! `http://` URL, else the default socket), one request at a time, JSON in and out, and
//! response bodies read as they stream (exec output).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Host {
    Unix(PathBuf),
    Tcp {
        authority: String,
        token: Option<String>,
    },
}

impl Host {
    /// `FORKD_HOST` (a socket path, `unix:PATH` or `http://HOST:PORT`; `FORKD_TOKEN` is sent
    /// to a TCP one), else the default socket.
    pub fn from_env() -> Result<Host> {
        let Some(value) = std::env::var_os("FORKD_HOST").filter(|v| !v.is_empty()) else {
            return Ok(Host::Unix(forkd_daemon::default_socket_path()));
        };
        let value = value.to_string_lossy().into_owned();
        if let Some(rest) = value.strip_prefix("http://") {
            let authority = rest.trim_end_matches('/').to_string();
            if authority.is_empty() || authority.contains('/') {
                bail!("FORKD_HOST {value:?}: expected http://HOST:PORT");
            }
            let token = std::env::var("FORKD_TOKEN").ok().filter(|t| !t.is_empty());
            return Ok(Host::Tcp { authority, token });
        }
        if value.contains("://") {
            bail!("FORKD_HOST {value:?}: only a socket path, unix:PATH or http://HOST:PORT is supported");
        }
        Ok(Host::Unix(PathBuf::from(
            value.strip_prefix("unix:").unwrap_or(&value),
        )))
    }

    fn describe(&self) -> String {
        match self {
            Host::Unix(path) => format!("unix:{}", path.display()),
            Host::Tcp { authority, .. } => format!("http://{authority}"),
        }
    }
}

/// A blocking client: each call runs on a small single-threaded runtime.
pub struct DaemonClient {
    host: Host,
    runtime: tokio::runtime::Runtime,
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
        Ok(DaemonClient { host, runtime })
    }

    /// Sends a request; the response's body is left to read.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Streaming<'_>> {
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
        body: Option<serde_json::Value>,
    ) -> Result<Response<Incoming>> {
        let not_running = |e: std::io::Error| {
            anyhow!(
                "no forkd daemon answers at {} ({e}); start one with `forkd serve`, or point FORKD_HOST at it",
                self.host.describe()
            )
        };
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
            Some(value) => {
                request = request.header("content-type", "application/json");
                Full::new(Bytes::from(serde_json::to_vec(&value)?))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body)?;
        match &self.host {
            Host::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(not_running)?;
                send_on(TokioIo::new(stream), request).await
            }
            Host::Tcp { authority, .. } => {
                let stream = tokio::net::TcpStream::connect(authority)
                    .await
                    .map_err(not_running)?;
                send_on(TokioIo::new(stream), request).await
            }
        }
    }
}

async fn send_on<IO>(io: IO, request: Request<Full<Bytes>>) -> Result<Response<Incoming>>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .context("talking to the daemon")?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .context("talking to the daemon")
}

/// The daemon's `{code, message}` as one line.
pub fn error_message(value: &serde_json::Value, status: u16) -> String {
    match value["message"].as_str() {
        Some(message) => message.to_string(),
        None => format!("the daemon answered HTTP {status}"),
    }
}
