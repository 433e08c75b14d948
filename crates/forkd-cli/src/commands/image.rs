//! `forkd kernel fetch|status` and `forkd image build`: guest kernels and root filesystem images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use forkd_image::cache::cache_root;
use forkd_image::{agent, kernel, recipe, rootfs};

use crate::output::{human_bytes, print_json, print_table};

#[derive(Args)]
pub struct KernelArgs {
    #[command(subcommand)]
    command: KernelCommand,
}

#[derive(Subcommand)]
enum KernelCommand {
    /// Download Debian's cloud kernel through apt and build its initramfs (cached).
    Fetch {
        #[arg(long)]
        json: bool,
    },
    /// Show the cached guest kernels.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build an ext4 root filesystem from a recipe (a name in recipes/ or a .toml path).
    Build(BuildArgs),
    /// List the built images in the cache.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct BuildArgs {
    /// Recipe name (looked up in FORKD_RECIPES or ./recipes) or path to a recipe .toml.
    recipe: String,
    /// Also write the image here.
    #[arg(short, long, value_name = "PATH")]
    output: Option<PathBuf>,
    /// Static forkd-agent binary to install (default: FORKD_AGENT_BIN, else built from the
    /// checkout with crates/forkd-agent/build-static.sh).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run_kernel(args: KernelArgs) -> Result<ExitCode> {
    match args.command {
        KernelCommand::Fetch { json } => kernel_fetch(json),
        KernelCommand::Status { json } => kernel_status(json),
    }
}

pub fn run_image(args: ImageArgs) -> Result<ExitCode> {
    match args.command {
        ImageCommand::Build(a) => image_build(a),
        ImageCommand::List { json } => image_list(json),
    }
}

/// A progress note for a person watching (stderr is a terminal); scripts see nothing.
fn note(message: &str) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!("forkd: {message}");
    }
}

fn kernel_fetch(json: bool) -> Result<ExitCode> {
    note("resolving linux-image-cloud-amd64 through apt (the first fetch downloads ~30 MB)");
    let outcome = kernel::fetch(&cache_root()).context("kernel fetch")?;
    if json {
        print_json(&outcome)?;
        return Ok(ExitCode::SUCCESS);
    }
    let k = &outcome.kernel;
    let state = if outcome.already_present {
        "already cached"
    } else {
        "fetched"
    };
    println!(
        "kernel {} ({} {}) {state}",
        k.info.release, k.info.package.name, k.info.package.version
    );
    println!("  vmlinuz    {}", k.vmlinuz.display());
    println!(
        "  initramfs  {} ({}, {} modules)",
        k.initramfs.display(),
        serde_json::to_value(k.info.initramfs_compression)?
            .as_str()
            .unwrap_or("?"),
        k.info.modules.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn kernel_status(json: bool) -> Result<ExitCode> {
    let status = kernel::status(&cache_root()).context("kernel status")?;
    if json {
        let current = status.current().map(|k| k.info.release.clone());
        print_json(&serde_json::json!({
            "cache_dir": status.cache_dir,
            "current": current,
            "kernels": status.kernels,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if status.kernels.is_empty() {
        println!(
            "no guest kernel cached in {} (run `forkd kernel fetch`)",
            status.cache_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = status
        .kernels
        .iter()
        .map(|k| {
            let size = std::fs::metadata(&k.vmlinuz).map(|m| m.len()).unwrap_or(0);
            vec![
                k.info.release.clone(),
                k.info.package.version.clone(),
                human_bytes(size),
                k.dir.display().to_string(),
            ]
        })
        .collect();
    print_table(&["RELEASE", "DEBIAN VERSION", "VMLINUZ", "PATH"], &rows);
    Ok(ExitCode::SUCCESS)
}

fn image_build(args: BuildArgs) -> Result<ExitCode> {
    let path = recipe::locate(&args.recipe, &recipe::recipe_dirs())?;
    let loaded = recipe::load(&path)?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let recipe_dir = loaded.dir().to_path_buf();
    let agent = agent::resolve_agent(
        args.agent.as_deref(),
        &[recipe_dir.as_path(), cwd.as_path()],
    )?;
    let opts = rootfs::BuildOptions {
        cache_root: cache_root(),
        agent,
        output: args.output,
    };
    if loaded.recipe.base == recipe::Base::Debian {
        note(&format!(
            "building image {} (the first build runs debootstrap: a few minutes)",
            loaded.recipe.name
        ));
    }
    let built = rootfs::build(&loaded, &opts)?;
    if args.json {
        print_json(&built)?;
        return Ok(ExitCode::SUCCESS);
    }
    let state = if built.already_present {
        "already built"
    } else {
        "built"
    };
    println!(
        "image {} {state}: {} ({}, guest memory {} MiB)",
        loaded.recipe.name,
        shown(&built.image),
        human_bytes(built.info.size_bytes),
        loaded.recipe.memory_mib
    );
    if let Some(out) = &built.output {
        println!("  copied to {}", shown(out));
    }
    Ok(ExitCode::SUCCESS)
}

fn image_list(json: bool) -> Result<ExitCode> {
    let images = rootfs::list(&cache_root()).context("image list")?;
    if json {
        print_json(&images)?;
        return Ok(ExitCode::SUCCESS);
    }
    if images.is_empty() {
        println!("no images built yet (run `forkd image build RECIPE`)");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            vec![
                i.info.recipe.name.clone(),
                format!("{:?}", i.info.recipe.base).to_lowercase(),
                human_bytes(i.info.size_bytes),
                format!("{} MiB", i.info.recipe.memory_mib),
                shown(&i.image),
            ]
        })
        .collect();
    print_table(&["RECIPE", "BASE", "SIZE", "MEMORY", "IMAGE"], &rows);
    Ok(ExitCode::SUCCESS)
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}
