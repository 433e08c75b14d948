//! `forkd snapshot`: boot a kernel, wait until the guest reports ready, snapshot it into the
//! store and stop it. `forkd compact`: flatten a chain of diff snapshots into a new
//! self-contained one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use forkd_sandbox::exec::{run_warmups, Warmup};
use forkd_store::Tag;
use forkd_vmm::builder::{DEFAULT_CMDLINE, DEFAULT_MEM_MIB};
use forkd_vmm::snapshot::{
    compact, snapshot_after_ready_net, snapshot_after_ready_with, BeforePause, BootNet,
    BootSnapshot,
};
use forkd_vmm::{KernelSource, VmConfig};

use super::{open_store, parse_tag};

#[derive(Args)]
pub struct SnapshotArgs {
    /// Tag of the new snapshot.
    #[arg(long, value_parser = parse_tag)]
    tag: Tag,
    /// ELF vmlinux or bzImage path, or `builtin:<name>` (`builtin:demo` is the demo guest).
    #[arg(long, value_name = "PATH|builtin:NAME")]
    kernel: String,
    /// Disk image the guest boots with (never written; the snapshot stores the disk as the
    /// guest saw it at the pause).
    #[arg(long, value_name = "PATH")]
    rootfs: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    mem_mib: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Initramfs (or initrd) loaded for the kernel. Default: for a kernel cached by
    /// `forkd kernel fetch`, its initramfs.img; otherwise none.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Seconds to wait for the guest's `READY <name>` on vsock host port 1025.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    ready_timeout: u64,
    /// Shell command (`sh -c CMD`) run in the ready guest through its forkd-agent before the
    /// snapshot; repeatable, run in order. A command that fails (non-zero exit, timeout)
    /// aborts the snapshot. (A recipe's `[eval] warmup` already runs inside the agent before
    /// it reports ready.)
    #[arg(long, value_name = "CMD")]
    warmup: Vec<String>,
    /// Code evaluated in the agent's warm interpreter before the snapshot, after the --warmup
    /// commands; repeatable. Code that raises aborts the snapshot.
    #[arg(long, value_name = "CODE")]
    warmup_eval: Vec<String>,
    /// Seconds each warm-up step may take.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    warmup_timeout: u64,
    /// Boot with a network device on a tap in a namespace of its own (10.0.2.15/24 behind
    /// 10.0.2.1, configured from the kernel command line's ip=), so children forked with
    /// --net have a network; --allow / --allow-dns open the parent's egress while it warms up.
    #[command(flatten)]
    net: super::net::NetOptions,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CompactArgs {
    /// Snapshot to flatten (any depth of diff chain).
    #[arg(long, value_parser = parse_tag)]
    from: Tag,
    /// Tag of the new self-contained snapshot.
    #[arg(long, value_parser = parse_tag)]
    to: Tag,
}

pub fn run_snapshot(args: SnapshotArgs) -> Result<ExitCode> {
    if args.ready_timeout == 0 {
        anyhow::bail!("--ready-timeout must be at least 1 second");
    }
    args.net.validate()?;
    let kernel = KernelSource::parse(&args.kernel)?;
    let warmups = warmup_steps(&args, &kernel)?;
    let mut vm = VmConfig::new(kernel);
    vm.mem_mib = args.mem_mib;
    vm.vcpus = args.vcpus;
    vm.cmdline = args.cmdline;
    vm.initrd = super::initrd_for(&vm.kernel, args.initrd);
    let store = open_store()?;
    let boot_net = if args.net.enabled() {
        let (pool, ip_args) = super::net::boot_network(&args.net)?;
        vm.cmdline = format!("{} {ip_args}", vm.cmdline);
        Some(pool)
    } else {
        None
    };
    let what = BootSnapshot {
        vm,
        rootfs: args.rootfs,
        ready_timeout: Duration::from_secs(args.ready_timeout),
    };
    let timeout = Duration::from_secs(args.warmup_timeout);
    let before_pause: Option<BeforePause> = (!warmups.is_empty()).then(|| -> BeforePause {
        Box::new(move |uds: &Path| Ok(run_warmups(uds, &warmups, timeout)?))
    });
    let report = match &boot_net {
        None => snapshot_after_ready_with(&store, &args.tag, &what, before_pause),
        Some(pool) => {
            // The tap is opened (and the VMM's threads started) in the parent's namespace;
            // this thread goes back once the snapshot is taken.
            let ns = pool.netns_of(0).context("the parent's network namespace")?;
            let _inside = forkd_sandbox::net::NetnsGuard::enter(ns)?;
            let net = BootNet {
                device: forkd_vmm::devices::virtio::NetConfig::new("tap0"),
                policy: args.net.record()?,
            };
            snapshot_after_ready_net(&store, &args.tag, &what, before_pause, Some(net))
        }
    }
    .with_context(|| format!("snapshot {}", args.tag))?;
    drop(boot_net);
    let m = &report.snapshot.manifest;
    if args.json {
        let value = serde_json::json!({
            "tag": m.tag.as_str(),
            "memory_mib": m.memory_mib,
            "vcpus": m.vcpus,
            "kernel": m.kernel,
            "dir": report.snapshot.dir,
            "pages_written": report.pages_written,
            "paused_ms": report.paused.as_secs_f64() * 1000.0,
            "total_ms": report.total.as_secs_f64() * 1000.0,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "snapshot {}: {} MiB, {} vCPU(s), {} pages written, {:.1} ms paused ({:.1} ms total)",
            m.tag,
            m.memory_mib,
            m.vcpus,
            report.pages_written,
            report.paused.as_secs_f64() * 1000.0,
            report.total.as_secs_f64() * 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The warm-up steps in the order they run, refused before anything boots when they cannot
/// work: empty, no time to run, or a built-in guest (which has no agent).
fn warmup_steps(args: &SnapshotArgs, kernel: &KernelSource) -> Result<Vec<Warmup>> {
    let steps: Vec<Warmup> = args
        .warmup
        .iter()
        .map(|c| Warmup::Shell(c.clone()))
        .chain(args.warmup_eval.iter().map(|c| Warmup::Eval(c.clone())))
        .collect();
    if steps.is_empty() {
        return Ok(steps);
    }
    if args
        .warmup
        .iter()
        .chain(&args.warmup_eval)
        .any(|c| c.trim().is_empty())
    {
        bail!("--warmup / --warmup-eval: a warm-up step is empty");
    }
    if args.warmup_timeout == 0 {
        bail!("--warmup-timeout must be at least 1 second");
    }
    if let KernelSource::Builtin { .. } = kernel {
        bail!(
            "--warmup needs a guest running forkd-agent; the built-in guest {} has none",
            kernel.describe()
        );
    }
    Ok(steps)
}

pub fn run_compact(args: CompactArgs) -> Result<ExitCode> {
    let store = open_store()?;
    let snap = compact(&store, &args.from, &args.to)
        .with_context(|| format!("compact {} into {}", args.from, args.to))?;
    println!(
        "compacted {} into {} (self-contained, {} MiB)",
        args.from, snap.manifest.tag, snap.manifest.memory_mib
    );
    Ok(ExitCode::SUCCESS)
}
