//! `memory.bin`: guest RAM as a sparse file, and copy-on-write mappings of it for children.
//!
//! The file holds the guest's regions back to back (a region table in vmstate.json says where
//! each one lives). Zero pages are holes. Children map it MAP_PRIVATE | MAP_NORESERVE: they
//! share the page cache until they write, and never write into the file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestRegionMmap, MmapRegion};

use crate::memory::{GuestAddress, GuestMemory, GuestMemoryRegion, PAGE_SIZE};

/// Where one guest RAM region lives in memory.bin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSpec {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// A run of pages, as a byte range of memory.bin (page aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("memory.bin is {actual} bytes but guest RAM needs {needed}: refusing to map it (a short file would crash the VM on first access)")]
    TooShort { actual: u64, needed: u64 },
    #[error("memory region table is invalid: {0}")]
    BadLayout(String),
    #[error("mapping memory.bin")]
    Map(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("memory.bin")]
    Io(#[from] io::Error),
}

/// Counts of what a write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub pages_written: u64,
    pub zero_pages_skipped: u64,
}

/// The region table for `mem`, regions packed back to back in file order.
pub fn layout_of(mem: &GuestMemory) -> Vec<RegionSpec> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let spec = RegionSpec {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            spec
        })
        .collect()
}

/// Bytes of guest RAM the layout describes (= memory.bin's logical size).
pub fn total_size(layout: &[RegionSpec]) -> u64 {
    layout.iter().map(|r| r.size).sum()
}

/// Checks that regions are page aligned, packed in order, and do not overlap in guest space.
pub fn validate_layout(layout: &[RegionSpec]) -> Result<(), MemoryFileError> {
    let bad = |m: String| Err(MemoryFileError::BadLayout(m));
    let page = PAGE_SIZE as u64;
    let mut expected_offset = 0;
    let mut guest_end = 0;
    if layout.is_empty() {
        return bad("no regions".into());
    }
    for (i, r) in layout.iter().enumerate() {
        if r.size == 0 || r.size % page != 0 || r.guest_addr % page != 0 {
            return bad(format!("region {i} is empty or not page aligned"));
        }
        if r.file_offset != expected_offset {
            return bad(format!(
                "region {i} starts at file offset {} instead of {expected_offset}",
                r.file_offset
            ));
        }
        if i > 0 && r.guest_addr < guest_end {
            return bad(format!("region {i} overlaps the previous one"));
        }
        guest_end = r
            .guest_addr
            .checked_add(r.size)
            .ok_or(MemoryFileError::BadLayout(format!("region {i} wraps")))?;
        expected_offset += r.size;
    }
    Ok(())
}

/// Host view of each region as a byte slice, paired with its spec.
///
/// # Safety
///
/// Nothing may write the guest's memory while the slices are alive: every vCPU must be paused
/// and every device quiesced, or a `&[u8]` would observe concurrent writes.
unsafe fn region_slices<'a>(
    mem: &'a GuestMemory,
    layout: &[RegionSpec],
) -> Vec<(RegionSpec, &'a [u8])> {
    mem.iter()
        .zip(layout)
        .map(|(r, spec)| {
            // SAFETY: `as_ptr()..+len()` is exactly one region's live host mapping, readable
            // and initialised (mmap'd memory always is), and `mem` (which owns it) is borrowed
            // for 'a, so the mapping outlives the slice. The caller guarantees that nothing
            // writes it meanwhile.
            let bytes =
                unsafe { std::slice::from_raw_parts(r.as_ptr().cast_const(), r.len() as usize) };
            (*spec, bytes)
        })
        .collect()
}

/// Writes every non-zero page of `mem` into `out` (which must be empty); zero pages stay holes.
pub fn write_full(mem: &GuestMemory, out: &File) -> Result<WriteStats, MemoryFileError> {
    let layout = layout_of(mem);
    out.set_len(total_size(&layout))?;
    let mut stats = WriteStats::default();
    // SAFETY: nothing writes `mem` while the slices live: its callers hand it the memory of a
    // machine whose vCPUs are all paused and devices quiesced (snapshot save), or of a loaded
    // snapshot that no vCPU runs at all (compact).
    for (spec, bytes) in unsafe { region_slices(mem, &layout) } {
        write_nonzero_runs(bytes, spec.file_offset, out, &mut stats)?;
    }
    Ok(stats)
}

/// Copies the pages in `extents` out of `mem`, back to back, so a diff snapshot can be written
/// to its file after the guest has resumed (a memcpy is far shorter than a file write).
pub fn copy_extents(mem: &GuestMemory, extents: &[Extent]) -> Result<Vec<u8>, MemoryFileError> {
    let layout = layout_of(mem);
    let total: u64 = extents.iter().map(|e| e.len).sum();
    let mut out = Vec::with_capacity(total as usize);
    // SAFETY: nothing writes `mem` while the slices live: a diff snapshot copies the dirtied
    // pages while every vCPU is paused and devices are quiesced (that is the point of the copy:
    // the guest resumes before the file is written).
    let slices = unsafe { region_slices(mem, &layout) };
    for e in extents {
        let (spec, bytes) = slices
            .iter()
            .find(|(s, _)| e.offset >= s.file_offset && e.offset + e.len <= s.file_offset + s.size)
            .ok_or_else(|| {
                MemoryFileError::BadLayout(format!("extent at {} crosses a region", e.offset))
            })?;
        let start = (e.offset - spec.file_offset) as usize;
        out.extend_from_slice(&bytes[start..start + e.len as usize]);
    }
    Ok(out)
}

/// Writes pages copied by [`copy_extents`] into `out`, a memory file of `total_size` bytes.
pub fn write_copied(
    out: &File,
    total_size: u64,
    extents: &[Extent],
    bytes: &[u8],
) -> Result<WriteStats, MemoryFileError> {
    out.set_len(total_size)?;
    let mut stats = WriteStats::default();
    let mut pos = 0usize;
    for e in extents {
        let len = e.len as usize;
        let chunk = bytes.get(pos..pos + len).ok_or_else(|| {
            MemoryFileError::BadLayout("copied pages are shorter than their extents".into())
        })?;
        out.write_all_at(chunk, e.offset)?;
        pos += len;
        stats.pages_written += e.len / PAGE_SIZE as u64;
    }
    Ok(stats)
}

/// Writes exactly the pages in `extents` (file offsets), zero or not: a diff snapshot must
/// record a page that became zero, or the parent's content would show through.
pub fn write_extents(
    mem: &GuestMemory,
    extents: &[Extent],
    out: &File,
) -> Result<WriteStats, MemoryFileError> {
    let layout = layout_of(mem);
    out.set_len(total_size(&layout))?;
    let mut stats = WriteStats::default();
    // SAFETY: nothing writes `mem` while the slices live: like `write_full`, this is only
    // handed the memory of a paused machine or of one that is not running (the tests).
    let slices = unsafe { region_slices(mem, &layout) };
    for e in extents {
        let (spec, bytes) = slices
            .iter()
            .find(|(s, _)| e.offset >= s.file_offset && e.offset + e.len <= s.file_offset + s.size)
            .ok_or_else(|| {
                MemoryFileError::BadLayout(format!("extent at {} crosses a region", e.offset))
            })?;
        let start = (e.offset - spec.file_offset) as usize;
        out.write_all_at(&bytes[start..start + e.len as usize], e.offset)?;
        stats.pages_written += e.len / PAGE_SIZE as u64;
    }
    Ok(stats)
}

fn write_nonzero_runs(
    bytes: &[u8],
    base: u64,
    out: &File,
    stats: &mut WriteStats,
) -> io::Result<()> {
    let mut run_start: Option<usize> = None;
    for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
        let zero = is_zero(page);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                flush_run(bytes, s, i, base, out)?;
                run_start = None;
            }
            _ => {}
        }
        if zero {
            stats.zero_pages_skipped += 1;
        } else {
            stats.pages_written += 1;
        }
    }
    if let Some(s) = run_start {
        flush_run(bytes, s, bytes.len().div_ceil(PAGE_SIZE), base, out)?;
    }
    Ok(())
}

fn flush_run(
    bytes: &[u8],
    first_page: usize,
    end_page: usize,
    base: u64,
    out: &File,
) -> io::Result<()> {
    let start = first_page * PAGE_SIZE;
    let end = (end_page * PAGE_SIZE).min(bytes.len());
    out.write_all_at(&bytes[start..end], base + start as u64)
}

fn is_zero(page: &[u8]) -> bool {
    // 16-byte wide compares: as fast as `align_to::<u128>` (x86-64 loads unaligned words at
    // no cost), without the unsafe. A page leaves no remainder; the check is for generality.
    let mut words = page.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap()) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Maps `file` copy-on-write as guest memory laid out as `layout`.
///
/// MAP_PRIVATE: the child's writes go to its own anonymous pages, never into the file.
/// MAP_NORESERVE: a child is charged only for the pages it actually dirties.
pub fn map_private(file: &File, layout: &[RegionSpec]) -> Result<GuestMemory, MemoryFileError> {
    validate_layout(layout)?;
    let needed = total_size(layout);
    let actual = file.metadata()?.len();
    if actual < needed {
        return Err(MemoryFileError::TooShort { actual, needed });
    }
    let mut regions = Vec::with_capacity(layout.len());
    for spec in layout {
        let fd = file.try_clone()?;
        let mapping: MmapRegion<AtomicBitmap> = MmapRegionBuilder::new_with_bitmap(
            spec.size as usize,
            AtomicBitmap::new(
                spec.size as usize,
                std::num::NonZeroUsize::new(PAGE_SIZE).unwrap(),
            ),
        )
        .with_file_offset(FileOffset::new(fd, spec.file_offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| MemoryFileError::Map(e.into()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(spec.guest_addr))
            .ok_or_else(|| MemoryFileError::BadLayout("region wraps the address space".into()))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryFileError::BadLayout(e.to_string()))
}

/// Replaces the pages in `extents` of an existing private mapping with the same pages of
/// `file` (a diff link), still copy-on-write. Used to assemble a chain: map the root, then
/// overlay each link's dirtied pages in order.
pub fn overlay_private(
    mem: &GuestMemory,
    file: &File,
    extents: &[Extent],
) -> Result<(), MemoryFileError> {
    let layout = layout_of(mem);
    let needed = total_size(&layout);
    let actual = file.metadata()?.len();
    if actual < needed {
        return Err(MemoryFileError::TooShort { actual, needed });
    }
    for e in extents {
        let (region, spec) = mem
            .iter()
            .zip(&layout)
            .find(|(_, s)| e.offset >= s.file_offset && e.offset + e.len <= s.file_offset + s.size)
            .ok_or_else(|| {
                MemoryFileError::BadLayout(format!("extent at {} crosses a region", e.offset))
            })?;
        if e.offset % PAGE_SIZE as u64 != 0 || e.len % PAGE_SIZE as u64 != 0 {
            return Err(MemoryFileError::BadLayout(format!(
                "extent at {} is not page aligned",
                e.offset
            )));
        }
        // Only an address for mmap below, never dereferenced here: no need for `add`.
        let addr = region
            .as_ptr()
            .wrapping_add((e.offset - spec.file_offset) as usize);
        // SAFETY: the extent lies inside this region (checked above), so MAP_FIXED replaces
        // pages of a mapping this GuestMemory owns and nothing else; with the same protection
        // and private semantics the region stays a valid mapping of its size. No reference to
        // those pages is live: the VM has not run yet and nothing else reads them meanwhile.
        let r = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                e.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED,
                file.as_raw_fd(),
                e.offset as libc::off_t,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(MemoryFileError::Map(io::Error::last_os_error().into()));
        }
    }
    Ok(())
}

/// Sorted page runs covering `pages` (file offsets of single pages, any order).
pub fn extents_from_pages(mut pages: Vec<u64>) -> Vec<Extent> {
    pages.sort_unstable();
    pages.dedup();
    let mut out: Vec<Extent> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some(last) if last.offset + last.len == p => last.len += PAGE_SIZE as u64,
            _ => out.push(Extent {
                offset: p,
                len: PAGE_SIZE as u64,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    fn guest(mib: usize) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    fn two_region_guest() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20), (GuestAddress(1 << 32), 2 << 20)])
            .unwrap()
    }

    #[test]
    fn full_write_is_sparse_and_round_trips_through_a_private_map() {
        let mem = two_region_guest();
        mem.write_slice(b"low", GuestAddress(0x1234)).unwrap();
        mem.write_slice(b"high", GuestAddress((1 << 32) + 0x10_0000))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let file = File::create(&path).unwrap();
        let stats = write_full(&mem, &file).unwrap();
        assert_eq!(stats.pages_written, 2);
        assert_eq!(stats.zero_pages_skipped, 1024 - 2);
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 <= 64 << 10);

        let file = File::open(&path).unwrap();
        let child = map_private(&file, &layout_of(&mem)).unwrap();
        let mut buf = [0u8; 4];
        child
            .read_slice(&mut buf, GuestAddress((1 << 32) + 0x10_0000))
            .unwrap();
        assert_eq!(&buf, b"high");
        // A child's write stays in the child.
        child.write_slice(b"CHILD", GuestAddress(0x1234)).unwrap();
        let sibling = map_private(&file, &layout_of(&mem)).unwrap();
        let mut buf = [0u8; 3];
        sibling.read_slice(&mut buf, GuestAddress(0x1234)).unwrap();
        assert_eq!(&buf, b"low");
        let mut on_disk = [0u8; 3];
        file.read_exact_at(&mut on_disk, 0x1234).unwrap();
        assert_eq!(&on_disk, b"low");
    }

    #[test]
    fn short_file_is_refused_before_mapping() {
        let mem = guest(4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let file = File::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        let err = map_private(&File::open(&path).unwrap(), &layout_of(&mem))
            .unwrap_err()
            .to_string();
        assert!(err.contains("1048576") && err.contains("4194304"), "{err}");
    }

    #[test]
    fn bad_layouts_are_refused() {
        let ok = RegionSpec {
            guest_addr: 0,
            size: 4096,
            file_offset: 0,
        };
        assert!(validate_layout(&[ok]).is_ok());
        assert!(validate_layout(&[]).is_err());
        assert!(validate_layout(&[RegionSpec { size: 100, ..ok }]).is_err());
        assert!(validate_layout(&[RegionSpec {
            file_offset: 4096,
            ..ok
        }])
        .is_err());
        let second = RegionSpec {
            guest_addr: 0,
            size: 4096,
            file_offset: 4096,
        };
        assert!(
            validate_layout(&[ok, second]).is_err(),
            "overlap in guest space"
        );
        let wrap = RegionSpec {
            guest_addr: u64::MAX - 4095,
            size: 8192,
            file_offset: 0,
        };
        assert!(validate_layout(&[wrap]).is_err());
    }

    #[test]
    fn diff_extents_overlay_the_parent_including_pages_that_became_zero() {
        let dir = tempfile::tempdir().unwrap();
        let parent_mem = guest(2);
        parent_mem
            .write_slice(&[0xaa; 4096], GuestAddress(0))
            .unwrap();
        parent_mem
            .write_slice(&[0xbb; 4096], GuestAddress(0x3000))
            .unwrap();
        let parent_path = dir.path().join("parent.bin");
        write_full(&parent_mem, &File::create(&parent_path).unwrap()).unwrap();

        // The child zeroes page 0 and writes page 5.
        let parent_file = File::open(&parent_path).unwrap();
        let child = map_private(&parent_file, &layout_of(&parent_mem)).unwrap();
        child.write_slice(&[0u8; 4096], GuestAddress(0)).unwrap();
        child
            .write_slice(&[0xcc; 4096], GuestAddress(0x5000))
            .unwrap();
        let extents = extents_from_pages(vec![0x5000, 0]);
        assert_eq!(extents.len(), 2);
        let diff_path = dir.path().join("diff.bin");
        let stats = write_extents(&child, &extents, &File::create(&diff_path).unwrap()).unwrap();
        assert_eq!(stats.pages_written, 2);

        let assembled = map_private(&parent_file, &layout_of(&parent_mem)).unwrap();
        overlay_private(&assembled, &File::open(&diff_path).unwrap(), &extents).unwrap();
        let read = |addr: u64| {
            let mut b = [0u8; 1];
            assembled.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b[0]
        };
        assert_eq!(
            read(0),
            0,
            "a page zeroed in the diff must not show the parent's data"
        );
        assert_eq!(read(0x3000), 0xbb, "untouched pages come from the parent");
        assert_eq!(read(0x5000), 0xcc);
    }

    #[test]
    fn extents_merge_adjacent_pages() {
        let e = extents_from_pages(vec![8192, 0, 4096, 4096, 20480]);
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 0,
                    len: 12288
                },
                Extent {
                    offset: 20480,
                    len: 4096
                }
            ]
        );
    }
}
