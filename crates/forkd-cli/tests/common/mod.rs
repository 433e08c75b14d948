//! Helpers for the CLI tests that fork children: each test's data directory and runtime
//! directory (children's sockets and logs) live inside its own temporary home.
#![allow(dead_code)] // each test crate uses a subset

pub mod net;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use forkd_test_support::http::{request, Endpoint, Response};

/// `forkd` with `home` as its data directory and `home/runtime` as its runtime directory.
pub fn forkd_command(home: &Path) -> Command {
    std::fs::create_dir_all(home.join("runtime")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
    cmd.env("FORKD_HOME", home)
        .env("XDG_RUNTIME_DIR", home.join("runtime"))
        .env_remove("RUST_LOG");
    cmd
}

pub fn forkd(home: &Path, args: &[&str]) -> Output {
    forkd_command(home).args(args).output().expect("run forkd")
}

/// Where a run's files go: overlays under the data directory, sockets and logs under the
/// runtime directory.
pub fn run_parents(home: &Path) -> [PathBuf; 2] {
    [home.join("run"), home.join("runtime/forkd")]
}

/// No run directory is left, in either place.
pub fn assert_no_run_dirs_left(home: &Path) {
    for run in run_parents(home) {
        let left = std::fs::read_dir(&run).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "{} still has entries", run.display());
    }
}

/// The demo guest's snapshot (64 MiB) tagged `tag` in `home`; panics with forkd's error.
pub fn snapshot_demo(home: &Path, tag: &str) {
    let args = [
        "snapshot",
        "--tag",
        tag,
        "--kernel",
        "builtin:demo",
        "--mem-mib",
        "64",
    ];
    let out = forkd(home, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `forkd serve`, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub tcp: Option<std::net::SocketAddr>,
    /// The TCP listener when it serves HTTPS.
    pub tls: Option<std::net::SocketAddr>,
}

impl Daemon {
    /// Starts `forkd serve` with `args` and waits for its "listening on" line.
    pub fn start(home: &Path, args: &[&str]) -> Daemon {
        Daemon::start_with_env(home, args, &[])
    }

    /// [`Daemon::start`] with environment variables of its own (its zygotes inherit them).
    pub fn start_with_env(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let socket = home.join("forkd.sock");
        let mut child = forkd_command(home)
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start forkd serve");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("forkd serve: listening on unix:"),
            "forkd serve said {line:?}"
        );
        let tcp = line
            .split("http://")
            .nth(1)
            .map(|a| a.trim().parse().unwrap());
        let tls = line
            .split("https://")
            .nth(1)
            .map(|a| a.trim().parse().unwrap());
        // Keep draining stderr so the daemon never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Daemon {
            child,
            socket,
            tcp,
            tls,
        }
    }

    pub fn unix(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.unix(), "GET", path, &[], b"").unwrap()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "forkd serve ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JSON error with this status and code, whose message is one line.
pub fn assert_error(response: &Response, status: u16, code: &str) -> String {
    assert_eq!(response.status, status, "{}", response.text());
    let body = response.json();
    assert_eq!(body["code"], code, "{body}");
    let message = body["message"].as_str().unwrap().to_string();
    assert!(
        !message.is_empty() && !message.contains('\n'),
        "{message:?}"
    );
    message
}

pub fn post_json(daemon: &Daemon, path: &str, body: &str) -> Response {
    post_json_within(daemon, path, body, Duration::from_secs(60))
}

/// [`post_json`] for a request the daemon may take longer over (a BRANCH of a large Linux
/// guest in the lab, where the CPU is about 20 times slower).
pub fn post_json_within(daemon: &Daemon, path: &str, body: &str, patience: Duration) -> Response {
    forkd_test_support::http::request_within(
        &daemon.unix(),
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        patience,
    )
    .unwrap()
}

/// Kills the zygotes (and with them their sandboxes) a test's daemons started in `home`:
/// they outlive the daemon by design.
pub struct ZygoteReaper(pub PathBuf);

impl Drop for ZygoteReaper {
    fn drop(&mut self) {
        for pid in zygote_pids(&self.0) {
            // SAFETY: kill(2) on a process this test started (its command line names the
            // test's own temporary home).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Processes running `forkd __zygote` for the data directory `home`.
pub fn zygote_pids(home: &Path) -> Vec<i32> {
    let home = home.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline);
            text.contains("__zygote") && text.contains(&home)
        })
        .collect()
}

pub fn create(daemon: &Daemon, body: serde_json::Value) -> Response {
    post_json(daemon, "/v1/sandboxes", &body.to_string())
}

pub fn ids(list: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// The demo guest behind sandbox `id` answers COUNTER on its vsock socket.
pub fn demo_answers(home: &Path, id: &str) -> bool {
    demo_counter(home, id).is_some()
}

/// The counter of the demo guest behind sandbox `id` (None: it did not answer).
pub fn demo_counter(home: &Path, id: &str) -> Option<u64> {
    let uds = home
        .join("daemon/sandboxes")
        .join(id)
        .join(format!("child-{}.vsock", child_index(home, id)));
    forkd_sandbox::fork::ask_counter(&uds, id, Instant::now() + Duration::from_secs(20)).ok()
}

/// The pool index in the socket's name (`child-N.vsock` in the sandbox's directory).
pub fn child_index(home: &Path, id: &str) -> String {
    std::fs::read_dir(home.join("daemon/sandboxes").join(id))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("child-")?
                .strip_suffix(".vsock")
                .map(str::to_string)
        })
        .next()
        .expect("a vsock socket")
}

/// A home with the demo guest's snapshot and a daemon on it. Fields drop in order: the
/// daemon, then the zygotes it started, then the home.
pub struct DemoDaemon {
    pub daemon: Daemon,
    pub _zygotes: ZygoteReaper,
    pub home: tempfile::TempDir,
}

/// None (after the SKIP line) where KVM is missing.
pub fn demo_daemon(test: &str, args: &[&str]) -> Option<DemoDaemon> {
    if !forkd_test_support::kvm_available(test) {
        return None;
    }
    let home = tempfile::tempdir().unwrap();
    snapshot_demo(home.path(), "demo");
    Some(DemoDaemon {
        daemon: Daemon::start(home.path(), args),
        _zygotes: ZygoteReaper(home.path().to_path_buf()),
        home,
    })
}

fn parent_of(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PPid:").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// Zygotes of `home`'s daemon: sandboxes and warm shells are forked from their zygote (same
/// command line), so the zygotes are the processes whose parent is not one.
pub fn zygote_count(home: &Path) -> usize {
    let all = zygote_pids(home);
    all.iter()
        .filter(|pid| !all.contains(&parent_of(**pid)))
        .count()
}

/// Starts an exec through `daemon` on a raw connection, reads its stream until `marker`
/// appears in it, then goes away without a word (as a client that crashed would).
pub fn exec_then_leave(daemon: &Daemon, exec_path: &str, body: &str, marker: &str) {
    use std::io::{Read, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    write!(
        conn,
        "POST {exec_path} HTTP/1.1\r\nHost: forkd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(marker) {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended before {marker:?}");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// A demo sandbox whose vsock socket is taken over by the real agent served on this host
/// (forkd-test-support's hybrid-vsock emulator), with its snapshot relabelled as a guest
/// that has one: the daemon's in-sandbox routes and the CLI verbs then run end to end
/// against a real agent, without a Linux guest. The "guest's" files are this host's.
pub struct HostAgentSandbox {
    pub id: String,
    _agent: forkd_test_support::vsock_agent::HybridVsockAgent,
}

pub fn host_agent_sandbox(demo: &DemoDaemon) -> HostAgentSandbox {
    let h = demo.home.path();
    let made = create(&demo.daemon, serde_json::json!({"tag": "demo"}));
    assert_eq!(made.status, 201, "{}", made.text());
    let id = ids(&made.json()).remove(0);
    let manifest = h.join("snapshots/demo/manifest.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let relabelled: String = text
        .lines()
        .map(|l| {
            if l.starts_with("kernel = ") {
                "kernel = \"/boot/host-agent\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(text, relabelled, "the manifest names its kernel");
    std::fs::write(&manifest, relabelled + "\n").unwrap();
    let uds = h
        .join("daemon/sandboxes")
        .join(&id)
        .join(format!("child-{}.vsock", child_index(h, &id)));
    std::fs::remove_file(&uds).unwrap();
    let python = std::process::Command::new("python3")
        .args(["-c", "pass"])
        .status()
        .is_ok_and(|s| s.success());
    let config = forkd_agent::server::AgentConfig {
        eval: python.then(|| forkd_agent::server::EvalConfig {
            interpreter: vec!["python3".into()],
            warmup: None,
            warmup_timeout: None,
        }),
        set_clock: false,
        resolv_conf: None,
    };
    let agent = forkd_test_support::vsock_agent::HybridVsockAgent::start_with(
        &uds,
        forkd_agent::protocol::DEFAULT_VSOCK_PORT,
        config,
    )
    .unwrap();
    HostAgentSandbox { id, _agent: agent }
}

/// A server process the test started, killed when dropped.
pub struct Serve(pub Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `python3 -m http.server` on a free loopback port: the plainest static server there is.
pub fn python_static_server(dir: &Path) -> Option<(Serve, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Serve(child);
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((server, format!("http://127.0.0.1:{port}")));
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    None
}
