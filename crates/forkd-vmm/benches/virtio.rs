//! Virtio benchmarks with real guests, each against a host baseline measured in the same run:
//! - vsock round-trip latency (host → device → guest echo → host) vs. a host Unix-socket echo;
//! - virtio-blk read throughput of the `blkbench` guest vs. the host reading the same file.
//!
//! `cargo bench -p forkd-vmm --bench virtio [-- ROUND_TRIPS DISK_MIB RUNS]`

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use forkd_vmm::devices::virtio::{attach, BlockConfig, VirtioConfig, VsockConfig};
use forkd_vmm::memory::{Bytes, GuestAddress};
use forkd_vmm::{build, KernelSource, SerialOutput, SharedBuffer, VmConfig, Vmm};

const MSG: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let round_trips: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let disk_mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let runs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("skipping virtio benchmarks: /dev/kvm is not usable here");
        return;
    }
    vsock_latency(round_trips);
    block_throughput(disk_mib, runs);
}

fn start(guest: &str, virtio: &VirtioConfig) -> (Vmm, forkd_vmm::devices::virtio::VirtioDevices) {
    let mut config = VmConfig::new(KernelSource::parse(&format!("builtin:{guest}")).unwrap());
    config.mem_mib = 64;
    config.serial = SerialOutput::Buffer(SharedBuffer::new());
    let mut vmm = build(&config).expect("build VM");
    let devices = attach(&mut vmm, virtio).expect("attach devices");
    vmm.start().expect("start VM");
    (vmm, devices)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summarize(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

fn round_trips(stream: &mut UnixStream, n: usize) -> Vec<f64> {
    let msg = [0x42u8; MSG];
    let mut back = [0u8; MSG];
    (0..n)
        .map(|_| {
            let t = Instant::now();
            stream.write_all(&msg).unwrap();
            stream.read_exact(&mut back).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

fn vsock_latency(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("bench.sock");
    let ready = UnixListener::bind(format!("{}_1025", uds.display())).unwrap();
    let virtio = VirtioConfig {
        vsock: Some(VsockConfig::new(uds.clone())),
        ..VirtioConfig::default()
    };
    let (vmm, _devices) = start("vsock", &virtio);
    let _ = ready.accept().unwrap();
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    writeln!(s, "CONNECT 1024").unwrap();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {}
    round_trips(&mut s, n / 10); // warm-up
    let (vm_med, vm_p99) = summarize(round_trips(&mut s, n));
    vmm.request_stop();

    // Baseline: the same exchange with an echo thread over a host Unix socket pair.
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; MSG];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    round_trips(&mut a, n / 10);
    let (host_med, host_p99) = summarize(round_trips(&mut a, n));
    drop(a);
    let _ = echo.join();
    println!("vsock round trip, {MSG} B, {n} samples (µs, lower is better)");
    println!("  guest echo via virtio-vsock: median {vm_med:8.1}  p99 {vm_p99:8.1}");
    println!("  host unix-socket echo:       median {host_med:8.1}  p99 {host_p99:8.1}");
    println!("  ratio (median): {:.1}x", vm_med / host_med);
}

const STATUS: u64 = 0x6000;
const BLKBENCH_MAGIC: u64 = u64::from_le_bytes(*b"BLKBENCH");

fn guest_phase(vmm: &Vmm) -> (u64, u64, u64) {
    let m = vmm.memory();
    let read = |o: u64| m.read_obj::<u64>(GuestAddress(STATUS + o)).unwrap_or(0);
    (read(0), read(8), read(16))
}

fn block_throughput(disk_mib: usize, runs: usize) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("disk.img");
    let data: Vec<u8> = (0..disk_mib << 20).map(|i| (i * 31) as u8).collect();
    std::fs::write(&base, &data).unwrap();
    drop(data);
    let mut guest = Vec::new();
    let mut host = Vec::new();
    for run in 0..runs {
        let virtio = VirtioConfig {
            block: Some(BlockConfig {
                base: base.clone(),
                overlay: dir.path().join(format!("overlay{run}")),
                read_only: true,
                id: "bench".into(),
            }),
            ..VirtioConfig::default()
        };
        let (mut vmm, _devices) = start("blkbench", &virtio);
        let deadline = Instant::now() + Duration::from_secs(300);
        while guest_phase(&vmm).1 != 1 {
            assert!(
                Instant::now() < deadline && guest_phase(&vmm).1 != 3,
                "blkbench failed"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        let t = Instant::now();
        while guest_phase(&vmm).1 == 1 {
            assert!(Instant::now() < deadline, "blkbench timed out");
            std::thread::sleep(Duration::from_micros(50));
        }
        let elapsed = t.elapsed().as_secs_f64();
        let (magic, phase, bytes) = guest_phase(&vmm);
        assert_eq!((magic, phase), (BLKBENCH_MAGIC, 2), "blkbench failed");
        guest.push(bytes as f64 / elapsed / (1 << 20) as f64);
        let _ = vmm.wait_timeout(Duration::from_secs(30));

        host.push(host_read_mib_s(&base, bytes));
    }
    let (g_med, _) = summarize(guest.clone());
    let (h_med, _) = summarize(host.clone());
    println!("block read throughput, {disk_mib} MiB disk read 4x per run in 256 KiB requests, {runs} runs (MiB/s, higher is better)");
    println!(
        "  guest via virtio-blk (COW disk): median {g_med:8.0}  min {:8.0}",
        guest.iter().cloned().fold(f64::MAX, f64::min)
    );
    println!(
        "  host pread of the same file:     median {h_med:8.0}  min {:8.0}",
        host.iter().cloned().fold(f64::MAX, f64::min)
    );
    println!("  ratio (median): {:.2}x of host", g_med / h_med);
}

/// The host reading `total` bytes of `path` in 256 KiB preads (page cache warm, like the guest).
fn host_read_mib_s(path: &Path, total: u64) -> f64 {
    let file = std::fs::File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let mut buf = vec![0u8; 256 * 1024];
    let t = Instant::now();
    let mut done = 0u64;
    while done < total {
        let off = done % size;
        let n = buf.len().min((size - off) as usize);
        file.read_exact_at(&mut buf[..n], off).unwrap();
        done += n as u64;
    }
    done as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64
}
