//! A daemon sandbox's life beyond spawn and kill: `forkd branch`, `forkd pause`,
//! `forkd resume`, `forkd logs`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::daemon_client::DaemonClient;
use crate::output::print_json;

#[derive(Args)]
pub struct BranchArgs {
    /// The running sandbox.
    id: String,
    /// The new snapshot's tag (default: ID-branch-N).
    #[arg(long)]
    tag: Option<String>,
    /// Save only the pages written since the sandbox's snapshot (the default).
    #[arg(long, conflicts_with = "full")]
    diff: bool,
    /// Save all of memory: a snapshot that does not depend on the sandbox's.
    #[arg(long)]
    full: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PauseArgs {
    /// The sandboxes to suspend to disk.
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Args)]
pub struct ResumeArgs {
    /// The paused sandboxes.
    #[arg(required = true)]
    ids: Vec<String>,
    /// Seconds until each is killed, from now (default: its original timeout).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
}

#[derive(Args)]
pub struct LogsArgs {
    /// The sandbox.
    id: String,
    /// Only the last BYTES bytes.
    #[arg(long, value_name = "BYTES")]
    tail: Option<u64>,
}

pub fn run_branch(args: BranchArgs) -> Result<ExitCode> {
    let client = DaemonClient::from_env()?;
    let body = json!({ "tag": args.tag, "diff": !args.full });
    let report = client.json(
        "POST",
        &format!("/v1/sandboxes/{}/branch", args.id),
        Some(body),
    )?;
    if args.json {
        print_json(&report)?;
    } else {
        println!(
            "{} ({} of {}, guest paused {:.1} ms)",
            text(&report["tag"]),
            text(&report["mode"]),
            args.id,
            report["pause_ms"].as_f64().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_pause(args: PauseArgs) -> Result<ExitCode> {
    each(&args.ids, "pause", |client, id| {
        client.json("POST", &format!("/v1/sandboxes/{id}/pause"), None)
    })
}

pub fn run_resume(args: ResumeArgs) -> Result<ExitCode> {
    let body = json!({ "timeout_secs": args.timeout });
    each(&args.ids, "resume", |client, id| {
        client.json(
            "POST",
            &format!("/v1/sandboxes/{id}/resume"),
            Some(body.clone()),
        )
    })
}

/// Runs `call` for every id, printing the ids that succeeded and one error line for each
/// that did not; fails when any did.
fn each(
    ids: &[String],
    verb: &str,
    call: impl Fn(&DaemonClient, &str) -> Result<Value>,
) -> Result<ExitCode> {
    let client = DaemonClient::from_env()?;
    let mut failed = false;
    for id in ids {
        match call(&client, id) {
            Ok(_) => println!("{id}"),
            Err(e) => {
                eprintln!("forkd: error: {verb} {id}: {e:#}");
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

pub fn run_logs(args: LogsArgs) -> Result<ExitCode> {
    let client = DaemonClient::from_env()?;
    let path = match args.tail {
        Some(n) => format!("/v1/sandboxes/{}/logs?tail={n}", args.id),
        None => format!("/v1/sandboxes/{}/logs", args.id),
    };
    let bytes = client
        .send("GET", &path, None)?
        .error_for_status()
        .with_context(|| format!("logs of {}", args.id))?
        .collect()?;
    std::io::stdout().write_all(&bytes)?;
    Ok(ExitCode::SUCCESS)
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}
