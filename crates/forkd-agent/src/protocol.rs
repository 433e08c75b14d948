//! The forkd-agent wire protocol, version 1.
//!
//! # Framing
//!
//! One stream connection (vsock or Unix socket) carries many requests. Everything on the wire,
//! in both directions, is a *frame*:
//!
//! ```text
//! offset 0   4 bytes   magic "FKA1"
//! offset 4   u32 BE    header length H   (at most MAX_HEADER_LEN = 1 MiB)
//! offset 8   u32 BE    payload length P  (at most MAX_PAYLOAD_LEN = 4 MiB)
//! offset 12  H bytes   header: one UTF-8 JSON object
//! offset 12+H P bytes  payload: raw bytes (stdin, file contents, output chunks, entropy)
//! ```
//!
//! Binary data always travels in the payload, never base64 inside JSON.
//!
//! # Requests (host → agent)
//!
//! The header is `{"v": 1, "id": N, "op": "<op>", ...op fields}`. `id` is chosen by the client,
//! must be non-zero, and tags every reply frame of that request, so one connection may have
//! several requests in flight (up to 64; more get `busy`); the agent runs each request on its
//! own thread. Ops:
//!
//! | op            | fields                                                       | payload        |
//! |---------------|--------------------------------------------------------------|----------------|
//! | `ping`        | –                                                            | –              |
//! | `exec`        | `argv`, `env` {k: v}, `clear_env`, `cwd`, `timeout_ms`       | stdin bytes    |
//! | `eval`        | `code`, `timeout_ms`, `stream`, `context`, `env`             | –              |
//! | `eval_context`| `action` (create/list/restart/remove), `context`, `cwd`      | –              |
//! | `file_read`   | `path`, `offset`, `length`                                   | –              |
//! | `file_write`  | `path`, `mode`, `create_dirs`, `more`                        | first chunk    |
//! | `data`        | – (continues the `file_write` with the same id)              | next chunk     |
//! | `end`         | – (finishes the `file_write` with the same id)               | –              |
//! | `file_list`   | `path`                                                       | –              |
//! | `file_stat`   | `path`                                                       | –              |
//! | `file_remove` | `path`, `recursive`                                          | –              |
//! | `file_mkdir`  | `path`, `parents`, `mode`                                    | –              |
//! | `file_rename` | `from`, `to` (an existing file at `to` is replaced)          | –              |
//! | `proc_start`  | as `exec`, plus `keep_stdin`, `pty` {cols, rows}             | stdin bytes    |
//! | `proc_list`   | –                                                            | –              |
//! | `proc_wait`   | `pid`, `timeout_ms`, `follow` (start/now: stream as written) | –              |
//! | `proc_kill`   | `pid`, `signal`                                              | –              |
//! | `proc_input`  | `pid`, `close` (to a `keep_stdin` process)                   | stdin bytes    |
//! | `proc_resize` | `pid`, `size` {cols, rows} (a `pty` process's terminal)      | –              |
//! | `tcp_connect` | `port` (guest loopback; the connection then carries TCP)     | –              |
//! | `restored`    | `realtime_sec`, `realtime_nsec`, `resolvers`                 | host entropy   |
//!
//! A `file_write` with `more: true` is followed by any number of `data` frames and one `end`
//! frame with the same id; the agent writes into a temporary file next to the target and renames
//! it into place only after `end`, so a failed or abandoned upload leaves nothing behind. `data`
//! and `end` frames for an id with no open upload are dropped (the upload may already have
//! failed and been answered).
//!
//! `file_mkdir` creates one directory (mode default 0o755, applied exactly, not through the
//! umask). Without `parents` an existing path is `already_exists` and a missing parent
//! `not_found`; with `parents` missing parents are created too and an existing directory is
//! not an error (the result says `created: false`). A path through a file is `not_a_directory`.
//!
//! # Background processes
//!
//! `exec` keeps its process tied to the request: output streams as chunks and the final frame
//! is the exit. Background processes are a separate family of ops rather than an `exec` flag,
//! because every part of the exchange differs (no chunks, an immediate answer, a later wait):
//!
//! - `proc_start` takes exactly `exec`'s fields and stdin payload, starts the process in a
//!   process group of its own and answers at once with its `pid` ([`ProcStartResult`]). The
//!   process outlives the connection that started it. Its stdout and stderr are captured, each
//!   into a ring buffer keeping the last [`PROC_CAPTURE_LEN`] bytes. `timeout_ms`, when given,
//!   kills its process group with SIGKILL when it expires.
//! - `proc_list` answers [`ProcListResult`]: every process in the table, running or exited.
//! - `proc_wait` waits up to `timeout_ms` (forever when absent; 0 polls) for the process to
//!   end, then sends what is captured of its output as `stdout` / `stderr` chunks and a
//!   [`ProcWaitResult`]. When it has ended, the wait collects it: its entry leaves the table
//!   (a second wait is `not_found`). When it is still running, the result says so, the output
//!   so far was sent, and the entry stays.
//! - `proc_kill` sends `signal` (default 9, SIGKILL; 1..=64) to the process's whole group and
//!   answers [`ProcKillResult`]; the entry stays until waited for, so the wait reports the
//!   signal.
//!
//! The `pid` is the guest's process id. An ended process is kept as a zombie until it is
//! collected, so its pid cannot be reused while its entry exists. At most
//! [`MAX_RUNNING_PROCS`] run at once (more get `busy`); of the ended ones not yet waited for
//! the newest [`MAX_EXITED_PROCS`] are kept, older ones are dropped. A process counts as ended
//! once it exited and its output pipes closed (or, when descendants hold them open, a short
//! grace period after its exit). Unknown pids are `not_found`.
//!
//! The table lives in the agent's memory and the processes in the guest, so a snapshot holds
//! both and every VM forked from it starts with the parent's background processes, still
//! running (each child's copy independent of the others'). That is what forking a VM means;
//! a child that does not want them kills them.
//!
//! # Eval
//!
//! `eval` runs Python (or JavaScript, below) code in the agent's long-lived interpreter and answers [`EvalResult`]:
//! the last expression's `repr()` (`value`), the exception, what the code printed, and its
//! display `results` as Jupyter MIME bundles (`{"text/plain": ..., "text/html": ..., "image/png":
//! base64, "application/json": {...}, ...}`): the last expression's value (`is_main`), what the
//! code passed to the `display()` built-in, and, when the code uses matplotlib's pyplot, each
//! figure still open (as a png; then closed). With `stream: true` the output is not in the
//! result: once the code starts running (its context found) the agent sends one empty `stdout`
//! chunk, then what the code writes as `stdout` / `stderr` chunks as it is written (whole
//! lines, or what it flushed, or a partial line after 100 ms). `env` is set in `os.environ` for
//! this eval only.
//!
//! Contexts are separate namespaces (each its own `__main__` module) with their own working
//! directory and execution count, in the one interpreter: imported modules, `sys.path`,
//! `os.environ` and threads are shared. `default` always exists (in the interpreter's working
//! directory); `eval_context` creates others (`cwd` default `/home/user`, else `/root`, else
//! `/`), lists them ([`EvalContextResult`]), restarts one (fresh namespace, its first working
//! directory, count 0) or removes one (not `default`). An unknown context is `not_found`. The
//! interpreter holds the contexts: when it dies or is killed on a timeout they are gone, and
//! the default one starts over empty.
//!
//! JavaScript: when the interpreter program is Node (`node`, `nodejs`, `node20`, ...; see
//! [`EvalStatus::language`]) the same requests run JavaScript, one language per agent. Code is
//! evaluated as in a browser's developer console (V8's REPL mode): top-level `await` works,
//! `const`/`let`/`class`/`function` declarations persist into later evals of the context, and
//! `value` is the last expression's `util.inspect()` text (none for `undefined`; a promise that
//! is the value is shown, not awaited). Its bundle has `text/plain`, plus `application/json` for
//! plain objects and arrays that JSON can carry. `console` and `process.stdout` /
//! `process.stderr` are the output; `display(v)` and `display({mime: data}, {raw: true})` add
//! results. Errors are `{type: error.name, message, traceback: error.stack}` without the
//! driver's frames (`Uncaught` with the value's text for a thrown non-error; a `SyntaxError`'s
//! traceback names `<eval-N>:line:column`). Contexts are separate `vm` contexts (their own
//! globals) with Node's globals and built-in modules, and `require` resolving from the context's
//! first directory, then `NODE_PATH`; the process, loaded modules, `process.env` and timers are
//! shared. `env` is set in `process.env` for one eval. `restored` replaces `Math.random` in
//! every context by a generator seeded from the kernel (V8 cannot reseed its own).
//!
//! `restored` is sent by the host first thing after every snapshot restore. The agent handles it
//! before any request that arrives after it, on any connection: it mixes the payload into the
//! kernel entropy pool, sets CLOCK_REALTIME, bumps the fork counter, and reseeds the eval
//! interpreter's `random` (and numpy's global generator) before the next eval. With
//! `resolvers` (the ones the child's network policy opens) it rewrites resolv.conf to list
//! exactly those, so a child resolves names the moment it resumes, whatever host the snapshot
//! was taken on.
//!
//! # Replies (agent → host)
//!
//! The header is `{"id": N, "type": "<type>", ...}`:
//!
//! - `{"type": "chunk", "stream": "stdout" | "stderr" | "data"}` with the bytes in the payload.
//!   `exec` streams its output this way as the process produces it; `file_read` streams the file.
//!   A client that wants captured output simply concatenates the chunks.
//! - `{"type": "result", "result": {...}}` — the final frame of a successful request; the shape
//!   of `result` depends on the op ([`PingResult`], [`ExecResult`], ...).
//! - `{"type": "error", "code": "...", "message": "..."}` — the final frame of a failed request.
//!
//! Every request gets exactly one final frame (`result` or `error`), after all its chunks.
//! Errors that cannot be tied to a request (unreadable JSON) use id 0. A frame whose lengths
//! exceed the limits is skipped and answered with `frame_too_large` (with the request's id when
//! its header could be read); the connection stays usable. A frame with a bad magic means the
//! stream is out of sync: the agent answers `bad_frame` with id 0 and closes that connection
//! (other connections are unaffected).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version of this protocol; sent as `v` in every request and reported by `ping`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Version of the agent binary (the crate version).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FKA1";
/// Length of the fixed frame prefix (magic + two lengths).
pub const FRAME_PREFIX_LEN: usize = 12;
/// Largest accepted JSON header, in bytes.
pub const MAX_HEADER_LEN: usize = 1 << 20;
/// Largest accepted payload, in bytes. Also the largest `exec` stdin.
pub const MAX_PAYLOAD_LEN: usize = 4 << 20;
/// Size of the chunks the agent and the client split streams into.
pub const CHUNK_LEN: usize = 256 << 10;
/// Requests one connection may have running at once; more are refused with `busy`.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 64;
/// Largest number of entries one `file_list` returns (the rest is reported as truncated).
pub const MAX_LIST_ENTRIES: usize = 5000;
/// Bytes of each output stream a background process keeps (the most recent ones).
pub const PROC_CAPTURE_LEN: usize = 1 << 20;
/// Background processes that may run at once; more `proc_start`s are refused with `busy`.
pub const MAX_RUNNING_PROCS: usize = 256;
/// Ended background processes kept until waited for; past this the oldest are dropped.
pub const MAX_EXITED_PROCS: usize = 256;
/// `proc_kill`'s signal when the request names none (SIGKILL).
pub const DEFAULT_KILL_SIGNAL: i32 = 9;
/// Largest signal number `proc_kill` accepts (Linux's SIGRTMAX).
pub const MAX_SIGNAL: i32 = 64;

/// vsock port the agent listens on inside the guest.
pub use forkd_guest_abi::GUEST_PORT as DEFAULT_VSOCK_PORT;
/// The host's vsock CID.
pub use forkd_guest_abi::HOST_CID;
/// vsock port on the host (CID 2) the agent sends its readiness line to.
pub use forkd_guest_abi::READY_PORT as READY_VSOCK_PORT;

/// The readiness line the agent writes once it is serving (project-wide convention).
pub fn ready_line() -> String {
    format!("READY forkd-agent {AGENT_VERSION}\n")
}

/// A request, as carried in the header's `op` field and the fields beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    Exec(ExecRequest),
    Eval(EvalRequest),
    EvalContext(EvalContextRequest),
    FileRead(FileReadRequest),
    FileWrite(FileWriteRequest),
    Data,
    End,
    FileList(PathRequest),
    FileStat(PathRequest),
    FileRemove(FileRemoveRequest),
    FileMkdir(FileMkdirRequest),
    FileRename(FileRenameRequest),
    ProcStart(ExecRequest),
    ProcList,
    ProcWait(ProcWaitRequest),
    ProcKill(ProcKillRequest),
    ProcInput(ProcInputRequest),
    ProcResize(ProcResizeRequest),
    TcpConnect(TcpConnectRequest),
    Restored(RestoredRequest),
}

/// Every op name the agent understands (used to tell `unknown_op` from `bad_request`).
pub const KNOWN_OPS: &[&str] = &[
    "ping",
    "exec",
    "eval",
    "eval_context",
    "file_read",
    "file_write",
    "data",
    "end",
    "file_list",
    "file_stat",
    "file_remove",
    "file_mkdir",
    "file_rename",
    "proc_start",
    "proc_list",
    "proc_wait",
    "proc_kill",
    "proc_input",
    "proc_resize",
    "tcp_connect",
    "restored",
];

impl Request {
    /// The op name as it appears on the wire.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Exec(_) => "exec",
            Request::Eval(_) => "eval",
            Request::EvalContext(_) => "eval_context",
            Request::FileRead(_) => "file_read",
            Request::FileWrite(_) => "file_write",
            Request::Data => "data",
            Request::End => "end",
            Request::FileList(_) => "file_list",
            Request::FileStat(_) => "file_stat",
            Request::FileRemove(_) => "file_remove",
            Request::FileMkdir(_) => "file_mkdir",
            Request::FileRename(_) => "file_rename",
            Request::ProcStart(_) => "proc_start",
            Request::ProcList => "proc_list",
            Request::ProcWait(_) => "proc_wait",
            Request::ProcKill(_) => "proc_kill",
            Request::ProcInput(_) => "proc_input",
            Request::ProcResize(_) => "proc_resize",
            Request::TcpConnect(_) => "tcp_connect",
            Request::Restored(_) => "restored",
        }
    }
}

/// Run a process. Its stdin is the frame payload (closed after it is written).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no slash.
    pub argv: Vec<String>,
    /// Variables added to (or, with `clear_env`, replacing) the agent's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub clear_env: bool,
    /// Working directory; the agent's own when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Wall-clock limit; on expiry the whole process group is killed with SIGKILL.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// `proc_start` only: stdin stays open after the payload is written, for `proc_input`
    /// to feed and close. (`exec` refuses it: its stdin is the one payload.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_stdin: bool,
    /// `proc_start` only: run it on a new pseudo-terminal of this size (its controlling
    /// terminal, in a session of its own). Its output is the terminal's, sent as `stdout`;
    /// `proc_input` writes to the terminal and `proc_resize` resizes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// Resizes the terminal of a process started with `pty`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProcResizeRequest {
    pub pid: u32,
    pub size: PtySize,
}

/// Evaluate code in the agent's long-lived interpreter.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalRequest {
    pub code: String,
    /// On expiry the interpreter is killed (its state is lost) and restarted on the next eval.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Send the output as chunks while the code runs (after one empty `stdout` chunk once it
    /// starts), rather than in the result.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    /// The context to run in; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Environment variables set in the interpreter for this eval only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What `eval_context` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalContextAction {
    /// Every context, `default` first.
    #[default]
    List,
    /// A new context (in `cwd`); answers it.
    Create,
    /// `context` gets a fresh namespace, its first working directory and count 0.
    Restart,
    /// `context` is removed (not `default`).
    Remove,
}

/// Manage the eval interpreter's contexts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EvalContextRequest {
    pub action: EvalContextAction,
    /// The context to restart or remove.
    #[serde(default)]
    pub context: Option<String>,
    /// A new context's working directory.
    #[serde(default)]
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FileReadRequest {
    pub path: String,
    #[serde(default)]
    pub offset: u64,
    /// Bytes to read from `offset`; to the end of the file when absent.
    #[serde(default)]
    pub length: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FileWriteRequest {
    pub path: String,
    /// Permission bits of the new file (default 0o644).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_dirs: bool,
    /// `data` frames and an `end` frame follow; otherwise the payload is the whole file.
    #[serde(default)]
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PathRequest {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FileRemoveRequest {
    pub path: String,
    /// Required to remove a non-empty directory.
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FileMkdirRequest {
    pub path: String,
    /// Create missing parents too, and accept a directory that already exists (`mkdir -p`).
    #[serde(default)]
    pub parents: bool,
    /// Permission bits of the new directory (default 0o755); parents get 0o755.
    #[serde(default)]
    pub mode: Option<u32>,
}

/// Renames (moves) `from` to `to` within the guest's filesystem; answers the stat of `to`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FileRenameRequest {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProcWaitRequest {
    pub pid: u32,
    /// How long to wait for the end; forever when absent, not at all when 0.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Stream the output as it is written instead of sending the capture at the end; from
    /// where. A following wait answers at the end (or the timeout) like any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<Follow>,
}

/// Where a following `proc_wait` starts sending output from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Follow {
    /// The start of what is still captured (all of it unless the ring buffer overflowed).
    Start,
    /// What the process writes from now on.
    Now,
}

/// Writes the payload to a background process's stdin (started with `keep_stdin`), then
/// closes it when `close` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProcInputRequest {
    pub pid: u32,
    #[serde(default)]
    pub close: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProcKillRequest {
    pub pid: u32,
    /// Signal number, 1..=MAX_SIGNAL; DEFAULT_KILL_SIGNAL when absent.
    #[serde(default)]
    pub signal: Option<i32>,
}

/// Sent by the host after every restore. The payload is fresh entropy for the guest kernel.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RestoredRequest {
    /// Host wall-clock time (seconds since the Unix epoch) to set CLOCK_REALTIME to.
    #[serde(default)]
    pub realtime_sec: Option<i64>,
    #[serde(default)]
    pub realtime_nsec: u32,
    /// The resolvers the child's network policy opens (`--allow-dns`): the agent writes them
    /// to the guest's resolv.conf. Absent: resolv.conf is left as the snapshot had it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolvers: Option<Vec<String>>,
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
    /// File contents (`file_read`).
    Data,
}

/// A reply frame's header, minus the id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Chunk { stream: Stream },
    Result { result: Value },
    Error { code: ErrorCode, message: String },
}

/// Machine-readable error categories; `message` carries the human-readable one-liner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame's magic was wrong; the connection is closed after this reply.
    BadFrame,
    /// The frame's header or payload exceeded the limits; it was skipped.
    FrameTooLarge,
    /// The header was not valid JSON, lacked `v`/`id`/`op`, or an op field was wrong.
    BadRequest,
    UnknownOp,
    UnsupportedVersion,
    NotFound,
    PermissionDenied,
    AlreadyExists,
    /// A component of the path is not a directory (or a directory was required).
    NotADirectory,
    /// The guest's filesystem is full (or the quota reached).
    NoSpace,
    /// Any other I/O failure.
    Io,
    /// The process for `exec` could not be started.
    SpawnFailed,
    /// No eval interpreter is configured or it could not be started.
    EvalUnavailable,
    /// The eval interpreter exited while evaluating; it restarts (fresh) on the next eval.
    InterpreterDied,
    /// The reply would have exceeded MAX_HEADER_LEN.
    ReplyTooLarge,
    /// The connection already has MAX_IN_FLIGHT_PER_CONNECTION requests running.
    Busy,
    Internal,
    /// A code this client does not know (sent by a newer agent).
    #[serde(other)]
    Other,
}

impl ErrorCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::NotADirectory => "not_a_directory",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::Io => "io",
            ErrorCode::SpawnFailed => "spawn_failed",
            ErrorCode::EvalUnavailable => "eval_unavailable",
            ErrorCode::InterpreterDied => "interpreter_died",
            ErrorCode::ReplyTooLarge => "reply_too_large",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
            ErrorCode::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `ping` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    pub agent_version: String,
    pub protocol_version: u32,
    pub uptime_ms: u64,
    /// How many `restored` notifications this agent has handled (forks/restores of this VM).
    pub fork_count: u64,
    pub pid: u32,
    pub eval: EvalStatus,
}

/// State of the eval interpreter, as reported by `ping`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalStatus {
    /// An interpreter is configured.
    pub enabled: bool,
    /// The interpreter process is running.
    pub ready: bool,
    pub interpreter: Vec<String>,
    /// The language `eval` runs: `python`, or `javascript` when the interpreter is Node (the
    /// interpreter program's name decides). Empty from agents older than this field.
    #[serde(default)]
    pub language: String,
    /// Why the interpreter could not be started, or why the warm-up code failed.
    pub error: Option<String>,
}

/// `exec` result (the output itself arrived as chunks before it).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit code when the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    /// The timeout expired and the process group was killed.
    pub timed_out: bool,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub duration_ms: u64,
}

/// `eval` result.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalResult {
    /// `repr()` of the last statement's value when it is an expression whose value is not
    /// `None` (as at the interactive prompt); `None` otherwise or on error.
    pub value: Option<String>,
    /// What the code printed to `sys.stdout` / `sys.stderr` (truncated past 256 KiB / 64 KiB).
    pub stdout: String,
    pub stderr: String,
    /// The exception the code raised.
    pub error: Option<EvalError>,
    /// The timeout expired; the interpreter was killed and its state is lost.
    pub timed_out: bool,
    /// Display results in order (see the module docs): `display()` calls, the last
    /// expression's value (`is_main`), matplotlib figures.
    #[serde(default)]
    pub results: Vec<EvalDisplay>,
    /// This eval's number in its context (1 for the first).
    #[serde(default)]
    pub execution_count: u64,
}

/// One display result: a Jupyter MIME bundle (binary formats in base64).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalDisplay {
    /// MIME type to data: a string, or JSON for `application/json` and the like.
    pub data: serde_json::Map<String, Value>,
    /// The value of the code's last expression (Jupyter's `execute_result`).
    #[serde(default)]
    pub is_main: bool,
}

/// One of the eval interpreter's contexts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EvalContext {
    pub id: String,
    /// The interpreter's language: `python` or `javascript`.
    pub language: String,
    /// Its working directory (where its last eval left it).
    pub cwd: String,
    /// Evals run in it since it was created or restarted.
    pub execution_count: u64,
}

/// `eval_context` result: the contexts listed, or the one created, restarted or removed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EvalContextResult {
    pub contexts: Vec<EvalContext>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalError {
    /// Exception class name, e.g. `ZeroDivisionError`.
    #[serde(rename = "type")]
    pub type_name: String,
    pub message: String,
    /// Formatted traceback, without the agent driver's own frames.
    pub traceback: String,
}

/// `file_read` result (the contents arrived as `data` chunks before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FileReadResult {
    /// Bytes sent.
    pub size: u64,
}

/// `file_write` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FileWriteResult {
    /// Bytes written.
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// `file_stat` result (does not follow a final symlink).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub mtime_ms: i64,
    pub uid: u32,
    pub gid: u32,
    pub link_target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub stat: FileStat,
}

/// `file_list` result, entries sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileListResult {
    pub entries: Vec<DirEntry>,
    /// The directory had more than MAX_LIST_ENTRIES entries; only the first ones (by name) are listed.
    pub truncated: bool,
}

/// `file_remove` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRemoveResult {
    pub kind: FileKind,
}

/// `file_mkdir` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMkdirResult {
    /// False when `parents` was set and the directory already existed.
    pub created: bool,
    pub stat: FileStat,
}

/// `proc_start` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcStartResult {
    pub pid: u32,
    /// Wall-clock start, milliseconds since the Unix epoch (guest clock).
    pub started_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcState {
    Running,
    /// Ended (exited or killed); see `exit_code` / `signal`.
    Exited,
}

/// One background process, as `proc_list` and `proc_wait` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    pub pid: u32,
    pub argv: Vec<String>,
    pub state: ProcState,
    /// Exit code when it exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    /// Its `timeout_ms` expired and the agent killed its process group.
    pub timed_out: bool,
    /// Milliseconds since the Unix epoch (guest clock).
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// Bytes it wrote to each stream so far (captured or not).
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

/// `proc_list` result, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcListResult {
    pub processes: Vec<ProcInfo>,
}

/// `proc_wait` result (the captured output arrived as `stdout` / `stderr` chunks before it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcWaitResult {
    #[serde(flatten)]
    pub process: ProcInfo,
    /// Bytes of each stream that fell out of the ring buffer and were not sent.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

/// Connects to a TCP port of the guest's loopback; after the answer, the connection carries
/// that TCP stream's bytes both ways instead of frames. Send it as the only request of a
/// fresh connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TcpConnectRequest {
    pub port: u16,
}

/// `tcp_connect` result: the address it reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnectResult {
    pub address: String,
}

/// `proc_input` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInputResult {
    pub pid: u32,
    pub written: u64,
    /// Its stdin is closed (by this request or an earlier one).
    pub closed: bool,
}

/// `proc_kill` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcKillResult {
    pub pid: u32,
    pub signal: i32,
    /// Its state when the signal was sent (an ended process's group may still have members).
    pub state: ProcState,
}

/// How the entropy from a `restored` notification reached the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntropyMethod {
    /// RNDADDENTROPY ioctl: mixed in and credited.
    Ioctl,
    /// Written to /dev/urandom: mixed in, not credited (the ioctl was not permitted).
    Write,
    /// Nothing was mixed in (empty payload, or both methods failed — see the note).
    None,
}

/// What happened to the clock on a `restored` notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockOutcome {
    Set,
    /// clock_settime returned EPERM (the agent lacks CAP_SYS_TIME).
    NotPermitted,
    /// clock_settime failed otherwise (see the note).
    Failed,
    /// The agent runs with `--skip-clock-set` (e.g. on a host, where it must not move the clock).
    Skipped,
    /// The request carried no time.
    NotRequested,
}

/// `restored` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredResult {
    /// The fork counter after this notification.
    pub fork_count: u64,
    pub entropy_bytes: u64,
    pub entropy_method: EntropyMethod,
    /// Why the ioctl (or the write) did not work, when it did not.
    pub entropy_note: Option<String>,
    /// Whether the kernel's CRNG was reseeded from the pool at once (RNDRESEEDCRNG). Mixing
    /// alone changes nothing a child reads until the kernel's next timed reseed, so without
    /// this two children could read the same /dev/urandom bytes; `entropy_note` says why not.
    #[serde(default)]
    pub crng_reseeded: bool,
    pub clock: ClockOutcome,
    pub clock_note: Option<String>,
    /// Whether resolv.conf now lists the request's `resolvers` (false when none were sent).
    #[serde(default)]
    pub resolvers_written: bool,
    /// Why resolv.conf could not be written, when it could not.
    #[serde(default)]
    pub resolvers_note: Option<String>,
}

/// Encodes a request header: the op's JSON with `v` and `id` added.
pub fn encode_request(id: u64, request: &Request) -> Vec<u8> {
    let mut value = serde_json::to_value(request).expect("requests always serialize");
    let object = value
        .as_object_mut()
        .expect("requests serialize to objects");
    object.insert("v".into(), Value::from(PROTOCOL_VERSION));
    object.insert("id".into(), Value::from(id));
    serde_json::to_vec(&value).expect("JSON values always serialize")
}

/// A request header that could not be decoded: the id (0 if unknown), code and message.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub id: u64,
    pub code: ErrorCode,
    pub message: String,
}

/// Decodes a request header, telling apart bad JSON, missing fields, version and op problems.
pub fn decode_request(header: &[u8]) -> Result<(u64, Request), DecodeError> {
    let fail = |id, code, message: String| DecodeError { id, code, message };
    let value: Value = serde_json::from_slice(header).map_err(|e| {
        fail(
            0,
            ErrorCode::BadRequest,
            format!("request header is not valid JSON: {e}"),
        )
    })?;
    let Some(object) = value.as_object() else {
        return Err(fail(
            0,
            ErrorCode::BadRequest,
            "request header is not a JSON object".into(),
        ));
    };
    let id = match object.get("id").and_then(Value::as_u64) {
        Some(id) if id != 0 => id,
        _ => {
            return Err(fail(
                0,
                ErrorCode::BadRequest,
                "request header lacks a non-zero integer \"id\"".into(),
            ))
        }
    };
    match object.get("v").and_then(Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(fail(
                id,
                ErrorCode::UnsupportedVersion,
                format!("request {id}: protocol version {v} is not supported (this agent speaks {PROTOCOL_VERSION})"),
            ))
        }
        None => {
            return Err(fail(
                id,
                ErrorCode::BadRequest,
                format!("request {id}: header lacks an integer \"v\" (protocol version)"),
            ))
        }
    }
    let op = match object.get("op").and_then(Value::as_str) {
        Some(op) => op.to_owned(),
        None => {
            return Err(fail(
                id,
                ErrorCode::BadRequest,
                format!("request {id}: header lacks a string \"op\""),
            ))
        }
    };
    if !KNOWN_OPS.contains(&op.as_str()) {
        return Err(fail(
            id,
            ErrorCode::UnknownOp,
            format!("request {id}: unknown op {op:?}"),
        ));
    }
    let request = serde_json::from_value(value).map_err(|e| {
        fail(
            id,
            ErrorCode::BadRequest,
            format!("request {id} ({op}): {e}"),
        )
    })?;
    Ok((id, request))
}

/// Encodes a reply header: the reply's JSON with `id` added.
pub fn encode_reply(id: u64, reply: &Reply) -> Vec<u8> {
    let mut value = serde_json::to_value(reply).expect("replies always serialize");
    value
        .as_object_mut()
        .expect("replies serialize to objects")
        .insert("id".into(), Value::from(id));
    serde_json::to_vec(&value).expect("JSON values always serialize")
}

/// Why a reply header could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ReplyDecodeError {
    #[error("reply header is not valid JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("reply header lacks an integer \"id\"")]
    NoId,
    #[error("reply {id}")]
    Body {
        id: u64,
        #[source]
        source: serde_json::Error,
    },
}

/// Decodes a reply header into its id and body.
pub fn decode_reply(header: &[u8]) -> Result<(u64, Reply), ReplyDecodeError> {
    let value: Value = serde_json::from_slice(header).map_err(ReplyDecodeError::NotJson)?;
    let id = value
        .get("id")
        .and_then(Value::as_u64)
        .ok_or(ReplyDecodeError::NoId)?;
    let reply =
        serde_json::from_value(value).map_err(|source| ReplyDecodeError::Body { id, source })?;
    Ok((id, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_with_id_and_version() {
        let request = Request::Exec(ExecRequest {
            argv: vec!["echo".into(), "hi".into()],
            timeout_ms: Some(5),
            ..Default::default()
        });
        let header = encode_request(7, &request);
        let text = String::from_utf8(header.clone()).unwrap();
        assert!(text.contains("\"op\":\"exec\""), "{text}");
        assert!(text.contains("\"v\":1"), "{text}");
        assert_eq!(decode_request(&header).unwrap(), (7, request));
    }

    #[test]
    fn decode_classifies_bad_headers() {
        let err = decode_request(b"{not json").unwrap_err();
        assert_eq!((err.id, err.code), (0, ErrorCode::BadRequest));
        let err = decode_request(br#"[1,2]"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        let err = decode_request(br#"{"v":1,"op":"ping"}"#).unwrap_err();
        assert_eq!((err.id, err.code), (0, ErrorCode::BadRequest));
        let err = decode_request(br#"{"v":9,"id":3,"op":"ping"}"#).unwrap_err();
        assert_eq!((err.id, err.code), (3, ErrorCode::UnsupportedVersion));
        let err = decode_request(br#"{"v":1,"id":4,"op":"reboot"}"#).unwrap_err();
        assert_eq!((err.id, err.code), (4, ErrorCode::UnknownOp));
        assert!(err.message.contains("reboot"), "{}", err.message);
        let err = decode_request(br#"{"v":1,"id":5,"op":"exec","argv":"ls"}"#).unwrap_err();
        assert_eq!((err.id, err.code), (5, ErrorCode::BadRequest));
        let err = decode_request(br#"{"v":1,"id":6}"#).unwrap_err();
        assert_eq!((err.id, err.code), (6, ErrorCode::BadRequest));
    }

    #[test]
    fn every_request_variant_uses_a_known_op_name() {
        let all = [
            Request::Ping,
            Request::Exec(Default::default()),
            Request::Eval(Default::default()),
            Request::EvalContext(Default::default()),
            Request::FileRead(Default::default()),
            Request::FileWrite(Default::default()),
            Request::Data,
            Request::End,
            Request::FileList(Default::default()),
            Request::FileStat(Default::default()),
            Request::FileRemove(Default::default()),
            Request::FileMkdir(Default::default()),
            Request::FileRename(Default::default()),
            Request::ProcStart(Default::default()),
            Request::ProcList,
            Request::ProcWait(Default::default()),
            Request::ProcKill(Default::default()),
            Request::ProcInput(Default::default()),
            Request::ProcResize(Default::default()),
            Request::TcpConnect(Default::default()),
            Request::Restored(Default::default()),
        ];
        assert_eq!(all.len(), KNOWN_OPS.len());
        for request in all {
            let (_, decoded) = decode_request(&encode_request(1, &request)).unwrap();
            assert_eq!(decoded.op_name(), request.op_name());
            assert!(KNOWN_OPS.contains(&request.op_name()));
        }
    }

    #[test]
    fn proc_wait_results_are_flat_objects_that_round_trip() {
        let result = ProcWaitResult {
            process: ProcInfo {
                pid: 42,
                argv: vec!["sleep".into(), "1".into()],
                state: ProcState::Exited,
                exit_code: None,
                signal: Some(9),
                timed_out: false,
                started_ms: 1,
                ended_ms: Some(2),
                stdout_bytes: 3,
                stderr_bytes: 0,
            },
            stdout_dropped: 0,
            stderr_dropped: 0,
        };
        let value = serde_json::to_value(&result).unwrap();
        assert_eq!(value["pid"], 42, "{value}");
        assert_eq!(value["state"], "exited", "{value}");
        assert_eq!(
            serde_json::from_value::<ProcWaitResult>(value).unwrap(),
            result
        );
        let (_, decoded) = decode_request(br#"{"v":1,"id":1,"op":"proc_kill","pid":7}"#).unwrap();
        assert_eq!(
            decoded,
            Request::ProcKill(ProcKillRequest {
                pid: 7,
                signal: None
            })
        );
    }

    #[test]
    fn eval_requests_without_the_newer_fields_keep_their_meaning() {
        let (_, decoded) =
            decode_request(br#"{"v":1,"id":1,"op":"eval","code":"1","timeout_ms":5}"#).unwrap();
        assert_eq!(
            decoded,
            Request::Eval(EvalRequest {
                code: "1".into(),
                timeout_ms: Some(5),
                ..Default::default()
            })
        );
        // Defaults are not sent, so an older agent sees the request it knows.
        let header = encode_request(1, &Request::Eval(EvalRequest::default()));
        let text = String::from_utf8(header).unwrap();
        assert!(
            !text.contains("stream") && !text.contains("context") && !text.contains("env"),
            "{text}"
        );
        let old_result: EvalResult = serde_json::from_str(
            r#"{"value":"2","stdout":"","stderr":"","error":null,"timed_out":false}"#,
        )
        .unwrap();
        assert_eq!(
            (old_result.results.len(), old_result.execution_count),
            (0, 0)
        );
        let (_, decoded) = decode_request(
            br#"{"v":1,"id":2,"op":"eval_context","action":"remove","context":"c1"}"#,
        )
        .unwrap();
        assert_eq!(
            decoded,
            Request::EvalContext(EvalContextRequest {
                action: EvalContextAction::Remove,
                context: Some("c1".into()),
                cwd: None,
            })
        );
    }

    #[test]
    fn reply_round_trips_and_tolerates_unknown_error_codes() {
        let reply = Reply::Chunk {
            stream: Stream::Stderr,
        };
        assert_eq!(decode_reply(&encode_reply(9, &reply)).unwrap(), (9, reply));
        let (id, reply) =
            decode_reply(br#"{"id":2,"type":"error","code":"brand_new","message":"m"}"#).unwrap();
        assert_eq!(id, 2);
        assert_eq!(
            reply,
            Reply::Error {
                code: ErrorCode::Other,
                message: "m".into()
            }
        );
    }
}
