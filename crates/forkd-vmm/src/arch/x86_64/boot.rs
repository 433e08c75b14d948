//! Kernel loading (ELF vmlinux or bzImage via linux-loader) and the Linux zero page
//! (`boot_params`) with its e820 map and command line.

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, load_cmdline, KernelLoader};

use super::layout::{
    ram_ranges, CMDLINE_ADDR, CMDLINE_MAX_SIZE, E820_RESERVED_END, EBDA_START,
    FIRST_ADDR_PAST_32BITS, HIMEM_START, MMIO_HOLE_START, ZERO_PAGE_ADDR,
};
use crate::memory::{Bytes, GuestAddress, GuestMemory};
use vm_memory::GuestMemoryBackend;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
/// boot_params.hdr constants from the boot protocol.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
pub const HDRS_MAGIC: u32 = 0x5372_6448;
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// setup_header.xloadflags: the kernel has the 64-bit entry point at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1;
/// Oldest boot protocol whose 64-bit entry we rely on.
pub const MIN_BZIMAGE_PROTOCOL: u16 = 0x020c;
/// Offset of the 64-bit entry point inside a bzImage's protected-mode kernel.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;

/// What is wrong with a kernel image or the command line.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel image is empty")]
    Empty,
    #[error("kernel image is neither an ELF vmlinux nor a bzImage (no ELF magic, no HdrS header)")]
    UnknownFormat,
    #[error("kernel ELF is not a 64-bit x86_64 executable (class {class}, machine {machine})")]
    NotX86_64Elf { class: u8, machine: u16 },
    #[error("kernel ELF is malformed or truncated: {0}")]
    Elf(String),
    #[error("bzImage is malformed or truncated: {0}")]
    BzImage(String),
    #[error(
        "bzImage boot protocol {version:#06x} is older than 2.12 or lacks the 64-bit entry point"
    )]
    BzImageTooOld { version: u16 },
    #[error("kernel does not fit in guest memory: {0}")]
    DoesNotFit(String),
    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),
    #[error("writing the zero page: {0}")]
    ZeroPage(vm_memory::GuestMemoryError),
}

/// Which loader took the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Where a loaded kernel is entered and what it told us about itself.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: u64,
    pub end: u64,
    /// The bzImage's setup header (copied into the zero page), None for ELF.
    pub setup_header: Option<setup_header>,
}

fn check_elf_header(image: &[u8]) -> Result<(), KernelError> {
    if image.len() < 64 {
        return Err(KernelError::Elf(format!(
            "{} bytes is shorter than the 64-byte ELF header",
            image.len()
        )));
    }
    let class = image[4];
    let machine = u16::from_le_bytes([image[18], image[19]]);
    if class != ELFCLASS64 || machine != EM_X86_64 {
        return Err(KernelError::NotX86_64Elf { class, machine });
    }
    Ok(())
}

fn is_bzimage(image: &[u8]) -> bool {
    image.len() >= 0x206 && image[0x202..0x206] == HDRS_MAGIC.to_le_bytes()
}

fn describe_loader_error(e: linux_loader::loader::Error) -> String {
    match e {
        linux_loader::loader::Error::Elf(inner) => inner.to_string(),
        linux_loader::loader::Error::Bzimage(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

/// Loads `image` (ELF vmlinux or bzImage) into guest memory at or above 1 MiB.
pub fn load_kernel(mem: &GuestMemory, image: &[u8]) -> Result<LoadedKernel, KernelError> {
    if image.is_empty() {
        return Err(KernelError::Empty);
    }
    let highmem = Some(GuestAddress(HIMEM_START));
    if image.starts_with(ELF_MAGIC) {
        check_elf_header(image)?;
        let result =
            Elf::load(mem, None, &mut Cursor::new(image), highmem).map_err(|e| match e {
                linux_loader::loader::Error::Elf(
                    linux_loader::loader::elf::Error::InvalidProgramHeaderAddress,
                ) => KernelError::DoesNotFit("a segment loads below 1 MiB".into()),
                linux_loader::loader::Error::Elf(
                    linux_loader::loader::elf::Error::ReadKernelImage,
                ) if segments_fit_in_file(image) => {
                    KernelError::DoesNotFit("a segment lies outside guest RAM".into())
                }
                other => KernelError::Elf(describe_loader_error(other)),
            })?;
        let entry = u64::from_le_bytes(image[24..32].try_into().expect("8 bytes"));
        if !mem.address_in_range(GuestAddress(entry)) {
            return Err(KernelError::Elf(format!(
                "entry point {entry:#x} is outside guest RAM"
            )));
        }
        return Ok(LoadedKernel {
            format: KernelFormat::Elf,
            entry,
            end: result.kernel_end,
            setup_header: None,
        });
    }
    if is_bzimage(image) {
        let result = BzImage::load(mem, None, &mut Cursor::new(image), highmem)
            .map_err(|e| KernelError::BzImage(describe_loader_error(e)))?;
        let hdr = result
            .setup_header
            .ok_or_else(|| KernelError::BzImage("no setup header".into()))?;
        if hdr.version < MIN_BZIMAGE_PROTOCOL || hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(KernelError::BzImageTooOld {
                version: hdr.version,
            });
        }
        return Ok(LoadedKernel {
            format: KernelFormat::BzImage,
            entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            end: result.kernel_end,
            setup_header: Some(hdr),
        });
    }
    Err(KernelError::UnknownFormat)
}

/// True when every PT_LOAD segment's file bytes are inside `image` (so a read failure means
/// the destination, guest RAM, was the problem rather than a truncated file).
fn segments_fit_in_file(image: &[u8]) -> bool {
    let phoff = u64::from_le_bytes(image[32..40].try_into().expect("8 bytes")) as usize;
    let phentsize = u16::from_le_bytes([image[54], image[55]]) as usize;
    let phnum = u16::from_le_bytes([image[56], image[57]]) as usize;
    (0..phnum).all(|i| {
        let off = phoff + i * phentsize;
        let Some(ph) = image.get(off..off + 56) else {
            return false;
        };
        let p_type = u32::from_le_bytes(ph[0..4].try_into().expect("4 bytes"));
        let p_offset = u64::from_le_bytes(ph[8..16].try_into().expect("8 bytes"));
        let p_filesz = u64::from_le_bytes(ph[32..40].try_into().expect("8 bytes"));
        p_type != 1 || p_offset.saturating_add(p_filesz) <= image.len() as u64
    })
}

/// Validates and writes the command line at [`CMDLINE_ADDR`]; returns its length in bytes.
pub fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<usize, KernelError> {
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| KernelError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| KernelError::Cmdline(e.to_string()))?;
    Ok(cmdline.len())
}

/// The e820 map for `mem_size` bytes of RAM: low RAM up to the EBDA, the EBDA/MP/ACPI/RSDP
/// area up to 1 MiB reserved, RAM from 1 MiB to the hole, and the rest above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, end: u64, kind: u32| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: kind,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, E820_RESERVED_END, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        let end = start + size;
        if start >= FIRST_ADDR_PAST_32BITS {
            map.push(entry(start, end, E820_RAM));
        } else if end > HIMEM_START {
            map.push(entry(HIMEM_START, end, E820_RAM));
        }
    }
    map
}

/// Highest initrd address the boot protocol allows when the kernel does not say (protocol
/// versions before 2.03, and ELF kernels, which have no setup header).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Initrds are placed on a page boundary.
const INITRD_ALIGN: u64 = 4096;

/// Where an initrd was placed in guest memory (boot_params `ramdisk_image` / `ramdisk_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRegion {
    pub addr: u64,
    pub size: u64,
}

/// Why an initrd cannot be placed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum InitrdError {
    #[error("is empty")]
    Empty,
    #[error("is {size} bytes but only {room} bytes of guest RAM are free between the kernel (ends at {kernel_end:#x}) and {ceiling:#x}; give the VM more memory")]
    TooBig {
        size: u64,
        room: u64,
        kernel_end: u64,
        ceiling: u64,
    },
}

impl LoadedKernel {
    /// First address past everything the kernel occupies at boot: the loaded image and, for a
    /// bzImage, the `init_size` bytes it decompresses into from its load address.
    pub fn footprint_end(&self) -> u64 {
        match (self.format, self.setup_header) {
            (KernelFormat::BzImage, Some(hdr)) => {
                let load = self.entry - BZIMAGE_64BIT_ENTRY_OFFSET;
                self.end.max(load + u64::from(hdr.init_size))
            }
            _ => self.end,
        }
    }

    /// The highest address an initrd byte may occupy (the kernel's `initrd_addr_max`).
    pub fn initrd_addr_max(&self) -> u64 {
        match self.setup_header {
            Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max),
            _ => DEFAULT_INITRD_ADDR_MAX,
        }
    }
}

/// Places an initrd of `size` bytes as high as possible, page-aligned, below the kernel's
/// `initrd_addr_max`, the 32-bit hole and the end of RAM, and above the kernel (the boot
/// protocol's advice: the kernel decompresses upward, the initrd stays out of its way).
pub fn place_initrd(
    mem_size: u64,
    kernel_end: u64,
    initrd_addr_max: u64,
    size: u64,
) -> Result<InitrdRegion, InitrdError> {
    if size == 0 {
        return Err(InitrdError::Empty);
    }
    let ceiling = (initrd_addr_max + 1).min(mem_size).min(MMIO_HOLE_START);
    let floor = kernel_end.max(HIMEM_START).next_multiple_of(INITRD_ALIGN);
    let room = ceiling.saturating_sub(floor);
    let too_big = InitrdError::TooBig {
        size,
        room,
        kernel_end,
        ceiling,
    };
    let addr = ceiling
        .checked_sub(size)
        .map(|a| a / INITRD_ALIGN * INITRD_ALIGN)
        .ok_or(too_big.clone())?;
    if addr < floor {
        return Err(too_big);
    }
    Ok(InitrdRegion { addr, size })
}

/// Points the zero page at an initrd already in guest memory (below 4 GiB by construction).
pub fn set_initrd(params: &mut boot_params, initrd: InitrdRegion) {
    params.hdr.ramdisk_image = initrd.addr as u32;
    params.hdr.ramdisk_size = initrd.size as u32;
}

/// The zero page for a kernel, following the 64-bit boot protocol.
pub fn build_boot_params(
    mem_size: u64,
    cmdline_len: usize,
    setup_header: Option<setup_header>,
    rsdp_addr: Option<u64>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some(rsdp) = rsdp_addr {
        params.acpi_rsdp_addr = rsdp;
    }
    let map = e820_map(mem_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    params
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`].
pub fn write_boot_params(mem: &GuestMemory, params: &boot_params) -> Result<(), KernelError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(KernelError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use vm_memory::ByteValued;

    #[test]
    fn zero_page_offsets_match_the_boot_protocol() {
        // Documentation/arch/x86/zero-page.rst and boot.rst.
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
        assert_eq!(offset_of!(boot_params, acpi_rsdp_addr), 0x070);
        assert_eq!(offset_of!(boot_params, e820_entries), 0x1e8);
        assert_eq!(offset_of!(boot_params, hdr), 0x1f1);
        assert_eq!(offset_of!(boot_params, e820_table), 0x2d0);
        let p = build_boot_params(256 << 20, 10, None, Some(0xe0000));
        let bytes = p.as_slice();
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(u16_at(0x1fe), 0xaa55, "boot_flag");
        assert_eq!(u32_at(0x202), 0x5372_6448, "HdrS");
        assert_eq!(bytes[0x210], 0xff, "type_of_loader");
        assert_eq!(u32_at(0x228), CMDLINE_ADDR as u32, "cmd_line_ptr");
        assert_eq!(u32_at(0x238), 10, "cmdline_size");
        assert_eq!(u32_at(0x070), 0xe0000, "acpi_rsdp_addr");
        assert_eq!(bytes[0x1e8], 3, "e820 entries");
        // First e820 entry at 0x2d0: addr 0, size EBDA_START, type RAM; entries are 20 bytes.
        let e0_size = u64::from_le_bytes(bytes[0x2d8..0x2e0].try_into().unwrap());
        assert_eq!(e0_size, EBDA_START);
        assert_eq!(u32_at(0x2e0), E820_RAM);
        assert_eq!(u32_at(0x2d0 + 20 + 16), E820_RESERVED);
    }

    #[test]
    fn e820_reserves_the_ebda_and_starts_high_ram_at_1mib() {
        let m = e820_map(128 << 20);
        let got: Vec<(u64, u64, u32)> = m.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x10_0000 - 0x9fc00, E820_RESERVED),
                (0x10_0000, (128 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_ram_below_every_limit() {
        // 64 MiB of RAM, kernel's limit far above: the top of RAM wins.
        let r = place_initrd(64 << 20, 0x20_0000, 0x7fff_ffff, 10_000).unwrap();
        assert_eq!(r.size, 10_000);
        assert_eq!(r.addr % 4096, 0);
        assert!(r.addr + r.size <= 64 << 20 && r.addr + 4096 + r.size > 64 << 20);
        // initrd_addr_max below the top of RAM: the last byte is at or below it.
        let r = place_initrd(1 << 30, 0x20_0000, 0x37ff_ffff, 1 << 20).unwrap();
        assert_eq!(r.addr + r.size, 0x3800_0000);
        // A big guest: the 32-bit hole caps it.
        let r = place_initrd(8 << 30, 0x20_0000, 0xffff_ffff, 1 << 20).unwrap();
        assert_eq!(r.addr + r.size, MMIO_HOLE_START);
    }

    #[test]
    fn initrd_that_does_not_fit_or_is_empty_is_refused() {
        assert_eq!(
            place_initrd(64 << 20, 0x20_0000, 0x37ff_ffff, 0),
            Err(InitrdError::Empty)
        );
        let err = place_initrd(16 << 20, 0x40_0000, 0x37ff_ffff, 13 << 20).unwrap_err();
        assert_eq!(
            err,
            InitrdError::TooBig {
                size: 13 << 20,
                room: 12 << 20,
                kernel_end: 0x40_0000,
                ceiling: 16 << 20
            }
        );
        assert!(err.to_string().contains("give the VM more memory"), "{err}");
        assert!(place_initrd(16 << 20, 0x40_0000, 0x37ff_ffff, 12 << 20).is_ok());
        assert!(place_initrd(16 << 20, 0x40_0000, 0x37ff_ffff, u64::MAX).is_err());
    }

    #[test]
    fn a_bzimage_keeps_its_decompression_room_and_initrd_limit() {
        let hdr = setup_header {
            init_size: 0x80_0000,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        let bz = LoadedKernel {
            format: KernelFormat::BzImage,
            entry: 0x10_0200,
            end: 0x50_0000,
            setup_header: Some(hdr),
        };
        assert_eq!(bz.footprint_end(), 0x90_0000, "load address + init_size");
        assert_eq!(bz.initrd_addr_max(), 0x7fff_ffff);
        let elf = LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x10_0000,
            end: 0x20_0000,
            setup_header: None,
        };
        assert_eq!(elf.footprint_end(), 0x20_0000);
        assert_eq!(elf.initrd_addr_max(), DEFAULT_INITRD_ADDR_MAX);
    }

    #[test]
    fn initrd_fields_land_in_the_setup_header() {
        let mut p = build_boot_params(64 << 20, 0, None, None);
        set_initrd(
            &mut p,
            InitrdRegion {
                addr: 0x3f0_0000,
                size: 0x1234,
            },
        );
        let bytes = p.as_slice();
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        // Documentation/arch/x86/boot.rst: ramdisk_image at 0x218, ramdisk_size at 0x21c.
        assert_eq!(u32_at(0x218), 0x3f0_0000);
        assert_eq!(u32_at(0x21c), 0x1234);
    }

    #[test]
    fn e820_splits_around_the_mmio_hole() {
        let m = e820_map(5 << 30);
        let last = m.last().unwrap();
        assert_eq!((last.addr, last.size), (4 << 30, 2 << 30));
        let low = &m[2];
        assert_eq!((low.addr, low.addr + low.size), (0x10_0000, 3 << 30));
        for pair in m.windows(2) {
            assert!(
                pair[0].addr + pair[0].size <= pair[1].addr,
                "sorted, no overlap"
            );
        }
    }

    #[test]
    fn bzimage_setup_header_is_kept() {
        let hdr = setup_header {
            version: 0x020f,
            xloadflags: 1,
            setup_sects: 30,
            ..Default::default()
        };
        let p = build_boot_params(64 << 20, 0, Some(hdr), None);
        let (version, sects, loader) = (p.hdr.version, p.hdr.setup_sects, p.hdr.type_of_loader);
        assert_eq!((version, sects, loader), (0x020f, 30, 0xff));
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn rejects_images_that_are_not_kernels() {
        let m = mem();
        assert!(matches!(load_kernel(&m, b""), Err(KernelError::Empty)));
        assert!(matches!(
            load_kernel(&m, b"#!/bin/sh\necho hi\n"),
            Err(KernelError::UnknownFormat)
        ));
        assert!(matches!(
            load_kernel(&m, b"\x7fELF\x02"),
            Err(KernelError::Elf(_))
        ));
        let mut elf32 = vec![0u8; 64];
        elf32[..4].copy_from_slice(b"\x7fELF");
        elf32[4] = 1;
        elf32[18] = 3;
        assert!(matches!(
            load_kernel(&m, &elf32),
            Err(KernelError::NotX86_64Elf {
                class: 1,
                machine: 3
            })
        ));
    }

    fn bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 1024 + 4096];
        img[0x1f1] = 1; // setup_sects: setup is (1 + 1) * 512 bytes
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[1024..1028].copy_from_slice(b"KERN");
        img
    }

    #[test]
    fn bzimage_is_loaded_at_1mib_and_entered_at_the_64_bit_entry() {
        let m = mem();
        let k = load_kernel(&m, &bzimage(0x020f, XLF_KERNEL_64)).unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.entry, 0x10_0200);
        let mut magic = [0u8; 4];
        m.read_slice(&mut magic, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&magic, b"KERN", "protected-mode kernel copied to 1 MiB");
        let version = k.setup_header.unwrap().version;
        assert_eq!(version, 0x020f);
    }

    #[test]
    fn bzimage_without_64_bit_entry_is_refused() {
        let m = mem();
        assert!(matches!(
            load_kernel(&m, &bzimage(0x020f, 0)),
            Err(KernelError::BzImageTooOld { version: 0x020f })
        ));
        assert!(matches!(
            load_kernel(&m, &bzimage(0x020a, XLF_KERNEL_64)),
            Err(KernelError::BzImageTooOld { version: 0x020a })
        ));
    }

    #[test]
    fn rejects_truncated_bzimage() {
        let mut img = vec![0u8; 0x300];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // loadflags LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(matches!(
            load_kernel(&mem(), &img),
            Err(KernelError::BzImage(_))
        ));
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let m = mem();
        let n = write_cmdline(&m, "console=ttyS0 panic=1").unwrap();
        assert_eq!(n, 21);
        let mut buf = [0u8; 22];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 panic=1\0");
        assert!(matches!(
            write_cmdline(&m, &"x".repeat(CMDLINE_MAX_SIZE + 1)),
            Err(KernelError::Cmdline(_))
        ));
    }
}
