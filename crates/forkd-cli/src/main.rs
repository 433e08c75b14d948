//! `forkd`: boot a microVM once, snapshot it, fork many children from the snapshot.

mod commands;
mod daemon_client;
mod hints;
mod output;
mod terminal;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "forkd",
    version,
    about = "Boot a microVM once, fork many children from its snapshot"
)]
struct Cli {
    /// Log verbosity (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the data directory (FORKD_HOME, else $XDG_DATA_HOME/forkd, else ~/.local/share/forkd).
    Where(commands::store::WhereArgs),
    /// List local snapshots.
    Images(commands::store::ImagesArgs),
    /// Show one snapshot's manifest.
    Inspect(commands::store::InspectArgs),
    /// Re-hash a snapshot's files against its manifest.
    Verify(commands::store::VerifyArgs),
    /// Remove snapshots.
    Rmi(commands::store::RmiArgs),
    /// Leftovers of interrupted work: partial downloads, staging and run directories (ls, prune)
    Cache(commands::cache::CacheArgs),
    /// Check this host for what forkd needs.
    Doctor(commands::doctor::DoctorArgs),
    /// Run microVMs.
    Vm(commands::vm::VmArgs),
    /// Boot a guest, wait until it reports ready, snapshot it into the store, stop it.
    Snapshot(commands::snapshot::SnapshotArgs),
    /// Fork N children from a snapshot, check each continues from it (or run a command in
    /// each with --exec), print timings.
    Fork(commands::fork::ForkArgs),
    /// Fork one child of a Linux snapshot, run a command in it (output streamed), exit with
    /// the command's exit code, remove the child.
    Run(commands::run::RunArgs),
    /// Snapshot the built-in demo guest (once) and fork 100 children from it.
    Demo(commands::fork::DemoArgs),
    /// Benchmarks: fork and BRANCH costs against baselines measured in the same run.
    Bench(commands::bench::BenchArgs),
    /// Children's networks: sweep what a killed forkd left behind.
    Net(commands::net::NetArgs),
    /// Flatten a chain of diff snapshots into a new self-contained snapshot.
    Compact(commands::snapshot::CompactArgs),
    /// Pack a snapshot into a .forkd-snapshot.tar.zst file.
    Pack(commands::hub::PackArgs),
    /// Install a snapshot from a pack file.
    Unpack(commands::hub::UnpackArgs),
    /// Download and install a snapshot from a hub, a URL or a pack file.
    Pull(commands::hub::PullArgs),
    /// Upload a snapshot's pack to a presigned URL or a forkd hub server.
    Push(commands::hub::PushArgs),
    /// Host a hub: publish packs into a directory, serve it, make signing keys.
    Hub(commands::hub::HubArgs),
    /// Guest kernels: fetch Debian's cloud kernel and build its initramfs, or show what is cached.
    Kernel(commands::image::KernelArgs),
    /// Root filesystem images built from recipes.
    Image(commands::image::ImageArgs),
    /// Run the daemon: keep sandboxes alive and serve the REST API on a Unix socket (and TCP).
    Serve(commands::serve::ServeArgs),
    /// Start sandboxes through the daemon; prints their ids.
    Spawn(commands::sandbox::SpawnArgs),
    /// List the daemon's sandboxes.
    Ps(commands::sandbox::PsArgs),
    /// Run a command in a sandbox, output streamed; exits with the command's exit code (-d:
    /// in the background, prints its pid).
    Exec(commands::sandbox::ExecArgs),
    /// Evaluate code in a sandbox's warm interpreter; prints its output and value.
    Eval(commands::sandbox::EvalArgs),
    /// Copy a file into or out of a sandbox: `forkd cp FILE ID:/PATH`, `forkd cp ID:/PATH FILE`.
    Cp(commands::cp::CpArgs),
    /// Kill sandboxes and remove their files.
    Kill(commands::sandbox::KillArgs),
    /// Snapshot a running sandbox into a new tag (BRANCH); it runs on.
    Branch(commands::lifecycle::BranchArgs),
    /// Suspend sandboxes to disk; they keep their ids.
    Pause(commands::lifecycle::PauseArgs),
    /// Bring paused sandboxes back, where they left off.
    Resume(commands::lifecycle::ResumeArgs),
    /// A sandbox's serial console output.
    Logs(commands::lifecycle::LogsArgs),
    /// Serve the Model Context Protocol on stdio: agents drive sandboxes through the daemon.
    Mcp(commands::mcp::McpArgs),
    /// The per-snapshot process the daemon starts sandboxes through (internal).
    #[command(name = "__zygote", hide = true)]
    Zygote(commands::zygote::ZygoteArgs),
}

/// `forkd images | head` closes our stdout early. Rust ignores SIGPIPE (forkd must: its VMMs
/// write to sockets whose peers may go away), so `println!` then panics; end quietly instead,
/// with the status a shell gives a process killed by SIGPIPE.
fn exit_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    exit_quietly_on_closed_stdout();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Where(a) => commands::store::run_where(a),
        Command::Images(a) => commands::store::run_images(a),
        Command::Inspect(a) => commands::store::run_inspect(a),
        Command::Verify(a) => commands::store::run_verify(a),
        Command::Rmi(a) => commands::store::run_rmi(a),
        Command::Cache(a) => commands::cache::run(a),
        Command::Doctor(a) => commands::doctor::run(a),
        Command::Vm(a) => commands::vm::run(a),
        Command::Snapshot(a) => commands::snapshot::run_snapshot(a),
        Command::Fork(a) => commands::fork::run_fork(a),
        Command::Run(a) => commands::run::run_run(a),
        Command::Demo(a) => commands::fork::run_demo(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Net(a) => commands::net::run(a),
        Command::Compact(a) => commands::snapshot::run_compact(a),
        Command::Pack(a) => commands::hub::run_pack(a),
        Command::Unpack(a) => commands::hub::run_unpack(a),
        Command::Pull(a) => commands::hub::run_pull(a),
        Command::Push(a) => commands::hub::run_push(a),
        Command::Hub(a) => commands::hub::run_hub(a),
        Command::Kernel(a) => commands::image::run_kernel(a),
        Command::Image(a) => commands::image::run_image(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Spawn(a) => commands::sandbox::run_spawn(a),
        Command::Ps(a) => commands::sandbox::run_ps(a),
        Command::Exec(a) => commands::sandbox::run_exec(a),
        Command::Eval(a) => commands::sandbox::run_eval(a),
        Command::Cp(a) => commands::cp::run(a),
        Command::Kill(a) => commands::sandbox::run_kill(a),
        Command::Branch(a) => commands::lifecycle::run_branch(a),
        Command::Pause(a) => commands::lifecycle::run_pause(a),
        Command::Resume(a) => commands::lifecycle::run_resume(a),
        Command::Logs(a) => commands::lifecycle::run_logs(a),
        Command::Mcp(a) => commands::mcp::run(a),
        Command::Zygote(a) => commands::zygote::run(a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // One line: the chain of contexts, outermost first, then what to do about it.
            eprintln!("forkd: error: {}", hints::render(&err));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
