//! `forkd vm run`: boot a kernel (or a built-in guest) in a microVM and run it until the guest
//! stops. Exit status: 0 on a clean stop (guest exit code 0, reset, power-off, or SIGINT /
//! SIGTERM to forkd), the guest's exit code when it exits with a non-zero one (1 if it does not
//! fit in 8 bits), 1 on errors.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use forkd_vmm::builder::{DEFAULT_CMDLINE, DEFAULT_MEM_MIB};
use forkd_vmm::devices::virtio::net::{MacAddr, DEFAULT_MAC};
use forkd_vmm::devices::virtio::{attach, BlockConfig, NetConfig, VirtioConfig, VsockConfig};
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
    /// Initramfs (or initrd) loaded for the kernel. Default: for a kernel cached by
    /// `forkd kernel fetch`, its initramfs.img; otherwise none.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
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
    /// Host tap of a virtio-net device. It must already exist in forkd's network namespace
    /// (e.g. `ip tuntap add dev tap0 mode tap`); forkd never creates one.
    #[arg(long, value_name = "NAME")]
    net_tap: Option<String>,
    /// The guest's MAC address on --net-tap.
    #[arg(long, value_name = "MAC", requires = "net_tap", default_value_t = DEFAULT_MAC)]
    net_mac: MacAddr,
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

/// Blocks SIGINT and SIGTERM in this thread (and the threads it spawns from now on).
fn block_stop_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is a plain bit array, so all-zero bytes are a valid value (and
    // sigemptyset initialises it properly anyway). sigemptyset/sigaddset write only through
    // their pointer, an exclusive borrow of the local `set`; pthread_sigmask reads `set` during
    // the call (a null old-set pointer is allowed) and only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(anyhow!(
                "blocking SIGINT/SIGTERM: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        Ok(set)
    }
}

/// SIGINT or SIGTERM stops the VM cleanly (the guest's state is discarded, exit status 0).
fn spawn_stop_on_signal(
    set: libc::sigset_t,
    control: std::sync::Arc<forkd_vmm::vstate::control::VmControl>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("stop-signal".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait(3) reads the initialised sigset_t `set` (owned by this closure)
            // and writes one c_int through the second pointer, an exclusive borrow of `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                tracing::info!(signal = sig, "stopping the VM on signal");
                control.request_stop(StopReason::Requested);
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
}

fn run_vm(args: RunArgs) -> Result<ExitCode> {
    let kernel = KernelSource::parse(&args.kernel)?;
    let mut config = VmConfig::new(kernel);
    config.mem_mib = args.mem_mib;
    config.vcpus = args.vcpus;
    config.cmdline = args.cmdline;
    config.initrd = super::initrd_for(&config.kernel, args.initrd);
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
        net: args.net_tap.map(|tap| NetConfig {
            tap,
            mac: args.net_mac,
        }),
    };
    // Blocked before the vCPU and device threads exist so they inherit the mask and only the
    // waiter thread below ever takes SIGINT/SIGTERM.
    let stop_signals = block_stop_signals()?;
    let mut devices = attach(&mut vmm, &virtio)?;
    vmm.start().context("starting the VM")?;
    spawn_stop_on_signal(stop_signals, vmm.control().clone())?;
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
