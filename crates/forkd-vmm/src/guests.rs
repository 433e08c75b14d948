//! Guest images compiled into the library from `guests/` by build.rs: the built-in demo guest
//! (`builtin:demo`) and the test guests. All are ELF images booted like a vmlinux.
//!
//! Conventions shared with the guest runtime (guests/lib/forkd_guest.h): serial on 0x3f8, the
//! debug-exit port 0xf4 (exit code), and a status page at [`STATUS_ADDR`].

use crate::memory::{Bytes, GuestAddress, GuestMemory};

mod images {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

pub use images::*;

/// The demo guest: counts in memory, prints to serial, (with vsock) answers `COUNTER`.
pub const DEMO_ELF: &[u8] = images::DEMO;

/// Guest-physical page where test guests publish state for the host to read.
pub const STATUS_ADDR: u64 = 0x6000;
/// "FORKDEMO", written at [`STATUS_ADDR`] by the demo guest once its counter is live.
pub const DEMO_MAGIC: u64 = u64::from_le_bytes(*b"FORKDEMO");
/// Vsock port the demo guest serves on (project-wide).
pub use forkd_guest_abi::GUEST_PORT as VSOCK_GUEST_PORT;
/// Host vsock port a guest connects to when ready, writing `READY <name>\n` (project-wide).
pub use forkd_guest_abi::READY_PORT as VSOCK_READY_PORT;

/// The guest named `name` (file stem under guests/), e.g. "demo", "hello".
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    ALL.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, image)| *image)
}

/// Names of every compiled guest.
pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|(n, _)| *n).collect()
}

/// The demo guest's counter, or None if the demo has not started counting (or this is not
/// the demo guest).
pub fn demo_counter(mem: &GuestMemory) -> Option<u64> {
    let magic: u64 = mem.read_obj(GuestAddress(STATUS_ADDR)).ok()?;
    if magic != DEMO_MAGIC {
        return None;
    }
    mem.read_obj(GuestAddress(STATUS_ADDR + 8)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_a_64_bit_x86_elf_entered_at_1mib() {
        assert!(names().contains(&"demo") && names().contains(&"hello"));
        for (name, image) in ALL {
            assert_eq!(&image[..4], b"\x7fELF", "{name}");
            assert_eq!(image[4], 2, "{name}: ELFCLASS64");
            assert_eq!(
                u16::from_le_bytes([image[18], image[19]]),
                62,
                "{name}: EM_X86_64"
            );
            let entry = u64::from_le_bytes(image[24..32].try_into().unwrap());
            assert_eq!(
                entry, 0x10_0000,
                "{name}: _start is first in .text at 1 MiB"
            );
        }
    }

    #[test]
    fn demo_magic_matches_the_guest_header() {
        // guests/demo.c: DEMO_MAGIC 0x4f4d45444b524f46
        assert_eq!(DEMO_MAGIC, 0x4f4d_4544_4b52_4f46);
    }
}
