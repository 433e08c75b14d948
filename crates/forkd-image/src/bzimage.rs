//! The x86 bzImage setup header, as Documentation/arch/x86/boot.rst lays it out, and the check a
//! 64-bit loader applies before it enters the kernel at load address + 0x200.

/// "HdrS", little-endian, at offset 0x202.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// 0xAA55 at offset 0x1fe.
pub const BOOT_FLAG: u16 = 0xaa55;
/// Boot protocol 2.12 introduced xloadflags and the 64-bit entry point contract we rely on.
pub const MIN_PROTOCOL: u16 = 0x020c;
/// xloadflags bit 0: the kernel has the legacy 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// loadflags bit 0: protected-mode code loads at 0x100000 (a "big" kernel).
pub const LOADED_HIGH: u8 = 1 << 0;

const OFF_SETUP_SECTS: usize = 0x1f1;
const OFF_BOOT_FLAG: usize = 0x1fe;
const OFF_HEADER: usize = 0x202;
const OFF_VERSION: usize = 0x206;
const OFF_KERNEL_VERSION: usize = 0x20e;
const OFF_LOADFLAGS: usize = 0x211;
const OFF_XLOADFLAGS: usize = 0x236;
/// Everything up to and including xloadflags must be present.
const MIN_LEN: usize = OFF_XLOADFLAGS + 2;

/// What the setup header says about a bzImage that passed [`check_bzimage`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BzImageInfo {
    /// Boot protocol version, e.g. 0x020f.
    pub protocol: u16,
    pub setup_sects: u8,
    pub xloadflags: u16,
    /// The kernel's own version string ("6.1.0-28-cloud-amd64 (debian-kernel@...) ..."), if set.
    pub kernel_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BzImageError {
    #[error("only {len} bytes, too short to hold a setup header")]
    TooShort { len: usize },
    #[error("no 0xAA55 boot flag at offset 0x1fe")]
    NoBootFlag,
    #[error("no \"HdrS\" magic at offset 0x202 (an ELF vmlinux or another format?)")]
    NoHdrS,
    #[error("boot protocol {0:#06x} is older than 2.12")]
    ProtocolTooOld(u16),
    #[error("xloadflags {0:#06x} lacks XLF_KERNEL_64 (no 64-bit entry point)")]
    Not64Bit(u16),
    #[error("loadflags {0:#04x} lack LOADED_HIGH (a zImage, not a bzImage)")]
    NotLoadedHigh(u8),
    #[error("setup code claims {setup_bytes} bytes but the file has only {len}")]
    Truncated { setup_bytes: usize, len: usize },
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Checks that `image` is a bzImage a 64-bit loader can boot: boot flag, "HdrS", protocol
/// >= 2.12, XLF_KERNEL_64, LOADED_HIGH and a protected-mode payload after the setup sectors.
pub fn check_bzimage(image: &[u8]) -> Result<BzImageInfo, BzImageError> {
    if image.len() < MIN_LEN {
        return Err(BzImageError::TooShort { len: image.len() });
    }
    if u16_at(image, OFF_BOOT_FLAG) != BOOT_FLAG {
        return Err(BzImageError::NoBootFlag);
    }
    if u32_at(image, OFF_HEADER) != HDRS_MAGIC {
        return Err(BzImageError::NoHdrS);
    }
    let protocol = u16_at(image, OFF_VERSION);
    if protocol < MIN_PROTOCOL {
        return Err(BzImageError::ProtocolTooOld(protocol));
    }
    let xloadflags = u16_at(image, OFF_XLOADFLAGS);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BzImageError::Not64Bit(xloadflags));
    }
    let loadflags = image[OFF_LOADFLAGS];
    if loadflags & LOADED_HIGH == 0 {
        return Err(BzImageError::NotLoadedHigh(loadflags));
    }
    // setup_sects == 0 means 4 for historical reasons; the boot sector adds one more.
    let setup_sects = image[OFF_SETUP_SECTS];
    let setup_bytes = (usize::from(if setup_sects == 0 { 4 } else { setup_sects }) + 1) * 512;
    if image.len() <= setup_bytes {
        return Err(BzImageError::Truncated {
            setup_bytes,
            len: image.len(),
        });
    }
    Ok(BzImageInfo {
        protocol,
        setup_sects,
        xloadflags,
        kernel_version: kernel_version_string(image),
    })
}

/// The NUL-terminated version string the header points at (offset + 0x200), if any.
fn kernel_version_string(image: &[u8]) -> Option<String> {
    let ptr = usize::from(u16_at(image, OFF_KERNEL_VERSION));
    if ptr == 0 {
        return None;
    }
    let start = ptr + 0x200;
    let tail = image.get(start..)?;
    let end = tail.iter().take(256).position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&tail[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic image with a valid header: 1 setup sector + boot sector + a payload.
    fn valid_image() -> Vec<u8> {
        let mut img = vec![0u8; 4096];
        img[OFF_SETUP_SECTS] = 1;
        img[OFF_BOOT_FLAG..OFF_BOOT_FLAG + 2].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        img[OFF_HEADER..OFF_HEADER + 4].copy_from_slice(b"HdrS");
        img[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        img[OFF_LOADFLAGS] = LOADED_HIGH;
        img[OFF_XLOADFLAGS..OFF_XLOADFLAGS + 2].copy_from_slice(&0x7fu16.to_le_bytes());
        img[OFF_KERNEL_VERSION..OFF_KERNEL_VERSION + 2].copy_from_slice(&0x100u16.to_le_bytes());
        img[0x300..0x30a].copy_from_slice(b"6.1.0-test");
        img
    }

    #[test]
    fn a_valid_header_is_accepted_and_read() {
        let info = check_bzimage(&valid_image()).unwrap();
        assert_eq!(info.protocol, 0x020f);
        assert_eq!(info.setup_sects, 1);
        assert_eq!(info.kernel_version.as_deref(), Some("6.1.0-test"));
    }

    #[test]
    fn each_broken_field_is_named() {
        type Breakage = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Breakage, BzImageError)> = vec![
            (
                Box::new(|i| i.truncate(100)),
                BzImageError::TooShort { len: 100 },
            ),
            (Box::new(|i| i[OFF_BOOT_FLAG] = 0), BzImageError::NoBootFlag),
            (Box::new(|i| i[OFF_HEADER] = b'X'), BzImageError::NoHdrS),
            (
                Box::new(|i| {
                    i[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x020bu16.to_le_bytes())
                }),
                BzImageError::ProtocolTooOld(0x020b),
            ),
            (
                Box::new(|i| {
                    i[OFF_XLOADFLAGS..OFF_XLOADFLAGS + 2].copy_from_slice(&0x7eu16.to_le_bytes())
                }),
                BzImageError::Not64Bit(0x7e),
            ),
            (
                Box::new(|i| i[OFF_LOADFLAGS] = 0),
                BzImageError::NotLoadedHigh(0),
            ),
            (
                Box::new(|i| i.truncate(1024)),
                BzImageError::Truncated {
                    setup_bytes: 1024,
                    len: 1024,
                },
            ),
        ];
        for (breakage, expected) in cases {
            let mut img = valid_image();
            breakage(&mut img);
            assert_eq!(check_bzimage(&img), Err(expected));
        }
    }

    #[test]
    fn an_elf_vmlinux_is_not_a_bzimage() {
        let mut elf = vec![0u8; 4096];
        elf[..4].copy_from_slice(b"\x7fELF");
        assert!(check_bzimage(&elf).is_err());
    }
}
