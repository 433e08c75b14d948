//! `forkd bench net`: what a network per child costs. The same run forks N children of a
//! snapshot without a network device (the built-in demo guest, same memory size: the net
//! guest cannot run without its device) and N children of the built-in net guest, each in its
//! own prepared namespace, and compares restores; then it measures ICMP echo packets/s to a guest through its tap (from
//! inside its namespace, and from the host through veth + NAT) against a bare veth pair
//! between two namespaces. The net guest only speaks ARP and ICMP, so echo rate (a window of
//! requests in flight) stands in for TCP throughput.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use forkd_sandbox::fork::{fork_snapshot_net, ChildCheck, ForkPlan, ForkReport};
use forkd_sandbox::net::{enter_netns, GuestNet, NetHost, NetPolicy, NetPool};
use forkd_sandbox::run_dirs::RunDirs;
use forkd_sandbox::stats::Summary;
use forkd_store::{RemoveMode, Store, Tag};
use forkd_vmm::devices::virtio::{NetConfig, VirtioConfig};
use forkd_vmm::snapshot::{AfterSnapshot, LoadedSnapshot, Machine, SnapshotMode};
use forkd_vmm::{KernelSource, SerialOutput, SharedBuffer, VmConfig};
use serde::Serialize;

use super::open_store;
use crate::output::print_json;

#[derive(Args)]
pub struct BenchNetArgs {
    /// Children forked with and without networking.
    #[arg(short = 'n', long = "count", default_value_t = 100)]
    n: usize,
    /// Seconds of each echo-rate measurement.
    #[arg(long, default_value_t = 3)]
    flood_secs: u64,
    #[arg(long)]
    json: bool,
}

const TAG: &str = "forkd-bench-net";
/// The baseline: a snapshot of the same size without a network device.
const PLAIN_TAG: &str = "forkd-bench-net-plain";
const MEM_MIB: u32 = 32;
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Echo requests kept in flight by the rate measurement.
const WINDOW: usize = 16;

#[derive(Serialize)]
struct NetBench {
    children: usize,
    without_net: Summary,
    with_net: Summary,
    p50_ratio: f64,
    p99_ratio: f64,
    wall_without_ms: f64,
    wall_with_ms: f64,
    /// Each child's network setup, off the fork path (parallel, before `go`).
    net_setup: Summary,
    net_prepare_wall_ms: f64,
    answered_ping: usize,
    echo_pps_guest_in_ns: f64,
    echo_pps_guest_via_nat: f64,
    echo_pps_bare_veth: f64,
}

pub fn run(args: BenchNetArgs) -> Result<ExitCode> {
    if args.n == 0 {
        bail!("--count must be at least 1");
    }
    let store = open_store()?;
    let host = NetHost::from_env()?;
    let tag = Tag::parse(TAG).expect("valid tag");
    build_snapshot(&store, &tag, &host)?;
    let loaded = LoadedSnapshot::load(&store, &tag).context("bench net")?;
    let tap = loaded.state().devices.net.as_ref().map(|n| n.tap.clone());
    let tap = tap.context("the bench snapshot has no net device")?;

    let plain_tag = Tag::parse(PLAIN_TAG).expect("valid tag");
    build_plain_snapshot(&store, &plain_tag)?;
    let plain_loaded = LoadedSnapshot::load(&store, &plain_tag).context("bench net")?;
    let (plain, _) = fork_n(&store, &plain_loaded, args.n, None)?;
    drop(plain_loaded);
    let t = Instant::now();
    let mut nets = NetPool::new(host.clone(), GuestNet::standard(&tap), NetPolicy::default())?;
    nets.prepare(0..args.n)?;
    let prepare_wall = t.elapsed();
    let setups: Vec<Duration> = nets.children().map(|(_, n)| n.setup).collect();
    let (with, held) = fork_n(&store, &loaded, args.n, Some(&nets))?;
    let (pool_with, run_dir) = held.context("the children with networking")?;
    let answered = nets
        .children()
        .filter(|(_, n)| {
            in_ns(Some(&n.netns), || {
                flood(GUEST, Duration::from_millis(1500), 1, 1)
            }) > 0.0
        })
        .count();
    let flood_time = Duration::from_secs(args.flood_secs);
    let first = nets.child(0).context("child 0's network")?;
    let in_ns_pps = in_ns(Some(&first.netns), || {
        flood(GUEST, flood_time, WINDOW, u64::MAX)
    });
    let addr = first.address;
    let via_nat_pps = in_ns(host.netns.as_deref(), || {
        flood(addr, flood_time, WINDOW, u64::MAX)
    });
    drop(pool_with);
    run_dir.remove();
    drop(nets);
    let bare_pps = bare_veth_pps(flood_time)?;

    let report = NetBench {
        children: args.n,
        p50_ratio: with.restore.p50_ms / plain.restore.p50_ms.max(1e-9),
        p99_ratio: with.restore.p99_ms / plain.restore.p99_ms.max(1e-9),
        without_net: plain.restore,
        with_net: with.restore,
        wall_without_ms: plain.wall_ms,
        wall_with_ms: with.wall_ms,
        net_setup: Summary::of(&setups),
        net_prepare_wall_ms: prepare_wall.as_secs_f64() * 1e3,
        answered_ping: answered,
        echo_pps_guest_in_ns: in_ns_pps,
        echo_pps_guest_via_nat: via_nat_pps,
        echo_pps_bare_veth: bare_pps,
    };
    print(&report, args.json)?;
    Ok(
        if answered == args.n && with.alive == args.n && plain.alive == args.n {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn print(r: &NetBench, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    println!(
        "== {} children, same run (no network: demo guest; own namespace: net guest; both {MEM_MIB} MiB)",
        r.children
    );
    println!("{:<34} {:>9} {:>9} {:>11}", "", "p50", "p99", "wall");
    let row = |name: &str, s: &Summary, wall: f64| {
        println!(
            "{name:<34} {:>6.2} ms {:>6.2} ms {:>8.1} ms",
            s.p50_ms, s.p99_ms, wall
        );
    };
    row("restore, no network", &r.without_net, r.wall_without_ms);
    row("restore, own namespace", &r.with_net, r.wall_with_ms);
    println!(
        "{:<34} {:>8.2}x {:>8.2}x",
        "with / without", r.p50_ratio, r.p99_ratio
    );
    row(
        "network setup per child (ahead)",
        &r.net_setup,
        r.net_prepare_wall_ms,
    );
    println!(
        "children answering ping in their namespace: {}/{}",
        r.answered_ping, r.children
    );
    println!("== ICMP echo rate ({WINDOW} in flight; stands in for TCP throughput)");
    println!(
        "{:<34} {:>10.0} packets/s",
        "guest, from its namespace (tap)", r.echo_pps_guest_in_ns
    );
    println!(
        "{:<34} {:>10.0} packets/s",
        "guest, from the host (veth + NAT)", r.echo_pps_guest_via_nat
    );
    println!(
        "{:<34} {:>10.0} packets/s",
        "bare veth pair (baseline)", r.echo_pps_bare_veth
    );
    Ok(())
}

/// A pool of children kept until the caller is done with them (so the network measurements
/// run while they are alive), and the run directory to remove afterwards.
type Held = Option<(forkd_sandbox::pool::Pool, RunDirs)>;

/// Forks `n` children (start only: the net guest has no agent) and returns their report; the
/// children without networking are stopped at once, those with it are handed back.
fn fork_n(
    store: &Store,
    loaded: &LoadedSnapshot,
    n: usize,
    nets: Option<&NetPool>,
) -> Result<(ForkReport, Held)> {
    let run_dir = RunDirs::for_this_process(
        store,
        if nets.is_some() {
            "bench-net"
        } else {
            "bench-plain"
        },
    );
    let plan = ForkPlan {
        n,
        run_dir: run_dir.clone(),
        snapshot_counter: None,
        timeout: Duration::from_secs(120),
        dirty_kib: None,
        jail: Default::default(),
    };
    let (mut pool, report) = fork_snapshot_net(loaded, &plan, false, &ChildCheck::StartOnly, nets)
        .context("forking children")?;
    if nets.is_none() {
        pool.stop_all(Duration::from_secs(10));
        run_dir.remove();
        return Ok((report, None));
    }
    Ok((report, Some((pool, run_dir))))
}

/// The baseline snapshot: the demo guest with the net guest's memory size, no network.
fn build_plain_snapshot(store: &Store, tag: &Tag) -> Result<()> {
    let guest = KernelSource::parse("builtin:demo")?;
    if store.exists(tag) {
        if store.get(tag)?.manifest.kernel == guest.identity() {
            return Ok(());
        }
        store.remove(std::slice::from_ref(tag), RemoveMode::Refuse)?;
    }
    let mut vm = VmConfig::new(guest);
    vm.mem_mib = MEM_MIB;
    let what = forkd_vmm::snapshot::BootSnapshot {
        vm,
        rootfs: None,
        ready_timeout: Duration::from_secs(60),
    };
    forkd_vmm::snapshot::snapshot_after_ready(store, tag, &what)
        .context("snapshotting the demo guest for the baseline")?;
    Ok(())
}

/// Boots the net guest on the tap of a prepared namespace and snapshots it (once; kept in the
/// store as forkd-bench-net, rebuilt when the built-in guest changed).
fn build_snapshot(store: &Store, tag: &Tag, host: &NetHost) -> Result<()> {
    let guest = KernelSource::parse("builtin:net")?;
    if store.exists(tag) {
        let snap = store.get(tag)?;
        if snap.manifest.kernel == guest.identity() {
            return Ok(());
        }
        store.remove(std::slice::from_ref(tag), RemoveMode::Refuse)?;
    }
    eprintln!(
        "forkd bench net: booting the built-in net guest and snapshotting it as {tag} (once)"
    );
    let mut boot = NetPool::new(
        host.clone(),
        GuestNet::standard("tap0"),
        NetPolicy::default(),
    )?;
    boot.prepare(0..1)?;
    let ns = boot.netns_of(0).context("the boot namespace")?.to_string();
    let serial = SharedBuffer::new();
    let mut config = VmConfig::new(guest);
    config.mem_mib = MEM_MIB;
    config.serial = SerialOutput::Buffer(serial.clone());
    let virtio = VirtioConfig {
        net: Some(NetConfig::new("tap0")),
        ..VirtioConfig::default()
    };
    let mut m =
        in_ns(Some(&ns), || Machine::boot(&config, &virtio)).context("booting the net guest")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serial.text().contains("READY net") {
        if Instant::now() > deadline {
            m.stop();
            bail!("the net guest did not report READY within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let saved = m.snapshot(store, tag, SnapshotMode::Full, AfterSnapshot::StayPaused);
    m.stop();
    saved.context("snapshotting the net guest")?;
    Ok(())
}

/// Runs `f` on a thread inside namespace `ns` (None: this one).
fn in_ns<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(ns) = ns {
                if let Err(e) = enter_netns(ns) {
                    panic!("entering {ns}: {e}");
                }
            }
            f()
        })
        .join()
        .expect("thread in a namespace")
    })
}

/// A bare veth pair between two fresh namespaces (named like forkd's, so a sweep finds them
/// after a crash), flooded from one end to the other.
fn bare_veth_pps(time: Duration) -> Result<f64> {
    let pid = std::process::id();
    let (a, b) = (format!("forkd-{pid}-900001"), format!("forkd-{pid}-900002"));
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("ip").args(args).output()?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let setup = || -> Result<()> {
        run(&["netns", "add", &a])?;
        run(&["netns", "add", &b])?;
        run(&[
            "-n", &a, "link", "add", "forkdb0", "type", "veth", "peer", "name", "forkdb1", "netns",
            &b,
        ])?;
        run(&["-n", &a, "addr", "add", "10.255.255.1/30", "dev", "forkdb0"])?;
        run(&["-n", &b, "addr", "add", "10.255.255.2/30", "dev", "forkdb1"])?;
        run(&["-n", &a, "link", "set", "forkdb0", "up"])?;
        run(&["-n", &b, "link", "set", "forkdb1", "up"])?;
        Ok(())
    };
    let result = setup().map(|()| {
        in_ns(Some(&a), || {
            flood(Ipv4Addr::new(10, 255, 255, 2), time, WINDOW, u64::MAX)
        })
    });
    let _ = run(&["-n", &a, "link", "del", "forkdb0"]);
    let _ = run(&["netns", "del", &a]);
    let _ = run(&["netns", "del", &b]);
    result
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| (u32::from(c[0]) << 8) | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Echo replies per second from `dst` over `time` (or until `enough` replies), keeping
/// `window` requests in flight (a window presumed lost after 200 ms without a reply is sent
/// again). 0 if nothing answered.
fn flood(dst: Ipv4Addr, time: Duration, window: usize, enough: u64) -> f64 {
    // SAFETY: plain socket creation; returns a new fd or -1.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if raw < 0 {
        return 0.0;
    }
    // SAFETY: raw was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let (mut seq, mut in_flight, mut replies) = (0u16, 0usize, 0u64);
    let start = Instant::now();
    let mut last_reply = Instant::now();
    while start.elapsed() < time && replies < enough {
        while in_flight < window {
            seq = seq.wrapping_add(1);
            let mut req = vec![8u8, 0, 0, 0];
            req.extend_from_slice(&id.to_be_bytes());
            req.extend_from_slice(&seq.to_be_bytes());
            req.extend_from_slice(&[0x42; 56]);
            let c = checksum(&req);
            req[2..4].copy_from_slice(&c.to_be_bytes());
            // SAFETY: sendto reads `req` and `addr`, both alive for the call.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    req.as_ptr().cast(),
                    req.len(),
                    0,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            in_flight += 1;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd, a live local.
        unsafe { libc::poll(&mut pfd, 1, 20) };
        let mut buf = [0u8; 1500];
        loop {
            // SAFETY: recv writes at most buf.len() bytes into `buf`.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            let p = &buf[..n as usize];
            let ihl = usize::from(p[0] & 15) * 4;
            if p.len() >= ihl + 8
                && p[12..16] == dst.octets()
                && p[ihl] == 0
                && p[ihl + 4..ihl + 6] == id.to_be_bytes()
            {
                replies += 1;
                in_flight = in_flight.saturating_sub(1);
                last_reply = Instant::now();
            }
        }
        if last_reply.elapsed() > Duration::from_millis(200) {
            in_flight = 0;
            last_reply = Instant::now();
        }
    }
    replies as f64 / start.elapsed().as_secs_f64()
}
