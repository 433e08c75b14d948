//! `forkd __zygote` (hidden): the per-snapshot process the daemon asks to start sandboxes
//! (see forkd_sandbox::zygote). Not for users; the daemon execs it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use forkd_sandbox::net::{GuestNet, NetHost};
use forkd_sandbox::vm_child::VmBody;
use forkd_sandbox::zygote::{self, ZygoteConfig, ZygoteNet};
use forkd_store::Tag;
use forkd_vmm::snapshot::LoadedSnapshot;

use super::{open_store, parse_tag};

#[derive(Args)]
pub struct ZygoteArgs {
    #[arg(long, value_parser = parse_tag)]
    tag: Tag,
    /// The socket to serve requests on.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Where each sandbox's directory goes.
    #[arg(long, value_name = "DIR")]
    run_dir: PathBuf,
    /// VM shells kept prepared ahead of demand.
    #[arg(long, default_value_t = 2)]
    warm: usize,
    /// Seconds a shell may take to prepare and a sandbox to start.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// KVM dirty logging in every sandbox (for diff BRANCH).
    #[arg(long)]
    track_dirty_pages: bool,
    #[command(flatten)]
    jail: super::JailArgs,
}

pub fn run(args: ZygoteArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let loaded =
        LoadedSnapshot::load(&store, &args.tag).with_context(|| format!("zygote {}", args.tag))?;
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("zygote run directory {}", args.run_dir.display()))?;
    // Each sandbox's directory is made under the run directory, after its process started.
    let view = forkd_sandbox::jail::View {
        writable: vec![args.run_dir.clone()],
        ..Default::default()
    };
    let body = VmBody {
        loaded: &loaded,
        track_dirty_pages: args.track_dirty_pages,
        store: Some(&store),
        net: None,
        jail: VmBody::jail_for(&args.jail.config(), &loaded, Some(&store), view),
    };
    // A snapshot with a network device: each sandbox gets a namespace of its own (its tap
    // has the snapshot's name in every one), with the snapshot's policy unless its spawn sets
    // one. Networks dead sandboxes left are swept by the daemon as it starts.
    let network = match &loaded.state().devices.net {
        Some(device) => {
            let m = loaded.manifest();
            Some(ZygoteNet {
                host: NetHost::from_env()?,
                guest: GuestNet::standard(&device.tap),
                recorded: m.net.clone(),
                pulled_as: (!m.name.is_empty()).then(|| m.name.clone()),
            })
        }
        None => None,
    };
    let config = ZygoteConfig {
        socket: args.socket,
        run_root: args.run_dir,
        warm: args.warm,
        timeout: Duration::from_secs(args.timeout),
        network,
    };
    zygote::serve(&body, &config)
        .with_context(|| format!("zygote {} on {}", args.tag, config.socket.display()))?;
    Ok(ExitCode::SUCCESS)
}
