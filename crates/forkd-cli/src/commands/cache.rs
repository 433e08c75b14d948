//! `forkd cache ls|prune`: what interrupted or crashed work left in the data directory —
//! partial downloads, pull locks, snapshot staging directories, run directories — and
//! removing what no live process uses.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use forkd_store::Store;
use serde::Serialize;

use super::open_store;
use crate::output::{human_bytes, print_json, print_table};

#[derive(Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// List partial downloads, pull locks, staging and run directories, and who uses them.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove every entry no live process uses (a pull resumes from nothing afterwards).
    Prune {
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

/// One leftover.
#[derive(Debug, Serialize)]
struct Entry {
    kind: &'static str,
    path: PathBuf,
    bytes: u64,
    in_use: bool,
    /// The pid of the process using it, when known.
    user: Option<u32>,
}

pub fn run(args: CacheArgs) -> Result<ExitCode> {
    let store = open_store()?;
    match args.command {
        CacheCommand::Ls { json } => list(&store, json),
        CacheCommand::Prune { dry_run, json } => prune(&store, dry_run, json),
    }
}

fn entries(store: &Store) -> Vec<Entry> {
    let mut all = Vec::new();
    for p in forkd_hub::cache::partial_downloads(store) {
        all.push(Entry {
            kind: "partial download",
            bytes: p.bytes,
            in_use: p.in_use,
            user: None,
            path: p.path,
        });
    }
    for path in forkd_hub::cache::stale_files(store) {
        all.push(Entry {
            kind: "stale pull record",
            path,
            bytes: 0,
            in_use: false,
            user: None,
        });
    }
    for w in store.unfinished_writes() {
        all.push(Entry {
            kind: "snapshot staging",
            bytes: dir_usage(&w.path),
            in_use: w.writer_alive,
            user: w.writer_alive.then_some(w.writer),
            path: w.path,
        });
    }
    for r in forkd_sandbox::run_dirs::run_dirs(store) {
        all.push(Entry {
            kind: "run directory",
            bytes: dir_usage(&r.path),
            in_use: r.owner_alive,
            user: r.owner_alive.then_some(r.owner),
            path: r.path,
        });
    }
    all
}

fn list(store: &Store, json: bool) -> Result<ExitCode> {
    let all = entries(store);
    if json {
        print_json(&all)?;
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!("nothing left over in {}", store.root().display());
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|e| {
            vec![
                e.kind.to_string(),
                human_bytes(e.bytes),
                state(e),
                e.path.display().to_string(),
            ]
        })
        .collect();
    print_table(&["KIND", "SIZE", "STATE", "PATH"], &rows);
    Ok(ExitCode::SUCCESS)
}

fn state(e: &Entry) -> String {
    match (e.in_use, e.user) {
        (true, Some(pid)) => format!("in use by {pid}"),
        (true, None) => "in use".into(),
        (false, _) => "unused".into(),
    }
}

fn prune(store: &Store, dry_run: bool, json: bool) -> Result<ExitCode> {
    let unused: Vec<Entry> = entries(store).into_iter().filter(|e| !e.in_use).collect();
    let mut freed = 0;
    let mut failed = Vec::new();
    for e in &unused {
        if dry_run {
            freed += e.bytes;
            continue;
        }
        match remove(&e.path) {
            Ok(()) => freed += e.bytes,
            Err(err) => failed.push(format!("{}: {err}", e.path.display())),
        }
    }
    if json {
        print_json(&serde_json::json!({
            "removed": unused, "bytes": freed, "dry_run": dry_run, "failed": failed,
        }))?;
    } else {
        let verb = if dry_run { "would remove" } else { "removed" };
        for e in &unused {
            println!("{verb} {} {}", e.kind, e.path.display());
        }
        println!("{verb} {} entries, {}", unused.len(), human_bytes(freed));
    }
    if let Some(first) = failed.first() {
        anyhow::bail!("could not remove {} entries, first {first}", failed.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Bytes a directory's files occupy on disk (holes excluded), best effort.
fn dir_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| dir_usage(&e.path()))
        .sum()
}
