//! A VM's disk: a read-only base image plus the VM's own copy-on-write overlay.
//!
//! Design (chosen so a fork is as cheap as possible on any filesystem):
//! - The base image is opened O_RDONLY and shared by every VM made from it; nothing here can
//!   write to it.
//! - The overlay is a sparse file as large as the disk, holding only the 4 KiB blocks the guest
//!   wrote, at their own offsets; an allocation bitmap (one bit per block) says which blocks
//!   live in the overlay. Reads take allocated blocks from the overlay and the rest from the
//!   base; a write to an unallocated block copies that block from the base first (when the
//!   write does not cover it entirely), then marks it allocated.
//! - The bitmap is persisted next to the overlay as `<overlay>.map` on every flush (written to
//!   a temporary file and renamed, so a crash leaves the previous consistent map).
//! - Forking a disk ([`CowDisk::fork_to`]) copies only the allocated blocks and the map: its
//!   cost is proportional to what the guest wrote, not to the disk size, and it needs neither
//!   reflink support nor a full copy of the base. A reflink copy of the base would be O(1) on
//!   btrfs/XFS but a full copy on ext4/tmpfs; the overlay approach is cheap everywhere.
//! - "The disk as the guest saw it" for a snapshot is base + overlay + map (all immutable once
//!   flushed), or a single image from [`CowDisk::export_to`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Granularity of copy-on-write.
pub const COW_BLOCK_SIZE: u64 = 4096;
const MAP_MAGIC: &[u8; 8] = b"FKDCOW01";
const MAP_HEADER_LEN: usize = 8 + 8 + 8;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk base image {path}: {error}")]
    Base {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("disk base image {path} is not a regular file")]
    BaseNotFile { path: PathBuf },
    #[error("disk overlay {path}: {error}")]
    Overlay {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("disk overlay {path} already exists (refusing to overwrite another VM's disk)")]
    OverlayExists { path: PathBuf },
    #[error("disk overlay map {path} is malformed: {reason}")]
    BadMap { path: PathBuf, reason: String },
    #[error("disk access of {len} bytes at offset {offset} is beyond the disk size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

/// Base image + copy-on-write overlay.
pub struct CowDisk {
    base_path: PathBuf,
    base: File,
    overlay_path: PathBuf,
    overlay: File,
    size: u64,
    allocated: Vec<u64>,
    map_dirty: bool,
}

impl std::fmt::Debug for CowDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowDisk")
            .field("base", &self.base_path)
            .field("overlay", &self.overlay_path)
            .field("size", &self.size)
            .finish()
    }
}

fn map_path_of(overlay: &Path) -> PathBuf {
    let mut s = overlay.as_os_str().to_owned();
    s.push(".map");
    PathBuf::from(s)
}

fn open_base(base: &Path) -> Result<(File, u64), DiskError> {
    let err = |error| DiskError::Base {
        path: base.to_path_buf(),
        error,
    };
    let file = File::open(base).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(DiskError::BaseNotFile {
            path: base.to_path_buf(),
        });
    }
    Ok((file, meta.len()))
}

fn blocks_for(size: u64) -> u64 {
    size.div_ceil(COW_BLOCK_SIZE)
}

impl CowDisk {
    /// A fresh overlay over `base` (nothing written yet). `overlay` must not exist.
    pub fn create(base: &Path, overlay: &Path) -> Result<CowDisk, DiskError> {
        let (base_file, size) = open_base(base)?;
        let map_path = map_path_of(overlay);
        if overlay.exists() || map_path.exists() {
            return Err(DiskError::OverlayExists {
                path: overlay.to_path_buf(),
            });
        }
        let overlay_err = |error| DiskError::Overlay {
            path: overlay.to_path_buf(),
            error,
        };
        let overlay_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(overlay)
            .map_err(overlay_err)?;
        let words = blocks_for(size).div_ceil(64) as usize;
        let mut disk = CowDisk {
            base_path: base.to_path_buf(),
            base: base_file,
            overlay_path: overlay.to_path_buf(),
            overlay: overlay_file,
            size,
            allocated: vec![0; words],
            map_dirty: true,
        };
        let setup = disk
            .overlay
            .set_len(blocks_for(size) * COW_BLOCK_SIZE)
            .map_err(overlay_err)
            .and_then(|_| disk.write_map());
        if let Err(e) = setup {
            // Leave no half-made overlay behind (and keep Drop from writing a map again).
            disk.map_dirty = false;
            let _ = std::fs::remove_file(overlay);
            let _ = std::fs::remove_file(&map_path);
            return Err(e);
        }
        Ok(disk)
    }

    /// Reopens an overlay created by [`CowDisk::create`] (or [`CowDisk::fork_to`]).
    pub fn open(base: &Path, overlay: &Path) -> Result<CowDisk, DiskError> {
        let (base_file, size) = open_base(base)?;
        let overlay_err = |error| DiskError::Overlay {
            path: overlay.to_path_buf(),
            error,
        };
        let overlay_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(overlay)
            .map_err(overlay_err)?;
        let map_path = map_path_of(overlay);
        let raw = std::fs::read(&map_path).map_err(|error| DiskError::Overlay {
            path: map_path.clone(),
            error,
        })?;
        let bad = |reason: String| DiskError::BadMap {
            path: map_path.clone(),
            reason,
        };
        if raw.len() < MAP_HEADER_LEN || &raw[..8] != MAP_MAGIC {
            return Err(bad("missing FKDCOW01 header".into()));
        }
        let map_size = u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default());
        let block_size = u64::from_le_bytes(raw[16..24].try_into().unwrap_or_default());
        if map_size != size || block_size != COW_BLOCK_SIZE {
            return Err(bad(format!(
                "made for a {map_size}-byte disk with {block_size}-byte blocks, base is {size} bytes"
            )));
        }
        let words = blocks_for(size).div_ceil(64) as usize;
        let body = &raw[MAP_HEADER_LEN..];
        if body.len() != words * 8 {
            return Err(bad(format!(
                "bitmap is {} bytes, expected {}",
                body.len(),
                words * 8
            )));
        }
        let allocated = body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        Ok(CowDisk {
            base_path: base.to_path_buf(),
            base: base_file,
            overlay_path: overlay.to_path_buf(),
            overlay: overlay_file,
            size,
            allocated,
            map_dirty: false,
        })
    }

    /// Disk size in bytes (the base image's size).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn base_path(&self) -> &Path {
        &self.base_path
    }

    pub fn overlay_path(&self) -> &Path {
        &self.overlay_path
    }

    pub fn map_path(&self) -> PathBuf {
        map_path_of(&self.overlay_path)
    }

    /// Number of 4 KiB blocks the guest has written.
    pub fn allocated_blocks(&self) -> u64 {
        self.allocated
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    fn is_allocated(&self, block: u64) -> bool {
        self.allocated[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn set_allocated(&mut self, block: u64) {
        self.allocated[(block / 64) as usize] |= 1 << (block % 64);
        self.map_dirty = true;
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), DiskError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                len: len as u64,
                size: self.size,
            }),
        }
    }

    fn overlay_io<T>(&self, r: std::io::Result<T>) -> Result<T, DiskError> {
        r.map_err(|error| DiskError::Overlay {
            path: self.overlay_path.clone(),
            error,
        })
    }

    /// Reads from the base; the base never shrinks under us in normal use, but a short read is
    /// filled with zeros rather than failing the guest.
    fn read_base(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let mut done = 0;
        while done < buf.len() {
            match self.base.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    return Err(DiskError::Base {
                        path: self.base_path.clone(),
                        error,
                    })
                }
            }
        }
        Ok(())
    }

    /// Splits `[offset, offset+len)` into pieces that each stay inside one block:
    /// (block index, offset in the request, length).
    fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
        let mut pos = 0usize;
        std::iter::from_fn(move || {
            if pos >= len {
                return None;
            }
            let abs = offset + pos as u64;
            let in_block = (abs % COW_BLOCK_SIZE) as usize;
            let n = (COW_BLOCK_SIZE as usize - in_block).min(len - pos);
            let item = (abs / COW_BLOCK_SIZE, pos, n);
            pos += n;
            Some(item)
        })
    }

    /// Reads the disk as the guest sees it.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check_range(offset, buf.len())?;
        for (block, at, n) in Self::pieces(offset, buf.len()) {
            let abs = offset + at as u64;
            let piece = &mut buf[at..at + n];
            if self.is_allocated(block) {
                self.overlay_io(self.overlay.read_exact_at(piece, abs))?;
            } else {
                self.read_base(abs, piece)?;
            }
        }
        Ok(())
    }

    /// Writes into the overlay; the base is never written.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_range(offset, data.len())?;
        let mut block_buf = vec![0u8; COW_BLOCK_SIZE as usize];
        for (block, at, n) in Self::pieces(offset, data.len()) {
            let abs = offset + at as u64;
            let piece = &data[at..at + n];
            if self.is_allocated(block) || n == COW_BLOCK_SIZE as usize {
                self.overlay_io(self.overlay.write_all_at(piece, abs))?;
            } else {
                // Copy the rest of the block from the base so the overlay block is complete.
                let block_start = block * COW_BLOCK_SIZE;
                let block_len = (self.size - block_start).min(COW_BLOCK_SIZE) as usize;
                let buf = &mut block_buf[..block_len];
                self.read_base(block_start, buf)?;
                let in_block = (abs - block_start) as usize;
                buf[in_block..in_block + n].copy_from_slice(piece);
                self.overlay_io(self.overlay.write_all_at(buf, block_start))?;
            }
            self.set_allocated(block);
        }
        Ok(())
    }

    /// Makes everything written so far durable: overlay data, then the map.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        self.overlay_io(self.overlay.sync_data())?;
        if self.map_dirty {
            self.write_map()?;
        }
        Ok(())
    }

    fn write_map(&mut self) -> Result<(), DiskError> {
        let map_path = self.map_path();
        let tmp_path = {
            let mut s = map_path.as_os_str().to_owned();
            s.push(".tmp");
            PathBuf::from(s)
        };
        let mut bytes = Vec::with_capacity(MAP_HEADER_LEN + self.allocated.len() * 8);
        bytes.extend_from_slice(MAP_MAGIC);
        bytes.extend_from_slice(&self.size.to_le_bytes());
        bytes.extend_from_slice(&COW_BLOCK_SIZE.to_le_bytes());
        for word in &self.allocated {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        let io = |error| DiskError::Overlay {
            path: map_path.clone(),
            error,
        };
        let mut tmp = File::create(&tmp_path).map_err(io)?;
        tmp.write_all(&bytes).map_err(io)?;
        tmp.sync_data().map_err(io)?;
        std::fs::rename(&tmp_path, &map_path).map_err(io)?;
        self.map_dirty = false;
        Ok(())
    }

    /// A new overlay at `new_overlay` with the same contents as this one, over the same base.
    /// Copies only the allocated blocks (the new file is sparse elsewhere).
    pub fn fork_to(&mut self, new_overlay: &Path) -> Result<CowDisk, DiskError> {
        self.flush()?;
        let mut child = CowDisk::create(&self.base_path, new_overlay)?;
        let result = self.copy_allocated_into(&mut child);
        if let Err(e) = result {
            drop(child);
            let _ = std::fs::remove_file(new_overlay);
            let _ = std::fs::remove_file(map_path_of(new_overlay));
            return Err(e);
        }
        Ok(child)
    }

    fn copy_allocated_into(&self, child: &mut CowDisk) -> Result<(), DiskError> {
        let mut buf = vec![0u8; COW_BLOCK_SIZE as usize];
        for block in 0..blocks_for(self.size) {
            if !self.is_allocated(block) {
                continue;
            }
            let start = block * COW_BLOCK_SIZE;
            let len = (self.size - start).min(COW_BLOCK_SIZE) as usize;
            self.overlay_io(self.overlay.read_exact_at(&mut buf[..len], start))?;
            child.overlay_io(child.overlay.write_all_at(&buf[..len], start))?;
            child.set_allocated(block);
        }
        child.flush()
    }

    /// Writes this overlay's blocks over an existing copy of the base at `dest` (so `dest`
    /// becomes the disk as the guest sees it; used with a sparse copy of the base).
    pub fn write_allocated_into(&self, dest: &Path) -> Result<(), DiskError> {
        let dest_err = |error| DiskError::Overlay {
            path: dest.to_path_buf(),
            error,
        };
        let out = OpenOptions::new()
            .write(true)
            .open(dest)
            .map_err(dest_err)?;
        let mut buf = vec![0u8; COW_BLOCK_SIZE as usize];
        for block in 0..blocks_for(self.size) {
            if !self.is_allocated(block) {
                continue;
            }
            let start = block * COW_BLOCK_SIZE;
            let len = (self.size - start).min(COW_BLOCK_SIZE) as usize;
            self.overlay_io(self.overlay.read_exact_at(&mut buf[..len], start))?;
            out.write_all_at(&buf[..len], start).map_err(dest_err)?;
        }
        out.sync_all().map_err(dest_err)
    }

    /// Writes the whole disk as the guest sees it into a new file `dest` (holes where the
    /// content is zero in neither layer are not preserved beyond what the copy preserves).
    pub fn export_to(&self, dest: &Path) -> Result<(), DiskError> {
        let dest_err = |error| DiskError::Overlay {
            path: dest.to_path_buf(),
            error,
        };
        std::fs::copy(&self.base_path, dest).map_err(dest_err)?;
        let out = OpenOptions::new()
            .write(true)
            .open(dest)
            .map_err(dest_err)?;
        let mut buf = vec![0u8; COW_BLOCK_SIZE as usize];
        for block in 0..blocks_for(self.size) {
            if !self.is_allocated(block) {
                continue;
            }
            let start = block * COW_BLOCK_SIZE;
            let len = (self.size - start).min(COW_BLOCK_SIZE) as usize;
            self.overlay_io(self.overlay.read_exact_at(&mut buf[..len], start))?;
            out.write_all_at(&buf[..len], start).map_err(dest_err)?;
        }
        out.sync_all().map_err(dest_err)
    }
}

impl Drop for CowDisk {
    /// A VM that stops without a final FLUSH still leaves a map matching its overlay data.
    fn drop(&mut self) {
        if self.map_dirty {
            if let Err(e) = self.write_map() {
                tracing::warn!("disk overlay map not saved: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_with_pattern(dir: &Path, len: usize) -> PathBuf {
        let path = dir.join("base.img");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    #[test]
    fn reads_base_until_written_and_never_writes_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_with_pattern(dir.path(), 3 * 4096 + 1024);
        let before = std::fs::read(&base).unwrap();
        let mut disk = CowDisk::create(&base, &dir.path().join("ov")).unwrap();
        assert_eq!(disk.size(), before.len() as u64);

        let mut buf = vec![0u8; before.len()];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, before);

        // A sub-block write in block 1, a cross-block write, and a write into the partial tail.
        disk.write_at(4096 + 100, &[0xaa; 10]).unwrap();
        disk.write_at(2 * 4096 - 3, &[0xbb; 6]).unwrap();
        disk.write_at(3 * 4096 + 1000, &[0xcc; 24]).unwrap();
        let mut expected = before.clone();
        expected[4196..4206].fill(0xaa);
        expected[2 * 4096 - 3..2 * 4096 + 3].fill(0xbb);
        expected[3 * 4096 + 1000..3 * 4096 + 1024].fill(0xcc);
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, expected);
        assert_eq!(disk.allocated_blocks(), 3);
        disk.flush().unwrap();
        assert_eq!(std::fs::read(&base).unwrap(), before, "base image changed");

        // Reopen from the persisted map.
        drop(disk);
        let disk = CowDisk::open(&base, &dir.path().join("ov")).unwrap();
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, expected);
    }

    #[test]
    fn writes_without_flush_survive_a_clean_drop() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_with_pattern(dir.path(), 16 * 1024);
        let overlay = dir.path().join("ov");
        let mut disk = CowDisk::create(&base, &overlay).unwrap();
        disk.write_at(4096, &[9; 100]).unwrap();
        drop(disk);
        let disk = CowDisk::open(&base, &overlay).unwrap();
        let mut buf = [0u8; 100];
        disk.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [9; 100]);
    }

    #[test]
    fn fork_and_export_see_the_same_disk() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_with_pattern(dir.path(), 64 * 1024);
        let mut parent = CowDisk::create(&base, &dir.path().join("parent")).unwrap();
        parent.write_at(8192, &[1; 4096]).unwrap();
        let mut child = parent.fork_to(&dir.path().join("child")).unwrap();
        child.write_at(0, &[2; 512]).unwrap();
        parent.write_at(0, &[3; 512]).unwrap();

        let mut a = vec![0u8; 512];
        child.read_at(0, &mut a).unwrap();
        assert_eq!(a, vec![2; 512]);
        parent.read_at(0, &mut a).unwrap();
        assert_eq!(a, vec![3; 512]);
        child.read_at(8192, &mut a).unwrap();
        assert_eq!(
            a,
            vec![1; 512],
            "child sees the parent's writes from before the fork"
        );

        parent.flush().unwrap();
        parent.export_to(&dir.path().join("export.img")).unwrap();
        let exported = std::fs::read(dir.path().join("export.img")).unwrap();
        let mut full = vec![0u8; 64 * 1024];
        parent.read_at(0, &mut full).unwrap();
        assert_eq!(exported, full);
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = CowDisk::create(&dir.path().join("nope"), &dir.path().join("ov"));
        assert!(matches!(missing, Err(DiskError::Base { .. })));
        assert!(!dir.path().join("ov").exists());
        let not_file = CowDisk::create(dir.path(), &dir.path().join("ov"));
        assert!(matches!(not_file, Err(DiskError::BaseNotFile { .. })));

        let base = base_with_pattern(dir.path(), 8192);
        let mut disk = CowDisk::create(&base, &dir.path().join("ov")).unwrap();
        let again = CowDisk::create(&base, &dir.path().join("ov"));
        assert!(matches!(again, Err(DiskError::OverlayExists { .. })));
        assert!(matches!(
            disk.write_at(8000, &[0; 500]),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read_at(u64::MAX - 2, &mut [0; 8]),
            Err(DiskError::OutOfRange { .. })
        ));
        disk.flush().unwrap();

        std::fs::write(dir.path().join("ov.map"), b"garbage").unwrap();
        let err = CowDisk::open(&base, &dir.path().join("ov")).unwrap_err();
        assert!(matches!(err, DiskError::BadMap { .. }), "{err}");
        let other_base = dir.path().join("other.img");
        std::fs::write(&other_base, vec![0u8; 4096]).unwrap();
        let mut d2 = CowDisk::create(&other_base, &dir.path().join("ov2")).unwrap();
        d2.flush().unwrap();
        let err = CowDisk::open(&base, &dir.path().join("ov2")).unwrap_err();
        assert!(err.to_string().contains("base is 8192 bytes"), "{err}");
    }
}
