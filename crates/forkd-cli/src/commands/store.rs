//! Local store commands: where, images, inspect, verify, rmi.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use forkd_store::{RemoveMode, Snapshot, Store, Tag};
use serde::Serialize;

use super::{open_store, parse_tag};
use crate::output::{human_bytes, print_json, print_table};

#[derive(Args)]
pub struct WhereArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ImagesArgs {
    /// `forkd images list` is `forkd images` (the seed documents' spelling).
    #[arg(value_parser = ["list"], hide = true)]
    verb: Option<String>,
    #[arg(long)]
    json: bool,
    /// List a hub's packages instead (optionally its registry URL; default FORKD_HUB_URL,
    /// else the `forkd hub use` setting).
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    hub: Option<String>,
}

#[derive(Args)]
pub struct InspectArgs {
    #[arg(value_parser = parse_tag)]
    tag: Tag,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    #[arg(value_parser = parse_tag)]
    tag: Tag,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RmiArgs {
    #[arg(value_parser = parse_tag, required = true)]
    tags: Vec<Tag>,
    /// Remove even when other snapshots name it as their parent (they become orphans).
    #[arg(long, conflicts_with = "cascade")]
    force: bool,
    /// Also remove every snapshot that depends on it, transitively.
    #[arg(long)]
    cascade: bool,
    #[arg(long)]
    json: bool,
}

/// One snapshot as `images` and `inspect` report it.
#[derive(Serialize)]
struct ImageRow {
    tag: String,
    memory_mib: u64,
    vcpus: u32,
    logical_bytes: u64,
    disk_bytes: u64,
    created_at: String,
    parent_tag: String,
    kernel: String,
    description: String,
    /// `namespace/name@version` it was pulled as (empty for a snapshot made here).
    package: String,
}

impl ImageRow {
    fn of(snap: &Snapshot) -> ImageRow {
        let m = &snap.manifest;
        ImageRow {
            tag: m.tag.to_string(),
            memory_mib: m.memory_mib,
            vcpus: m.vcpus,
            logical_bytes: m.logical_size(),
            disk_bytes: snap.disk_usage(),
            created_at: m.created_at.clone(),
            parent_tag: m.parent_tag.clone(),
            kernel: m.kernel.clone(),
            description: m.description.clone(),
            package: match (m.name.as_str(), m.version.as_str()) {
                ("", _) => String::new(),
                (name, "") => name.to_string(),
                (name, version) => format!("{name}@{version}"),
            },
        }
    }
}

pub fn run_where(args: WhereArgs) -> Result<ExitCode> {
    let root = Store::default_root();
    if args.json {
        print_json(&serde_json::json!({ "data_dir": root }))?;
    } else {
        println!("{}", root.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_images(args: ImagesArgs) -> Result<ExitCode> {
    if let Some(hub) = &args.hub {
        return super::hub::run_images_hub(hub, args.json);
    }
    let store = open_store()?;
    let mut rows = Vec::new();
    for entry in store.list()? {
        match entry {
            Ok(snap) => rows.push(ImageRow::of(&snap)),
            // A broken snapshot is reported but does not hide the others.
            Err(e) => eprintln!("forkd: warning: {}", forkd_store::error_chain(&e)),
        }
    }
    if args.json {
        print_json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.tag.clone(),
                format!("{} MiB", r.memory_mib),
                human_bytes(r.logical_bytes),
                human_bytes(r.disk_bytes),
                r.created_at.clone(),
                dash_if_empty(&r.parent_tag),
                dash_if_empty(&r.package),
            ]
        })
        .collect();
    print_table(
        &[
            "TAG", "MEMORY", "SIZE", "ON DISK", "CREATED", "PARENT", "PACKAGE",
        ],
        &table,
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct InspectReport {
    #[serde(flatten)]
    image: ImageRow,
    format_version: u32,
    forkd_version: String,
    base_image: String,
    /// sha256 of the parent's manifest.toml when this link was made (empty for no parent).
    parent_sha256: String,
    /// Ancestors from the direct parent up to the root.
    ancestors: Vec<String>,
    depth: usize,
    dependents: Vec<String>,
    /// The network policy its children get (None: no network device, or egress denied).
    net: Option<forkd_store::NetRecord>,
    files: Vec<forkd_store::FileEntry>,
}

pub fn run_inspect(args: InspectArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let snap = store.get(&args.tag)?;
    let ancestors = ancestors(&store, &snap);
    let report = InspectReport {
        image: ImageRow::of(&snap),
        format_version: snap.manifest.format_version,
        forkd_version: snap.manifest.forkd_version.clone(),
        base_image: snap.manifest.base_image.clone(),
        parent_sha256: snap.manifest.parent_sha256.clone(),
        depth: ancestors.len(),
        ancestors,
        dependents: store
            .dependents(&args.tag)?
            .iter()
            .map(Tag::to_string)
            .collect(),
        net: snap.manifest.net.clone(),
        files: snap.manifest.files.clone(),
    };
    if args.json {
        print_json(&report)?;
    } else {
        print_inspect(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// Walks `parent_tag` links upward; stops at a missing parent or a cycle.
fn ancestors(store: &Store, snap: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = snap.manifest.parent();
    while let Some(tag) = next {
        if out.contains(&tag.to_string()) || tag == snap.manifest.tag {
            break;
        }
        out.push(tag.to_string());
        next = store.get(&tag).ok().and_then(|s| s.manifest.parent());
    }
    out
}

fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

fn print_inspect(r: &InspectReport) {
    let none = dash_if_empty;
    println!("tag:            {}", r.image.tag);
    println!("package:        {}", none(&r.image.package));
    println!("created:        {}", r.image.created_at);
    println!(
        "format:         {} (forkd {})",
        r.format_version, r.forkd_version
    );
    println!(
        "memory:         {} MiB, {} vCPU(s)",
        r.image.memory_mib, r.image.vcpus
    );
    println!("kernel:         {}", none(&r.image.kernel));
    println!("base image:     {}", none(&r.base_image));
    println!("description:    {}", none(&r.image.description));
    if let Some(net) = &r.net {
        println!("net policy:     {}", none(&net.as_options()));
    }
    if r.parent_sha256.is_empty() {
        println!("parent:         {}", none(&r.image.parent_tag));
    } else {
        println!(
            "parent:         {} (manifest sha256:{})",
            r.image.parent_tag, r.parent_sha256
        );
    }
    println!("depth:          {}", r.depth);
    println!(
        "ancestors:      {}",
        if r.ancestors.is_empty() {
            "-".into()
        } else {
            r.ancestors.join(" <- ")
        }
    );
    println!(
        "dependents:     {}",
        if r.dependents.is_empty() {
            "-".into()
        } else {
            r.dependents.join(", ")
        }
    );
    println!(
        "size:           {} logical, {} on disk",
        human_bytes(r.image.logical_bytes),
        human_bytes(r.image.disk_bytes)
    );
    println!("files:");
    for f in &r.files {
        println!(
            "  {:<14} {:>12}  sha256:{}",
            f.name,
            human_bytes(f.size),
            f.sha256
        );
    }
}

pub fn run_verify(args: VerifyArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let files = store.get(&args.tag)?.manifest.files.len();
    let problems = store.verify(&args.tag)?;
    if args.json {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        print_json(
            &serde_json::json!({ "tag": args.tag, "ok": list.is_empty(), "problems": list }),
        )?;
    } else if problems.is_empty() {
        println!("{}: ok ({files} files match the manifest)", args.tag);
    } else {
        for p in &problems {
            eprintln!("forkd: verify {}: {p}", args.tag);
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn run_rmi(args: RmiArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let mode = match (args.force, args.cascade) {
        (_, true) => RemoveMode::Cascade,
        (true, false) => RemoveMode::Orphan,
        (false, false) => RemoveMode::Refuse,
    };
    let removed = store.remove(&args.tags, mode)?;
    if args.json {
        print_json(&serde_json::json!({ "removed": removed }))?;
    } else {
        for tag in removed {
            println!("removed {tag}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
