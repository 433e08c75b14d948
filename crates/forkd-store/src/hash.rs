//! Streaming SHA-256 that reads through holes without touching the disk for them.
//!
//! `sha2` picks the SHA-NI / AVX2 code path at run time, so one core hashes at GB/s; several
//! files are hashed on separate threads.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::sparse::data_extents;

const CHUNK: usize = 1 << 20;
static ZEROS: [u8; CHUNK] = [0u8; CHUNK];

/// Logical size and lowercase hex sha256 of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: String,
}

/// Hashes a file's logical content; holes are fed to the hasher as zeros without reading them.
pub fn hash_file(path: &Path) -> io::Result<FileDigest> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    for extent in data_extents(&file)? {
        feed_zeros(&mut hasher, extent.start - pos);
        let mut off = extent.start;
        while off < extent.end {
            let n = ((extent.end - off) as usize).min(CHUNK);
            file.read_exact_at(&mut buf[..n], off)?;
            hasher.update(&buf[..n]);
            off += n as u64;
        }
        pos = extent.end;
    }
    feed_zeros(&mut hasher, size - pos);
    Ok(FileDigest {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

fn feed_zeros(hasher: &mut Sha256, mut len: u64) {
    while len > 0 {
        let n = (len as usize).min(CHUNK);
        hasher.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// Hashes several files concurrently, one thread each (bounded by the core count).
/// Results come back in the order of `paths`.
pub fn hash_files(paths: &[PathBuf]) -> Vec<io::Result<FileDigest>> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(1);
    let mut results: Vec<Option<io::Result<FileDigest>>> = (0..paths.len()).map(|_| None).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots = std::sync::Mutex::new(&mut results);
    std::thread::scope(|s| {
        for _ in 0..workers.min(paths.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(path) = paths.get(i) else { break };
                let digest = hash_file(path);
                slots.lock().unwrap()[i] = Some(digest);
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every index is hashed"))
        .collect()
}

/// Hex sha256 of an in-memory buffer.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_hash_equals_plain_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = File::create(&p).unwrap();
        f.set_len((8 << 20) + 123).unwrap();
        f.write_all_at(b"hello", 3 << 20).unwrap();
        f.write_all_at(b"tail", (8 << 20) + 100).unwrap();
        drop(f);
        let plain = sha256_hex(&std::fs::read(&p).unwrap());
        let d = hash_file(&p).unwrap();
        assert_eq!(d.sha256, plain);
        assert_eq!(d.size, (8 << 20) + 123);
    }

    #[test]
    fn known_vector_and_parallel_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"abc").unwrap();
        std::fs::write(&b, b"").unwrap();
        let r = hash_files(&[a, b, dir.path().join("missing")]);
        assert_eq!(
            r[0].as_ref().unwrap().sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            r[1].as_ref().unwrap().sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(r[2].is_err());
    }
}
