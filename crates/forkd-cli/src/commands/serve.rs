//! `forkd serve`: the daemon (see forkd-daemon). Runs in the foreground until SIGTERM or
//! Ctrl-C; `packaging/forkd.service` runs it under systemd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use forkd_daemon::DaemonConfig;
use forkd_store::Store;

#[derive(Args)]
pub struct ServeArgs {
    /// Unix socket to listen on (default: $XDG_RUNTIME_DIR/forkd/forkd.sock, or
    /// /run/forkd/forkd.sock for root).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also listen on TCP (e.g. 127.0.0.1:8800); any address but loopback needs --token-file.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Serve the --listen address as HTTPS with this PEM certificate chain (leaf first);
    /// needs --tls-key.
    #[arg(long, value_name = "CERT.pem", requires_all = ["tls_key", "listen"])]
    tls_cert: Option<PathBuf>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, value_name = "KEY.pem", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// File whose first line is the bearer token TCP clients must present.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Append one JSON line per request to FILE (reopened on SIGHUP).
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// Most sandboxes alive at once; creating more is refused (HTTP 429).
    #[arg(long, value_name = "N", default_value_t = forkd_daemon::config::DEFAULT_MAX_SANDBOXES)]
    max_sandboxes: usize,
    /// VM shells kept prepared per snapshot ahead of demand (refilled after each spawn).
    #[arg(long, value_name = "N", default_value_t = forkd_daemon::config::DEFAULT_WARM)]
    warm: usize,
    /// Seconds a request waits for a sandbox's agent to accept a connection and answer.
    #[arg(long, value_name = "SECS", default_value_t = forkd_daemon::config::DEFAULT_AGENT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    agent_timeout: u64,
    /// Where the daemon keeps its sandbox records, zygote sockets and sandboxes' files
    /// (default: DATA_DIR/daemon).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Run every sandbox's VMM process unconfined, for debugging: no seccomp filters, the
    /// daemon's privileges and user, and the host's whole filesystem (jailed by default).
    #[arg(long)]
    no_jail: bool,
    /// Largest request body accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = forkd_daemon::config::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let mut config = DaemonConfig::new(Store::default_root());
    if let Some(socket) = args.socket {
        config.socket = socket;
    }
    config.listen = args.listen;
    config.audit_log = args.audit_log;
    config.max_body_bytes = args.max_body_bytes;
    config.max_sandboxes = args.max_sandboxes;
    config.warm = args.warm;
    config.jail = !args.no_jail;
    if args.no_jail {
        eprintln!(
            "warning: --no-jail: {}",
            forkd_sandbox::jail::JailConfig::OFF_NOTE
        );
    }
    config.agent_timeout = std::time::Duration::from_secs(args.agent_timeout);
    if let Some(dir) = args.state_dir {
        config.state_dir = dir;
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(forkd_daemon::config::TlsFiles { cert, key });
    }
    if let Some(path) = &args.token_file {
        config.token = Some(
            forkd_hub::serve::read_token_file(path).with_context(|| "--token-file".to_string())?,
        );
    }
    forkd_daemon::serve(config, |listening| {
        eprintln!("forkd serve: listening on {}", listening.join(", "));
    })?;
    eprintln!("forkd serve: stopped");
    Ok(ExitCode::SUCCESS)
}
