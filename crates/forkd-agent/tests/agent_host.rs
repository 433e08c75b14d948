//! Acceptance tests: the real `forkd-agent` binary running as a host process on a Unix socket,
//! driven through the client library (and raw frames for malformed input).

use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use forkd_agent::client::{wait_ready_line, AgentClient, ClientError, ExecBuilder, ReplyFrame};
use forkd_agent::frame::{read_frame, write_frame};
use forkd_agent::protocol::{
    decode_reply, encode_request, ClockOutcome, EntropyMethod, ErrorCode, EvalContextAction,
    EvalRequest, ExecRequest, FileKind, FileWriteRequest, Follow, PathRequest, ProcState,
    ProcWaitResult, PtySize, Reply, Request, Stream, AGENT_VERSION, MAGIC, MAX_EXITED_PROCS,
    MAX_HEADER_LEN, MAX_IN_FLIGHT_PER_CONNECTION, MAX_PAYLOAD_LEN, PROC_CAPTURE_LEN,
};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// The agent under test: this crate's binary, or another build (e.g. the static one from
/// build-static.sh) named by FORKD_AGENT_BIN.
/// Prints one "SKIP: ..." line past the test harness's output capture, so it shows in the
/// suite's output (scripts/test.sh lists them).
macro_rules! skip {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), "SKIP: {}", format!($($arg)*));
    }};
}

fn agent_bin() -> String {
    std::env::var("FORKD_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_forkd-agent").into())
}

/// The Python the eval tests use (FORKD_TEST_PYTHON, e.g. a venv with numpy; default python3).
fn python() -> String {
    std::env::var("FORKD_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}
/// Generous: only reached when something hangs, turning a hang into a failure.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

struct AgentProcess {
    child: Child,
    dir: TempDir,
    socket: PathBuf,
}

impl AgentProcess {
    fn start(args: &[&str]) -> Self {
        Self::start_wrapped(&[], args)
    }

    /// Starts the agent (optionally under a wrapper such as `setpriv ...`) and waits for its
    /// READY line on stdout.
    fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut argv: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        argv.push(agent_bin());
        argv.extend(["--unix".into(), socket.display().to_string()]);
        if !args
            .iter()
            .any(|a| a.starts_with("--eval-interpreter") || *a == "--no-eval")
        {
            argv.extend(["--eval-interpreter".into(), python()]);
        }
        argv.extend(args.iter().map(|s| s.to_string()));
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let version = wait_ready_line(&mut stdout).expect("agent printed READY");
        assert_eq!(version, AGENT_VERSION);
        Self { child, dir, socket }
    }

    fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
    }

    fn client(&self) -> AgentClient<UnixStream> {
        AgentClient::new(self.connect())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the agent process exited"
        );
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python3_available() -> bool {
    Command::new(python())
        .arg("-c")
        .arg("pass")
        .status()
        .is_ok_and(|s| s.success())
}

macro_rules! require_python {
    () => {
        if !python3_available() {
            skip!("{}: {} is not installed", module_path!(), python());
            return;
        }
    };
}

fn sh(script: &str) -> ExecBuilder {
    ExecBuilder::new(["sh", "-c", script])
}

fn sha256_file(path: &Path) -> String {
    let mut hasher = Sha256::new();
    io::copy(&mut fs::File::open(path).unwrap(), &mut hasher).unwrap();
    hex::encode(hasher.finalize())
}

/// Writes `len` pseudo-random bytes (xorshift, so the content is incompressible and varied).
fn write_random_file(path: &Path, len: usize, seed: u64) {
    let mut state = seed | 1;
    let mut out = io::BufWriter::new(fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 16];
    let mut written = 0;
    while written < len {
        for word in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        let n = block.len().min(len - written);
        out.write_all(&block[..n]).unwrap();
        written += n;
    }
    out.flush().unwrap();
}

/// True once `pid` no longer runs (gone, or a zombie nobody reaped yet).
fn process_dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

/// True while `pid` is an unreaped zombie whose parent is `parent`.
fn zombie_of(pid: u32, parent: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    fields.first() == Some(&"Z") && fields.get(1) == Some(&parent.to_string().as_str())
}

/// Polls `check` until it holds; panics with `what` after a generous bound (never asserts on
/// how long it took).
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < IO_TIMEOUT, "gave up waiting: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn agent_error(result: Result<impl std::fmt::Debug, ClientError>) -> (ErrorCode, String) {
    match result {
        Err(ClientError::Agent { code, message }) => (code, message),
        other => panic!("expected an agent error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// ping, readiness, command line

#[test]
fn ping_reports_version_uptime_and_no_forks() {
    let agent = AgentProcess::start(&["--no-eval", "--skip-clock-set"]);
    let ping = agent.client().ping().unwrap();
    assert_eq!(ping.agent_version, AGENT_VERSION);
    assert_eq!(ping.protocol_version, 1);
    assert_eq!(ping.fork_count, 0);
    assert_eq!(ping.pid, agent.child.id());
    assert!(!ping.eval.enabled);
}

#[test]
fn ready_line_is_written_to_ready_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let ready_path = dir.path().join("ready.sock");
    let listener = UnixListener::bind(&ready_path).unwrap();
    let agent = AgentProcess::start(&["--no-eval", "--ready-unix", ready_path.to_str().unwrap()]);
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut line = String::new();
    conn.read_to_string(&mut line).unwrap();
    assert_eq!(line, format!("READY forkd-agent {AGENT_VERSION}\n"));
    drop(agent);
}

#[test]
fn bad_command_lines_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_socket = dir.path().join("file");
    fs::write(&not_a_socket, "x").unwrap();
    let out = Command::new(agent_bin())
        .args(["--no-eval", "--unix", not_a_socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(fs::read_to_string(&not_a_socket).unwrap(), "x");

    let out = Command::new(agent_bin())
        .args([
            "--unix",
            dir.path().join("s").to_str().unwrap(),
            "--eval-interpreter",
            " ",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--eval-interpreter is empty"));
}

#[test]
fn vsock_listener_serves_when_vsock_loopback_exists() {
    let port = 20000 + (std::process::id() % 20000);
    let mut child = Command::new(agent_bin())
        .args([
            "--no-eval",
            "--no-ready-vsock",
            "--vsock-port",
            &port.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    if wait_ready_line(&mut stdout).is_err() {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let _ = child.wait();
        skip!(
            "vsock listener: AF_VSOCK is not usable here ({})",
            err.trim()
        );
        return;
    }
    let stream = forkd_agent::vsock::VsockStream::connect(forkd_agent::vsock::CID_LOCAL, port);
    match stream {
        Err(e) => skip!("vsock round trip: no vsock loopback transport on this host ({e})"),
        Ok(stream) => {
            let ping = AgentClient::new(stream).ping().unwrap();
            assert_eq!(ping.agent_version, AGENT_VERSION);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A stand-in for the VMM's hybrid-vsock socket: answers `CONNECT <port>` like Firecracker
/// does, then splices the connection to the agent's Unix socket (or refuses other ports).
fn fake_hybrid_vsock(agent_socket: PathBuf, dir: &Path) -> PathBuf {
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while conn.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            if line != b"CONNECT 1024" {
                continue; // dropping the connection refuses it
            }
            conn.write_all(b"OK 1073741824\n").unwrap();
            let agent = UnixStream::connect(&agent_socket).unwrap();
            let (mut a_in, mut a_out) = (agent.try_clone().unwrap(), agent);
            let (mut c_in, mut c_out) = (conn.try_clone().unwrap(), conn);
            thread::spawn(move || io::copy(&mut c_in, &mut a_out));
            thread::spawn(move || io::copy(&mut a_in, &mut c_out));
        }
    });
    path
}

#[test]
fn client_reaches_the_agent_through_the_hybrid_vsock_handshake() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let uds = fake_hybrid_vsock(agent.socket.clone(), agent.dir.path());
    let stream = forkd_agent::client::connect_hybrid_vsock(&uds, 1024).unwrap();
    let mut client = AgentClient::new(stream);
    assert_eq!(client.ping().unwrap().agent_version, AGENT_VERSION);
    let out = client
        .exec(&ExecBuilder::new(["echo", "via vsock"]).build(), b"")
        .unwrap();
    assert_eq!(out.stdout, b"via vsock\n");

    match forkd_agent::client::connect_hybrid_vsock(&uds, 1025) {
        Err(ClientError::Handshake { path, source }) => {
            assert!(path.ends_with("vsock.sock"), "{path}");
            assert!(source.to_string().contains("CONNECT 1025"), "{source}");
        }
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// exec

#[test]
fn exec_captures_output_exit_code_env_cwd_and_stdin() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let request = sh("echo out; echo err >&2; cat; pwd; echo \"$GREETING\"; exit 3")
        .env("GREETING", "hello from env")
        .cwd(agent.dir.path().to_str().unwrap())
        .build();
    let out = client.exec(&request, b"from stdin\n").unwrap();
    let cwd = fs::canonicalize(agent.dir.path()).unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("out\nfrom stdin\n{}\nhello from env\n", cwd.display())
    );
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.result.exit_code, Some(3));
    assert_eq!(out.result.signal, None);
    assert!(!out.result.timed_out);
    assert_eq!(out.result.stderr_bytes, 4);

    let cleared = client
        .exec(
            &sh("echo \"[$HOME]\"")
                .clear_env()
                .env("PATH", "/usr/bin:/bin")
                .build(),
            b"",
        )
        .unwrap();
    assert_eq!(cleared.stdout, b"[]\n");
}

#[test]
fn exec_stdin_up_to_the_payload_limit_arrives_intact() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let source = agent.path("stdin.bin");
    write_random_file(&source, MAX_PAYLOAD_LEN, 7);
    let input = fs::read(&source).unwrap();
    let out = agent
        .client()
        .exec(&ExecBuilder::new(["cat"]).build(), &input)
        .unwrap();
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "stdin came back altered");
}

#[test]
fn exec_reports_the_killing_signal() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let out = agent
        .client()
        .exec(&sh("kill -TERM $$").build(), b"")
        .unwrap();
    assert_eq!(out.result.exit_code, None);
    assert_eq!(out.result.signal, Some(libc::SIGTERM));
}

#[test]
fn exec_bad_inputs_get_errors_and_the_connection_keeps_working() {
    let mut agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let (code, message) =
        agent_error(client.exec(&ExecBuilder::new(["/nonexistent/prog"]).build(), b""));
    assert_eq!(code, ErrorCode::SpawnFailed);
    assert!(message.contains("/nonexistent/prog"), "{message}");
    let (code, message) = agent_error(client.exec(&ExecRequest::default(), b""));
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("argv is empty"), "{message}");
    let (code, _) = agent_error(client.exec(&sh("true").cwd("/nonexistent/dir").build(), b""));
    assert_eq!(code, ErrorCode::SpawnFailed);
    assert_eq!(
        client.exec(&sh("echo ok").build(), b"").unwrap().stdout,
        b"ok\n"
    );
    agent.assert_alive();
}

#[test]
fn exec_timeout_kills_the_whole_process_group() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let pidfile = agent.path("grandchild.pid");
    // The shell starts a grandchild that would sleep for five minutes, then sleeps itself.
    let script = format!("sleep 300 & echo $! > {}; sleep 300", pidfile.display());
    let out = agent
        .client()
        .exec(&sh(&script).timeout_ms(3000).build(), b"")
        .unwrap();
    assert!(out.result.timed_out);
    assert_eq!(out.result.signal, Some(libc::SIGKILL));
    let grandchild: i32 = fs::read_to_string(&pidfile)
        .expect("the shell wrote the grandchild's pid before the timeout")
        .trim()
        .parse()
        .unwrap();
    wait_until("the grandchild to die", || process_dead(grandchild));
}

#[test]
fn exec_timeout_does_not_wait_for_output_held_by_escaped_processes() {
    let agent = AgentProcess::start(&["--no-eval"]);
    // setsid puts the sleeper outside the group, and it keeps stdout open. The agent must
    // still answer (after its drain grace) instead of waiting for the sleeper's five minutes.
    let out = agent
        .client()
        .exec(
            &sh("setsid sleep 300 & echo $!").timeout_ms(3000).build(),
            b"",
        )
        .unwrap();
    let escaped: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(out.result.timed_out);
    // Our own leftover; the agent deliberately cannot reach it.
    // SAFETY: kill(2) takes only integers and touches no memory of ours.
    unsafe { libc::kill(escaped, libc::SIGKILL) };
}

#[test]
fn exec_64_mib_stdout_is_captured_and_streamed_intact() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let big = agent.path("big.bin");
    write_random_file(&big, 64 << 20, 0x5eed);
    let expected = sha256_file(&big);
    let mut client = agent.client();

    let request = ExecBuilder::new(["cat", big.to_str().unwrap()]).build();
    let out = client.exec(&request, b"").unwrap();
    assert_eq!(out.stdout.len(), 64 << 20);
    assert_eq!(hex::encode(Sha256::digest(&out.stdout)), expected);
    assert_eq!(out.result.stdout_bytes, 64 << 20);
    assert_eq!(out.result.exit_code, Some(0));
    drop(out);

    // Streamed to stderr this time, hashed chunk by chunk as it arrives.
    let mut hasher = Sha256::new();
    let (mut chunks, mut bytes) = (0usize, 0usize);
    let script = format!("cat {} >&2", big.display());
    let result = client
        .exec_streaming(&sh(&script).build(), b"", |stream, data| {
            assert_eq!(stream, Stream::Stderr);
            hasher.update(data);
            chunks += 1;
            bytes += data.len();
            Ok(())
        })
        .unwrap();
    assert_eq!(bytes, 64 << 20);
    assert!(chunks > 1, "output arrived in {chunks} chunk(s)");
    assert_eq!(hex::encode(hasher.finalize()), expected);
    assert_eq!(result.stderr_bytes, 64 << 20);
}

#[test]
fn exec_keeps_interleaved_stdout_and_stderr_apart() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let script = "i=0; while [ $i -lt 2000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done";
    let out = agent.client().exec(&sh(script).build(), b"").unwrap();
    let expect = |prefix: &str| -> String { (0..2000).map(|i| format!("{prefix}{i}\n")).collect() };
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expect("out"));
    assert_eq!(String::from_utf8(out.stderr).unwrap(), expect("err"));
}

// ---------------------------------------------------------------------------------------------
// concurrency

#[test]
fn concurrent_connections_each_get_their_own_answers() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let socket = agent.socket.clone();
    let workers: Vec<_> = (0..6)
        .map(|worker| {
            let socket = socket.clone();
            thread::spawn(move || {
                let stream = UnixStream::connect(&socket).unwrap();
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut client = AgentClient::new(stream);
                for round in 0..15 {
                    let tag = format!("{worker}-{round}");
                    let out = client
                        .exec(&ExecBuilder::new(["echo", &tag]).build(), b"")
                        .unwrap();
                    assert_eq!(out.stdout, format!("{tag}\n").into_bytes());
                    assert_eq!(client.ping().unwrap().fork_count, 0);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
}

#[test]
fn one_connection_runs_requests_concurrently() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let flag = agent.path("flag");
    let mut client = agent.client();
    // Request 1 waits for a file that only request 2 creates: with requests served one after
    // the other on this connection, request 1 would run into its timeout.
    let wait_script = format!(
        "while [ ! -e {} ]; do sleep 0.01; done; echo done",
        flag.display()
    );
    let waiting = client
        .send(
            &Request::Exec(sh(&wait_script).timeout_ms(60_000).build()),
            b"",
        )
        .unwrap();
    let writing = client
        .send(
            &Request::FileWrite(FileWriteRequest {
                path: flag.display().to_string(),
                ..Default::default()
            }),
            b"go",
        )
        .unwrap();
    let mut stdout = Vec::new();
    let mut finished = Vec::new();
    while finished.len() < 2 {
        let frame = client.recv().unwrap();
        match frame.reply {
            Reply::Chunk { .. } => stdout.extend_from_slice(&frame.payload),
            Reply::Result { result } => finished.push((frame.id, result)),
            Reply::Error { message, .. } => panic!("request {} failed: {message}", frame.id),
        }
    }
    assert_eq!(
        finished[0].0, writing,
        "the write finishes while the exec still waits"
    );
    assert_eq!(finished[1].0, waiting);
    assert_eq!(finished[1].1["timed_out"], false);
    assert_eq!(stdout, b"done\n");
}

#[test]
fn requests_beyond_the_in_flight_limit_are_refused_not_queued_forever() {
    let agent = AgentProcess::start(&["--no-eval"]);
    if Command::new("flock").arg("--version").output().is_err() {
        skip!("in-flight limit: flock(1) from util-linux is not installed");
        return;
    }
    // The test holds an exclusive lock; every command blocks (without polling) on a shared one.
    let lock_path = agent.path("release.lock");
    let lock = fs::File::create(&lock_path).unwrap();
    assert_eq!(
        // SAFETY: flock(2) takes only integers; the fd is open, owned by `lock`.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0
    );
    let mut client = agent.client();
    let wait_script = format!("flock -s {} true", lock_path.display());
    let request = Request::Exec(sh(&wait_script).timeout_ms(120_000).build());
    let waiting: Vec<u64> = (0..MAX_IN_FLIGHT_PER_CONNECTION)
        .map(|_| client.send(&request, b"").unwrap())
        .collect();
    let stat = Request::FileStat(PathRequest { path: "/".into() });
    let refused = client.send(&stat, b"").unwrap();
    match client.recv().unwrap() {
        ReplyFrame {
            id,
            reply:
                Reply::Error {
                    code: ErrorCode::Busy,
                    message,
                },
            ..
        } => {
            assert_eq!(id, refused);
            assert!(message.contains("in flight"), "{message}");
        }
        other => panic!("expected busy, got {other:?}"),
    }
    drop(lock);
    let mut done = std::collections::HashSet::new();
    while done.len() < waiting.len() {
        let frame = client.recv().unwrap();
        match frame.reply {
            Reply::Result { result } => {
                assert_eq!(result["exit_code"], 0, "{result}");
                done.insert(frame.id);
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    // Slots are released: the connection takes requests again.
    assert_eq!(client.stat("/").unwrap().kind, FileKind::Dir);
}

// ---------------------------------------------------------------------------------------------
// malformed input

fn raw_request(stream: &mut UnixStream, header: &[u8], payload: &[u8]) {
    write_frame(stream, header, payload).unwrap();
}

fn raw_reply(stream: &mut UnixStream) -> (u64, Reply) {
    let frame = read_frame(stream).unwrap().expect("a reply frame");
    decode_reply(&frame.header).unwrap()
}

fn expect_error(stream: &mut UnixStream, id: u64, code: ErrorCode) -> String {
    match raw_reply(stream) {
        (got, Reply::Error { code: c, message }) if got == id && c == code => message,
        other => panic!("expected error {code} for id {id}, got {other:?}"),
    }
}

fn ping_works(stream: &mut UnixStream) {
    raw_request(stream, &encode_request(99, &Request::Ping), b"");
    match raw_reply(stream) {
        (99, Reply::Result { result }) => assert_eq!(result["agent_version"], AGENT_VERSION),
        other => panic!("ping failed: {other:?}"),
    }
}

#[test]
fn garbage_bytes_get_bad_frame_and_only_that_connection_closes() {
    let mut agent = AgentProcess::start(&["--no-eval"]);
    let mut stream = agent.connect();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let message = expect_error(&mut stream, 0, ErrorCode::BadFrame);
    assert!(message.contains("FKA1"), "{message}");
    assert!(
        read_frame(&mut stream).unwrap().is_none(),
        "connection closed"
    );
    ping_works(&mut agent.connect());
    agent.assert_alive();
}

#[test]
fn bad_json_unknown_op_bad_fields_and_versions_get_errors_on_a_live_connection() {
    let mut agent = AgentProcess::start(&["--no-eval"]);
    let mut s = agent.connect();
    raw_request(&mut s, b"{this is not json", b"");
    let m = expect_error(&mut s, 0, ErrorCode::BadRequest);
    assert!(m.contains("not valid JSON"), "{m}");
    raw_request(&mut s, b"\xff\xfe\x00", b"");
    expect_error(&mut s, 0, ErrorCode::BadRequest);
    raw_request(&mut s, br#"{"v":1,"op":"ping"}"#, b"");
    expect_error(&mut s, 0, ErrorCode::BadRequest);
    raw_request(&mut s, br#"{"v":1,"id":3,"op":"format_disk"}"#, b"");
    let m = expect_error(&mut s, 3, ErrorCode::UnknownOp);
    assert!(m.contains("format_disk"), "{m}");
    raw_request(&mut s, br#"{"v":1,"id":4,"op":"exec","argv":[1,2]}"#, b"");
    expect_error(&mut s, 4, ErrorCode::BadRequest);
    raw_request(&mut s, br#"{"v":1,"id":5,"op":"file_stat"}"#, b"");
    let m = expect_error(&mut s, 5, ErrorCode::BadRequest);
    assert!(m.contains("path"), "{m}");
    raw_request(&mut s, br#"{"v":2,"id":6,"op":"ping"}"#, b"");
    expect_error(&mut s, 6, ErrorCode::UnsupportedVersion);
    // Data for an upload that does not exist is dropped without a reply.
    raw_request(&mut s, &encode_request(7, &Request::Data), b"stray");
    ping_works(&mut s);
    agent.assert_alive();
}

#[test]
fn oversized_frames_are_skipped_with_an_error_and_the_connection_stays_usable() {
    let mut agent = AgentProcess::start(&["--no-eval"]);
    let mut s = agent.connect();
    // Payload one byte over the limit, header readable: the error carries the request id.
    let header = encode_request(11, &Request::Exec(ExecBuilder::new(["cat"]).build()));
    let mut prefix = Vec::new();
    prefix.extend_from_slice(&MAGIC);
    prefix.extend_from_slice(&(header.len() as u32).to_be_bytes());
    prefix.extend_from_slice(&((MAX_PAYLOAD_LEN + 1) as u32).to_be_bytes());
    s.write_all(&prefix).unwrap();
    s.write_all(&header).unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        thread::spawn(move || w.write_all(&vec![0x55u8; MAX_PAYLOAD_LEN + 1]).unwrap())
    };
    let m = expect_error(&mut s, 11, ErrorCode::FrameTooLarge);
    assert!(m.contains("payload"), "{m}");
    writer.join().unwrap();
    ping_works(&mut s);

    // Header over the limit: the id is unknown.
    let mut prefix = Vec::new();
    prefix.extend_from_slice(&MAGIC);
    prefix.extend_from_slice(&((MAX_HEADER_LEN + 1) as u32).to_be_bytes());
    prefix.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&prefix).unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        thread::spawn(move || w.write_all(&vec![b' '; MAX_HEADER_LEN + 1]).unwrap())
    };
    expect_error(&mut s, 0, ErrorCode::FrameTooLarge);
    writer.join().unwrap();
    ping_works(&mut s);
    agent.assert_alive();
}

#[test]
fn a_connection_dropped_mid_frame_does_not_hurt_the_agent() {
    let mut agent = AgentProcess::start(&["--no-eval"]);
    {
        let mut s = agent.connect();
        s.write_all(&MAGIC).unwrap();
        s.write_all(&100u32.to_be_bytes()).unwrap();
        s.write_all(&0u32.to_be_bytes()).unwrap();
        s.write_all(b"{\"v\":1,").unwrap();
    }
    ping_works(&mut agent.connect());
    agent.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// files

#[test]
fn files_write_read_stat_list_and_remove() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let dir = agent.path("tree");
    let file = dir.join("sub/hello.txt");
    let file_str = file.to_str().unwrap();

    let (code, _) = agent_error(client.write_file_bytes(file_str, b"x", None));
    assert_eq!(
        code,
        ErrorCode::NotFound,
        "parent directory missing without create_dirs"
    );
    assert!(!dir.exists());

    let written = client
        .write_file(file_str, &mut &b"hello, agent\n"[..], Some(0o600), true)
        .unwrap();
    assert_eq!(written, 13);
    assert_eq!(fs::read(&file).unwrap(), b"hello, agent\n");
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        client.read_file_to_vec(file_str).unwrap(),
        b"hello, agent\n"
    );
    let mut middle = Vec::new();
    assert_eq!(
        client
            .read_file_range(file_str, 7, Some(5), &mut middle)
            .unwrap(),
        5
    );
    assert_eq!(middle, b"agent");

    let stat = client.stat(file_str).unwrap();
    assert_eq!(
        (stat.kind, stat.size, stat.mode),
        (FileKind::File, 13, 0o600)
    );
    std::os::unix::fs::symlink("sub/hello.txt", dir.join("link")).unwrap();
    fs::write(dir.join("a.txt"), "a").unwrap();
    let link = client.stat(dir.join("link").to_str().unwrap()).unwrap();
    assert_eq!(link.kind, FileKind::Symlink);
    assert_eq!(link.link_target.as_deref(), Some("sub/hello.txt"));

    let listing = client.list_dir(dir.to_str().unwrap()).unwrap();
    let names: Vec<_> = listing
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.stat.kind))
        .collect();
    assert_eq!(
        names,
        [
            ("a.txt", FileKind::File),
            ("link", FileKind::Symlink),
            ("sub", FileKind::Dir)
        ]
    );
    assert!(!listing.truncated);

    let sub = dir.join("sub");
    let (code, message) = agent_error(client.remove(sub.to_str().unwrap(), false));
    assert_eq!(code, ErrorCode::Io);
    assert!(message.contains("recursive"), "{message}");
    assert!(file.exists());
    assert_eq!(client.remove(file_str, false).unwrap().kind, FileKind::File);
    assert!(!file.exists());
    fs::write(sub.join("again"), "x").unwrap();
    assert_eq!(
        client.remove(sub.to_str().unwrap(), true).unwrap().kind,
        FileKind::Dir
    );
    assert!(!sub.exists());

    for (result, code) in [
        (
            client.read_file_to_vec(file_str).map(|_| ()),
            ErrorCode::NotFound,
        ),
        (client.stat(file_str).map(|_| ()), ErrorCode::NotFound),
        (client.list_dir(file_str).map(|_| ()), ErrorCode::NotFound),
        (
            client.remove(file_str, false).map(|_| ()),
            ErrorCode::NotFound,
        ),
        (
            client.read_file_to_vec(dir.to_str().unwrap()).map(|_| ()),
            ErrorCode::BadRequest,
        ),
        (client.stat("").map(|_| ()), ErrorCode::BadRequest),
        (
            client.write_file_bytes("", b"x", None).map(|_| ()),
            ErrorCode::BadRequest,
        ),
        (
            client
                .write_file_bytes(file_str, b"x", Some(0o77777))
                .map(|_| ()),
            ErrorCode::BadRequest,
        ),
    ] {
        let (got, message) = agent_error(result);
        assert_eq!(got, code, "{message}");
    }
    // Files whose stat size says nothing about their content (procfs) are read to the end.
    let status = client.read_file_to_vec("/proc/self/status").unwrap();
    assert!(String::from_utf8_lossy(&status).contains("Pid:"));

    // Nothing half-written was left behind by the failed writes.
    let left: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn large_files_stream_both_ways_intact() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let source = agent.path("source.bin");
    let len = 48 << 20;
    write_random_file(&source, len, 42);
    let expected = sha256_file(&source);

    let target = agent.path("uploaded.bin");
    let sent = client
        .write_file(
            target.to_str().unwrap(),
            &mut fs::File::open(&source).unwrap(),
            None,
            false,
        )
        .unwrap();
    assert_eq!(sent, len as u64);
    assert_eq!(sha256_file(&target), expected);

    struct HashingSink(Sha256, usize);
    impl Write for HashingSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.update(buf);
            self.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut sink = HashingSink(Sha256::new(), 0);
    assert_eq!(
        client
            .read_file(target.to_str().unwrap(), &mut sink)
            .unwrap(),
        len as u64
    );
    assert!(sink.1 > 1, "the download arrived in {} chunk(s)", sink.1);
    assert_eq!(hex::encode(sink.0.finalize()), expected);
}

#[test]
fn an_abandoned_upload_leaves_nothing_behind() {
    let mut agent = AgentProcess::start(&["--no-eval"]);
    let target = agent.path("never.bin");
    {
        let mut s = agent.connect();
        let request = Request::FileWrite(FileWriteRequest {
            path: target.display().to_string(),
            more: true,
            ..Default::default()
        });
        raw_request(&mut s, &encode_request(1, &request), b"first");
        raw_request(&mut s, &encode_request(1, &Request::Data), &[7u8; 100_000]);
        // Closed without an `end` frame.
    }
    // The agent notices the close asynchronously; a later request on a new connection sees
    // the directory only once the upload worker has cleaned up.
    wait_until("the abandoned upload's temporary file to disappear", || {
        fs::read_dir(agent.dir.path()).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .contains("forkd-upload")
        })
    });
    assert!(!target.exists());
    ping_works(&mut agent.connect());
    agent.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// restored

#[test]
fn restored_mixes_entropy_bumps_the_counter_and_is_handled_first() {
    let agent = AgentProcess::start(&["--no-eval", "--skip-clock-set"]);
    let mut client = agent.client();
    let result = client.restored(&[0xa5; 64], SystemTime::now()).unwrap();
    assert_eq!(result.fork_count, 1);
    assert_eq!(result.entropy_bytes, 64);
    assert_ne!(
        result.entropy_method,
        EntropyMethod::None,
        "{:?}",
        result.entropy_note
    );
    assert!(result.crng_reseeded, "{:?}", result.entropy_note);
    assert_eq!(result.clock, ClockOutcome::Skipped);
    assert_eq!(client.ping().unwrap().fork_count, 1);

    // Pipelined: the ping sent right behind the notification already sees its effect.
    let mut raw = agent.connect();
    let restored = Request::Restored(Default::default());
    raw_request(&mut raw, &encode_request(1, &restored), &[1, 2, 3]);
    raw_request(&mut raw, &encode_request(2, &Request::Ping), b"");
    let mut ping_count = None;
    for _ in 0..2 {
        if let (2, Reply::Result { result }) = raw_reply(&mut raw) {
            ping_count = result["fork_count"].as_u64();
        }
    }
    assert_eq!(ping_count, Some(2));

    // An invalid notification changes nothing.
    raw_request(
        &mut raw,
        br#"{"v":1,"id":3,"op":"restored","realtime_sec":5,"realtime_nsec":1000000000}"#,
        b"",
    );
    let m = expect_error(&mut raw, 3, ErrorCode::BadRequest);
    assert!(m.contains("realtime_nsec"), "{m}");
    assert_eq!(client.ping().unwrap().fork_count, 2);
}

/// The resolvers a child's network opens reach its resolv.conf on `restored`; without them
/// the file stays as the snapshot had it, and a bad resolver changes nothing.
#[test]
fn restored_writes_the_resolvers_it_is_given_and_only_those() {
    let etc = tempfile::tempdir().unwrap();
    let conf = etc.path().join("resolv.conf");
    fs::write(&conf, "nameserver 192.0.2.53\n").unwrap();
    let conf_arg = conf.display().to_string();
    let agent = AgentProcess::start(&["--no-eval", "--skip-clock-set", "--resolv-conf", &conf_arg]);
    let mut client = agent.client();
    let plain = client.restored(&[1; 32], SystemTime::now()).unwrap();
    assert!(!plain.resolvers_written);
    assert_eq!(plain.resolvers_note, None);
    assert_eq!(
        fs::read_to_string(&conf).unwrap(),
        "nameserver 192.0.2.53\n"
    );

    let resolvers: Vec<std::net::IpAddr> =
        vec!["10.0.2.3".parse().unwrap(), "2001:db8::53".parse().unwrap()];
    let given = client
        .restored_with(&[2; 32], SystemTime::now(), Some(&resolvers))
        .unwrap();
    assert!(given.resolvers_written, "{:?}", given.resolvers_note);
    let text = fs::read_to_string(&conf).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines, ["nameserver 10.0.2.3", "nameserver 2001:db8::53"]);
    assert_eq!(
        fs::read_dir(etc.path()).unwrap().count(),
        1,
        "no temporary file is left beside resolv.conf"
    );

    // A multicast resolver, or one that is not an address, is refused before anything changes.
    let mut raw = agent.connect();
    raw_request(
        &mut raw,
        br#"{"v":1,"id":1,"op":"restored","resolvers":["224.0.0.1"]}"#,
        b"",
    );
    let m = expect_error(&mut raw, 1, ErrorCode::BadRequest);
    assert!(m.contains("224.0.0.1"), "{m}");
    raw_request(
        &mut raw,
        br#"{"v":1,"id":2,"op":"restored","resolvers":["not-an-ip"]}"#,
        b"",
    );
    let m = expect_error(&mut raw, 2, ErrorCode::BadRequest);
    assert!(m.contains("not-an-ip"), "{m}");
    assert_eq!(client.ping().unwrap().fork_count, 2);
    assert_eq!(fs::read_to_string(&conf).unwrap(), text);

    // On a host (--unix without --resolv-conf) nothing is ever written, and the answer says so.
    let host = AgentProcess::start(&["--no-eval", "--skip-clock-set"]);
    let answer = host
        .client()
        .restored_with(&[3; 32], SystemTime::now(), Some(&resolvers))
        .unwrap();
    assert!(!answer.resolvers_written);
    assert!(
        answer
            .resolvers_note
            .as_deref()
            .unwrap_or("")
            .contains("host"),
        "{answer:?}"
    );
}

#[test]
fn restored_without_privileges_falls_back_and_says_so() {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    let wrapper: &[&str] = if unsafe { libc::geteuid() } != 0 {
        &[]
    } else if Command::new("setpriv").arg("--help").output().is_ok() {
        // Drop the capabilities the ioctl and clock_settime need; keep everything else.
        &[
            "setpriv",
            "--bounding-set",
            "-sys_admin,-sys_time",
            "--inh-caps",
            "-all",
        ]
    } else {
        skip!("restored without privileges: running as root and setpriv is missing");
        return;
    };
    // Clock setting enabled: without CAP_SYS_TIME the host clock cannot move.
    let agent = AgentProcess::start_wrapped(wrapper, &["--no-eval"]);
    let result = agent
        .client()
        .restored(&[0x5a; 32], SystemTime::now())
        .unwrap();
    assert_eq!(result.entropy_method, EntropyMethod::Write);
    assert!(
        result
            .entropy_note
            .as_deref()
            .unwrap_or("")
            .contains("RNDADDENTROPY"),
        "{result:?}"
    );
    assert!(!result.crng_reseeded, "{result:?}");
    assert!(
        result
            .entropy_note
            .as_deref()
            .unwrap_or("")
            .contains("RNDRESEEDCRNG"),
        "{result:?}"
    );
    assert_eq!(result.clock, ClockOutcome::NotPermitted, "{result:?}");
    assert_eq!(result.fork_count, 1);
}

// ---------------------------------------------------------------------------------------------
// eval

#[test]
fn eval_keeps_state_captures_output_and_returns_tracebacks() {
    require_python!();
    let agent = AgentProcess::start(&["--eval-warmup", "import json\nWARM = 7"]);
    let mut client = agent.client();
    let ping = client.ping().unwrap();
    assert!(
        ping.eval.ready && ping.eval.error.is_none(),
        "{:?}",
        ping.eval
    );

    // The warm-up ran in the user namespace: no re-import needed.
    let r = client.eval("json.dumps({'warm': WARM})", None).unwrap();
    assert_eq!(r.value.as_deref(), Some("'{\"warm\": 7}'"));

    let r = client
        .eval("x = 41\nprint('side', 'effect')", None)
        .unwrap();
    assert_eq!(
        (r.value.as_deref(), r.stdout.as_str()),
        (None, "side effect\n")
    );
    let r = client.eval("x + 1", None).unwrap();
    assert_eq!(r.value.as_deref(), Some("42"));
    let r = client
        .eval("import sys\nprint('e', file=sys.stderr)\n[None]", None)
        .unwrap();
    assert_eq!(
        (r.value.as_deref(), r.stderr.as_str()),
        (Some("[None]"), "e\n")
    );

    let r = client
        .eval("def f(d):\n    return 1 / d\nf(0)", None)
        .unwrap();
    let error = r.error.expect("an exception");
    assert_eq!(error.type_name, "ZeroDivisionError");
    assert!(
        error.traceback.contains("return 1 / d"),
        "{}",
        error.traceback
    );
    assert!(error.traceback.contains("in f"), "{}", error.traceback);
    assert!(
        !error.traceback.contains("_evaluate"),
        "{}",
        error.traceback
    );

    let r = client.eval("def broken(:", None).unwrap();
    assert_eq!(r.error.unwrap().type_name, "SyntaxError");
    let r = client.eval("raise SystemExit(3)", None).unwrap();
    assert_eq!(r.error.unwrap().type_name, "SystemExit");
    // Reading stdin or writing to the real stdout cannot disturb the driver.
    let r = client
        .eval(
            "import os, sys\nos.write(1, b'noise\\n')\nsys.stdin.read()",
            None,
        )
        .unwrap();
    assert_eq!(r.value.as_deref(), Some("''"));
    assert_eq!(client.eval("x", None).unwrap().value.as_deref(), Some("41"));
}

#[test]
fn eval_timeout_and_interpreter_death_restart_a_fresh_interpreter() {
    require_python!();
    let agent = AgentProcess::start(&[]);
    let mut client = agent.client();
    client.eval("kept = 1", None).unwrap();
    let r = client.eval("while True:\n    pass", Some(300)).unwrap();
    assert!(r.timed_out);
    let r = client.eval("kept", None).unwrap();
    assert_eq!(
        r.error.unwrap().type_name,
        "NameError",
        "state was lost with the old interpreter"
    );
    assert_eq!(
        client.eval("1 + 1", None).unwrap().value.as_deref(),
        Some("2")
    );

    let (code, message) = agent_error(client.eval("import os\nos._exit(3)", None));
    assert_eq!(code, ErrorCode::InterpreterDied);
    assert!(message.contains("state is lost"), "{message}");
    assert_eq!(
        client.eval("2 + 2", None).unwrap().value.as_deref(),
        Some("4")
    );
    assert!(client.ping().unwrap().eval.ready);
}

#[test]
fn eval_concurrent_callers_are_serialized_safely() {
    require_python!();
    let agent = AgentProcess::start(&[]);
    agent.client().eval("counter = 0", None).unwrap();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let mut client = agent.client();
            thread::spawn(move || {
                for _ in 0..25 {
                    let r = client.eval("counter += 1", None).unwrap();
                    assert!(r.error.is_none(), "{:?}", r.error);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        agent
            .client()
            .eval("counter", None)
            .unwrap()
            .value
            .as_deref(),
        Some("100")
    );
}

/// An eval request as the code-interpreter plane sends it.
fn eval_request(code: &str) -> EvalRequest {
    EvalRequest {
        code: code.into(),
        ..Default::default()
    }
}

#[test]
fn eval_streaming_sends_output_as_it_is_written_before_the_result() {
    require_python!();
    let agent = AgentProcess::start(&[]);
    let mut client = agent.client();
    let request = EvalRequest {
        stream: true,
        ..eval_request(
            "import sys, time\nprint('one')\nprint('part', end='')\ntime.sleep(0.6)\n\
             print(' two', file=sys.stderr)\nprint('three')\n3",
        )
    };
    let start = Instant::now();
    let mut chunks = Vec::new();
    let result = client
        .eval_streaming(&request, |stream, data| {
            chunks.push((
                start.elapsed(),
                stream,
                String::from_utf8(data.to_vec()).unwrap(),
            ));
            Ok(())
        })
        .unwrap();
    let done = start.elapsed();
    let seen: Vec<(Stream, &str)> = chunks.iter().map(|(_, s, t)| (*s, t.as_str())).collect();
    assert_eq!(
        seen,
        [
            (Stream::Stdout, ""),
            (Stream::Stdout, "one\n"),
            (Stream::Stdout, "part"),
            (Stream::Stderr, " two\n"),
            (Stream::Stdout, "three\n"),
        ],
        "the start marker, then the output in order, a partial line flushed after a while"
    );
    // "one" and the partial line arrived while the code still slept, well before the result.
    assert!(
        chunks[1].0 + Duration::from_millis(400) < done,
        "{chunks:?} / {done:?}"
    );
    assert!(
        chunks[2].0 + Duration::from_millis(300) < done,
        "{chunks:?} / {done:?}"
    );
    assert_eq!(result.value.as_deref(), Some("3"));
    assert_eq!((result.stdout.as_str(), result.stderr.as_str()), ("", ""));
    assert_eq!(result.execution_count, 1);

    // Without `stream`, the output is captured in the result as before, and nothing streams.
    let result = client
        .eval_streaming(&eval_request("print('kept')"), |s, d| {
            panic!("unexpected {s:?} chunk {d:?}")
        })
        .unwrap();
    assert_eq!(result.stdout, "kept\n");
    assert_eq!(result.execution_count, 2);
    // A logging handler made during one eval writes into later evals' output.
    client
        .eval("import logging, sys\nlog = logging.getLogger('t')\nlog.addHandler(logging.StreamHandler(sys.stderr))", None)
        .unwrap();
    let result = client.eval("log.warning('later')", None).unwrap();
    assert_eq!(result.stderr, "later\n");
}

#[test]
fn eval_results_are_mime_bundles_from_repr_methods_display_and_figures() {
    require_python!();
    let agent = AgentProcess::start(&[]);
    let mut client = agent.client();
    let code = "\
class Rich:
    def __repr__(self):
        return 'Rich()'
    def _repr_html_(self):
        return '<b>rich</b>'
    def _repr_png_(self):
        return b'\\x89PNG-bytes'
    def _repr_json_(self):
        return {'n': 1}
    def _repr_latex_(self):
        return None
display(Rich(), 'shown')
Rich()";
    let result = client.eval(code, None).unwrap();
    assert!(result.error.is_none(), "{:?}", result.error);
    assert_eq!(result.value.as_deref(), Some("Rich()"));
    let bundles: Vec<(serde_json::Value, bool)> = result
        .results
        .iter()
        .map(|r| (serde_json::Value::Object(r.data.clone()), r.is_main))
        .collect();
    let rich = serde_json::json!({
        "text/plain": "Rich()",
        "text/html": "<b>rich</b>",
        "image/png": "iVBORy1ieXRlcw==",
        "application/json": {"n": 1},
    });
    assert_eq!(
        bundles,
        [
            (rich.clone(), false),
            (serde_json::json!({"text/plain": "'shown'"}), false),
            (rich, true),
        ]
    );

    // A failing format is left out and said on stderr; a class is shown by its repr only.
    let r = client
        .eval(
            "class Bad:\n    def _repr_html_(self):\n        raise ValueError('no html')\nBad",
            None,
        )
        .unwrap();
    assert_eq!(r.results.len(), 1);
    assert_eq!(r.results[0].data.keys().collect::<Vec<_>>(), ["text/plain"]);
    let r = client.eval("Bad()", None).unwrap();
    assert_eq!(r.results[0].data.keys().collect::<Vec<_>>(), ["text/plain"]);
    assert!(
        r.stderr
            .contains("_repr_html_() raised ValueError: no html"),
        "{}",
        r.stderr
    );

    // Too big for a reply: the format is left out, the rest arrives, and stderr says so.
    let r = client
        .eval(
            "class Huge:\n    def _repr_png_(self):\n        return b'x' * 2_000_000\nHuge()",
            None,
        )
        .unwrap();
    assert!(r.results[0].is_main);
    assert_eq!(r.results[0].data.keys().collect::<Vec<_>>(), ["text/plain"]);
    assert!(
        r.stderr.contains("image/png") && r.stderr.contains("left out"),
        "{}",
        r.stderr
    );

    // Open pyplot figures (a stand-in module: the code imported it) become png results and
    // are closed; without pyplot imported nothing is looked for.
    let fake_pyplot = "\
import sys, types
plt = types.ModuleType('matplotlib.pyplot')
plt.open = {1: 'fig-a', 2: 'fig-b'}
class Figure:
    def __init__(self, name):
        self.name = name
    def savefig(self, out, format, **options):
        out.write(('PNG of ' + self.name).encode())
    def __repr__(self):
        return '<Figure ' + self.name + '>'
plt.get_fignums = lambda: sorted(plt.open)
plt.figure = lambda n: Figure(plt.open[n])
def close(fig):
    for n, name in list(plt.open.items()):
        if getattr(fig, 'name', None) == name:
            del plt.open[n]
plt.close = close
sys.modules['matplotlib.pyplot'] = plt
7";
    let r = client.eval(fake_pyplot, None).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    let shown: Vec<_> = r
        .results
        .iter()
        .map(|d| (d.is_main, d.data.get("image/png").and_then(|v| v.as_str())))
        .collect();
    assert_eq!(
        shown,
        [
            (true, None),
            (false, Some("UE5HIG9mIGZpZy1h")),
            (false, Some("UE5HIG9mIGZpZy1i")),
        ]
    );
    assert_eq!(r.results[1].data["text/plain"], "<Figure fig-a>");
    let r = client.eval("plt.open", None).unwrap();
    assert_eq!(r.value.as_deref(), Some("{}"), "the figures were closed");
    assert_eq!(r.results.len(), 1);
}

#[test]
fn eval_contexts_are_separate_namespaces_with_their_own_cwd_and_count() {
    require_python!();
    let agent = AgentProcess::start(&[]);
    let mut client = agent.client();
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("sub")).unwrap();
    let home = dir.path().to_str().unwrap();
    let made = client
        .eval_context(EvalContextAction::Create, None, Some(home))
        .unwrap();
    let ctx = made.contexts[0].clone();
    assert_eq!((ctx.language.as_str(), ctx.cwd.as_str()), ("python", home));
    assert_ne!(ctx.id, "default");
    let in_ctx = |code: &str| EvalRequest {
        context: Some(ctx.id.clone()),
        ..eval_request(code)
    };
    let mut run = |request: &EvalRequest| client.eval_streaming(request, |_, _| Ok(())).unwrap();

    let r = run(&eval_request("x = 'default'\nimport os\nos.getcwd()"));
    let default_cwd = r.value.clone().unwrap();
    assert_ne!(default_cwd, format!("{home:?}"));
    let r = run(&in_ctx("x"));
    assert_eq!(
        r.error.unwrap().type_name,
        "NameError",
        "x is not in the new context"
    );
    let r = run(&in_ctx(
        "import os\nx = 'ctx'\nos.chdir('sub')\nos.getcwd()",
    ));
    assert_eq!(r.value, Some(format!("'{home}/sub'")));
    assert_eq!(r.execution_count, 2, "counted per context");
    assert_eq!(run(&eval_request("x")).value.as_deref(), Some("'default'"));
    let r = run(&eval_request("os.getcwd()"));
    assert_eq!(r.value.as_ref(), Some(&default_cwd), "default's cwd stays");
    assert_eq!(r.execution_count, 3);
    let r = run(&in_ctx("(x, os.getcwd())"));
    assert_eq!(r.value, Some(format!("('ctx', '{home}/sub')")));

    let listed = client
        .eval_context(EvalContextAction::List, None, None)
        .unwrap();
    let ids: Vec<(&str, &str, u64)> = listed
        .contexts
        .iter()
        .map(|c| (c.id.as_str(), c.cwd.as_str(), c.execution_count))
        .collect();
    let sub = format!("{home}/sub");
    assert_eq!(ids[1], (ctx.id.as_str(), sub.as_str(), 3));
    assert_eq!((ids[0].0, ids[0].2, ids.len()), ("default", 3, 2));

    // Restart: an empty namespace, back in its first directory, counting from 0.
    let restarted = client
        .eval_context(EvalContextAction::Restart, Some(&ctx.id), None)
        .unwrap();
    assert_eq!(restarted.contexts[0].cwd, home);
    let mut run = |request: &EvalRequest| client.eval_streaming(request, |_, _| Ok(())).unwrap();
    let r = run(&in_ctx("x"));
    assert_eq!(r.error.unwrap().type_name, "NameError");
    assert_eq!(r.execution_count, 1);
    let r = run(&in_ctx("import os\nos.getcwd()"));
    assert_eq!(r.value, Some(format!("'{home}'")));
    // Default can be restarted too.
    client
        .eval_context(EvalContextAction::Restart, Some("default"), None)
        .unwrap();
    let r = client.eval("x", None).unwrap();
    assert_eq!(r.error.unwrap().type_name, "NameError");

    // Environment variables hold for one eval.
    let r = client
        .eval_streaming(
            &EvalRequest {
                env: [("FORKD_T_VAR".to_string(), "set".to_string())].into(),
                ..eval_request("import os\nos.environ.get('FORKD_T_VAR')")
            },
            |_, _| Ok(()),
        )
        .unwrap();
    assert_eq!(r.value.as_deref(), Some("'set'"));
    let r = client.eval("os.environ.get('FORKD_T_VAR')", None).unwrap();
    assert_eq!(r.value, None);

    // Removed: gone for evals and context ops alike.
    client
        .eval_context(EvalContextAction::Remove, Some(&ctx.id), None)
        .unwrap();
    let (code, message) = agent_error(client.eval_streaming(&in_ctx("1"), |_, _| Ok(())));
    assert_eq!(code, ErrorCode::NotFound);
    assert!(message.contains(&ctx.id), "{message}");
    let (code, _) =
        agent_error(client.eval_context(EvalContextAction::Restart, Some(&ctx.id), None));
    assert_eq!(code, ErrorCode::NotFound);
    let (code, _) =
        agent_error(client.eval_context(EvalContextAction::Remove, Some(&ctx.id), None));
    assert_eq!(code, ErrorCode::NotFound);
    let listed = client
        .eval_context(EvalContextAction::List, None, None)
        .unwrap();
    assert_eq!(listed.contexts.len(), 1);
}

#[test]
fn eval_context_bad_inputs_are_refused() {
    require_python!();
    let agent = AgentProcess::start(&[]);
    let mut client = agent.client();
    let (code, message) =
        agent_error(client.eval_context(EvalContextAction::Remove, Some("default"), None));
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(
        message.contains("default context cannot be removed"),
        "{message}"
    );
    let (code, _) = agent_error(client.eval_context(EvalContextAction::Restart, None, None));
    assert_eq!(code, ErrorCode::BadRequest);
    let (code, message) = agent_error(client.eval_context(
        EvalContextAction::Create,
        None,
        Some("/nonexistent/forkd-dir"),
    ));
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("/nonexistent/forkd-dir"), "{message}");
    let (code, _) = agent_error(client.eval_streaming(
        &EvalRequest {
            context: Some("nope".into()),
            stream: true,
            ..eval_request("1")
        },
        |s, d| panic!("nothing streams for an unknown context: {s:?} {d:?}"),
    ));
    assert_eq!(code, ErrorCode::NotFound);
    let (code, _) = agent_error(client.eval_streaming(
        &EvalRequest {
            env: [("BAD=NAME".to_string(), "x".to_string())].into(),
            ..eval_request("1")
        },
        |_, _| Ok(()),
    ));
    assert_eq!(code, ErrorCode::BadRequest);
    assert_eq!(
        client.eval("1 + 1", None).unwrap().value.as_deref(),
        Some("2")
    );

    // A context of an interpreter killed on a timeout is gone, and the error says why.
    let ctx = client
        .eval_context(EvalContextAction::Create, None, None)
        .unwrap()
        .contexts
        .remove(0);
    let r = client
        .eval_streaming(
            &EvalRequest {
                context: Some(ctx.id.clone()),
                timeout_ms: Some(300),
                ..eval_request("while True:\n    pass")
            },
            |_, _| Ok(()),
        )
        .unwrap();
    assert!(r.timed_out);
    let (code, message) = agent_error(client.eval_streaming(
        &EvalRequest {
            context: Some(ctx.id.clone()),
            ..eval_request("1")
        },
        |_, _| Ok(()),
    ));
    assert_eq!(code, ErrorCode::NotFound);
    assert!(message.contains("contexts were lost"), "{message}");
}

#[test]
fn restored_reseeds_the_interpreters_random_generator() {
    require_python!();
    let agent = AgentProcess::start(&["--skip-clock-set", "--eval-warmup", "import random"]);
    let mut client = agent.client();
    client.eval("before = random.getstate()", None).unwrap();
    assert_eq!(
        client
            .eval("random.getstate() == before", None)
            .unwrap()
            .value
            .as_deref(),
        Some("True")
    );
    client.restored(&[9; 32], SystemTime::now()).unwrap();
    assert_eq!(
        client
            .eval("random.getstate() == before", None)
            .unwrap()
            .value
            .as_deref(),
        Some("False")
    );
}

#[test]
fn eval_warmup_failure_is_reported_and_eval_still_works() {
    require_python!();
    let agent = AgentProcess::start(&["--eval-warmup", "import forkd_no_such_module"]);
    let mut client = agent.client();
    let status = client.ping().unwrap().eval;
    assert!(status.ready);
    let error = status.error.expect("warm-up error reported");
    assert!(error.contains("ModuleNotFoundError"), "{error}");
    assert_eq!(
        client.eval("3 * 3", None).unwrap().value.as_deref(),
        Some("9")
    );
}

#[test]
fn eval_unavailable_without_an_interpreter() {
    let agent = AgentProcess::start(&["--eval-interpreter", "/nonexistent/python3"]);
    let mut client = agent.client();
    let status = client.ping().unwrap().eval;
    assert!(status.enabled && !status.ready);
    assert!(status.error.unwrap().contains("/nonexistent/python3"));
    let (code, _) = agent_error(client.eval("1", None));
    assert_eq!(code, ErrorCode::EvalUnavailable);
    assert_eq!(
        client.exec(&sh("echo still").build(), b"").unwrap().stdout,
        b"still\n"
    );

    let agent = AgentProcess::start(&["--no-eval"]);
    let (code, message) = agent_error(agent.client().eval("1", None));
    assert_eq!(code, ErrorCode::EvalUnavailable);
    assert!(message.contains("--no-eval"), "{message}");
}

#[test]
fn eval_numpy_warmed_when_numpy_is_installed() {
    require_python!();
    let has_numpy = Command::new(python())
        .args(["-c", "import numpy"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_numpy {
        skip!(
            "eval numpy: numpy is not installed for {} on this host",
            python()
        );
        return;
    }
    let agent = AgentProcess::start(&["--eval-warmup", "import numpy"]);
    let r = agent
        .client()
        .eval("numpy.zeros(5).tolist()", None)
        .unwrap();
    assert_eq!(r.value.as_deref(), Some("[0.0, 0.0, 0.0, 0.0, 0.0]"));
}

#[test]
fn eval_large_output_is_truncated_not_fatal() {
    require_python!();
    let agent = AgentProcess::start(&[]);
    let mut client = agent.client();
    let r = client
        .eval("print('y' * 3_000_000)\n'z' * 2_000_000", None)
        .unwrap();
    assert!(
        r.stdout.contains("truncated"),
        "stdout length {}",
        r.stdout.len()
    );
    assert!(r.value.unwrap().contains("truncated"));
    // The interpreter and the connection are fine afterwards.
    assert_eq!(
        client.eval("len('ok')", None).unwrap().value.as_deref(),
        Some("2")
    );
}

// ---------------------------------------------------------------------------------------------
// mkdir

#[test]
fn rename_moves_a_file_replacing_the_target_and_refuses_a_missing_source() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let path = |name: &str| agent.path(name).to_str().unwrap().to_string();
    fs::write(agent.path("old"), "content").unwrap();
    fs::write(agent.path("taken"), "replaced").unwrap();
    let stat = client.rename(&path("old"), &path("taken")).unwrap();
    assert_eq!((stat.kind, stat.size), (FileKind::File, 7));
    assert_eq!(fs::read_to_string(agent.path("taken")).unwrap(), "content");
    assert!(!agent.path("old").exists());
    for (from, to, code) in [
        (path("old"), path("new"), ErrorCode::NotFound),
        (String::new(), path("new"), ErrorCode::BadRequest),
    ] {
        let err = client.rename(&from, &to).unwrap_err();
        assert_eq!(err.code(), Some(code), "{err}");
    }
    ping_works(&mut agent.connect());
}

#[test]
fn mkdir_creates_with_its_mode_and_refuses_what_exists_or_has_no_parent() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let path = |name: &str| agent.path(name).to_str().unwrap().to_string();

    let made = client.mkdir(&path("one"), false, Some(0o700)).unwrap();
    assert!(made.created);
    assert_eq!((made.stat.kind, made.stat.mode), (FileKind::Dir, 0o700));
    assert!(agent.path("one").is_dir());
    let default = client.mkdir(&path("two"), false, None).unwrap();
    assert_eq!(default.stat.mode, 0o755, "the default, whatever the umask");

    let deep = client.mkdir(&path("a/b/c"), true, Some(0o750)).unwrap();
    assert!(deep.created && agent.path("a/b/c").is_dir());
    assert_eq!(deep.stat.mode, 0o750);
    let again = client.mkdir(&path("a/b/c"), true, None).unwrap();
    assert!(
        !again.created,
        "an existing directory with parents is no error"
    );
    assert_eq!(again.stat.mode, 0o750, "and is left as it was");

    fs::write(agent.path("file"), "x").unwrap();
    for (target, parents, mode, code) in [
        (path("one"), false, None, ErrorCode::AlreadyExists),
        (path("file"), false, None, ErrorCode::AlreadyExists),
        (path("file"), true, None, ErrorCode::AlreadyExists),
        (path("missing/child"), false, None, ErrorCode::NotFound),
        (path("file/child"), false, None, ErrorCode::NotADirectory),
        (
            path("file/child/deeper"),
            true,
            None,
            ErrorCode::NotADirectory,
        ),
        (
            path("bad-mode"),
            false,
            Some(0o17777),
            ErrorCode::BadRequest,
        ),
        (String::new(), true, None, ErrorCode::BadRequest),
    ] {
        let (got, message) = agent_error(client.mkdir(&target, parents, mode));
        assert_eq!(got, code, "{target} (parents {parents}): {message}");
        assert!(message.starts_with("file_mkdir"), "{message}");
    }
    assert!(!agent.path("missing").exists() && !agent.path("bad-mode").exists());
    assert_eq!(fs::read(agent.path("file")).unwrap(), b"x");
}

// ---------------------------------------------------------------------------------------------
// background processes

/// Waits (bounded) for a background process's end and returns what the wait gave.
fn wait_proc(client: &mut AgentClient<UnixStream>, pid: u32) -> forkd_agent::client::ProcOutput {
    let out = client.proc_wait(pid, Some(60_000)).unwrap();
    assert_eq!(out.result.process.state, ProcState::Exited, "{out:?}");
    out
}

#[test]
fn background_process_output_and_exit_code_are_kept_until_waited_for() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let started = client
        .proc_start(&sh("echo hi; echo oops >&2; exit 3").build(), b"")
        .unwrap();
    assert!(started.pid > 0);
    let out = wait_proc(&mut client, started.pid);
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"hi\n"[..], &b"oops\n"[..])
    );
    let p = &out.result.process;
    assert_eq!((p.exit_code, p.signal, p.timed_out), (Some(3), None, false));
    assert_eq!(p.argv, ["sh", "-c", "echo hi; echo oops >&2; exit 3"]);
    assert_eq!((p.stdout_bytes, p.stderr_bytes), (3, 5));
    assert!(p.ended_ms.unwrap() >= p.started_ms);
    assert!(
        !zombie_of(started.pid, agent.child.id()),
        "waited for: the zombie is reaped"
    );
    let (code, _) = agent_error(client.proc_wait(started.pid, Some(0)));
    assert_eq!(code, ErrorCode::NotFound, "a wait collects the process");

    // stdin is the payload; the process outlives the connection that started it.
    let pid = agent
        .client()
        .proc_start(&ExecBuilder::new(["cat"]).build(), b"from stdin")
        .unwrap()
        .pid;
    let out = wait_proc(&mut client, pid);
    assert_eq!(out.stdout, b"from stdin");
    assert_eq!(out.result.process.exit_code, Some(0));
}

#[test]
fn background_processes_are_listed_killed_by_group_and_the_wait_reports_the_signal() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let sleeper = client
        .proc_start(&ExecBuilder::new(["sleep", "300"]).build(), b"")
        .unwrap()
        .pid;
    // A shell whose child sleeps too: killing the process kills its whole group.
    let family = client
        .proc_start(&sh("sleep 300 & echo $!; wait").build(), b"")
        .unwrap()
        .pid;
    let listed = client.proc_list().unwrap().processes;
    let pids: Vec<u32> = listed.iter().map(|p| p.pid).collect();
    assert_eq!(pids, [sleeper, family], "oldest first");
    assert_eq!(listed[0].argv, ["sleep", "300"]);
    assert!(listed
        .iter()
        .all(|p| p.state == ProcState::Running && p.exit_code.is_none()));

    // A wait that times out says it still runs, sends the output so far, and keeps it.
    let mut grandchild = String::new();
    wait_until("the shell to print its child's pid", || {
        let out = client.proc_wait(family, Some(0)).unwrap();
        assert_eq!(out.result.process.state, ProcState::Running);
        grandchild = String::from_utf8_lossy(&out.stdout).trim().to_string();
        !grandchild.is_empty()
    });
    let grandchild: i32 = grandchild.parse().unwrap();

    let killed = client.proc_kill(sleeper, Some(libc::SIGTERM)).unwrap();
    assert_eq!((killed.pid, killed.signal), (sleeper, libc::SIGTERM));
    assert_eq!(killed.state, ProcState::Running);
    wait_until("the killed process to be listed as exited", || {
        client.proc_list().unwrap().processes[0].state == ProcState::Exited
    });
    assert!(
        zombie_of(sleeper, agent.child.id()),
        "ended but not waited for: kept as a zombie, so its pid cannot be reused"
    );
    let out = wait_proc(&mut client, sleeper);
    assert_eq!(
        (out.result.process.exit_code, out.result.process.signal),
        (None, Some(libc::SIGTERM))
    );

    assert_eq!(
        client.proc_kill(family, None).unwrap().signal,
        libc::SIGKILL
    );
    wait_until("the shell's child to die with its group", || {
        process_dead(grandchild)
    });
    assert_eq!(
        wait_proc(&mut client, family).result.process.signal,
        Some(libc::SIGKILL)
    );
    assert!(client.proc_list().unwrap().processes.is_empty());
}

#[test]
fn background_process_bad_inputs_get_errors_and_change_nothing() {
    let mut agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let pid = client
        .proc_start(&ExecBuilder::new(["sleep", "300"]).build(), b"")
        .unwrap()
        .pid;
    for signal in [0, -1, 65] {
        let (code, message) = agent_error(client.proc_kill(pid, Some(signal)));
        assert_eq!(code, ErrorCode::BadRequest, "{message}");
        assert!(message.contains("not a signal number"), "{message}");
    }
    let unknown = 999_999_999;
    let (code, message) = agent_error(client.proc_wait(unknown, Some(0)));
    assert_eq!(code, ErrorCode::NotFound, "{message}");
    assert!(message.contains("999999999"), "{message}");
    assert_eq!(
        agent_error(client.proc_kill(unknown, None)).0,
        ErrorCode::NotFound
    );
    let (code, message) =
        agent_error(client.proc_start(&ExecBuilder::new(["/nonexistent/prog"]).build(), b""));
    assert_eq!(code, ErrorCode::SpawnFailed);
    assert!(message.contains("/nonexistent/prog"), "{message}");
    let (code, _) = agent_error(client.proc_start(&ExecRequest::default(), b""));
    assert_eq!(code, ErrorCode::BadRequest);

    let listed = client.proc_list().unwrap().processes;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].pid, listed[0].state),
        (pid, ProcState::Running),
        "the refused kills did not touch it"
    );
    client.proc_kill(pid, None).unwrap();
    wait_proc(&mut client, pid);
    agent.assert_alive();
}

#[test]
fn background_process_timeout_kills_its_group() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let pid = client
        .proc_start(&sh("sleep 300").timeout_ms(300).build(), b"")
        .unwrap()
        .pid;
    let p = wait_proc(&mut client, pid).result.process;
    assert!(p.timed_out, "{p:?}");
    assert_eq!(p.signal, Some(libc::SIGKILL));
}

#[test]
fn background_output_keeps_the_last_mebibyte_of_each_stream() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    // 3 MiB of numbered lines: the kept part must be the end of the stream.
    let script = "seq 1 400000; echo end";
    let expected = agent
        .client()
        .exec(&sh(script).build(), b"")
        .unwrap()
        .stdout;
    assert!(expected.len() > 2 * PROC_CAPTURE_LEN);
    let pid = client.proc_start(&sh(script).build(), b"").unwrap().pid;
    let out = wait_proc(&mut client, pid);
    assert_eq!(out.stdout.len(), PROC_CAPTURE_LEN);
    assert_eq!(out.stdout, expected[expected.len() - PROC_CAPTURE_LEN..]);
    assert_eq!(out.result.process.stdout_bytes, expected.len() as u64);
    assert_eq!(
        out.result.stdout_dropped,
        (expected.len() - PROC_CAPTURE_LEN) as u64
    );
}

#[test]
fn ended_processes_beyond_the_cap_are_dropped_oldest_first() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let extra = 3;
    let pids: Vec<u32> = (0..MAX_EXITED_PROCS + extra)
        .map(|_| {
            client
                .proc_start(&ExecBuilder::new(["true"]).build(), b"")
                .unwrap()
                .pid
        })
        .collect();
    wait_until("every process to end", || {
        client
            .proc_list()
            .unwrap()
            .processes
            .iter()
            .all(|p| p.state == ProcState::Exited)
    });
    let listed: Vec<u32> = client
        .proc_list()
        .unwrap()
        .processes
        .iter()
        .map(|p| p.pid)
        .collect();
    assert_eq!(listed.len(), MAX_EXITED_PROCS);
    // They ended in no particular order, so which ones went is not known exactly; but the
    // dropped ones were reaped, and everything listed can still be waited for.
    for pid in &pids {
        if !listed.contains(pid) {
            assert_eq!(
                agent_error(client.proc_wait(*pid, Some(0))).0,
                ErrorCode::NotFound
            );
        }
    }
    for pid in listed {
        assert_eq!(
            wait_proc(&mut client, pid).result.process.exit_code,
            Some(0)
        );
    }
    for pid in pids {
        assert!(!zombie_of(pid, agent.child.id()), "{pid} was reaped");
    }
}

/// Output chunks a follower received, with when each arrived.
type Followed = Vec<(Stream, Vec<u8>, Instant)>;

/// Follows `pid` from `from` on its own connection, collecting what arrives and when.
fn follow_proc(
    agent: &AgentProcess,
    pid: u32,
    from: Follow,
) -> std::thread::JoinHandle<(Followed, ProcWaitResult)> {
    let mut client = agent.client();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let result = client
            .proc_follow(pid, from, Some(60_000), &mut |stream, data| {
                seen.push((stream, data.to_vec(), Instant::now()));
                Ok(())
            })
            .unwrap();
        (seen, result)
    })
}

fn joined(seen: &[(Stream, Vec<u8>, Instant)], which: Stream) -> String {
    seen.iter()
        .filter(|(s, _, _)| *s == which)
        .map(|(_, d, _)| String::from_utf8_lossy(d).into_owned())
        .collect()
}

#[test]
fn a_followed_process_streams_its_output_as_written_and_takes_input_on_a_kept_stdin() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    // Echoes each line it reads, on stdout and stderr, until its stdin closes.
    let script = "echo started; while read -r line; do echo \"out:$line\"; echo \"err:$line\" >&2; done; echo bye";
    let pid = client
        .proc_start(&sh(script).keep_stdin().build(), b"first\n")
        .unwrap()
        .pid;
    let from_start = follow_proc(&agent, pid, Follow::Start);
    wait_until("the first line is echoed", || {
        client.proc_list().unwrap().processes[0].stdout_bytes >= 18
    });
    let from_now = follow_proc(&agent, pid, Follow::Now);
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    let input = client.proc_input(pid, b"second\n", false).unwrap();
    assert_eq!((input.pid, input.written, input.closed), (pid, 7, false));
    std::thread::sleep(Duration::from_millis(1500));
    let closed = client.proc_input(pid, b"", true).unwrap();
    assert!(closed.closed);

    let (seen, result) = from_start.join().unwrap();
    assert_eq!(
        joined(&seen, Stream::Stdout),
        "started\nout:first\nout:second\nbye\n"
    );
    assert_eq!(joined(&seen, Stream::Stderr), "err:first\nerr:second\n");
    let second = seen
        .iter()
        .find(|(_, d, _)| d.starts_with(b"out:second"))
        .expect("the second line arrived in a chunk of its own");
    assert!(
        second.2 >= sent && second.2 < sent + Duration::from_millis(1400),
        "the second line streamed before the stdin closed"
    );
    assert_eq!(result.process.exit_code, Some(0));
    assert_eq!((result.stdout_dropped, result.stderr_dropped), (0, 0));
    // Following from now skips what was written before.
    let (seen, result) = from_now.join().unwrap();
    assert_eq!(joined(&seen, Stream::Stdout), "out:second\nbye\n");
    assert_eq!(result.process.state, ProcState::Exited);
    // Seeing the end collects it (for one follower; the other already held it).
    assert!(!zombie_of(pid, agent.child.id()));
    let (code, _) = agent_error(client.proc_wait(pid, Some(0)));
    assert_eq!(code, ErrorCode::NotFound);
}

#[test]
fn input_to_a_process_without_a_kept_stdin_or_after_close_is_refused() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let plain = client
        .proc_start(&ExecBuilder::new(["sleep", "300"]).build(), b"")
        .unwrap()
        .pid;
    let (code, message) = agent_error(client.proc_input(plain, b"x", false));
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("keep_stdin"), "{message}");
    let kept = client
        .proc_start(&ExecBuilder::new(["cat"]).keep_stdin().build(), b"")
        .unwrap()
        .pid;
    assert!(client.proc_input(kept, b"", true).unwrap().closed);
    let (code, _) = agent_error(client.proc_input(kept, b"late", false));
    assert_eq!(code, ErrorCode::BadRequest);
    let out = wait_proc(&mut client, kept);
    assert_eq!(
        out.result.process.exit_code,
        Some(0),
        "cat saw its stdin close"
    );
    let (code, _) = agent_error(client.proc_input(999_999, b"x", false));
    assert_eq!(code, ErrorCode::NotFound);
    let (code, message) = agent_error(client.exec(&sh("true").keep_stdin().build(), b""));
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("proc_start"), "{message}");
    client.proc_kill(plain, None).unwrap();
    // A follow with a deadline ends at it, with the process still running.
    let sleeper = client
        .proc_start(&ExecBuilder::new(["sleep", "300"]).build(), b"")
        .unwrap()
        .pid;
    let result = client
        .proc_follow(sleeper, Follow::Now, Some(200), &mut |_, _| Ok(()))
        .unwrap();
    assert_eq!(result.process.state, ProcState::Running);
    client.proc_kill(sleeper, None).unwrap();
}

// ---------------------------------------------------------------------------------------------
// tcp tunnels

#[test]
fn tcp_connect_turns_the_connection_into_a_stream_to_the_guest_port() {
    let agent = AgentProcess::start(&["--no-eval"]);
    // A line server: greets first, then answers each line upper-cased until the peer closes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket.write_all(b"hello\n").unwrap();
        let mut seen = Vec::new();
        socket.read_to_end(&mut seen).unwrap();
        socket.write_all(&seen.to_ascii_uppercase()).unwrap();
        seen
    });
    let (mut tunnel, result) = agent.client().tcp_connect(port).unwrap();
    assert_eq!(result.address, format!("127.0.0.1:{port}"));
    let mut greeting = [0u8; 6];
    tunnel.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"hello\n");
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    tunnel.write_all(&big).unwrap();
    tunnel.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    tunnel.read_to_end(&mut back).unwrap();
    assert_eq!(server.join().unwrap(), big, "the server got every byte");
    assert_eq!(
        back,
        big.to_ascii_uppercase(),
        "and its answer came back whole"
    );

    // A port nothing listens on, and port 0, are refused; the connection stays an agent's.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let (code, message) = agent_error(agent.client().tcp_connect(closed_port).map(|_| ()));
    assert_eq!(code, ErrorCode::Io);
    assert!(message.contains("nothing accepts"), "{message}");
    let (code, _) = agent_error(agent.client().tcp_connect(0).map(|_| ()));
    assert_eq!(code, ErrorCode::BadRequest);
}

#[test]
fn a_pty_process_has_a_terminal_that_takes_input_and_resizes() {
    let agent = AgentProcess::start(&["--no-eval"]);
    let mut client = agent.client();
    let script = "read -r line; stty size; tty; echo got:$line";
    let pid = client
        .proc_start(&sh(script).pty(80, 24).build(), b"")
        .unwrap()
        .pid;
    client
        .proc_resize(
            pid,
            PtySize {
                cols: 100,
                rows: 30,
            },
        )
        .unwrap();
    client.proc_input(pid, b"typed\n", false).unwrap();
    let out = wait_proc(&mut client, pid);
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("30 100"), "the resize reached it: {screen}");
    assert!(
        screen.contains("/dev/pts/"),
        "its stdio is a terminal: {screen}"
    );
    assert!(
        screen.contains("got:typed"),
        "the input reached it: {screen}"
    );
    assert!(out.stderr.is_empty(), "a terminal is one stream");
    assert_eq!(out.result.process.exit_code, Some(0));

    let plain = client
        .proc_start(&ExecBuilder::new(["sleep", "300"]).build(), b"")
        .unwrap()
        .pid;
    let (code, message) = agent_error(client.proc_resize(plain, PtySize { cols: 1, rows: 1 }));
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("pty"), "{message}");
    client.proc_kill(plain, None).unwrap();
    let (code, _) = agent_error(client.exec(&sh("true").pty(80, 24).build(), b""));
    assert_eq!(code, ErrorCode::BadRequest);
}
