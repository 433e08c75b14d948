//! Hub commands: pack, unpack, pull, push, hub publish / serve / keygen, images --hub.

use std::fs::File;
use std::io::{BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use forkd_hub::config::{config_path, hub_from, save_hub};
use forkd_hub::publish::{publish, write_pack_file, PublishOptions};
use forkd_hub::push::{push, PushOptions};
use forkd_hub::registry::{registry_url, Registry, LATEST, MAX_REGISTRY_BYTES};
use forkd_hub::serve::{read_token_file, ServeOptions, Server};
use forkd_hub::sign::TrustPolicy;
use forkd_hub::{
    pull, unpack, FetchConfig, Notifier, PackOptions, PullOptions, UnpackOptions, UnpackOutcome,
    PACK_SUFFIX,
};
use forkd_store::{Snapshot, Tag};
use serde::Serialize;

use super::{open_store, parse_tag};
use crate::output::{human_bytes, print_json, print_table};

#[derive(Args)]
pub struct PackArgs {
    /// Snapshot to pack.
    #[arg(long, value_parser = parse_tag)]
    tag: Tag,
    /// Output file (default: NAME-VERSION.forkd-snapshot.tar.zst in the current directory).
    #[arg(short, long, visible_alias = "out")]
    output: Option<PathBuf>,
    /// Package name, namespace/name (default: none, and a registry may list the pack under
    /// any name; pull installs it under the snapshot's tag either way).
    #[arg(long)]
    name: Option<String>,
    /// Package version (default: the snapshot's, else derived from its creation time).
    #[arg(long)]
    version: Option<String>,
    #[arg(long)]
    description: Option<String>,
    #[arg(long)]
    base_image: Option<String>,
    /// For a diff snapshot: the pack holding its parent, NS/NAME@VERSION (a chain pack;
    /// pulling it fetches the parent first when it is missing).
    #[arg(long, value_name = "NS/NAME@VERSION")]
    parent: Option<String>,
    /// Sign with this minisign secret key (writes FILE.minisig).
    #[arg(long, value_name = "KEYFILE")]
    sign: Option<PathBuf>,
    /// zstd level (default: measured trade-off, see forkd_hub::DEFAULT_LEVEL).
    #[arg(long, default_value_t = forkd_hub::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct UnpackArgs {
    /// A .forkd-snapshot.tar.zst file.
    file: PathBuf,
    /// Install under this tag (default: the tag the snapshot had when it was packed).
    #[arg(long, value_parser = parse_tag)]
    tag: Option<Tag>,
    /// Replace an existing, different snapshot with the same tag.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PullArgs {
    /// ns/name[@version], a pack URL, or a local pack path.
    reference: String,
    /// Install under this tag (default: the tag the snapshot had when it was packed).
    #[arg(long, value_parser = parse_tag)]
    tag: Option<Tag>,
    /// Replace an existing, different snapshot with the same tag.
    #[arg(long)]
    force: bool,
    /// The hub's registry.json URL (default: FORKD_HUB_URL, else the `forkd hub use` setting).
    #[arg(long)]
    hub: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PushArgs {
    #[arg(long, value_parser = parse_tag)]
    tag: Tag,
    /// A presigned PUT URL, or (with --token-file) a `forkd hub serve` URL.
    #[arg(long)]
    to: String,
    /// Bearer token for a `forkd hub serve` endpoint.
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    version: Option<String>,
    /// For a diff snapshot: the pack holding its parent, NS/NAME@VERSION (a chain pack;
    /// pulling it fetches the parent first when it is missing).
    #[arg(long, value_name = "NS/NAME@VERSION")]
    parent: Option<String>,
    /// Sign with this minisign secret key.
    #[arg(long, value_name = "KEYFILE")]
    sign: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct HubArgs {
    #[command(subcommand)]
    command: HubCommand,
}

#[derive(Subcommand)]
enum HubCommand {
    /// Write a pack into DIR and record it in DIR/registry.json (static hosting).
    Publish(PublishArgs),
    /// Serve DIR as a hub over HTTP and accept authenticated pushes.
    Serve(ServeArgs),
    /// Create a minisign-compatible key pair for --sign (PREFIX.key, PREFIX.pub).
    Keygen(KeygenArgs),
    /// Make URL (a registry.json URL, or a hub directory) the hub `pull` and `images --hub`
    /// use when neither --hub nor FORKD_HUB_URL is given.
    Use(UseArgs),
}

#[derive(Args)]
struct UseArgs {
    /// http(s):// URL of a registry.json (or of a directory ending in /), or a local directory.
    url: String,
}

#[derive(Args)]
struct PublishArgs {
    #[arg(long, value_parser = parse_tag)]
    tag: Tag,
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    name: String,
    #[arg(long)]
    version: String,
    /// Absolute URL the directory is served at (default: URLs relative to registry.json).
    #[arg(long)]
    url_base: Option<String>,
    #[arg(long)]
    description: Option<String>,
    #[arg(long)]
    base_image: Option<String>,
    /// For a diff snapshot: the pack holding its parent, NS/NAME@VERSION.
    #[arg(long, value_name = "NS/NAME@VERSION")]
    parent: Option<String>,
    #[arg(long, value_name = "KEYFILE")]
    sign: Option<PathBuf>,
    /// Do not point `latest` at this version.
    #[arg(long)]
    no_latest: bool,
    /// The recipe the snapshot was built from (recorded in the registry entry).
    #[arg(long)]
    recipe_path: Option<String>,
    /// The release the pack belongs to (recorded in the registry entry).
    #[arg(long)]
    release_tag: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8780")]
    listen: SocketAddr,
    /// File holding the bearer token pushes must present (required off loopback).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
struct KeygenArgs {
    /// Writes PREFIX.key (secret, mode 0600) and PREFIX.pub.
    prefix: PathBuf,
}

/// The name / version a pack of `snap` gets when the user does not say.
/// `--parent`, checked against the diff snapshot it is given for.
fn parent_of(
    store: &forkd_store::Store,
    snap: &Snapshot,
    parent: Option<&str>,
) -> Result<Option<forkd_hub::pack::ParentPack>> {
    let Some(package) = parent else {
        return Ok(None);
    };
    Ok(Some(forkd_hub::pack::parent_pack(store, snap, package)?))
}

/// `--version`, else the snapshot's, else one derived from its creation time.
fn pack_version(snap: &Snapshot, version: Option<String>) -> String {
    let m = &snap.manifest;
    version
        .or_else(|| (!m.version.is_empty()).then(|| m.version.clone()))
        .unwrap_or_else(|| {
            let digits: String = m
                .created_at
                .chars()
                .filter(|c| c.is_ascii_digit())
                .take(14)
                .collect();
            format!("v{digits}")
        })
}

pub fn run_pack(args: PackArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let snap = store.get(&args.tag)?;
    // Without --name the pack declares no package: a registry may list it under any name.
    let name = args.name.unwrap_or_default();
    let version = pack_version(&snap, args.version);
    let mut opts = PackOptions::new(&name, &version);
    opts.description = args.description;
    opts.base_image = args.base_image;
    opts.level = args.level;
    opts.parent = parent_of(&store, &snap, args.parent.as_deref())?;
    let short = name.rsplit('/').next().filter(|s| !s.is_empty());
    let short = short.unwrap_or(args.tag.as_str());
    let output = args
        .output
        .unwrap_or_else(|| PathBuf::from(format!("{short}-{version}{PACK_SUFFIX}")));
    let started = Instant::now();
    let (info, sig) = write_pack_file(&snap, &opts, &output, args.sign.as_deref())
        .with_context(|| format!("cannot pack {}", args.tag))?;
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        print_json(&serde_json::json!({
            "file": output, "tag": args.tag.as_str(), "name": (!name.is_empty()).then_some(&name),
            "version": version, "size_bytes": info.size_bytes,
            "sha256": info.sha256, "logical_bytes": info.manifest.logical_size(),
            "signed": sig.is_some(), "seconds": secs,
        }))?;
    } else {
        let identity = match name.as_str() {
            "" => format!("version {version}, no package name"),
            name => format!("{name}@{version}"),
        };
        println!(
            "packed {} ({identity}) into {} ({} from {} logical, {secs:.1} s){}",
            args.tag,
            output.display(),
            human_bytes(info.size_bytes),
            human_bytes(info.manifest.logical_size()),
            if sig.is_some() { ", signed" } else { "" }
        );
        println!("sha256 {}", info.sha256);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct InstallReport {
    tag: String,
    installed: bool,
    already_present: bool,
    package: Option<String>,
    source: String,
    fetched_bytes: u64,
    resumed_from: u64,
    signed_by: Option<String>,
    /// Parent packs a chain pack needed, pulled first.
    parents: Vec<String>,
    seconds: f64,
}

pub fn run_unpack(args: UnpackArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let origin = args.file.display().to_string();
    let file = File::open(&args.file).with_context(|| format!("cannot open {origin}"))?;
    let opts = UnpackOptions {
        tag: args.tag,
        force: args.force,
        expect_name: None,
        record_package: None,
    };
    let started = Instant::now();
    let outcome = unpack(
        &store,
        BufReader::with_capacity(1 << 20, file),
        &origin,
        &opts,
        &mut |_| Ok(()),
    )?;
    report_install(
        &outcome,
        InstallReport {
            tag: outcome.snapshot().tag().to_string(),
            installed: matches!(outcome, UnpackOutcome::Installed(_)),
            already_present: matches!(outcome, UnpackOutcome::AlreadyPresent(_)),
            package: None,
            source: origin,
            fetched_bytes: 0,
            resumed_from: 0,
            signed_by: None,
            parents: Vec::new(),
            seconds: started.elapsed().as_secs_f64(),
        },
        args.json,
    )
}

fn report_install(outcome: &UnpackOutcome, r: InstallReport, json: bool) -> Result<ExitCode> {
    if json {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    let what = r.package.clone().unwrap_or_else(|| r.source.clone());
    match outcome {
        UnpackOutcome::AlreadyPresent(_) => {
            println!(
                "{} is already present and identical ({what}); nothing to do",
                r.tag
            )
        }
        UnpackOutcome::Installed(snap) => {
            let mut line = format!(
                "installed {what} as {} ({} logical, {} on disk, {:.1} s",
                r.tag,
                human_bytes(snap.manifest.logical_size()),
                human_bytes(snap.disk_usage()),
                r.seconds
            );
            if r.fetched_bytes > 0 {
                line.push_str(&format!(", {} downloaded", human_bytes(r.fetched_bytes)));
            }
            if r.resumed_from > 0 {
                line.push_str(&format!(", resumed at {}", human_bytes(r.resumed_from)));
            }
            line.push(')');
            if let Some(k) = &r.signed_by {
                line.push_str(&format!("; signature verified with key {k}"));
            }
            if !r.parents.is_empty() {
                line.push_str(&format!(
                    "; its parent {} pulled first",
                    r.parents.join(", ")
                ));
            }
            println!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The environment's retry settings, with retries and waits told on stderr: a pull that is
/// slow because it is retrying or waiting for another one says so.
pub(crate) fn fetch_config() -> FetchConfig {
    FetchConfig {
        notify: Notifier::new(|m| eprintln!("forkd: {m}")),
        ..FetchConfig::from_env()
    }
}

fn trust_policy() -> Result<TrustPolicy> {
    let path = TrustPolicy::default_path();
    Ok(TrustPolicy::load(&path)?)
}

pub fn run_pull(args: PullArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let opts = PullOptions {
        hub: args.hub,
        tag: args.tag,
        force: args.force,
        progress: !args.json,
        progress_bar: None,
        trust: trust_policy()?,
        fetch: fetch_config(),
    };
    let started = Instant::now();
    let r = pull(&store, &args.reference, &opts)
        .with_context(|| format!("cannot pull {}", args.reference))?;
    report_install(
        &r.outcome,
        InstallReport {
            tag: r.outcome.snapshot().tag().to_string(),
            installed: matches!(r.outcome, UnpackOutcome::Installed(_)),
            already_present: matches!(r.outcome, UnpackOutcome::AlreadyPresent(_)),
            package: r.package.as_ref().map(|(n, v)| format!("{n}@{v}")),
            source: r.source.clone(),
            fetched_bytes: r.fetched_bytes,
            resumed_from: r.resumed_from,
            signed_by: r.signed_by.clone(),
            parents: r.parents.clone(),
            seconds: started.elapsed().as_secs_f64(),
        },
        args.json,
    )
}

pub fn run_push(args: PushArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let snap = store.get(&args.tag)?;
    let name = args
        .name
        .or_else(|| (!snap.manifest.name.is_empty()).then(|| snap.manifest.name.clone()))
        .unwrap_or_else(|| format!("local/{}", snap.manifest.tag));
    let version = pack_version(&snap, args.version);
    let token = match &args.token_file {
        Some(p) => Some(read_token_file(p)?),
        None => None,
    };
    let mut pack = PackOptions::new(&name, &version);
    pack.parent = parent_of(&store, &snap, args.parent.as_deref())?;
    let opts = PushOptions {
        pack,
        to: args.to,
        token,
        sign_key: args.sign,
        fetch: fetch_config(),
    };
    let presigned = opts.token.is_none();
    let r = push(&store, &snap, &opts).with_context(|| format!("cannot push {}", args.tag))?;
    // A presigned URL names one object: leave the signature here for the user to upload.
    let sig_file = match (&r.minisig, presigned) {
        (Some(sig), true) => {
            let short = name.rsplit('/').next().unwrap_or(&name);
            let path = PathBuf::from(format!("{short}-{version}{PACK_SUFFIX}.minisig"));
            std::fs::write(&path, sig)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Some(path)
        }
        _ => None,
    };
    if args.json {
        print_json(&serde_json::json!({
            "url": r.url, "name": name, "version": version, "sha256": r.sha256,
            "size_bytes": r.size_bytes, "signature_file": sig_file,
        }))?;
    } else {
        println!(
            "pushed {} as {name}@{version} ({}) to {}",
            args.tag,
            human_bytes(r.size_bytes),
            r.url
        );
        println!("sha256 {}", r.sha256);
        if let Some(p) = &sig_file {
            println!(
                "signature written to {} (upload it next to the pack)",
                p.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_hub(args: HubArgs) -> Result<ExitCode> {
    match args.command {
        HubCommand::Publish(a) => run_publish(a),
        HubCommand::Serve(a) => run_serve(a),
        HubCommand::Keygen(a) => run_keygen(a),
        HubCommand::Use(a) => run_use(a),
    }
}

fn run_use(args: UseArgs) -> Result<ExitCode> {
    // Checked now, and a local directory kept absolute, so a later pull from anywhere works.
    let url = registry_url(&args.url)?;
    let hub = if url.scheme() == "file" {
        std::path::absolute(&args.url)?.display().to_string()
    } else {
        args.url.clone()
    };
    let Some(path) = config_path() else {
        anyhow::bail!("hub use: neither XDG_CONFIG_HOME nor HOME is set, so there is no configuration file to write");
    };
    save_hub(&path, &hub)?;
    println!("hub: {url} (saved in {})", path.display());
    Ok(ExitCode::SUCCESS)
}

fn run_publish(args: PublishArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let snap = store.get(&args.tag)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let mut pack = PackOptions::new(&args.name, &args.version);
    pack.description = args.description;
    pack.base_image = args.base_image;
    pack.parent = parent_of(&store, &snap, args.parent.as_deref())?;
    let opts = PublishOptions {
        pack,
        url_base: args.url_base,
        sign_key: args.sign,
        make_latest: !args.no_latest,
        recipe_path: args.recipe_path,
        release_tag: args.release_tag,
    };
    let r =
        publish(&snap, &args.dir, &opts).with_context(|| format!("cannot publish {}", args.tag))?;
    if args.json {
        print_json(&serde_json::json!({ "pack": r.pack_path, "entry": r.entry }))?;
    } else {
        println!(
            "published {} as {}@{} ({}) in {}",
            args.tag,
            args.name,
            args.version,
            human_bytes(r.entry.size_bytes.unwrap_or(0)),
            args.dir.join("registry.json").display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_serve(args: ServeArgs) -> Result<ExitCode> {
    let token = match &args.token_file {
        Some(p) => Some(read_token_file(p)?),
        None => None,
    };
    let authed = token.is_some();
    let server = Server::bind(ServeOptions {
        token,
        ..ServeOptions::new(args.dir.clone(), args.listen)
    })?;
    eprintln!(
        "forkd: serving {} at http://{}/ (pushes {})",
        args.dir.display(),
        server.local_addr(),
        if authed {
            "need the token"
        } else {
            "open to local users: loopback only"
        }
    );
    server.run()?;
    Ok(ExitCode::SUCCESS)
}

fn run_keygen(args: KeygenArgs) -> Result<ExitCode> {
    use std::os::unix::fs::OpenOptionsExt;
    let (secret, public) = forkd_hub::sign::generate_keypair()?;
    let key = PathBuf::from(format!("{}.key", args.prefix.display()));
    let publ = PathBuf::from(format!("{}.pub", args.prefix.display()));
    for p in [&key, &publ] {
        if p.exists() {
            bail!("{} already exists; not overwriting a key", p.display());
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .with_context(|| format!("cannot create {}", key.display()))?;
    f.write_all(secret.as_bytes())?;
    std::fs::write(&publ, &public).with_context(|| format!("cannot write {}", publ.display()))?;
    println!("secret key: {}", key.display());
    println!(
        "public key: {} ({})",
        publ.display(),
        public.lines().nth(1).unwrap_or("")
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct HubImageRow {
    package: String,
    version: String,
    description: String,
    memory_mib: Option<u64>,
    size_bytes: Option<u64>,
    created_at: Option<String>,
    url: String,
}

/// `forkd images --hub [URL]`: what a hub offers. `hub` is "" for "the configured hub".
pub fn run_images_hub(hub: &str, json: bool) -> Result<ExitCode> {
    let flag = (!hub.is_empty()).then_some(hub);
    let url = registry_url(&hub_from(flag)?)?;
    let origin = url.to_string();
    let text = forkd_hub::fetch::fetch_small(&url, &fetch_config(), MAX_REGISTRY_BYTES, false)?
        .expect("not missing_ok");
    let registry = Registry::parse(&String::from_utf8_lossy(&text), &origin)?;
    let mut rows = Vec::new();
    for (name, pkg) in &registry.packages {
        if !pkg.versions.contains_key(LATEST) {
            eprintln!(
                "forkd: warning: registry {origin}: package {name:?} has no \"latest\" version"
            );
        }
        for (version, e) in &pkg.versions {
            rows.push(HubImageRow {
                package: name.clone(),
                version: version.clone(),
                description: pkg.description.clone(),
                memory_mib: e.memory_mib,
                size_bytes: e.size_bytes,
                created_at: e.created_at.clone(),
                url: e.url.clone(),
            });
        }
    }
    if json {
        print_json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    let dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.package.clone(),
                r.version.clone(),
                dash(r.memory_mib.map(|m| format!("{m} MiB"))),
                dash(r.size_bytes.map(human_bytes)),
                dash(r.created_at.clone()),
                r.description.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "PACKAGE",
            "VERSION",
            "MEMORY",
            "PACK SIZE",
            "CREATED",
            "DESCRIPTION",
        ],
        &table,
    );
    Ok(ExitCode::SUCCESS)
}
