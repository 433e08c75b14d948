//! `forkd vm run`: boot a kernel (or a built-in guest) in a microVM and run it until the guest
//! stops. Exit status: 0 on a clean stop (guest exit code 0, reset, power-off), the guest's
//! exit code when it exits with a non-zero one, 1 on errors.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use forkd_vmm::builder::{DEFAULT_CMDLINE, DEFAULT_MEM_MIB};
use forkd_vmm::devices::virtio::{attach, BlockConfig, VirtioConfig, VsockConfig};
use forkd_vmm::host::{KvmFlavour, PVM_EXPLANATION};
use forkd_vmm::{KernelSource, SerialOutput, StopReason, VmConfig};

#[derive(Args)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Boot a kernel and run it until the guest stops.
    Run(RunArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// ELF vmlinux or bzImage path, or `builtin:<name>` (`builtin:demo` is the demo guest).
    #[arg(long, value_name = "PATH|builtin:NAME")]
    kernel: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    mem_mib: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Where the guest's serial console goes: a file, or `-` for stdout (stdin is forwarded).
    #[arg(long, default_value = "-", value_name = "PATH|-")]
    serial: String,
    /// Disk image for a virtio-blk device. The VM writes to its own copy-on-write overlay
    /// (a temporary file removed at exit); the image itself is never written.
    #[arg(long, value_name = "PATH")]
    rootfs: Option<PathBuf>,
    /// Unix socket of a virtio-vsock device (guest CID 3): host processes connect and send
    /// `CONNECT <port>`; guest connections to port P go to `<PATH>_<P>`.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
}

pub fn run(args: VmArgs) -> Result<ExitCode> {
    match args.command {
        VmCommand::Run(a) => run_vm(a),
    }
}

fn serial_output(spec: &str) -> SerialOutput {
    if spec == "-" {
        SerialOutput::Stdout
    } else {
        SerialOutput::File(PathBuf::from(spec))
    }
}

/// The one-line error for a guest that stopped abnormally.
fn describe_failure(reason: &StopReason) -> String {
    let kvm_failure = matches!(
        reason,
        StopReason::InternalError { .. }
            | StopReason::FailEntry { .. }
            | StopReason::TripleFault { .. }
    );
    if kvm_failure && KvmFlavour::detect() == KvmFlavour::Pvm {
        format!("{reason}; this host's KVM is PVM: {PVM_EXPLANATION} (see forkd doctor)")
    } else {
        reason.to_string()
    }
}

fn run_vm(args: RunArgs) -> Result<ExitCode> {
    let kernel = KernelSource::parse(&args.kernel)?;
    let mut config = VmConfig::new(kernel);
    config.mem_mib = args.mem_mib;
    config.vcpus = args.vcpus;
    config.cmdline = args.cmdline;
    config.serial = serial_output(&args.serial);

    let mut vmm = forkd_vmm::build(&config)?;
    let scratch = tempfile::Builder::new()
        .prefix("forkd-vm-")
        .tempdir()
        .context("creating a directory for the VM's disk overlay")?;
    let virtio = VirtioConfig {
        block: args.rootfs.map(|base| BlockConfig {
            base,
            overlay: scratch.path().join("rootfs.overlay"),
            read_only: false,
            id: "forkd-rootfs".into(),
        }),
        vsock: args.vsock_uds.map(VsockConfig::new),
        rng: false,
    };
    let mut devices = attach(&mut vmm, &virtio)?;
    vmm.start().context("starting the VM")?;
    if args.serial == "-" {
        vmm.spawn_serial_input(Box::new(std::io::stdin()))
            .context("forwarding stdin to the serial port")?;
    }
    let reason = vmm.wait().context("waiting for the VM")?;
    devices.stop();
    tracing::info!(%reason, "VM stopped");
    match reason {
        r if r.is_clean() => Ok(ExitCode::SUCCESS),
        StopReason::GuestExit(code) => {
            eprintln!("forkd: guest exited with code {code}");
            // Exit statuses are 8 bits; keep a non-zero guest code non-zero.
            let status = u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1);
            Ok(ExitCode::from(status))
        }
        other => Err(anyhow!(describe_failure(&other))),
    }
}
