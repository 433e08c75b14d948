//! The agent server: accepts connections, reads frames, runs each request on its own thread
//! and writes the replies back (see [`crate::protocol`]).

mod eval;
mod exec;
mod files;
mod pool;
mod procs;
mod pty;
mod restore;
mod tunnel;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::frame::{self, Frame, FrameError};
use crate::protocol::{
    decode_request, encode_reply, ErrorCode, EvalStatus, PingResult, Reply, Request, Stream,
    AGENT_VERSION, CHUNK_LEN, MAX_HEADER_LEN, MAX_IN_FLIGHT_PER_CONNECTION, PROTOCOL_VERSION,
};
use crate::vsock::{VsockListener, VsockStream};

pub use eval::EvalConfig;

/// How the agent behaves; built from the command line by the binary.
#[derive(Debug, Clone, Default)]
pub struct AgentConfig {
    /// The eval interpreter; `None` disables eval.
    pub eval: Option<EvalConfig>,
    /// Set CLOCK_REALTIME on `restored`. Off when the agent runs on a host (tests), where it
    /// must not move the machine's clock.
    pub set_clock: bool,
    /// The file `restored` writes the child's resolvers to (the guest's /etc/resolv.conf;
    /// host tests point it elsewhere). None: never written.
    pub resolv_conf: Option<PathBuf>,
}

/// A failed request: the error code and a one-line message naming the input and the problem.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Maps an I/O error to a code, with `context` (e.g. "file_read /etc/x") in front.
    pub fn io(context: &str, err: &io::Error) -> Self {
        let code = match err.kind() {
            io::ErrorKind::NotFound => ErrorCode::NotFound,
            io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
            io::ErrorKind::AlreadyExists => ErrorCode::AlreadyExists,
            io::ErrorKind::NotADirectory => ErrorCode::NotADirectory,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorCode::NoSpace,
            _ => ErrorCode::Io,
        };
        Self::new(code, format!("{context}: {err}"))
    }
}

/// How much input is discarded after a bad frame before the connection is dropped anyway.
const BAD_FRAME_DRAIN_LIMIT: u64 = 1 << 20;

/// A connected stream the agent can serve: readable, writable from another thread (through a
/// clone), and able to half-close.
pub trait ConnStream: Read + Write + Send + Sized + 'static {
    fn try_clone_stream(&self) -> io::Result<Self>;
    fn shutdown_write(&self) -> io::Result<()>;
}

impl ConnStream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl ConnStream for VsockStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown_write()
    }
}

/// State shared by every connection.
struct State {
    started: Instant,
    fork_count: AtomicU64,
    /// `restored` takes this for writing; every other request takes it for reading before it
    /// starts, so nothing that arrives after a `restored` runs before the hook has finished.
    restore_gate: RwLock<()>,
    /// Set by `restored`; the next eval reseeds the interpreter's random generators first.
    reseed_pending: AtomicBool,
    set_clock: bool,
    resolv_conf: Option<PathBuf>,
    eval: Option<Mutex<eval::EvalEngine>>,
    eval_status: Arc<Mutex<EvalStatus>>,
    next_upload: AtomicU64,
    procs: procs::ProcTable,
}

/// The agent: cheap to clone, serves any number of connections concurrently.
#[derive(Clone)]
pub struct Agent {
    state: Arc<State>,
}

impl Agent {
    /// Creates the agent; when eval is configured this starts the interpreter and runs the
    /// warm-up code (blocking), so a snapshot taken after readiness has a warm interpreter.
    pub fn new(config: AgentConfig) -> Agent {
        let eval_status = Arc::new(Mutex::new(EvalStatus::default()));
        let eval = config
            .eval
            .map(|cfg| Mutex::new(eval::EvalEngine::start(cfg, eval_status.clone())));
        Agent {
            state: Arc::new(State {
                started: Instant::now(),
                fork_count: AtomicU64::new(0),
                restore_gate: RwLock::new(()),
                reseed_pending: AtomicBool::new(false),
                set_clock: config.set_clock,
                resolv_conf: config.resolv_conf,
                eval,
                eval_status,
                next_upload: AtomicU64::new(0),
                procs: procs::ProcTable::default(),
            }),
        }
    }

    /// What `ping` answers.
    pub fn ping(&self) -> PingResult {
        let state = &self.state;
        PingResult {
            agent_version: AGENT_VERSION.to_string(),
            protocol_version: PROTOCOL_VERSION,
            uptime_ms: state.started.elapsed().as_millis() as u64,
            fork_count: state.fork_count.load(Ordering::SeqCst),
            pid: std::process::id(),
            eval: lock(&state.eval_status).clone(),
        }
    }

    /// Accepts Unix-socket connections forever, one thread per connection.
    pub fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        loop {
            match listener.accept() {
                Ok((stream, _)) => self.spawn_connection(stream),
                Err(e) => accept_failed(&e),
            }
        }
    }

    /// Accepts vsock connections forever, one thread per connection.
    pub fn serve_vsock(&self, listener: VsockListener) -> io::Result<()> {
        loop {
            match listener.accept() {
                Ok(stream) => self.spawn_connection(stream),
                Err(e) => accept_failed(&e),
            }
        }
    }

    fn spawn_connection<S: ConnStream>(&self, stream: S) {
        let agent = self.clone();
        let spawned = thread::Builder::new()
            .name("conn".into())
            .spawn(move || agent.serve_connection(stream));
        if let Err(e) = spawned {
            tracing::error!("cannot start a connection thread: {e}");
        }
    }

    /// Serves one connection until the peer closes it or the stream goes out of sync.
    pub fn serve_connection<S: ConnStream>(&self, stream: S) {
        let writer = match stream.try_clone_stream() {
            Ok(writer) => writer,
            Err(e) => {
                tracing::error!("cannot duplicate a connection: {e}");
                return;
            }
        };
        let mut reader = stream;
        let conn = Arc::new(ConnWriter::new(Box::new(writer)));
        let mut uploads: HashMap<u64, SyncSender<UploadMsg>> = HashMap::new();
        loop {
            match frame::read_frame(&mut reader) {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    if let Some(tcp) = self.handle_frame(frame, &conn, &mut uploads) {
                        drop(uploads);
                        conn.reader_closed.store(true, Ordering::SeqCst);
                        tunnel::splice(reader, tcp);
                        return;
                    }
                }
                Err(FrameError::TooLarge {
                    header_len,
                    payload_len,
                    header,
                }) => {
                    let id = header
                        .and_then(|h| decode_request(&h).ok())
                        .map_or(0, |(id, _)| id);
                    let message = format!(
                        "frame skipped: header {header_len} bytes (limit {MAX_HEADER_LEN}), payload {payload_len} bytes (limit {})",
                        crate::protocol::MAX_PAYLOAD_LEN
                    );
                    tracing::warn!("request {id}: {message}");
                    conn.send_error(id, ErrorCode::FrameTooLarge, &message);
                }
                Err(FrameError::BadMagic { found }) => {
                    let message = format!(
                        "frame starts with {found:02x?} instead of \"FKA1\"; closing this connection"
                    );
                    tracing::warn!("{message}");
                    conn.send_error(0, ErrorCode::BadFrame, &message);
                    // Closing with unread input would reset the connection and could destroy
                    // the error reply in flight: signal EOF, then drain what the peer sends.
                    let _ = reader.shutdown_write();
                    let _ = io::copy(
                        &mut (&mut reader).take(BAD_FRAME_DRAIN_LIMIT),
                        &mut io::sink(),
                    );
                    break;
                }
                Err(FrameError::Io(e)) => {
                    tracing::debug!("connection read failed: {e}");
                    break;
                }
            }
            if conn.is_broken() {
                break;
            }
        }
        // Dropping the senders aborts any upload that never saw its `end` frame.
        drop(uploads);
        conn.reader_closed.store(true, Ordering::SeqCst);
    }

    /// Serves one frame; a `tcp_connect` that succeeded returns the TCP stream the
    /// connection now carries.
    fn handle_frame(
        &self,
        frame: Frame,
        conn: &Arc<ConnWriter>,
        uploads: &mut HashMap<u64, SyncSender<UploadMsg>>,
    ) -> Option<std::net::TcpStream> {
        let (id, request) = match decode_request(&frame.header) {
            Ok(decoded) => decoded,
            Err(e) => {
                tracing::warn!("{}", e.message);
                conn.send_error(e.id, e.code, &e.message);
                return None;
            }
        };
        let replier = Replier::new(id, conn.clone());
        match request {
            Request::Data => route_upload(uploads, id, UploadMsg::Chunk(frame.payload)),
            Request::End => route_upload(uploads, id, UploadMsg::End),
            // The gates are released before replying: a peer that does not read its replies
            // must not be able to hold up a restore (or anything waiting behind one).
            Request::Ping => {
                drop(read_gate(&self.state));
                replier.finish(Ok(to_value(&self.ping())));
            }
            // Handled inline, holding the gate for writing, so that every request read after
            // it (on this connection or any other) waits until the hook has run.
            Request::Restored(req) => {
                let gate = self
                    .state
                    .restore_gate
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                let outcome = restore::handle(&self.state, &req, &frame.payload);
                drop(gate);
                replier.finish(outcome.map(|r| to_value(&r)));
            }
            Request::TcpConnect(req) => {
                drop(read_gate(&self.state));
                // Only this reply may be in flight: everything after it is the TCP stream's.
                let alone = uploads.is_empty() && Arc::strong_count(conn) == 2;
                return match tunnel::connect(&req, alone) {
                    Ok((tcp, result)) => {
                        replier.finish(Ok(to_value(&result)));
                        Some(tcp)
                    }
                    Err(e) => {
                        replier.finish(Err(e));
                        None
                    }
                };
            }
            Request::FileWrite(req) if req.more => {
                if uploads.contains_key(&id) {
                    replier.finish(Err(OpError::new(
                        ErrorCode::BadRequest,
                        format!("request {id}: an upload with this id is already in progress"),
                    )));
                    return None;
                }
                // Bounded: a slow disk pushes back on the connection instead of buffering.
                let (tx, rx) = mpsc::sync_channel(4);
                uploads.insert(id, tx);
                self.spawn_request(replier, move |state, _| {
                    files::write(state, &req, frame.payload, Some(rx))
                });
            }
            other => {
                let payload = frame.payload;
                self.spawn_request(replier, move |state, replier| {
                    run_request(state, other, payload, replier)
                });
            }
        }
        None
    }

    fn spawn_request<F>(&self, replier: Replier, work: F)
    where
        F: FnOnce(&State, &Arc<Replier>) -> Result<Value, OpError> + Send + 'static,
    {
        let state = self.state.clone();
        let replier = Arc::new(replier);
        // A peer that keeps sending but never reads would otherwise grow threads without
        // bound; past the limit requests are refused (and the refusal itself pushes back).
        let Some(slot) = InFlight::claim(&replier.conn) else {
            replier.finish(Err(OpError::new(
                ErrorCode::Busy,
                format!(
                    "request {}: {MAX_IN_FLIGHT_PER_CONNECTION} requests already in flight on this connection",
                    replier.id
                ),
            )));
            return;
        };
        let worker_replier = replier.clone();
        let spawned = pool::spawn(move || {
            drop(read_gate(&state));
            let outcome = work(&state, &worker_replier);
            worker_replier.finish(outcome);
            drop(slot);
        });
        if let Err(e) = spawned {
            replier.finish(Err(OpError::new(
                ErrorCode::Internal,
                format!("request {}: cannot start a worker thread: {e}", replier.id),
            )));
        }
    }
}

fn run_request(
    state: &State,
    request: Request,
    payload: Vec<u8>,
    replier: &Arc<Replier>,
) -> Result<Value, OpError> {
    match request {
        Request::Exec(req) => exec::run(&req, payload, replier).map(|r| to_value(&r)),
        Request::Eval(req) => eval::run(state, &req, replier).map(|r| to_value(&r)),
        Request::EvalContext(req) => eval::context(state, &req).map(|r| to_value(&r)),
        Request::FileRead(req) => files::read(&req, replier).map(|r| to_value(&r)),
        Request::FileWrite(req) => files::write(state, &req, payload, None),
        Request::FileList(req) => files::list(&req.path).map(|r| to_value(&r)),
        Request::FileStat(req) => files::stat(&req.path).map(|r| to_value(&r)),
        Request::FileRemove(req) => files::remove(&req).map(|r| to_value(&r)),
        Request::FileMkdir(req) => files::mkdir(&req).map(|r| to_value(&r)),
        Request::FileRename(req) => files::rename(&req).map(|r| to_value(&r)),
        Request::ProcStart(req) => state.procs.start(&req, payload).map(|r| to_value(&r)),
        Request::ProcList => Ok(to_value(&state.procs.list())),
        Request::ProcWait(req) => state.procs.wait(&req, replier).map(|r| to_value(&r)),
        Request::ProcKill(req) => state.procs.kill(&req).map(|r| to_value(&r)),
        Request::ProcInput(req) => state.procs.input(&req, &payload).map(|r| to_value(&r)),
        Request::ProcResize(req) => state.procs.resize(&req),
        Request::Ping
        | Request::Restored(_)
        | Request::TcpConnect(_)
        | Request::Data
        | Request::End => Err(OpError::new(
            ErrorCode::Internal,
            "request routed to the wrong handler",
        )),
    }
}

fn read_gate(state: &State) -> std::sync::RwLockReadGuard<'_, ()> {
    state.restore_gate.read().unwrap_or_else(|p| p.into_inner())
}

fn to_value<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("result types always serialize")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking request thread must not take the whole agent down with a poisoned lock.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_failed(err: &io::Error) {
    // Typically EMFILE/ENFILE: back off instead of spinning, and keep serving.
    tracing::warn!("accept failed: {err}");
    thread::sleep(Duration::from_millis(50));
}

/// A chunk of an upload (or its end), routed from the connection reader to the upload worker.
pub(crate) enum UploadMsg {
    Chunk(Vec<u8>),
    End,
}

fn route_upload(uploads: &mut HashMap<u64, SyncSender<UploadMsg>>, id: u64, msg: UploadMsg) {
    let is_end = matches!(msg, UploadMsg::End);
    let Some(tx) = uploads.get(&id) else {
        tracing::debug!("request {id}: data for no open upload dropped");
        return;
    };
    // A send error means the worker already failed and answered; drop the rest quietly.
    if tx.send(msg).is_err() || is_end {
        uploads.remove(&id);
    }
}

/// A claimed slot among a connection's MAX_IN_FLIGHT_PER_CONNECTION; released on drop.
struct InFlight(Arc<ConnWriter>);

impl InFlight {
    fn claim(conn: &Arc<ConnWriter>) -> Option<Self> {
        let claimed = conn
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_IN_FLIGHT_PER_CONNECTION).then_some(n + 1)
            })
            .is_ok();
        claimed.then(|| InFlight(conn.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The write half of a connection, shared by every request running on it.
pub(crate) struct ConnWriter {
    writer: Mutex<Box<dyn Write + Send>>,
    broken: AtomicBool,
    /// The peer closed its end (or the stream went out of sync): no further request comes,
    /// and long waits on its behalf can give up.
    reader_closed: AtomicBool,
    in_flight: AtomicUsize,
}

impl ConnWriter {
    fn new(writer: Box<dyn Write + Send>) -> Self {
        Self {
            writer: Mutex::new(writer),
            broken: AtomicBool::new(false),
            reader_closed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    fn send(&self, id: u64, reply: &Reply, payload: &[u8]) -> io::Result<()> {
        if self.is_broken() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection already failed",
            ));
        }
        let header = encode_reply(id, reply);
        let result = frame::write_frame(&mut **lock(&self.writer), &header, payload);
        if let Err(e) = &result {
            tracing::debug!("request {id}: reply not delivered: {e}");
            self.broken.store(true, Ordering::SeqCst);
        }
        result
    }

    fn send_error(&self, id: u64, code: ErrorCode, message: &str) {
        let _ = self.send(
            id,
            &Reply::Error {
                code,
                message: message.to_string(),
            },
            &[],
        );
    }
}

/// Sends the frames of one request: chunks, then exactly one final result or error.
pub(crate) struct Replier {
    id: u64,
    conn: Arc<ConnWriter>,
    /// Set once the final frame is out; later chunks (from a straggling output pump) are
    /// refused so nothing of this request ever follows its final frame.
    finished: Mutex<bool>,
}

impl Replier {
    fn new(id: u64, conn: Arc<ConnWriter>) -> Self {
        Self {
            id,
            conn,
            finished: Mutex::new(false),
        }
    }

    /// Sends `data` as one or more chunks of `stream`. Fails when the peer is gone.
    pub fn chunk(&self, stream: Stream, data: &[u8]) -> io::Result<()> {
        let finished = lock(&self.finished);
        if *finished {
            return Err(io::Error::other("request already finished"));
        }
        for piece in data.chunks(CHUNK_LEN) {
            self.conn.send(self.id, &Reply::Chunk { stream }, piece)?;
        }
        Ok(())
    }

    /// Sends one empty chunk of `stream`: a signal whose meaning the op defines (a streaming
    /// `eval` has started). Fails when the peer is gone.
    pub fn chunk_marker(&self, stream: Stream) -> io::Result<()> {
        let finished = lock(&self.finished);
        if *finished {
            return Err(io::Error::other("request already finished"));
        }
        self.conn.send(self.id, &Reply::Chunk { stream }, &[])
    }

    /// The peer is gone: nothing will read this request's answer.
    pub fn peer_gone(&self) -> bool {
        self.conn.is_broken() || self.conn.reader_closed.load(Ordering::SeqCst)
    }

    pub fn finish(&self, outcome: Result<Value, OpError>) {
        let mut finished = lock(&self.finished);
        if *finished {
            return;
        }
        *finished = true;
        let reply = match outcome {
            Ok(result) => Reply::Result { result },
            Err(e) => {
                tracing::debug!("request {}: {} {}", self.id, e.code, e.message);
                Reply::Error {
                    code: e.code,
                    message: e.message,
                }
            }
        };
        if encode_reply(self.id, &reply).len() > MAX_HEADER_LEN {
            let message = format!(
                "request {}: the reply exceeds the {MAX_HEADER_LEN}-byte header limit",
                self.id
            );
            self.conn
                .send_error(self.id, ErrorCode::ReplyTooLarge, &message);
            return;
        }
        let _ = self.conn.send(self.id, &reply, &[]);
    }
}
