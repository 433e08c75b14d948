//! Hashing throughput of the store against `sha256sum` measured in the same run.
//!
//! `cargo bench -p forkd-store --bench hash [-- SIZE_MIB RUNS]`

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use forkd_store::hash::{hash_file, hash_files};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let size_mib: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let dense = dir.path().join("dense.bin");
    let sparse = dir.path().join("sparse.bin");
    write_dense(&dense, size_mib);
    write_sparse(&sparse, size_mib);
    let gib = size_mib as f64 / 1024.0;
    println!("hashing {size_mib} MiB files, {runs} runs each (GiB/s: higher is better)");

    let ours = time_runs(runs, || {
        hash_file(&dense).unwrap();
    });
    let baseline = time_runs(runs, || {
        let ok = Command::new("sha256sum")
            .arg(&dense)
            .output()
            .map(|o| o.status.success());
        assert!(matches!(ok, Ok(true)), "sha256sum failed");
    });
    let holes = time_runs(runs, || {
        hash_file(&sparse).unwrap();
    });
    let pair = [dense.clone(), sparse.clone()];
    let parallel = time_runs(runs, || {
        hash_files(&pair).into_iter().for_each(|r| drop(r.unwrap()));
    });
    report("forkd hash_file, dense", &ours, gib);
    report("sha256sum (baseline), dense", &baseline, gib);
    report("forkd hash_file, sparse (1/64 data)", &holes, gib);
    report(
        "forkd hash_files, dense+sparse in parallel",
        &parallel,
        2.0 * gib,
    );
    println!(
        "ratio forkd/sha256sum (median time, dense): {:.2}x",
        median(&ours) / median(&baseline)
    );
}

fn write_dense(path: &Path, mib: u64) {
    let mut f = File::create(path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
}

fn write_sparse(path: &Path, mib: u64) {
    let f = File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
    for i in (0..mib).step_by(64) {
        f.write_all_at(&vec![0xa5u8; 1 << 20], i << 20).unwrap();
    }
}

fn time_runs(runs: usize, mut f: impl FnMut()) -> Vec<f64> {
    f(); // warm the page cache
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times
}

fn median(sorted: &[f64]) -> f64 {
    sorted[sorted.len() / 2]
}

fn p99(sorted: &[f64]) -> f64 {
    sorted[((sorted.len() as f64 * 0.99).ceil() as usize).min(sorted.len()) - 1]
}

fn report(what: &str, sorted: &[f64], gib: f64) {
    println!(
        "{what:<45} median {:>7.1} ms ({:>5.2} GiB/s)  p99 {:>7.1} ms",
        median(sorted) * 1e3,
        gib / median(sorted),
        p99(sorted) * 1e3
    );
}
