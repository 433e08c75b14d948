//! Sandboxes through the daemon, with Docker's habits: `forkd spawn`, `forkd ps`,
//! `forkd exec ID -- CMD` (output streamed, CMD's exit code ours; `-d` starts it in the
//! background and prints its pid), `forkd eval ID CODE`, `forkd kill`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Args;
use serde_json::{json, Value};

use super::ExecOptions;
use crate::daemon_client::DaemonClient;
use crate::output::{print_json, print_table};
use crate::terminal::{parse_env_assignment, TIMEOUT_EXIT_CODE};

#[derive(Args)]
pub struct SpawnArgs {
    /// The snapshot to fork.
    #[arg(long)]
    tag: String,
    /// How many.
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    n: u32,
    /// Seconds until each is killed and its files removed (default: until `forkd kill`).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Environment variable for every command run in them; repeatable.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env_assignment)]
    env: Vec<(String, String)>,
    /// Label to filter by (`forkd ps --label K=V`); repeatable.
    #[arg(long = "label", value_name = "K=V", value_parser = parse_env_assignment)]
    labels: Vec<(String, String)>,
    /// Memory limit of each one's VMM process, in MiB (cgroup v2 memory.max).
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// CPU limit of each one, in CPUs (cgroup v2 cpu.max; 0.5 is half of one).
    #[arg(long, value_name = "N")]
    cpus: Option<f64>,
    /// Task limit of each one's VMM process (cgroup v2 pids.max).
    #[arg(long, value_name = "N")]
    pids: Option<u64>,
    /// Let them reach CIDR (an address is a /32), on PORT only when given (TCP and UDP);
    /// repeatable. With --allow-dns, replaces the policy the snapshot recorded (which
    /// applies otherwise). The snapshot needs a network device.
    #[arg(long = "allow", value_name = "CIDR[:PORT]")]
    allow: Vec<String>,
    /// Let them reach the host's resolvers (TCP and UDP port 53).
    #[arg(long)]
    allow_dns: bool,
    /// Forward the host's TCP port HOST_PORT to the sandbox's GUEST_PORT (with -n 1);
    /// repeatable.
    #[arg(long = "publish", value_name = "HOST_PORT:GUEST_PORT")]
    publish: Vec<String>,
    #[arg(long)]
    json: bool,
}

impl SpawnArgs {
    /// The request's `network` section (None: no networking option given), its values
    /// checked first: a bad one is a one-line error naming it, as for `forkd fork`.
    fn network(&self) -> Result<Option<Value>> {
        forkd_sandbox::net::parse_allows(&self.allow)?;
        for p in &self.publish {
            p.parse::<forkd_sandbox::net::Publish>()?;
        }
        if !self.publish.is_empty() && self.n != 1 {
            bail!("--publish forwards a host port to one sandbox; use it with -n 1");
        }
        let mut network = serde_json::Map::new();
        if !self.allow.is_empty() || self.allow_dns {
            network.insert("allow".into(), json!(self.allow));
            network.insert("allow_dns".into(), json!(self.allow_dns));
        }
        if !self.publish.is_empty() {
            network.insert("publish".into(), json!(self.publish));
        }
        Ok((!network.is_empty()).then_some(Value::Object(network)))
    }
}

#[derive(Args)]
pub struct PsArgs {
    /// Only sandboxes of this snapshot.
    #[arg(long)]
    tag: Option<String>,
    /// Only sandboxes with this label; repeatable (all must match).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_env_assignment)]
    labels: Vec<(String, String)>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ExecArgs {
    /// The sandbox.
    id: String,
    /// Kill the command (its process group) after this many seconds; forkd exits with 124.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Detached: start the command in the background, print its pid and return at once
    /// (its output is kept in the sandbox for a wait through the API).
    #[arg(short = 'd', long)]
    detach: bool,
    #[command(flatten)]
    options: ExecOptions,
    /// The command and its arguments, after `--`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD",
        required = true
    )]
    command: Vec<String>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// The sandbox.
    id: String,
    /// The code, or `-` to read it from standard input.
    code: String,
    /// Kill the interpreter after this many seconds (its state is lost); forkd exits with 124.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Print the whole outcome as JSON (value, stdout, stderr, error with its traceback).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct KillArgs {
    /// The sandboxes to kill.
    ids: Vec<String>,
    /// Every sandbox of the daemon.
    #[arg(long, conflicts_with = "ids")]
    all: bool,
}

pub fn run_spawn(args: SpawnArgs) -> Result<ExitCode> {
    let network = args.network()?;
    let client = DaemonClient::from_env()?;
    let mut body = json!({
        "tag": args.tag,
        "count": args.n,
        "timeout_secs": args.timeout,
        "env": args.env.into_iter().collect::<BTreeMap<_, _>>(),
        "metadata": args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        "limits": {"memory_mib": args.memory, "cpus": args.cpus, "pids": args.pids},
    });
    if let Some(network) = network {
        body["network"] = network;
    }
    let made = client.json("POST", "/v1/sandboxes", Some(body))?;
    if args.json {
        print_json(&made)?;
    } else {
        for s in made["sandboxes"].as_array().into_iter().flatten() {
            println!("{}", s["id"].as_str().unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_ps(args: PsArgs) -> Result<ExitCode> {
    let client = DaemonClient::from_env()?;
    let mut query: Vec<String> = args.tag.iter().map(|t| format!("tag={t}")).collect();
    query.extend(args.labels.iter().map(|(k, v)| format!("metadata.{k}={v}")));
    let path = if query.is_empty() {
        "/v1/sandboxes".to_string()
    } else {
        format!("/v1/sandboxes?{}", query.join("&"))
    };
    let list = client.json("GET", &path, None)?;
    if args.json {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = list["sandboxes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            vec![
                text(&s["id"]),
                text(&s["tag"]),
                text(&s["state"]),
                s["pid"].to_string(),
                text(&s["created_at"]),
                match s["expires_at"].as_u64() {
                    Some(t) => format!("in {} s", t.saturating_sub(unix_now())),
                    None => "-".into(),
                },
                labels(&s["metadata"]),
            ]
        })
        .collect();
    print_table(
        &["ID", "TAG", "STATE", "PID", "CREATED", "EXPIRES", "LABELS"],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run_exec(args: ExecArgs) -> Result<ExitCode> {
    let timeout = args.timeout.map(std::time::Duration::from_secs);
    if args.timeout == Some(0) {
        bail!("--timeout must be at least 1 second");
    }
    let spec = args.options.spec(&args.command, timeout)?;
    let client = DaemonClient::from_env()?;
    let body = json!({
        "cmd": spec.argv,
        "env": spec.env.into_iter().collect::<BTreeMap<_, _>>(),
        "cwd": spec.cwd,
        "timeout_secs": args.timeout,
    });
    if args.detach {
        let path = format!("/v1/sandboxes/{}/processes", args.id);
        let started = client
            .json("POST", &path, Some(body))
            .with_context(|| format!("exec in {}", args.id))?;
        println!("{}", started["pid"]);
        return Ok(ExitCode::SUCCESS);
    }
    let mut response = client
        .send(
            "POST",
            &format!("/v1/sandboxes/{}/exec", args.id),
            Some(body),
        )?
        .error_for_status()
        .with_context(|| format!("exec in {}", args.id))?;
    let mut pending = Vec::new();
    while let Some(chunk) = response.next_chunk()? {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(code) = handle_event(&args.id, &line)? {
                return Ok(ExitCode::from(code));
            }
        }
    }
    bail!(
        "exec in {}: the daemon's stream ended without the command's exit",
        args.id
    )
}

/// An exec output event's bytes: its text, or base64 for output that is not UTF-8.
pub(crate) fn event_bytes(event: &Value) -> Vec<u8> {
    match (event["data"].as_str(), event["data_b64"].as_str()) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Writes an output event to our stdout/stderr; returns our exit code at the command's end.
fn handle_event(id: &str, line: &[u8]) -> Result<Option<u8>> {
    let event: Value = serde_json::from_slice(line)?;
    let bytes = || event_bytes(&event);
    match event["type"].as_str() {
        Some("stdout") => {
            let mut out = std::io::stdout();
            let _ = out.write_all(&bytes()).and_then(|_| out.flush());
        }
        Some("stderr") => {
            let mut err = std::io::stderr();
            let _ = err.write_all(&bytes()).and_then(|_| err.flush());
        }
        Some("exit") => {
            let code = if event["timed_out"] == true {
                eprintln!("forkd: error: exec in {id}: the command timed out");
                TIMEOUT_EXIT_CODE
            } else if let Some(code) = event["exit_code"].as_i64() {
                code as i32
            } else {
                128 + event["signal"].as_i64().unwrap_or(0) as i32
            };
            return Ok(Some(u8::try_from(code).unwrap_or(1)));
        }
        Some("error") => bail!("exec in {id}: {}", text(&event["message"])),
        _ => {}
    }
    Ok(None)
}

pub fn run_eval(args: EvalArgs) -> Result<ExitCode> {
    if args.timeout == Some(0) {
        bail!("--timeout must be at least 1 second");
    }
    let code = if args.code == "-" {
        let mut code = String::new();
        std::io::stdin()
            .read_to_string(&mut code)
            .context("reading the code from standard input")?;
        code
    } else {
        args.code
    };
    let client = DaemonClient::from_env()?;
    let body = json!({ "code": code, "timeout_secs": args.timeout });
    let outcome = client
        .json(
            "POST",
            &format!("/v1/sandboxes/{}/eval", args.id),
            Some(body),
        )
        .with_context(|| format!("eval in {}", args.id))?;
    if args.json {
        print_json(&outcome)?;
    } else {
        print_eval_output(&outcome);
    }
    eval_exit(&args.id, &outcome, args.timeout)
}

/// What the code printed, then the value of its last expression (as at the interactive
/// prompt).
fn print_eval_output(outcome: &Value) {
    let mut out = std::io::stdout();
    let _ = out.write_all(text(&outcome["stdout"]).as_bytes());
    if let Some(value) = outcome["value"].as_str() {
        let _ = writeln!(out, "{value}");
    }
    let _ = out.flush();
    let mut err = std::io::stderr();
    let _ = err.write_all(text(&outcome["stderr"]).as_bytes());
    let _ = err.flush();
}

/// Our exit: 0, 124 when the interpreter was killed by the timeout, 1 (with a one-line error)
/// when the code raised.
fn eval_exit(id: &str, outcome: &Value, timeout: Option<u64>) -> Result<ExitCode> {
    if outcome["timed_out"] == true {
        let after = timeout.map_or(String::new(), |t| format!(" after {t} s"));
        eprintln!(
            "forkd: error: eval in {id}: timed out{after}; the interpreter was restarted and its state is lost"
        );
        return Ok(ExitCode::from(TIMEOUT_EXIT_CODE as u8));
    }
    let error = &outcome["error"];
    if error.is_object() {
        let message = text(&error["message"]);
        let first_line = message.lines().next().unwrap_or_default();
        bail!("eval in {id}: {}: {first_line}", text(&error["type"]));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_kill(args: KillArgs) -> Result<ExitCode> {
    let client = DaemonClient::from_env()?;
    if args.all {
        return kill_all(&client);
    }
    let ids: Vec<String> = if args.ids.is_empty() {
        bail!("name the sandboxes to kill (see `forkd ps`), or give --all");
    } else {
        args.ids
    };
    let mut failed = false;
    for id in ids {
        match client.json("DELETE", &format!("/v1/sandboxes/{id}"), None) {
            Ok(_) => println!("{id}"),
            Err(e) => {
                eprintln!("forkd: error: kill {id}: {e:#}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// One request deletes every sandbox; prints the ids, and one line per failure.
fn kill_all(client: &DaemonClient) -> Result<ExitCode> {
    let out = client.json("DELETE", "/v1/sandboxes?all=true", None)?;
    for id in out["deleted"].as_array().into_iter().flatten() {
        println!("{}", text(id));
    }
    let failed = out["failed"].as_array().cloned().unwrap_or_default();
    for f in &failed {
        eprintln!(
            "forkd: error: kill {}: {}",
            text(&f["id"]),
            text(&f["error"])
        );
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn labels(v: &Value) -> String {
    let labels: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    if labels.is_empty() {
        "-".into()
    } else {
        labels.join(",")
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
