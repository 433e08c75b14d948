//! Host-side client: one blocking request at a time over any `Read + Write` stream.
//!
//! ```no_run
//! use forkd_agent::client::{connect_hybrid_vsock, AgentClient, ExecBuilder};
//! # fn main() -> Result<(), forkd_agent::client::ClientError> {
//! let stream = connect_hybrid_vsock("/run/forkd/child-1/vsock.sock", 1024)?;
//! let mut agent = AgentClient::new(stream);
//! agent.restored(&[0u8; 64], std::time::SystemTime::now())?;
//! let out = agent.exec(&ExecBuilder::new(["uname", "-a"]).timeout_ms(5000).build(), b"")?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! # Ok(()) }
//! ```
//!
//! For requests in parallel, open one connection per thread (the agent serves connections
//! concurrently); [`AgentClient::send`] / [`AgentClient::recv`] expose the raw frames for
//! pipelining on one connection.

use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::frame::{self, FrameError};
use crate::protocol::{
    decode_reply, encode_request, ErrorCode, EvalContextAction, EvalContextRequest,
    EvalContextResult, EvalRequest, EvalResult, ExecRequest, ExecResult, FileListResult,
    FileMkdirRequest, FileMkdirResult, FileReadRequest, FileReadResult, FileRemoveRequest,
    FileRemoveResult, FileRenameRequest, FileStat, FileWriteRequest, FileWriteResult, Follow,
    PathRequest, PingResult, ProcInputRequest, ProcInputResult, ProcKillRequest, ProcKillResult,
    ProcListResult, ProcResizeRequest, ProcStartResult, ProcWaitRequest, ProcWaitResult, PtySize,
    Reply, Request, RestoredRequest, RestoredResult, Stream, TcpConnectRequest, TcpConnectResult,
    CHUNK_LEN, MAX_PAYLOAD_LEN,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent connection failed")]
    Io(#[from] io::Error),
    /// The agent answered the request with an error.
    #[error("agent error {code}: {message}")]
    Agent { code: ErrorCode, message: String },
    /// The agent sent something this client cannot make sense of.
    #[error("agent protocol violation: {0}")]
    Protocol(String),
    /// The agent sent a reply header this client cannot decode.
    #[error("agent protocol violation")]
    BadReply(#[from] crate::protocol::ReplyDecodeError),
    /// The hybrid-vsock `CONNECT` handshake was refused or garbled.
    #[error("vsock handshake with {path}")]
    Handshake {
        path: String,
        #[source]
        source: HandshakeError,
    },
    /// The request cannot be sent as given (e.g. stdin above the payload limit).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// The agent's error code, when this is an agent error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Why a hybrid-vsock `CONNECT <port>` handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("sending CONNECT {port}")]
    Send {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("connection closed after CONNECT {port} (nothing listens on that guest port?)")]
    Closed { port: u32 },
    #[error("reading the CONNECT {port} reply")]
    Read {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("expected \"OK <port>\" after CONNECT {port}, got {reply:?}")]
    BadReply { port: u32, reply: String },
}

/// A reply frame as [`AgentClient::recv`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyFrame {
    pub id: u64,
    pub reply: Reply,
    pub payload: Vec<u8>,
}

/// Captured output of an `exec`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub result: ExecResult,
}

/// What a `proc_wait` gave: the captured output (the last PROC_CAPTURE_LEN bytes of each
/// stream) and the process's state.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub result: ProcWaitResult,
}

/// Builds an [`ExecRequest`].
#[derive(Debug, Clone, Default)]
pub struct ExecBuilder {
    request: ExecRequest,
}

impl ExecBuilder {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            request: ExecRequest {
                argv: argv.into_iter().map(Into::into).collect(),
                ..Default::default()
            },
        }
    }
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.env.insert(key.into(), value.into());
        self
    }
    pub fn clear_env(mut self) -> Self {
        self.request.clear_env = true;
        self
    }
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.request.cwd = Some(dir.into());
        self
    }
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.request.timeout_ms = Some(ms);
        self
    }
    /// `proc_start` only: run it on a new terminal of `cols` × `rows`.
    pub fn pty(mut self, cols: u16, rows: u16) -> Self {
        self.request.pty = Some(PtySize { cols, rows });
        self
    }
    /// `proc_start` only: keep its stdin open for `proc_input`.
    pub fn keep_stdin(mut self) -> Self {
        self.request.keep_stdin = true;
        self
    }
    pub fn build(self) -> ExecRequest {
        self.request
    }
}

/// A connection to one agent.
pub struct AgentClient<S: Read + Write> {
    stream: S,
    next_id: u64,
}

impl<S: Read + Write> AgentClient<S> {
    pub fn new(stream: S) -> Self {
        Self { stream, next_id: 1 }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Sends one request frame and returns its id (for pipelining; pair with [`Self::recv`]).
    pub fn send(&mut self, request: &Request, payload: &[u8]) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.send_with_id(id, request, payload)?;
        self.next_id += 1;
        Ok(id)
    }

    fn send_with_id(
        &mut self,
        id: u64,
        request: &Request,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(ClientError::InvalidRequest(format!(
                "{}: payload of {} bytes exceeds the {MAX_PAYLOAD_LEN}-byte limit",
                request.op_name(),
                payload.len()
            )));
        }
        frame::write_frame(&mut self.stream, &encode_request(id, request), payload)?;
        Ok(())
    }

    /// Reads the next reply frame, whatever request it belongs to.
    pub fn recv(&mut self) -> Result<ReplyFrame, ClientError> {
        let frame = match frame::read_frame(&mut self.stream) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection",
                )))
            }
            Err(FrameError::Io(e)) => return Err(ClientError::Io(e)),
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        };
        let (id, reply) = decode_reply(&frame.header)?;
        Ok(ReplyFrame {
            id,
            reply,
            payload: frame.payload,
        })
    }

    /// Sends a request and reads its replies: chunks go to `on_chunk`, the final result is
    /// returned. If `on_chunk` fails, the remaining replies are still consumed (keeping the
    /// connection usable) and its error is returned.
    pub fn call(
        &mut self,
        request: &Request,
        payload: &[u8],
        on_chunk: &mut dyn FnMut(Stream, &[u8]) -> io::Result<()>,
    ) -> Result<Value, ClientError> {
        let id = self.send(request, payload)?;
        self.finish(id, on_chunk)
    }

    fn finish(
        &mut self,
        id: u64,
        on_chunk: &mut dyn FnMut(Stream, &[u8]) -> io::Result<()>,
    ) -> Result<Value, ClientError> {
        let mut sink_error = None;
        loop {
            let frame = self.recv()?;
            if frame.id != id && frame.id != 0 {
                return Err(ClientError::Protocol(format!(
                    "reply for request {} while waiting for request {id}",
                    frame.id
                )));
            }
            match frame.reply {
                Reply::Chunk { stream } => {
                    if sink_error.is_none() {
                        sink_error = on_chunk(stream, &frame.payload).err();
                    }
                }
                Reply::Result { result } => {
                    return match sink_error {
                        Some(e) => Err(ClientError::Io(e)),
                        None => Ok(result),
                    }
                }
                Reply::Error { code, message } => return Err(ClientError::Agent { code, message }),
            }
        }
    }

    fn call_typed<T: DeserializeOwned>(
        &mut self,
        request: &Request,
        payload: &[u8],
    ) -> Result<T, ClientError> {
        let value = self.call(request, payload, &mut |stream, _| {
            Err(io::Error::other(format!("unexpected {stream:?} chunk")))
        })?;
        parse_result(request, value)
    }

    pub fn ping(&mut self) -> Result<PingResult, ClientError> {
        self.call_typed(&Request::Ping, &[])
    }

    /// Runs a command and captures its output. `stdin` is at most MAX_PAYLOAD_LEN bytes.
    pub fn exec(&mut self, request: &ExecRequest, stdin: &[u8]) -> Result<ExecOutput, ClientError> {
        let mut output = ExecOutput::default();
        output.result = self.exec_streaming(request, stdin, |stream, data| {
            match stream {
                Stream::Stderr => output.stderr.extend_from_slice(data),
                _ => output.stdout.extend_from_slice(data),
            }
            Ok(())
        })?;
        Ok(output)
    }

    /// Runs a command, handing each output chunk to `on_output` as it arrives.
    pub fn exec_streaming(
        &mut self,
        request: &ExecRequest,
        stdin: &[u8],
        mut on_output: impl FnMut(Stream, &[u8]) -> io::Result<()>,
    ) -> Result<ExecResult, ClientError> {
        let request = Request::Exec(request.clone());
        let value = self.call(&request, stdin, &mut on_output)?;
        parse_result(&request, value)
    }

    /// Evaluates `code` in the agent's warm interpreter.
    pub fn eval(&mut self, code: &str, timeout_ms: Option<u64>) -> Result<EvalResult, ClientError> {
        self.call_typed(
            &Request::Eval(EvalRequest {
                code: code.to_string(),
                timeout_ms,
                ..Default::default()
            }),
            &[],
        )
    }

    /// Runs an eval as `request` says (context, environment, streaming). With `stream` set,
    /// `on_output` gets one empty `stdout` chunk once the code starts, then its output as it is
    /// written; without, the output is in the result and `on_output` is not called.
    pub fn eval_streaming(
        &mut self,
        request: &EvalRequest,
        mut on_output: impl FnMut(Stream, &[u8]) -> io::Result<()>,
    ) -> Result<EvalResult, ClientError> {
        let request = Request::Eval(request.clone());
        let value = self.call(&request, &[], &mut on_output)?;
        parse_result(&request, value)
    }

    /// Creates, lists, restarts or removes contexts of the eval interpreter.
    pub fn eval_context(
        &mut self,
        action: EvalContextAction,
        context: Option<&str>,
        cwd: Option<&str>,
    ) -> Result<EvalContextResult, ClientError> {
        self.call_typed(
            &Request::EvalContext(EvalContextRequest {
                action,
                context: context.map(str::to_string),
                cwd: cwd.map(str::to_string),
            }),
            &[],
        )
    }

    /// Streams a file (or the `length` bytes at `offset`) into `sink`; returns the byte count.
    pub fn read_file_range<W: Write>(
        &mut self,
        path: &str,
        offset: u64,
        length: Option<u64>,
        sink: &mut W,
    ) -> Result<u64, ClientError> {
        let request = Request::FileRead(FileReadRequest {
            path: path.to_string(),
            offset,
            length,
        });
        let value = self.call(&request, &[], &mut |_, data| sink.write_all(data))?;
        let result: FileReadResult = parse_result(&request, value)?;
        Ok(result.size)
    }

    pub fn read_file<W: Write>(&mut self, path: &str, sink: &mut W) -> Result<u64, ClientError> {
        self.read_file_range(path, 0, None, sink)
    }

    pub fn read_file_to_vec(&mut self, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut data = Vec::new();
        self.read_file(path, &mut data)?;
        Ok(data)
    }

    /// Uploads everything `source` yields to `path`, in chunks; the file appears (atomically,
    /// with `mode`, default 0o644) only once the upload is complete.
    pub fn write_file<R: Read>(
        &mut self,
        path: &str,
        source: &mut R,
        mode: Option<u32>,
        create_dirs: bool,
    ) -> Result<u64, ClientError> {
        let request = Request::FileWrite(FileWriteRequest {
            path: path.to_string(),
            mode,
            create_dirs,
            more: true,
        });
        let id = self.send(&request, &[])?;
        let mut buf = vec![0u8; CHUNK_LEN];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Abandon the upload: the agent keeps nothing of it. Closing is the only
                    // way to abort on the wire, so the connection is spent either way.
                    return Err(ClientError::Io(e));
                }
            };
            self.send_with_id(id, &Request::Data, &buf[..n])?;
        }
        self.send_with_id(id, &Request::End, &[])?;
        let value = self.finish(id, &mut |stream, _| {
            Err(io::Error::other(format!("unexpected {stream:?} chunk")))
        })?;
        let result: FileWriteResult = parse_result(&request, value)?;
        Ok(result.size)
    }

    pub fn write_file_bytes(
        &mut self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<u64, ClientError> {
        self.write_file(path, &mut io::Cursor::new(data), mode, false)
    }

    pub fn list_dir(&mut self, path: &str) -> Result<FileListResult, ClientError> {
        self.call_typed(&Request::FileList(PathRequest { path: path.into() }), &[])
    }

    pub fn stat(&mut self, path: &str) -> Result<FileStat, ClientError> {
        self.call_typed(&Request::FileStat(PathRequest { path: path.into() }), &[])
    }

    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<FileRemoveResult, ClientError> {
        self.call_typed(
            &Request::FileRemove(FileRemoveRequest {
                path: path.into(),
                recursive,
            }),
            &[],
        )
    }

    /// Renames `from` to `to` in the guest; the stat of `to`.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<FileStat, ClientError> {
        self.call_typed(
            &Request::FileRename(FileRenameRequest {
                from: from.into(),
                to: to.into(),
            }),
            &[],
        )
    }

    /// Creates a directory (`parents`: with its missing parents, and an existing one is fine).
    pub fn mkdir(
        &mut self,
        path: &str,
        parents: bool,
        mode: Option<u32>,
    ) -> Result<FileMkdirResult, ClientError> {
        self.call_typed(
            &Request::FileMkdir(FileMkdirRequest {
                path: path.into(),
                parents,
                mode,
            }),
            &[],
        )
    }

    /// Starts a background process; the agent answers with its pid at once.
    pub fn proc_start(
        &mut self,
        request: &ExecRequest,
        stdin: &[u8],
    ) -> Result<ProcStartResult, ClientError> {
        self.call_typed(&Request::ProcStart(request.clone()), stdin)
    }

    /// The agent's background processes, running and ended-but-not-waited-for.
    pub fn proc_list(&mut self) -> Result<ProcListResult, ClientError> {
        self.call_typed(&Request::ProcList, &[])
    }

    /// Waits up to `timeout_ms` (forever when None) for a background process to end; returns
    /// its captured output and state. A wait that sees the end collects the process.
    pub fn proc_wait(
        &mut self,
        pid: u32,
        timeout_ms: Option<u64>,
    ) -> Result<ProcOutput, ClientError> {
        let request = Request::ProcWait(ProcWaitRequest {
            pid,
            timeout_ms,
            follow: None,
        });
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let value = self.call(&request, &[], &mut |stream, data| {
            match stream {
                Stream::Stderr => stderr.extend_from_slice(data),
                _ => stdout.extend_from_slice(data),
            }
            Ok(())
        })?;
        Ok(ProcOutput {
            stdout,
            stderr,
            result: parse_result(&request, value)?,
        })
    }

    /// Follows a background process: `on_output` gets its output as it is written (from the
    /// start of its capture, or from now), until it ends or `timeout_ms` passes. Seeing the
    /// end collects it, as `proc_wait` does.
    pub fn proc_follow(
        &mut self,
        pid: u32,
        from: Follow,
        timeout_ms: Option<u64>,
        on_output: &mut dyn FnMut(Stream, &[u8]) -> io::Result<()>,
    ) -> Result<ProcWaitResult, ClientError> {
        let request = Request::ProcWait(ProcWaitRequest {
            pid,
            timeout_ms,
            follow: Some(from),
        });
        let value = self.call(&request, &[], on_output)?;
        parse_result(&request, value)
    }

    /// Writes `data` to a background process's kept stdin, then closes it if `close`.
    pub fn proc_input(
        &mut self,
        pid: u32,
        data: &[u8],
        close: bool,
    ) -> Result<ProcInputResult, ClientError> {
        self.call_typed(&Request::ProcInput(ProcInputRequest { pid, close }), data)
    }

    /// Resizes the terminal of a process started with `pty`.
    pub fn proc_resize(&mut self, pid: u32, size: PtySize) -> Result<Value, ClientError> {
        self.call(
            &Request::ProcResize(ProcResizeRequest { pid, size }),
            &[],
            &mut |_, _| Ok(()),
        )
    }

    /// Asks the agent for a TCP stream to `port` on the guest's loopback; on success the
    /// connection itself carries it from here on and is handed back.
    pub fn tcp_connect(mut self, port: u16) -> Result<(S, TcpConnectResult), ClientError> {
        let result = self.call_typed(&Request::TcpConnect(TcpConnectRequest { port }), &[])?;
        Ok((self.stream, result))
    }

    /// Sends `signal` (SIGKILL when None) to a background process's whole group.
    pub fn proc_kill(
        &mut self,
        pid: u32,
        signal: Option<i32>,
    ) -> Result<ProcKillResult, ClientError> {
        self.call_typed(&Request::ProcKill(ProcKillRequest { pid, signal }), &[])
    }

    /// Tells a freshly restored agent to mix `entropy` into its kernel pool, set its clock to
    /// `now`, and bump its fork counter. Send it before anything else after a restore.
    pub fn restored(
        &mut self,
        entropy: &[u8],
        now: SystemTime,
    ) -> Result<RestoredResult, ClientError> {
        self.restored_with(entropy, now, None)
    }

    /// [`Self::restored`], also giving the child the resolvers its network may reach (written
    /// to its resolv.conf); None leaves resolv.conf as the snapshot had it.
    pub fn restored_with(
        &mut self,
        entropy: &[u8],
        now: SystemTime,
        resolvers: Option<&[std::net::IpAddr]>,
    ) -> Result<RestoredResult, ClientError> {
        let since_epoch = now.duration_since(UNIX_EPOCH).map_err(|_| {
            ClientError::InvalidRequest("restored: the time is before the Unix epoch".into())
        })?;
        self.call_typed(
            &Request::Restored(RestoredRequest {
                realtime_sec: Some(since_epoch.as_secs() as i64),
                realtime_nsec: since_epoch.subsec_nanos(),
                resolvers: resolvers.map(|list| list.iter().map(ToString::to_string).collect()),
            }),
            entropy,
        )
    }
}

fn parse_result<T: DeserializeOwned>(request: &Request, value: Value) -> Result<T, ClientError> {
    serde_json::from_value(value)
        .map_err(|e| ClientError::Protocol(format!("{} result: {e}", request.op_name())))
}

/// Connects to an agent's Unix socket (`forkd-agent --unix PATH`).
pub fn connect_unix(path: impl AsRef<Path>) -> Result<UnixStream, ClientError> {
    Ok(UnixStream::connect(path)?)
}

/// Opens a stream to guest vsock `port` through a hybrid-vsock Unix socket (Firecracker
/// convention, also forkd's VMM): send `CONNECT <port>\n`, expect `OK <host port>\n`. The
/// returned stream then carries the guest port's bytes.
pub fn connect_hybrid_vsock(
    uds_path: impl AsRef<Path>,
    port: u32,
) -> Result<UnixStream, ClientError> {
    let path = uds_path.as_ref();
    let mut stream = UnixStream::connect(path)?;
    hybrid_vsock_handshake(&mut stream, port).map_err(|source| ClientError::Handshake {
        path: path.display().to_string(),
        source,
    })?;
    Ok(stream)
}

/// The client half of the hybrid-vsock handshake on an already connected stream.
pub fn hybrid_vsock_handshake<S: Read + Write>(
    stream: &mut S,
    port: u32,
) -> Result<u32, HandshakeError> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|source| HandshakeError::Send { port, source })?;
    // Byte by byte: anything after the newline already belongs to the agent protocol.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => return Err(HandshakeError::Closed { port }),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(HandshakeError::Read { port, source }),
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    text.strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or(HandshakeError::BadReply { port, reply: text })
}

/// Reads lines from `reader` until the agent's readiness line; returns the agent version.
pub fn wait_ready_line<R: BufRead>(reader: &mut R) -> Result<String, ClientError> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Protocol(
                "stream ended before the READY line".into(),
            ));
        }
        if let Some(version) = line.trim_end().strip_prefix("READY forkd-agent ") {
            return Ok(version.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose reads come from a script and whose writes are recorded.
    struct Scripted {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn handshake_accepts_ok_and_leaves_following_bytes() {
        let mut s = Scripted {
            input: io::Cursor::new(b"OK 1073741824\nFKA1".to_vec()),
            output: Vec::new(),
        };
        assert_eq!(hybrid_vsock_handshake(&mut s, 1024).unwrap(), 1073741824);
        assert_eq!(s.output, b"CONNECT 1024\n");
        let mut rest = Vec::new();
        s.input.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"FKA1");
    }

    #[test]
    fn handshake_rejects_garbage_and_eof() {
        for input in [&b"NOPE\n"[..], b"", b"OK notanumber\n"] {
            let mut s = Scripted {
                input: io::Cursor::new(input.to_vec()),
                output: Vec::new(),
            };
            assert!(hybrid_vsock_handshake(&mut s, 1024).is_err(), "{input:?}");
        }
    }

    #[test]
    fn ready_line_is_found_after_other_output() {
        let mut text = io::Cursor::new(b"starting\nREADY forkd-agent 0.1.0\n".to_vec());
        assert_eq!(wait_ready_line(&mut text).unwrap(), "0.1.0");
        let mut nothing = io::Cursor::new(b"starting\n".to_vec());
        assert!(wait_ready_line(&mut nothing).is_err());
    }

    #[test]
    fn oversized_stdin_is_refused_before_sending() {
        let mut client = AgentClient::new(Scripted {
            input: io::Cursor::new(Vec::new()),
            output: Vec::new(),
        });
        let big = vec![0u8; MAX_PAYLOAD_LEN + 1];
        let err = client
            .exec(&ExecBuilder::new(["cat"]).build(), &big)
            .unwrap_err();
        assert!(matches!(err, ClientError::InvalidRequest(_)), "{err}");
        assert!(client.get_ref().output.is_empty());
    }
}
