//! Background processes (`proc_*` ops): started detached from the request that asked, their
//! output kept in ring buffers, their end kept until a `proc_wait` collects it.
//!
//! Each process has three helpers on the pool: two output pumps and a supervisor that sees the
//! exit with `waitid(WNOWAIT)`, which leaves the process a zombie. Only collecting it (a wait
//! that saw the end, or eviction) reaps it, always under the table's lock and after marking it
//! reaped: until then its pid cannot be reused, so a pid in the table always names the process
//! it was given to, and nothing signals a pid once it may belong to someone else.
//!
//! Lock order: the table, then a process's state; never the other way round.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::exec::{command, feed_stdin, DRAIN_GRACE};
use super::{lock, pty, OpError, Replier};
use crate::protocol::{
    ErrorCode, ExecRequest, Follow, ProcInfo, ProcInputRequest, ProcInputResult, ProcKillRequest,
    ProcKillResult, ProcListResult, ProcResizeRequest, ProcStartResult, ProcState, ProcWaitRequest,
    ProcWaitResult, Stream, DEFAULT_KILL_SIGNAL, MAX_EXITED_PROCS, MAX_RUNNING_PROCS, MAX_SIGNAL,
    PROC_CAPTURE_LEN,
};

/// Read size of the output pumps: smaller than exec's chunks, as many of these may be parked.
const PIPE_READ_LEN: usize = 64 << 10;
/// A wait with no deadline wakes this often to notice that its connection went away, so an
/// abandoned wait on a process that never ends does not hold a thread forever.
const WAIT_POLL: Duration = Duration::from_secs(1);

/// Orders starts (for listing) and ends (for eviction) without trusting the guest clock,
/// which a `restored` may move.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn next_seq() -> u64 {
    SEQUENCE.fetch_add(1, Ordering::SeqCst)
}

/// The agent's background processes, by pid.
#[derive(Default)]
pub(super) struct ProcTable {
    procs: Mutex<BTreeMap<u32, Arc<Proc>>>,
}

struct Proc {
    pid: u32,
    argv: Vec<String>,
    started_ms: i64,
    start_seq: u64,
    state: Mutex<ProcInner>,
    /// Notified on every change of `state` that a waiter may care about (output included).
    changed: Condvar,
    /// Its stdin when started with `keep_stdin` (its terminal with `pty`), until closed. A
    /// lock of its own: a write may block on a full pipe and must not hold up the output
    /// pumps or waiters.
    stdin: Mutex<Option<File>>,
    /// The master side of its terminal, when started with `pty`.
    terminal: Option<OwnedFd>,
}

#[derive(Default)]
struct ProcInner {
    stdout: Capture,
    stderr: Capture,
    pipes_open: u8,
    /// How the group leader ended, as soon as waitid reports it.
    exit: Option<ExitStatus>,
    /// Set once the exit is known and the output drained (or the grace period passed): from
    /// here on the process is `exited` and a wait collects it.
    end: Option<End>,
    timed_out: bool,
    /// The zombie is gone: its pid may belong to another process now.
    reaped: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct ExitStatus {
    code: Option<i32>,
    signal: Option<i32>,
}

#[derive(Debug, Clone, Copy)]
struct End {
    status: ExitStatus,
    ended_ms: i64,
    seq: u64,
}

impl ProcInner {
    fn capture(&mut self, stream: Stream) -> &mut Capture {
        match stream {
            Stream::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        }
    }
}

impl Proc {
    fn info(&self, inner: &ProcInner) -> ProcInfo {
        let status = inner.end.map(|e| e.status).unwrap_or_default();
        ProcInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            state: match inner.end {
                Some(_) => ProcState::Exited,
                None => ProcState::Running,
            },
            exit_code: status.code,
            signal: status.signal,
            timed_out: inner.timed_out,
            started_ms: self.started_ms,
            ended_ms: inner.end.map(|e| e.ended_ms),
            stdout_bytes: inner.stdout.total,
            stderr_bytes: inner.stderr.total,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcInner> {
        lock(&self.state)
    }

    /// Waits for a change of state, at most `limit`.
    fn wait_change<'a>(
        &self,
        guard: MutexGuard<'a, ProcInner>,
        limit: Duration,
    ) -> MutexGuard<'a, ProcInner> {
        match self.changed.wait_timeout(guard, limit) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }
}

impl ProcTable {
    pub fn start(&self, req: &ExecRequest, mut stdin: Vec<u8>) -> Result<ProcStartResult, OpError> {
        let program = req
            .argv
            .first()
            .ok_or_else(|| OpError::new(ErrorCode::BadRequest, "proc_start: argv is empty"))?;
        // Held across the spawn, so concurrent starts cannot overshoot the limit.
        let mut procs = lock(&self.procs);
        let running = evict_exited(&mut procs);
        if running >= MAX_RUNNING_PROCS {
            return Err(OpError::new(
                ErrorCode::Busy,
                format!("proc_start {program:?}: {MAX_RUNNING_PROCS} background processes are already running"),
            ));
        }
        let spawn_failed = |e: io::Error| {
            OpError::new(
                ErrorCode::SpawnFailed,
                format!("proc_start {program:?}: {e}"),
            )
        };
        let (mut cmd, terminal) = match req.pty {
            Some(size) => {
                let (master, slave) = pty::open(size).map_err(spawn_failed)?;
                (
                    pty::command(req, &slave).map_err(spawn_failed)?,
                    Some(master),
                )
            }
            None => (command(req, req.keep_stdin || !stdin.is_empty()), None),
        };
        // The parent's copies of the slave side are gone once `cmd` is: the terminal's
        // output then ends when the process and its children close theirs.
        let spawned = cmd.spawn();
        drop(cmd);
        let mut child = spawned.map_err(spawn_failed)?;
        // A terminal's output is one stream, read from its master side.
        let terminal_output = match &terminal {
            Some(master) => Some(File::from(master.try_clone().map_err(spawn_failed)?)),
            None => None,
        };
        let pipes: [(Option<Box<dyn Read + Send>>, Stream); 2] = match terminal_output {
            Some(output) => [
                (Some(Box::new(output)), Stream::Stdout),
                (None, Stream::Stderr),
            ],
            None => [
                (
                    child.stdout.take().map(|p| Box::new(p) as _),
                    Stream::Stdout,
                ),
                (
                    child.stderr.take().map(|p| Box::new(p) as _),
                    Stream::Stderr,
                ),
            ],
        };
        let input = match (&terminal, child.stdin.take()) {
            (Some(master), _) => Some(File::from(master.try_clone().map_err(spawn_failed)?)),
            (None, Some(pipe)) if req.keep_stdin => Some(File::from(OwnedFd::from(pipe))),
            (None, Some(pipe)) => {
                feed_stdin(pipe, std::mem::take(&mut stdin));
                None
            }
            (None, None) => None,
        };
        let proc = Arc::new(Proc {
            pid: child.id(),
            argv: req.argv.clone(),
            started_ms: now_ms(),
            start_seq: next_seq(),
            state: Mutex::new(ProcInner {
                pipes_open: pipes.iter().filter(|(p, _)| p.is_some()).count() as u8,
                ..ProcInner::default()
            }),
            changed: Condvar::new(),
            stdin: Mutex::new(None),
            terminal,
        });
        procs.insert(proc.pid, proc.clone());
        drop(procs);
        tracing::debug!("proc_start {:?}: pid {}", req.argv, proc.pid);

        if let Some(mut input) = input {
            // Written here, before the answer, so a `proc_input` cannot overtake it; a kept
            // stdin's first payload is meant to be small (a pipe holds 64 KiB).
            let _ = input.write_all(&stdin);
            *lock(&proc.stdin) = Some(input);
        }
        for (pipe, stream) in pipes {
            if let Some(pipe) = pipe {
                helper("proc-output", {
                    let proc = proc.clone();
                    move || capture_output(pipe, stream, &proc)
                });
            }
        }
        helper("proc-supervisor", {
            let proc = proc.clone();
            move || supervise(&proc)
        });
        if let Some(ms) = req.timeout_ms {
            let proc = proc.clone();
            helper("proc-timeout", move || {
                enforce_timeout(&proc, Duration::from_millis(ms))
            });
        }
        // `child` is dropped without a wait: the supervisor sees the exit, a collector reaps.
        Ok(ProcStartResult {
            pid: proc.pid,
            started_ms: proc.started_ms,
        })
    }

    pub fn list(&self) -> ProcListResult {
        let mut procs = lock(&self.procs);
        evict_exited(&mut procs);
        let mut listed: Vec<(u64, ProcInfo)> = procs
            .values()
            .map(|p| (p.start_seq, p.info(&p.lock())))
            .collect();
        listed.sort_by_key(|(seq, _)| *seq);
        ProcListResult {
            processes: listed.into_iter().map(|(_, info)| info).collect(),
        }
    }

    /// Waits for the end (within the request's timeout), sends the captured output as chunks
    /// (as it is written when following), and collects the process when it has ended.
    pub fn wait(
        &self,
        req: &ProcWaitRequest,
        replier: &Replier,
    ) -> Result<ProcWaitResult, OpError> {
        let context = format!("proc_wait {}", req.pid);
        let proc = self.get(req.pid, &context)?;
        let deadline = req
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        if let Some(from) = req.follow {
            let dropped = follow(&proc, from, deadline, replier, &context)?;
            let result = ProcWaitResult {
                process: proc.info(&proc.lock()),
                stdout_dropped: dropped[0],
                stderr_dropped: dropped[1],
            };
            if result.process.state == ProcState::Exited {
                self.collect(&proc);
            }
            return Ok(result);
        }
        let mut inner = proc.lock();
        while inner.end.is_none() {
            let left = match deadline {
                Some(at) => at.saturating_duration_since(Instant::now()),
                None => WAIT_POLL,
            };
            if left.is_zero() {
                break;
            }
            if replier.peer_gone() {
                return Err(OpError::new(
                    ErrorCode::Io,
                    format!("{context}: the connection closed while waiting"),
                ));
            }
            inner = proc.wait_change(inner, left.min(WAIT_POLL));
        }
        let stdout = inner.stdout.contents();
        let stderr = inner.stderr.contents();
        let result = ProcWaitResult {
            process: proc.info(&inner),
            stdout_dropped: inner.stdout.dropped(),
            stderr_dropped: inner.stderr.dropped(),
        };
        drop(inner);
        // Collected only once its output is on its way: a wait whose peer vanished mid-reply
        // leaves the entry for the next one.
        for (stream, data) in [(Stream::Stdout, stdout), (Stream::Stderr, stderr)] {
            replier
                .chunk(stream, &data)
                .map_err(|e| OpError::io(&context, &e))?;
        }
        if result.process.state == ProcState::Exited {
            self.collect(&proc);
        }
        Ok(result)
    }

    pub fn kill(&self, req: &ProcKillRequest) -> Result<ProcKillResult, OpError> {
        let context = format!("proc_kill {}", req.pid);
        let signal = req.signal.unwrap_or(DEFAULT_KILL_SIGNAL);
        if !(1..=MAX_SIGNAL).contains(&signal) {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!("{context}: {signal} is not a signal number (1..={MAX_SIGNAL})"),
            ));
        }
        let proc = self.get(req.pid, &context)?;
        // Under the process's lock, so it cannot be reaped (and its pid reused) meanwhile.
        let inner = proc.lock();
        if inner.reaped {
            return Err(not_found(&context));
        }
        signal_group(proc.pid, signal).map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => OpError::new(
                ErrorCode::BadRequest,
                format!("{context}: signal {signal}: {e}"),
            ),
            _ => OpError::io(&context, &e),
        })?;
        Ok(ProcKillResult {
            pid: proc.pid,
            signal,
            state: proc.info(&inner).state,
        })
    }

    /// Writes to a kept stdin, then closes it if asked.
    pub fn input(&self, req: &ProcInputRequest, data: &[u8]) -> Result<ProcInputResult, OpError> {
        let context = format!("proc_input {}", req.pid);
        let proc = self.get(req.pid, &context)?;
        let mut stdin = lock(&proc.stdin);
        if !data.is_empty() {
            let Some(pipe) = stdin.as_mut() else {
                return Err(OpError::new(
                    ErrorCode::BadRequest,
                    format!("{context}: its stdin is closed (or was not kept open: start it with keep_stdin)"),
                ));
            };
            pipe.write_all(data).map_err(|e| match e.kind() {
                io::ErrorKind::BrokenPipe => OpError::new(
                    ErrorCode::Io,
                    format!(
                        "{context}: the process no longer reads its stdin (it ended or closed it)"
                    ),
                ),
                _ => OpError::io(&context, &e),
            })?;
        }
        if req.close {
            stdin.take();
        }
        Ok(ProcInputResult {
            pid: proc.pid,
            written: data.len() as u64,
            closed: stdin.is_none(),
        })
    }

    /// Resizes the terminal of a process started with `pty`.
    pub fn resize(&self, req: &ProcResizeRequest) -> Result<Value, OpError> {
        let context = format!("proc_resize {}", req.pid);
        let proc = self.get(req.pid, &context)?;
        let Some(master) = &proc.terminal else {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!("{context}: it was not started with a pty"),
            ));
        };
        pty::resize(master, req.size).map_err(|e| OpError::io(&context, &e))?;
        Ok(serde_json::json!({ "pid": proc.pid, "cols": req.size.cols, "rows": req.size.rows }))
    }

    fn get(&self, pid: u32, context: &str) -> Result<Arc<Proc>, OpError> {
        lock(&self.procs)
            .get(&pid)
            .cloned()
            .ok_or_else(|| not_found(context))
    }

    /// Removes an ended process from the table and reaps it (unless someone else did first).
    fn collect(&self, proc: &Arc<Proc>) {
        let mut procs = lock(&self.procs);
        if procs.get(&proc.pid).is_some_and(|p| Arc::ptr_eq(p, proc)) {
            procs.remove(&proc.pid);
            reap(proc);
        }
    }
}

fn not_found(context: &str) -> OpError {
    OpError::new(
        ErrorCode::NotFound,
        format!(
            "{context}: no background process with this pid (never started, or already waited for)"
        ),
    )
}

/// Drops the oldest ended processes beyond MAX_EXITED_PROCS; returns how many still run.
fn evict_exited(procs: &mut BTreeMap<u32, Arc<Proc>>) -> usize {
    let mut ended: Vec<(u64, u32)> = procs
        .values()
        .filter_map(|p| p.lock().end.map(|end| (end.seq, p.pid)))
        .collect();
    let running = procs.len() - ended.len();
    if ended.len() > MAX_EXITED_PROCS {
        ended.sort_unstable();
        let excess = ended.len() - MAX_EXITED_PROCS;
        for (_, pid) in &ended[..excess] {
            if let Some(proc) = procs.remove(pid) {
                tracing::debug!("background process {pid} dropped unwaited (table full)");
                reap(&proc);
            }
        }
    }
    running
}

/// Reaps an ended process's zombie. Callers hold the table's lock and have taken it out.
fn reap(proc: &Proc) {
    let mut inner = proc.lock();
    if inner.reaped || inner.end.is_none() {
        return;
    }
    let mut status = 0;
    // SAFETY: waitpid(2) writes only to `status`, a local. The pid is our child, a zombie
    // (its end is recorded), so WNOHANG returns at once.
    unsafe { libc::waitpid(proc.pid as libc::pid_t, &mut status, libc::WNOHANG) };
    inner.reaped = true;
}

fn capture_output(mut pipe: Box<dyn Read + Send>, stream: Stream, proc: &Proc) {
    let mut buf = vec![0u8; PIPE_READ_LEN];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                proc.lock().capture(stream).push(&buf[..n]);
                proc.changed.notify_all();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let mut inner = proc.lock();
    inner.pipes_open = inner.pipes_open.saturating_sub(1);
    proc.changed.notify_all();
}

/// Sees the group leader exit, lets its output drain, and records the end.
fn supervise(proc: &Proc) {
    let status = match wait_keep_zombie(proc.pid) {
        Ok(status) => status,
        Err(e) => {
            // Not our child any more (nothing else here reaps, so this should not happen):
            // record an end without a status and never signal that pid again.
            tracing::warn!("background process {}: waitid failed: {e}", proc.pid);
            proc.lock().reaped = true;
            ExitStatus::default()
        }
    };
    let mut inner = proc.lock();
    inner.exit = Some(status);
    proc.changed.notify_all();
    // Descendants that left the group can hold the pipes open forever; the end must not
    // wait for them.
    let grace_end = Instant::now() + DRAIN_GRACE;
    while inner.pipes_open > 0 {
        let left = grace_end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        inner = proc.wait_change(inner, left);
    }
    inner.end = Some(End {
        status,
        ended_ms: now_ms(),
        seq: next_seq(),
    });
    proc.changed.notify_all();
    drop(inner);
    // Nobody reads a kept stdin any more; a writer blocked on it keeps it until it fails.
    if let Ok(mut stdin) = proc.stdin.try_lock() {
        stdin.take();
    }
}

/// Sends each stream's output as it is written, from `from`, until the process has ended or
/// the deadline passed; returns how many bytes of each stream fell out of the ring buffer
/// before they could be sent.
fn follow(
    proc: &Proc,
    from: Follow,
    deadline: Option<Instant>,
    replier: &Replier,
    context: &str,
) -> Result<[u64; 2], OpError> {
    const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];
    let mut cursors = {
        let mut inner = proc.lock();
        STREAMS.map(|s| match from {
            Follow::Start => inner.capture(s).first(),
            Follow::Now => inner.capture(s).total,
        })
    };
    let mut dropped = [0u64; 2];
    loop {
        let mut inner = proc.lock();
        let (pending, done) = loop {
            let mut pending = Vec::new();
            for (i, stream) in STREAMS.into_iter().enumerate() {
                let capture = inner.capture(stream);
                dropped[i] += capture.first().saturating_sub(cursors[i]);
                let data = capture.since(cursors[i]);
                cursors[i] = capture.total;
                if !data.is_empty() {
                    pending.push((stream, data));
                }
            }
            let left = deadline.map(|at| at.saturating_duration_since(Instant::now()));
            let done = inner.end.is_some() || left.is_some_and(|l| l.is_zero());
            if done || !pending.is_empty() {
                break (pending, done);
            }
            if replier.peer_gone() {
                return Err(OpError::new(
                    ErrorCode::Io,
                    format!("{context}: the connection closed while following"),
                ));
            }
            inner = proc.wait_change(inner, left.unwrap_or(WAIT_POLL).min(WAIT_POLL));
        };
        drop(inner);
        for (stream, data) in pending {
            replier
                .chunk(stream, &data)
                .map_err(|e| OpError::io(context, &e))?;
        }
        if done {
            return Ok(dropped);
        }
    }
}

/// Kills the process group with SIGKILL when `timeout` expires before the leader exits.
fn enforce_timeout(proc: &Proc, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut inner = proc.lock();
    while inner.exit.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            if !inner.reaped {
                tracing::info!(
                    "background process {}: timeout, killing its group",
                    proc.pid
                );
                inner.timed_out = true;
                let _ = signal_group(proc.pid, libc::SIGKILL);
            }
            return;
        }
        inner = proc.wait_change(inner, left);
    }
}

/// Blocks until `pid` exits and reports how, leaving it a zombie (WNOWAIT).
fn wait_keep_zombie(pid: u32) -> io::Result<ExitStatus> {
    loop {
        // SAFETY: siginfo_t is plain old data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid(2) writes only into `info`, which outlives the call.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            // SAFETY: a successful WEXITED waitid fills in si_status for a CLD_* si_code.
            let value = unsafe { info.si_status() };
            return Ok(match info.si_code {
                libc::CLD_EXITED => ExitStatus {
                    code: Some(value),
                    signal: None,
                },
                _ => ExitStatus {
                    code: None,
                    signal: Some(value),
                },
            });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    // SAFETY: killpg(2) takes only integers. `pgid` is a background process's pid, which
    // leads its own group (process_group(0)) and is never 0 (our own group); the callers
    // check it has not been reaped, so it is still ours.
    if unsafe { libc::killpg(pgid as libc::pid_t, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn helper(name: &str, work: impl FnOnce() + Send + 'static) {
    if let Err(e) = super::pool::spawn(work) {
        tracing::error!("cannot start {name} thread: {e}");
    }
}

/// The last PROC_CAPTURE_LEN bytes of a stream, and how many it had in all.
#[derive(Debug, Default)]
struct Capture {
    buf: VecDeque<u8>,
    total: u64,
}

impl Capture {
    fn push(&mut self, data: &[u8]) {
        self.push_within(data, PROC_CAPTURE_LEN);
    }

    fn push_within(&mut self, data: &[u8], limit: usize) {
        self.total += data.len() as u64;
        let data = &data[data.len().saturating_sub(limit)..];
        let overflow = (self.buf.len() + data.len()).saturating_sub(limit);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    fn contents(&self) -> Vec<u8> {
        let (front, back) = self.buf.as_slices();
        [front, back].concat()
    }

    fn dropped(&self) -> u64 {
        self.total - self.buf.len() as u64
    }

    /// Stream position of the oldest byte still held.
    fn first(&self) -> u64 {
        self.dropped()
    }

    /// What is still held from stream position `cursor` on.
    fn since(&self, cursor: u64) -> Vec<u8> {
        let skip = cursor.saturating_sub(self.first()) as usize;
        self.buf
            .range(skip.min(self.buf.len())..)
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_the_most_recent_bytes_and_counts_the_rest() {
        let mut c = Capture::default();
        c.push_within(b"hello", 8);
        assert_eq!((c.contents(), c.dropped()), (b"hello".to_vec(), 0));
        c.push_within(b" world", 8);
        assert_eq!(c.contents(), b"lo world");
        assert_eq!((c.total, c.dropped()), (11, 3));
        c.push_within(b"0123456789abc", 8);
        assert_eq!(
            c.contents(),
            b"56789abc",
            "a push longer than the limit keeps its tail"
        );
        assert_eq!((c.total, c.dropped()), (24, 16));
        c.push_within(b"", 8);
        assert_eq!(c.total, 24);
    }
}
