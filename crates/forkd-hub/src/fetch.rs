//! HTTP(S) / file fetching with retries, and the resumable streaming download that feeds a
//! pull: network → (cache file for resume, sha256, BLAKE2b prehash) → channel → unpacker.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use url::Url;

use crate::error::{HubError, Result};
use crate::sign::Prehasher;

const CHUNK: usize = 256 * 1024;

/// Retry / timeout knobs. `from_env` reads `FORKD_HUB_RETRIES` and `FORKD_HUB_BACKOFF_MS`.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Extra attempts after the first for transient failures.
    pub retries: u32,
    /// First backoff; doubles per attempt, capped at 8 s.
    pub backoff: Duration,
    pub connect_timeout: Duration,
    /// Longest silence on an open connection.
    pub read_timeout: Duration,
    /// Told about each retry, so a user watching a slow pull knows why it is slow.
    pub notify: Notifier,
}

/// Where a fetch reports what it is doing besides progress (retries, waits). Silent by default.
#[derive(Clone, Default)]
pub struct Notifier(Option<Arc<NoticeFn>>);

type NoticeFn = dyn Fn(&str) + Send + Sync;

impl Notifier {
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Notifier {
        Notifier(Some(Arc::new(f)))
    }

    pub fn say(&self, message: &str) {
        tracing::info!("{message}");
        if let Some(f) = &self.0 {
            f(message);
        }
    }
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Notifier(set)"
        } else {
            "Notifier(silent)"
        })
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            retries: 4,
            backoff: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            notify: Notifier::default(),
        }
    }
}

impl FetchConfig {
    pub fn from_env() -> FetchConfig {
        let mut c = FetchConfig::default();
        if let Some(n) = env_u64("FORKD_HUB_RETRIES") {
            c.retries = n as u32;
        }
        if let Some(ms) = env_u64("FORKD_HUB_BACKOFF_MS") {
            c.backoff = Duration::from_millis(ms);
        }
        c
    }

    pub fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout_connect(self.connect_timeout)
            .timeout_read(self.read_timeout)
            .user_agent(concat!("forkd/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    fn delay(&self, attempt: u32) -> Duration {
        (self.backoff * 2u32.saturating_pow(attempt)).min(Duration::from_secs(8))
    }

    fn notify_retry(&self, e: &HubError, attempt: u32, what: &str) {
        self.notify.say(&format!(
            "{e}; {what} in {:.1} s (retry {} of {})",
            self.delay(attempt).as_secs_f64(),
            attempt + 1,
            self.retries
        ));
    }
}

fn env_u64(k: &str) -> Option<u64> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

/// Maps a ureq failure to a `HubError::Http`, deciding whether it is worth retrying: only
/// failures that can heal by themselves are (a refused or dropped connection, 5xx, 408, 429).
/// A name that does not resolve, a TLS or HTTP protocol mismatch and other 4xx answers come
/// back the same on every attempt.
pub fn http_error(url: &Url, e: ureq::Error) -> HubError {
    match e {
        ureq::Error::Status(code, resp) => HubError::Http {
            url: url.to_string(),
            msg: format!("HTTP {code} {}", resp.status_text()),
            transient: code >= 500 || code == 408 || code == 429,
        },
        ureq::Error::Transport(t) => {
            let (what, transient) = transport_class(&t);
            let mut detail = t
                .message()
                .map_or_else(|| t.kind().to_string(), str::to_string);
            if let Some(src) = std::error::Error::source(&t) {
                detail = format!("{detail}: {src}");
            }
            HubError::Http {
                url: url.to_string(),
                msg: format!("{what}: {detail}"),
                transient,
            }
        }
    }
}

/// What a transport failure means for the user, and whether a retry could help.
fn transport_class(t: &ureq::Transport) -> (&'static str, bool) {
    use ureq::ErrorKind::*;
    match t.kind() {
        Dns => ("cannot resolve the host", false),
        // rustls reports a handshake that met garbage (a plain-HTTP server on an https URL)
        // as invalid data; a refused or reset connection has its own kinds.
        ConnectionFailed if io_kind(t) == Some(io::ErrorKind::InvalidData) => {
            ("TLS handshake failed (is it an https server?)", false)
        }
        ConnectionFailed | Io | ProxyConnect => ("cannot reach", true),
        BadStatus | BadHeader => ("does not speak HTTP", false),
        _ => ("cannot fetch", false),
    }
}

fn io_kind(t: &ureq::Transport) -> Option<io::ErrorKind> {
    let mut source = std::error::Error::source(t);
    while let Some(s) = source {
        if let Some(e) = s.downcast_ref::<io::Error>() {
            return Some(e.kind());
        }
        source = s.source();
    }
    None
}

/// Runs `op` until it succeeds, fails permanently, or runs out of retries.
pub fn with_retries<T>(cfg: &FetchConfig, mut op: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 0;
    loop {
        match op() {
            Err(e) if e.is_transient() && attempt < cfg.retries => {
                cfg.notify_retry(&e, attempt, "retrying");
                std::thread::sleep(cfg.delay(attempt));
                attempt += 1;
            }
            Err(e) if e.is_transient() && attempt > 0 => return Err(gave_up(e, attempt + 1)),
            other => return other,
        }
    }
}

/// Notes on a transient error that retrying did not help.
fn gave_up(e: HubError, attempts: u32) -> HubError {
    match e {
        HubError::Http { url, msg, .. } => HubError::Http {
            url,
            msg: format!("{msg} (gave up after {attempts} attempts)"),
            transient: true,
        },
        other => other,
    }
}

/// Fetches a small document (registry, signature) from http(s) or file, at most `max` bytes.
/// `Ok(None)` on 404 / missing file when `missing_ok`.
pub fn fetch_small(
    url: &Url,
    cfg: &FetchConfig,
    max: u64,
    missing_ok: bool,
) -> Result<Option<Vec<u8>>> {
    let too_big = || HubError::Http {
        url: url.to_string(),
        msg: format!("larger than {max} bytes"),
        transient: false,
    };
    if url.scheme() == "file" {
        let path = url
            .to_file_path()
            .map_err(|_| HubError::Invalid(format!("{url}: not a local path")))?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && missing_ok => return Ok(None),
            Err(e) => return Err(HubError::io(&path, e)),
        };
        let mut buf = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut buf)
            .map_err(|e| HubError::io(&path, e))?;
        if buf.len() as u64 > max {
            return Err(too_big());
        }
        return Ok(Some(buf));
    }
    let agent = cfg.agent();
    with_retries(cfg, || {
        let resp = match agent.request_url("GET", url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(404, _)) if missing_ok => return Ok(None),
            Err(e) => return Err(http_error(url, e)),
        };
        let mut buf = Vec::new();
        resp.into_reader()
            .take(max + 1)
            .read_to_end(&mut buf)
            .map_err(|e| HubError::Http {
                url: url.to_string(),
                msg: format!("connection lost: {e}"),
                transient: true,
            })?;
        if buf.len() as u64 > max {
            return Err(too_big());
        }
        Ok(Some(buf))
    })
}

/// One pack download.
#[derive(Debug, Clone)]
pub struct Download {
    pub url: Url,
    /// From the registry; enables the resume cache and the final check.
    pub expected_sha256: Option<String>,
    pub expected_size: Option<u64>,
    /// Partial-download file (resume); kept only while the download is incomplete.
    pub cache_path: Option<PathBuf>,
    /// Compute the minisign prehash (BLAKE2b-512) while streaming: only when there is a
    /// signature to check, since it costs as much CPU as the sha256.
    pub want_prehash: bool,
}

/// What the producer saw.
#[derive(Debug, Clone, Default)]
pub struct DownloadResult {
    pub total_bytes: u64,
    pub sha256: String,
    pub prehash: Vec<u8>,
    /// Bytes that came over the network in this run (excludes a resumed cached prefix).
    pub fetched_bytes: u64,
    /// Bytes reused from the cache of an earlier, interrupted run.
    pub resumed_from: u64,
    /// The consumer stopped early (already present, or it refused the pack).
    pub cancelled: bool,
}

/// Chunks from the producer, or the error that stopped it.
pub type Chunk = std::result::Result<Vec<u8>, HubError>;

struct Sink<'a> {
    tx: SyncSender<Chunk>,
    sha: Sha256,
    pre: Option<Prehasher>,
    pos: u64,
    cache: Option<File>,
    cache_path: Option<PathBuf>,
    bar: &'a ProgressBar,
    cap: Option<u64>,
    url: &'a Url,
}

impl Sink<'_> {
    /// Hashes, caches and forwards one chunk; false when the consumer is gone.
    fn push(&mut self, data: Vec<u8>, from_cache: bool) -> Result<bool> {
        if let Some(cap) = self.cap {
            if self.pos + data.len() as u64 > cap {
                return Err(HubError::Http {
                    url: self.url.to_string(),
                    msg: format!("sends more than the {cap} bytes the registry lists"),
                    transient: false,
                });
            }
        }
        if !from_cache {
            if let (Some(f), Some(p)) = (&self.cache, &self.cache_path) {
                f.write_all_at(&data, self.pos)
                    .map_err(|e| HubError::io(p, e))?;
            }
        }
        self.sha.update(&data);
        if let Some(p) = &mut self.pre {
            p.update(&data);
        }
        self.pos += data.len() as u64;
        self.bar.set_position(self.pos);
        Ok(self.tx.send(Ok(data)).is_ok())
    }
}

/// Runs the download, sending chunks to `tx`. Errors are also sent down the channel so the
/// consumer stops, and returned.
pub fn produce(
    d: &Download,
    cfg: &FetchConfig,
    tx: SyncSender<Chunk>,
    bar: &ProgressBar,
) -> Result<DownloadResult> {
    let err_tx = tx.clone();
    let result = produce_inner(d, cfg, tx, bar);
    if let Err(e) = &result {
        // The consumer only needs to stop; the caller reports the producer's own error.
        let _ = err_tx.send(Err(HubError::Invalid(forkd_store::error_chain(e))));
    }
    result
}

fn produce_inner(
    d: &Download,
    cfg: &FetchConfig,
    tx: SyncSender<Chunk>,
    bar: &ProgressBar,
) -> Result<DownloadResult> {
    let mut sink = Sink {
        tx,
        sha: Sha256::new(),
        pre: d.want_prehash.then(Prehasher::default),
        pos: 0,
        cache: None,
        cache_path: d.cache_path.clone(),
        bar,
        cap: d.expected_size,
        url: &d.url,
    };
    let mut result = DownloadResult::default();
    if d.url.scheme() == "file" {
        let path = d
            .url
            .to_file_path()
            .map_err(|_| HubError::Invalid(format!("{}: not a local path", d.url)))?;
        let file = File::open(&path).map_err(|e| HubError::io(&path, e))?;
        sink.cache_path = None;
        if !stream(&mut sink, file, |e| HubError::io(&path, e))? {
            result.cancelled = true;
        }
        result.fetched_bytes = sink.pos;
    } else {
        result = produce_http(d, cfg, &mut sink)?;
    }
    result.total_bytes = sink.pos;
    result.sha256 = hex::encode(sink.sha.finalize());
    result.prehash = sink.pre.map(Prehasher::finish).unwrap_or_default();
    Ok(result)
}

/// Copies a reader into the sink; Ok(false) when the consumer went away.
fn stream<R: Read>(
    sink: &mut Sink<'_>,
    mut r: R,
    map: impl Fn(io::Error) -> HubError,
) -> Result<bool> {
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(map(e)),
        };
        buf.truncate(n);
        if !sink.push(buf, false)? {
            return Ok(false);
        }
    }
}

fn produce_http(d: &Download, cfg: &FetchConfig, sink: &mut Sink<'_>) -> Result<DownloadResult> {
    let mut result = DownloadResult::default();
    let agent = cfg.agent();
    if let Some(p) = &d.cache_path {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map_err(|e| HubError::io(p, e))?;
        sink.cache = Some(f);
    }
    // Bytes a previous, interrupted run left in the cache.
    let mut cached = match &sink.cache {
        Some(f) => f.metadata().map(|m| m.len()).unwrap_or(0),
        None => 0,
    };
    if let (Some(size), true) = (d.expected_size, cached > 0) {
        if cached > size {
            cached = 0;
        }
    }
    let mut attempt = 0u32;
    let mut first = true;
    loop {
        let from = if first { cached } else { sink.pos };
        let response = match request_from(&agent, &d.url, from) {
            // The cached bytes are not a prefix of what the server has: start over.
            Ok(None) => {
                truncate_cache(sink)?;
                cached = 0;
                request_from(&agent, &d.url, 0).map(|r| r.expect("no range, no 416"))
            }
            Ok(Some(r)) => Ok(r),
            Err(e) => Err(e),
        };
        let outcome = response.and_then(|(resp, start)| {
            check_server_size(&d.url, &resp, d.expected_size)?;
            if first {
                first = false;
                if start == 0 && cached > 0 {
                    // The server ignored Range: start over.
                    truncate_cache(sink)?;
                    cached = 0;
                }
                if start > 0 {
                    if !feed_cache_prefix(sink, start)? {
                        return Ok(false);
                    }
                    result.resumed_from = start;
                }
            }
            let mut reader = resp.into_reader();
            // A server that answered 200 to a mid-stream retry resends from byte 0: skip.
            if start < sink.pos {
                let skip = sink.pos - start;
                io::copy(&mut (&mut reader).take(skip), &mut io::sink())
                    .map_err(|e| lost(&d.url, e))?;
            }
            let before = sink.pos;
            let r = stream(sink, reader, |e| lost(&d.url, e));
            result.fetched_bytes += sink.pos - before;
            r
        });
        match outcome {
            Ok(false) => {
                result.cancelled = true;
                return Ok(result);
            }
            Ok(true) => {
                if let Some(size) = d.expected_size {
                    if sink.pos < size {
                        let e = HubError::Http {
                            url: d.url.to_string(),
                            msg: format!("ended after {} of {size} bytes", sink.pos),
                            transient: true,
                        };
                        if attempt < cfg.retries {
                            cfg.notify_retry(&e, attempt, "resuming");
                            std::thread::sleep(cfg.delay(attempt));
                            attempt += 1;
                            continue;
                        }
                        return Err(if attempt > 0 {
                            gave_up(e, attempt + 1)
                        } else {
                            e
                        });
                    }
                }
                return Ok(result);
            }
            Err(e) if e.is_transient() && attempt < cfg.retries => {
                cfg.notify_retry(&e, attempt, &format!("resuming at byte {}", sink.pos));
                std::thread::sleep(cfg.delay(attempt));
                attempt += 1;
            }
            Err(e) if e.is_transient() && attempt > 0 => return Err(gave_up(e, attempt + 1)),
            Err(e) => return Err(e),
        }
    }
}

fn lost(url: &Url, e: io::Error) -> HubError {
    HubError::Http {
        url: url.to_string(),
        msg: format!("connection lost: {e}"),
        transient: true,
    }
}

fn truncate_cache(sink: &mut Sink<'_>) -> Result<()> {
    if let (Some(f), Some(p)) = (&sink.cache, &sink.cache_path) {
        f.set_len(0).map_err(|e| HubError::io(p, e))?;
    }
    Ok(())
}

/// Replays the first `len` cached bytes into the sink (hashing them, not re-caching).
fn feed_cache_prefix(sink: &mut Sink<'_>, len: u64) -> Result<bool> {
    let (Some(f), Some(p)) = (sink.cache.as_ref(), sink.cache_path.clone()) else {
        return Ok(true);
    };
    let f = f.try_clone().map_err(|e| HubError::io(&p, e))?;
    let mut off = 0;
    while off < len {
        let n = ((len - off) as usize).min(1 << 20);
        let mut buf = vec![0u8; n];
        f.read_exact_at(&mut buf, off)
            .map_err(|e| HubError::io(&p, e))?;
        off += n as u64;
        if !sink.push(buf, true)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Refuses, before reading a byte, a pack whose size on the server is not the registry's: no
/// retry or resume can change it.
fn check_server_size(url: &Url, resp: &ureq::Response, expected: Option<u64>) -> Result<()> {
    match (expected, server_total(resp)) {
        (Some(want), Some(have)) if want != have => Err(HubError::Http {
            url: url.to_string(),
            msg: format!("is {have} bytes on the server, the registry lists {want}"),
            transient: false,
        }),
        _ => Ok(()),
    }
}

/// The whole object's size as the response states it: `Content-Range: bytes a-b/TOTAL` for a
/// partial answer, `Content-Length` for a whole one.
fn server_total(resp: &ureq::Response) -> Option<u64> {
    if resp.status() == 206 {
        return resp
            .header("Content-Range")?
            .rsplit_once('/')
            .and_then(|(_, total)| total.trim().parse().ok());
    }
    resp.header("Content-Length")?.trim().parse().ok()
}

/// GET, with `Range: bytes=from-` when `from > 0`. Returns the response and the offset its
/// body starts at (0 when the server ignored the range); `None` for 416 (range beyond the end).
fn request_from(
    agent: &ureq::Agent,
    url: &Url,
    from: u64,
) -> Result<Option<(ureq::Response, u64)>> {
    let mut req = agent.request_url("GET", url);
    if from > 0 {
        req = req.set("Range", &format!("bytes={from}-"));
    }
    match req.call() {
        Ok(resp) if resp.status() == 206 => {
            let start = resp
                .header("Content-Range")
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            match start {
                Some(s) if s == from => Ok(Some((resp, s))),
                _ => Err(HubError::Http {
                    url: url.to_string(),
                    msg: "answered a range request with the wrong range".into(),
                    transient: false,
                }),
            }
        }
        Ok(resp) => Ok(Some((resp, 0))),
        Err(ureq::Error::Status(416, _)) if from > 0 => Ok(None),
        Err(e) => Err(http_error(url, e)),
    }
}

/// The consumer's end of the channel as a `Read`. A producer error surfaces as an
/// `io::Error` carrying the `HubError`, and is also kept in `failure`.
pub struct ChannelReader {
    rx: Receiver<Chunk>,
    current: Vec<u8>,
    pos: usize,
    pub failure: Arc<Mutex<Option<String>>>,
}

impl ChannelReader {
    pub fn new(rx: Receiver<Chunk>) -> ChannelReader {
        ChannelReader {
            rx,
            current: Vec::new(),
            pos: 0,
            failure: Arc::default(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    *self.failure.lock().unwrap() = Some(forkd_store::error_chain(&e));
                    return Err(io::Error::other(e));
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
