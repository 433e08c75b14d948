//! One module per command group; each exposes clap `Args` structs and `run_*` functions
//! returning the process exit code.

pub mod bench;
pub mod bench_api;
pub mod bench_net;
pub mod cache;
pub mod cp;
pub mod doctor;
pub mod fork;
pub mod hub;
pub mod image;
pub mod interrupt;
pub mod lifecycle;
pub mod mcp;
pub mod net;
pub mod run;
pub mod sandbox;
pub mod serve;
pub mod snapshot;
pub mod store;
pub mod vm;
pub mod zygote;

use anyhow::Context;
use forkd_sandbox::exec::ExecSpecError;
use forkd_store::{Store, Tag};

/// Opens the store at the configured data directory.
pub fn open_store() -> anyhow::Result<Store> {
    let root = Store::default_root();
    Store::open(&root).with_context(|| format!("cannot open the data directory {}", root.display()))
}

/// The initrd to boot `kernel` with: `explicit` when given; else, for a kernel from
/// `forkd kernel fetch`'s cache, the initramfs built with it.
pub fn initrd_for(
    kernel: &forkd_vmm::KernelSource,
    explicit: Option<std::path::PathBuf>,
) -> Option<std::path::PathBuf> {
    if explicit.is_some() {
        return explicit;
    }
    let forkd_vmm::KernelSource::Path(path) = kernel else {
        return None;
    };
    let initramfs = forkd_image::kernel::cached_initramfs(path)?;
    tracing::info!(initrd = %initramfs.display(), "using the cached kernel's initramfs");
    Some(initramfs)
}

/// The children's jail (`forkd fork`, `demo`, `run`, `zygote`, `bench`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct JailArgs {
    /// Run the children unconfined, for debugging: no seccomp filters, the privileges and
    /// user forkd runs with, and the host's whole filesystem (the jail is on by default).
    #[arg(long)]
    pub no_jail: bool,
}

impl JailArgs {
    /// The jail's configuration; `--no-jail` says on stderr what it turned off.
    pub fn config(&self) -> forkd_sandbox::jail::JailConfig {
        if self.no_jail {
            eprintln!(
                "warning: --no-jail: {}",
                forkd_sandbox::jail::JailConfig::OFF_NOTE
            );
            forkd_sandbox::jail::JailConfig::disabled()
        } else {
            forkd_sandbox::jail::JailConfig::default()
        }
    }
}

/// Options of a command run in a child (`forkd run`, `forkd fork --exec`).
#[derive(clap::Args, Debug, Default)]
pub struct ExecOptions {
    /// Environment variable for the command; repeatable.
    #[arg(long = "env", value_name = "K=V", value_parser = crate::terminal::parse_env_assignment)]
    pub env: Vec<(String, String)>,
    /// Working directory of the command inside the guest (an absolute path).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
}

impl ExecOptions {
    /// The command `argv` with these options, checked as the engine checks every request.
    pub fn spec(
        &self,
        argv: &[String],
        timeout: Option<std::time::Duration>,
    ) -> anyhow::Result<forkd_sandbox::exec::ExecSpec> {
        let spec = forkd_sandbox::exec::ExecSpec {
            argv: argv.to_vec(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            timeout,
            stdin: Vec::new(),
        };
        spec.validate().map_err(|e| {
            let flag = match e {
                ExecSpecError::RelativeCwd(_) => "--cwd",
                ExecSpecError::BadEnvName(_) => "--env",
                _ => "the command",
            };
            anyhow::Error::new(e).context(flag)
        })?;
        Ok(spec)
    }
}

/// Parses a tag given on the command line (the error names the input).
pub fn parse_tag(s: &str) -> Result<Tag, String> {
    Tag::parse(s).map_err(|e| e.to_string())
}
