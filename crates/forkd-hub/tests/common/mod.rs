//! Shared test helpers: synthetic snapshots and hand-crafted (possibly hostile) packs.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use forkd_store::{FileEntry, Manifest, SnapshotMeta, Store, Tag, FORMAT_VERSION};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// Writes a sparse file of `len` bytes with `data_len` bytes of random data spread in 1 MiB
/// runs (seeded, reproducible), plus a few compressible pages.
pub fn sparse_random_file(path: &Path, len: u64, data_len: u64, seed: u64) {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let run = 1u64 << 20;
    let runs = data_len.div_ceil(run).max(1);
    let stride = (len / runs).max(run) & !4095;
    let mut buf = vec![0u8; run as usize];
    let mut left = data_len;
    for i in 0..runs {
        let n = left.min(run) as usize;
        if n == 0 {
            break;
        }
        rng.fill_bytes(&mut buf[..n]);
        f.write_all_at(&buf[..n], i * stride).unwrap();
        left -= n as u64;
    }
    // A compressible page near the end (text-like).
    if len > 8192 {
        let text = b"forkd test page ".repeat(256);
        f.write_all_at(&text[..4096], (len - 8192) & !4095).unwrap();
    }
    f.sync_all().unwrap();
}

/// A synthetic snapshot committed through the store: sparse memory.bin and rootfs.ext4,
/// a small vmstate.json.
pub fn make_snapshot(store: &Store, tag: &str, mem_len: u64, mem_data: u64, seed: u64) {
    let tag = Tag::parse(tag).unwrap();
    let staging = store.begin(&tag).unwrap();
    sparse_random_file(&staging.path().join("memory.bin"), mem_len, mem_data, seed);
    sparse_random_file(
        &staging.path().join("rootfs.ext4"),
        mem_len / 4,
        mem_data / 8,
        seed + 1,
    );
    std::fs::write(
        staging.path().join("vmstate.json"),
        format!("{{\"vcpus\":[{{\"rip\":1048576}}],\"seed\":{seed}}}"),
    )
    .unwrap();
    staging
        .commit(SnapshotMeta {
            memory_mib: mem_len >> 20,
            vcpus: 1,
            description: "synthetic test snapshot".into(),
            base_image: "test:base".into(),
            kernel: "builtin:demo".into(),
            parent_tag: None,
            parent_sha256: String::new(),
            net: None,
        })
        .unwrap();
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A pack manifest declaring `files` (name, content).
pub fn manifest_text(tag: &str, name: &str, files: &[(&str, &[u8])]) -> String {
    Manifest {
        format_version: FORMAT_VERSION,
        tag: Tag::parse(tag).unwrap(),
        created_at: "2026-11-21T00:00:00Z".into(),
        forkd_version: "0.1.0".into(),
        memory_mib: 1,
        vcpus: 1,
        description: String::new(),
        base_image: String::new(),
        kernel: String::new(),
        parent_tag: String::new(),
        parent_sha256: String::new(),
        name: name.into(),
        version: "v1".into(),
        parent_package: String::new(),
        parent_content_sha256: String::new(),
        net: None,
        files: files
            .iter()
            .map(|(n, d)| FileEntry {
                name: n.to_string(),
                size: d.len() as u64,
                sha256: sha256_hex(d),
            })
            .collect(),
    }
    .to_toml()
}

/// One raw tar entry with exactly these name bytes (no sanitizing), type and content.
pub fn raw_entry(name: &[u8], kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
    raw_entry_sized(name, kind, data, data.len() as u64)
}

/// Like `raw_entry` but the header's size field says `size`.
pub fn raw_entry_sized(name: &[u8], kind: tar::EntryType, data: &[u8], size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
    }
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(kind);
    if kind == tar::EntryType::Symlink || kind == tar::EntryType::Link {
        h.set_link_name("/etc/passwd").unwrap();
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Concatenates entries, adds the end-of-archive marker and compresses.
pub fn zstd_tar(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut tar: Vec<u8> = entries.concat();
    tar.extend_from_slice(&[0u8; 1024]);
    zstd::encode_all(&tar[..], 3).unwrap()
}

/// Nothing installed and no staging / trash directory left.
pub fn assert_store_empty(store: &Store) {
    let left: Vec<String> = std::fs::read_dir(store.snapshots_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "store not empty: {left:?}");
}

pub mod servers;

pub fn have(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .is_ok_and(|o| o.status.success())
}
