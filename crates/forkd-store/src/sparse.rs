//! Sparse-file primitives: find data extents, copy without inflating holes, measure disk usage.
//!
//! memory.bin and rootfs.ext4 are mostly zeros. Everything that touches them walks only the
//! data extents (SEEK_DATA / SEEK_HOLE) so a 1 GiB file with 1 MiB of data costs 1 MiB.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Byte ranges of `file` that hold data; everything else reads as zeros.
///
/// Filesystems without SEEK_DATA support report the whole file as one data extent, which is
/// correct (just not sparse-aware).
pub fn data_extents(file: &File) -> io::Result<Vec<Range<u64>>> {
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let start = match lseek(fd, pos, libc::SEEK_DATA) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break, // only a hole remains
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                extents.push(pos..len);
                break;
            }
            Err(e) => return Err(e),
        };
        let end = lseek(fd, start, libc::SEEK_HOLE)?.min(len);
        if end > start {
            extents.push(start..end);
        }
        pos = end;
    }
    Ok(extents)
}

fn lseek(fd: i32, offset: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: lseek(2) takes only integers and touches no memory of ours; a bad fd just makes
    // it fail with EBADF.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Bytes the file occupies on disk (allocated blocks), as opposed to its logical length.
pub fn disk_usage(path: &Path) -> io::Result<u64> {
    Ok(std::fs::symlink_metadata(path)?.blocks() * 512)
}

/// Tries a reflink (FICLONE): an instant, copy-on-write clone on btrfs / XFS.
pub fn reflink(src: &File, dst: &File) -> io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE's argument is an integer (the source fd), not a pointer, so the ioctl
    // reads or writes no memory of ours; both fds are open, borrowed from the Files.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Copies `src` to a new file `dst` keeping holes: reflink when the filesystem can, else only
/// the data extents via copy_file_range. `dst` must not exist.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<()> {
    let input = File::open(src)?;
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    let len = input.metadata()?.len();
    if reflink(&input, &output).is_ok() {
        return Ok(());
    }
    for extent in data_extents(&input)? {
        copy_range(&input, &output, extent)?;
    }
    output.set_len(len)?;
    Ok(())
}

fn copy_range(input: &File, output: &File, extent: Range<u64>) -> io::Result<()> {
    let mut off_in = extent.start as libc::loff_t;
    let mut off_out = extent.start as libc::loff_t;
    let mut left = extent.end - extent.start;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: copy_file_range(2) reads and updates the two offsets through the pointers,
        // exclusive borrows of the locals `off_in`/`off_out`, and copies between the fds
        // (open, borrowed from the Files) in the kernel: no buffer of ours is touched.
        let n = unsafe {
            libc::copy_file_range(
                input.as_raw_fd(),
                &mut off_in,
                output.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if matches!(
                err.raw_os_error(),
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP)
            ) {
                return copy_range_by_read(input, output, off_in as u64, left);
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank while copying",
            ));
        }
        left -= n as u64;
    }
    Ok(())
}

fn copy_range_by_read(input: &File, output: &File, mut off: u64, mut left: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        input.read_exact_at(&mut buf[..n], off)?;
        output.write_all_at(&buf[..n], off)?;
        off += n as u64;
        left -= n as u64;
    }
    Ok(())
}

/// Whether the filesystem holding `dir` keeps holes (probe file written and removed).
pub fn supports_sparse(dir: &Path) -> io::Result<bool> {
    let probe = tempfile_in(dir, "sparse-probe")?;
    let result = (|| {
        let f = std::fs::OpenOptions::new().write(true).open(&probe)?;
        f.set_len(16 << 20)?;
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1u8; 4096], (16 << 20) - 4096)?;
        f.sync_all()?;
        Ok(disk_usage(&probe)? < 1 << 20)
    })();
    let _ = std::fs::remove_file(&probe);
    result
}

/// Whether the filesystem holding `dir` supports reflinks (probe files written and removed).
pub fn supports_reflink(dir: &Path) -> io::Result<bool> {
    let a = tempfile_in(dir, "reflink-probe-a")?;
    let b = tempfile_in(dir, "reflink-probe-b")?;
    let result = (|| {
        std::fs::write(&a, [7u8; 4096])?;
        let src = File::open(&a)?;
        let dst = std::fs::OpenOptions::new().write(true).open(&b)?;
        Ok(reflink(&src, &dst).is_ok())
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    result
}

fn tempfile_in(dir: &Path, what: &str) -> io::Result<std::path::PathBuf> {
    let path = dir.join(format!(".{what}.{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn sparse_file(path: &Path, len: u64, data_at: &[u64]) {
        let f = File::create(path).unwrap();
        f.set_len(len).unwrap();
        for &off in data_at {
            f.write_all_at(&[0xab; 4096], off).unwrap();
        }
        f.sync_all().unwrap();
    }

    #[test]
    fn extents_cover_only_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        sparse_file(&p, 64 << 20, &[0, 32 << 20]);
        let ex = data_extents(&File::open(&p).unwrap()).unwrap();
        let total: u64 = ex.iter().map(|r| r.end - r.start).sum();
        assert!(total < 4 << 20, "extents {ex:?}");
        assert!(ex.iter().any(|r| r.contains(&(32 << 20))));
    }

    #[test]
    fn copy_keeps_holes_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        sparse_file(&a, 256 << 20, &[4096, 100 << 20]);
        copy_sparse(&a, &b).unwrap();
        assert_eq!(std::fs::metadata(&b).unwrap().len(), 256 << 20);
        assert!(disk_usage(&b).unwrap() <= 2 << 20);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }

    #[test]
    fn copy_refuses_existing_destination() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"x").unwrap();
        std::fs::write(&b, b"y").unwrap();
        assert!(copy_sparse(&a, &b).is_err());
        assert_eq!(std::fs::read(&b).unwrap(), b"y");
    }
}
