//! `forkd-agent`: the guest agent binary (see the library docs for the protocol).
//!
//! Readiness: once listening and after the eval warm-up, the agent writes
//! `READY forkd-agent <version>\n` to stdout, to `--ready-unix PATH` (connect and write) when
//! given, and — in vsock mode, unless `--no-ready-vsock` — to the host at vsock CID 2 port 1025.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use forkd_agent::protocol::{ready_line, DEFAULT_VSOCK_PORT, HOST_CID, READY_VSOCK_PORT};
use forkd_agent::server::{Agent, AgentConfig, EvalConfig};
use forkd_agent::vsock::{VsockListener, VsockStream, CID_ANY};

#[derive(Parser, Debug)]
#[command(
    name = "forkd-agent",
    version,
    about = "forkd guest agent: exec, eval, files over vsock"
)]
struct Args {
    /// vsock port to listen on (guest mode, the default).
    #[arg(long, default_value_t = DEFAULT_VSOCK_PORT)]
    vsock_port: u32,
    /// Listen on this Unix socket instead of vsock (host tests).
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Also announce readiness by connecting to this Unix socket and writing the READY line.
    #[arg(long, value_name = "PATH")]
    ready_unix: Option<PathBuf>,
    /// vsock port on the host (CID 2) that receives the READY line in vsock mode.
    #[arg(long, default_value_t = READY_VSOCK_PORT)]
    ready_vsock_port: u32,
    /// Do not send the READY line over vsock.
    #[arg(long)]
    no_ready_vsock: bool,
    /// Interpreter command for eval (split on whitespace). A program named node, nodejs or
    /// node<version> runs JavaScript (the agent appends `-e <driver> <fds>`); any other is taken
    /// for a Python (the agent appends `-c <driver>`).
    #[arg(long, default_value = "python3")]
    eval_interpreter: String,
    /// Code run in the interpreter before readiness, e.g. "import numpy".
    #[arg(long, value_name = "CODE")]
    eval_warmup: Option<String>,
    /// Give up on the warm-up after this many seconds (0: no limit).
    #[arg(long, default_value_t = 600)]
    eval_warmup_timeout_secs: u64,
    /// Run without an eval interpreter.
    #[arg(long)]
    no_eval: bool,
    /// Never set the clock on `restored` (for running on a host, whose clock must not move).
    #[arg(long)]
    skip_clock_set: bool,
    /// Where `restored` writes a child's resolvers (the ones its network policy opens).
    /// Default: /etc/resolv.conf in a guest; never with --unix (on a host, whose resolv.conf
    /// must not change).
    #[arg(long, value_name = "PATH")]
    resolv_conf: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    log_level: tracing::Level,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(args.log_level)
        .with_ansi(false)
        .init();

    let config = AgentConfig {
        eval: eval_config(&args)?,
        set_clock: !args.skip_clock_set,
        resolv_conf: args.resolv_conf.clone().or_else(|| {
            args.unix
                .is_none()
                .then(|| PathBuf::from("/etc/resolv.conf"))
        }),
    };
    if args.unix.is_none() {
        // In a guest: services on its loopback must be reachable (see `tcp_connect`).
        match forkd_agent::loopback::bring_up() {
            Ok(true) => tracing::info!("brought the loopback interface up"),
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot bring the loopback interface up: {e}"),
        }
    }
    // Bind before warming up so early connections queue instead of failing.
    let listener = match &args.unix {
        Some(path) => Listener::Unix(bind_unix(path)?),
        None => Listener::Vsock(
            VsockListener::bind(CID_ANY, args.vsock_port)
                .with_context(|| format!("cannot listen on vsock port {}", args.vsock_port))?,
        ),
    };
    let agent = Agent::new(config);
    announce_ready(&args);
    match listener {
        Listener::Unix(l) => agent
            .serve_unix(l)
            .context("serving the Unix socket failed"),
        Listener::Vsock(l) => agent.serve_vsock(l).context("serving vsock failed"),
    }
}

enum Listener {
    Unix(UnixListener),
    Vsock(VsockListener),
}

fn eval_config(args: &Args) -> Result<Option<EvalConfig>> {
    if args.no_eval {
        return Ok(None);
    }
    let interpreter: Vec<String> = args
        .eval_interpreter
        .split_whitespace()
        .map(String::from)
        .collect();
    if interpreter.is_empty() {
        bail!("--eval-interpreter is empty (use --no-eval to run without eval)");
    }
    Ok(Some(EvalConfig {
        interpreter,
        warmup: args.eval_warmup.clone(),
        warmup_timeout: (args.eval_warmup_timeout_secs > 0)
            .then(|| Duration::from_secs(args.eval_warmup_timeout_secs)),
    }))
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    // A stale socket from an earlier run is replaced; any other file is left alone.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            bail!("--unix {}: exists and is not a socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| {
            format!("--unix {}: cannot remove the stale socket", path.display())
        })?;
    }
    UnixListener::bind(path).with_context(|| format!("--unix {}: cannot listen", path.display()))
}

fn announce_ready(args: &Args) {
    let line = ready_line();
    let mut stdout = std::io::stdout();
    let _ = stdout
        .write_all(line.as_bytes())
        .and_then(|()| stdout.flush());
    if let Some(path) = &args.ready_unix {
        match UnixStream::connect(path).and_then(|mut s| s.write_all(line.as_bytes())) {
            Ok(()) => {}
            Err(e) => tracing::warn!("--ready-unix {}: {e}", path.display()),
        }
    }
    if args.unix.is_none() && !args.no_ready_vsock {
        // In the background: serving must not wait for a slow host listener.
        let port = args.ready_vsock_port;
        let vsock_line = line.clone();
        thread::spawn(move || notify_host_vsock(port, &vsock_line));
    }
    tracing::info!("{}", line.trim_end());
}

/// The host may still be setting up its listener when the guest gets here: retry briefly.
fn notify_host_vsock(port: u32, line: &str) {
    let mut last_error = None;
    for attempt in 0..20 {
        match VsockStream::connect(HOST_CID, port).and_then(|mut s| s.write_all(line.as_bytes())) {
            Ok(()) => return,
            Err(e) => last_error = Some(e),
        }
        thread::sleep(Duration::from_millis(50 * (attempt + 1)));
    }
    if let Some(e) = last_error {
        tracing::warn!("cannot send READY to vsock CID {HOST_CID} port {port}: {e}");
    }
}
