//! Pull benchmark (issue 5).
//!
//! A pack whose memory.bin is 1 GiB logical with 256 MiB of random data is served by nginx on
//! loopback. Each run pulls it into a fresh store with `forkd_hub::pull` and, in the same run,
//! times the shell baseline
//! `curl -o f URL && sha256sum f && zstd -dc f | tar -x && sha256sum <extracted files>`.
//! Prints medians, p99 and the ratio, on-disk sizes, and pack time / size per zstd level
//! against `tar --sparse -c | zstd -T0` at the same level.
//!
//! Env: FORKD_BENCH_RUNS (default 5), FORKD_BENCH_DIR (default: system temp dir).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::servers::Nginx;
use forkd_hub::publish::{publish, PublishOptions};
use forkd_hub::{pull, write_pack, PackOptions, PullOptions};
use forkd_store::sparse::disk_usage;
use forkd_store::{SnapshotMeta, Store, Tag};
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Realistic compressible content: the host's shared libraries and binaries (code, symbol
/// tables, strings), as a warmed guest's page cache and heap would hold. Falls back to text.
fn guest_like_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if out.len() >= len {
                return out;
            }
            if p.is_file() {
                if let Ok(bytes) = std::fs::read(&p) {
                    out.extend_from_slice(&bytes[..bytes.len().min(len - out.len())]);
                }
            }
        }
    }
    while out.len() < len {
        out.extend_from_slice(b"PATH=/usr/local/bin:/usr/bin import numpy as np; x = 1 ");
    }
    out.truncate(len);
    out
}

/// memory.bin: 1 GiB logical, 256 MiB random data in 4 MiB runs spread over the file, plus
/// 32 MiB of compressible guest-like pages (binaries and libraries).
fn build_snapshot(store: &Store) {
    let tag = Tag::parse("bench").unwrap();
    let staging = store.begin(&tag).unwrap();
    let mem = File::create(staging.path().join("memory.bin")).unwrap();
    mem.set_len(GIB).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut buf = vec![0u8; 4 * MIB as usize];
    for i in 0..64u64 {
        rng.fill_bytes(&mut buf);
        mem.write_all_at(&buf, i * 16 * MIB).unwrap();
    }
    let guest = guest_like_bytes(48 * MIB as usize);
    for (i, chunk) in guest[..32 * MIB as usize]
        .chunks(4 * MIB as usize)
        .enumerate()
    {
        mem.write_all_at(chunk, i as u64 * 128 * MIB + 8 * MIB)
            .unwrap();
    }
    mem.sync_all().unwrap();
    let rootfs = File::create(staging.path().join("rootfs.ext4")).unwrap();
    rootfs.set_len(256 * MIB).unwrap();
    for (i, chunk) in guest[32 * MIB as usize..]
        .chunks(4 * MIB as usize)
        .enumerate()
    {
        rootfs.write_all_at(chunk, i as u64 * 64 * MIB).unwrap();
    }
    rootfs.sync_all().unwrap();
    std::fs::write(
        staging.path().join("vmstate.json"),
        "{\"vcpus\":[{\"rip\":1048576,\"rsp\":36848}],\"devices\":[]}",
    )
    .unwrap();
    staging
        .commit(SnapshotMeta {
            memory_mib: 1024,
            vcpus: 1,
            description: "bench".into(),
            ..Default::default()
        })
        .unwrap();
}

fn stats(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = samples[samples.len() / 2];
    let p99_index = ((samples.len() as f64) * 0.99).ceil() as usize - 1;
    (median, samples[p99_index.min(samples.len() - 1)])
}

fn sh(cmd: &str, dir: &Path) -> Duration {
    let t = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{cmd} failed");
    t.elapsed()
}

fn dir_disk_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| disk_usage(&e.unwrap().path()).unwrap_or(0))
        .sum()
}

fn main() {
    for tool in ["curl", "zstd", "tar", "sha256sum"] {
        if !common::have(tool) {
            eprintln!("skipped: {tool} is not installed");
            return;
        }
    }
    let runs: usize = std::env::var("FORKD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let base = std::env::var_os("FORKD_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(base).unwrap();
    let src = Store::open(work.path().join("src")).unwrap();
    build_snapshot(&src);
    let snap = src.get(&Tag::parse("bench").unwrap()).unwrap();
    let data: u64 = snap
        .manifest
        .files
        .iter()
        .map(|f| disk_usage(&snap.file(&f.name)).unwrap())
        .sum();
    println!(
        "snapshot: {} MiB logical, {} MiB of data on disk",
        snap.manifest.logical_size() / MIB,
        data / MIB
    );

    // Pack: ours per level vs tar --sparse | zstd -T0 at the same level.
    println!("\npack (median of {} runs):", runs.min(3));
    println!("level  forkd s  forkd MiB   tar|zstd s  tar|zstd MiB   time ratio");
    let names = "manifest.toml vmstate.json rootfs.ext4 memory.bin";
    for level in [1, 3, 6, 9] {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut our_size = 0;
        let mut their_size = 0;
        for _ in 0..runs.min(3) {
            let out = work.path().join("p.tar.zst");
            let t = Instant::now();
            let mut opts = PackOptions::new("bench/mem", "v1");
            opts.level = level;
            let mut w = BufWriter::with_capacity(MIB as usize, File::create(&out).unwrap());
            write_pack(&snap, &opts, &mut w).unwrap();
            w.flush().unwrap();
            ours.push(t.elapsed().as_secs_f64());
            our_size = std::fs::metadata(&out).unwrap().len();
            let d = sh(
                &format!(
                    "tar --sparse -cf - {names} | zstd -q -T0 -{level} -o {}",
                    work.path().join("b.tar.zst").display()
                ),
                &snap.dir,
            );
            theirs.push(d.as_secs_f64());
            their_size = std::fs::metadata(work.path().join("b.tar.zst"))
                .unwrap()
                .len();
            let _ = std::fs::remove_file(work.path().join("b.tar.zst"));
            let _ = std::fs::remove_file(&out);
        }
        let (o, _) = stats(&mut ours);
        let (b, _) = stats(&mut theirs);
        println!(
            "{level:>5}  {o:>7.2}  {:>9.1}   {b:>10.2}  {:>12.1}   {:>10.2}",
            our_size as f64 / MIB as f64,
            their_size as f64 / MIB as f64,
            o / b
        );
    }

    // Publish at the default level and serve with nginx.
    let hub = work.path().join("hub");
    std::fs::create_dir(&hub).unwrap();
    let report = publish(
        &snap,
        &hub,
        &PublishOptions {
            pack: PackOptions::new("bench/mem", "v1"),
            url_base: None,
            sign_key: None,
            make_latest: true,
            recipe_path: None,
            release_tag: None,
        },
    )
    .unwrap();
    let Some(nginx) = Nginx::start(&hub) else {
        return;
    };
    let pack_url = nginx.url(&report.entry.url);
    println!(
        "\npack served: {:.1} MiB at {pack_url}",
        report.entry.size_bytes.unwrap() as f64 / MIB as f64
    );

    let mut ours = Vec::new();
    let mut base_times = Vec::new();
    let mut our_disk = 0;
    let mut base_disk = 0;
    for run in 0..runs {
        // Ours: registry → streaming pull → verified install.
        let home = work.path().join(format!("home{run}"));
        let store = Store::open(&home).unwrap();
        let opts = PullOptions {
            hub: Some(nginx.url("/")),
            ..Default::default()
        };
        let t = Instant::now();
        let r = pull(&store, "bench/mem", &opts).unwrap();
        ours.push(t.elapsed().as_secs_f64());
        our_disk = r.outcome.snapshot().disk_usage();
        assert!(store.verify(r.outcome.snapshot().tag()).unwrap().is_empty());
        std::fs::remove_dir_all(&home).unwrap();

        // Baseline, same run.
        let x = work.path().join(format!("x{run}"));
        std::fs::create_dir(&x).unwrap();
        let d = sh(
            &format!(
                "curl -s -o f {pack_url} && sha256sum f && zstd -dc f | tar -x && sha256sum {names}"
            ),
            &x,
        );
        base_times.push(d.as_secs_f64());
        std::fs::remove_file(x.join("f")).unwrap();
        base_disk = dir_disk_usage(&x);
        std::fs::remove_dir_all(&x).unwrap();
    }
    let (om, op) = stats(&mut ours);
    let (bm, bp) = stats(&mut base_times);
    println!("\npull ({runs} runs):");
    println!("  forkd pull          median {om:.3} s  p99 {op:.3} s");
    println!("  curl+sha+zstd+tar   median {bm:.3} s  p99 {bp:.3} s");
    println!("  ratio (median)      {:.2}x  (target <= 0.60x)", om / bm);
    println!(
        "  on disk after pull: forkd {:.1} MiB (source data {:.1} MiB), baseline extract {:.1} MiB (+ {:.1} MiB pack file it keeps)",
        our_disk as f64 / MIB as f64,
        data as f64 / MIB as f64,
        base_disk as f64 / MIB as f64,
        report.entry.size_bytes.unwrap() as f64 / MIB as f64
    );
}
