//! The host side of virtio-net: a TAP interface opened through `/dev/net/tun`.
//!
//! The tap must already exist (e.g. `ip tuntap add dev tap0 mode tap`) in the network
//! namespace of the thread that opens it: the kernel looks the name up there, and a child
//! restored in another namespace gets that namespace's tap of the same name. The VMM never
//! creates one (TUNSETIFF would, silently, for an unknown name).
//!
//! The fd is non-blocking, with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header
//! (virtio_net_hdr_v1, what a VERSION_1 driver uses): every read is one 12-byte header followed
//! by one Ethernet frame, every write must be the same. It opens with no offloads
//! (`TUNSETOFFLOAD` 0: the kernel checksums and segments everything before handing it over);
//! the device widens that with [`Tap::set_offloads`] to what its driver accepted. Offloads only
//! concern what the kernel hands the reader: written frames may carry checksum and
//! segmentation requests whatever they are.

use std::ffi::CString;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::{NetError, VNET_HDR_LEN};

/// Longest interface name (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// `struct ifreq` as TUNSETIFF / TUNGETIFF use it: a name and the flags (the rest of the
/// 40-byte union unused).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device (or, for tests, any fd that keeps datagram boundaries).
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// A real tap (TUNSETOFFLOAD applies), not a stand-in fd from [`Tap::from_fd`].
    is_tap: bool,
    /// The TUN_F_* flags last set.
    offloads: libc::c_uint,
}

/// Checks `name` is something `ip link` could have created.
fn check_name(name: &str) -> Result<CString, NetError> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if !ok {
        return Err(NetError::BadTapName(name.to_string()));
    }
    CString::new(name).map_err(|_| NetError::BadTapName(name.to_string()))
}

/// The interface index of `name` in this thread's network namespace (0: no such interface).
fn if_index(name: &CString) -> u32 {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; if_nametoindex only
    // reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

/// TUNSETVNETHDRSZ: the header size, passed by pointer.
fn set_vnet_hdr_size(fd: RawFd, size: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, a local that lives
    // through the call.
    let ret = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size as *const libc::c_int) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// TUNSETOFFLOAD: the offload flags, passed by value (not a pointer).
fn set_offload(fd: RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument as an integer; no memory is passed.
    let ret = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Attaches to the existing tap `name` in the calling thread's network namespace.
    pub fn open(name: &str) -> Result<Tap, NetError> {
        let cname = check_name(name)?;
        let index = if_index(&cname);
        if index == 0 {
            return Err(NetError::TapMissing(name.to_string()));
        }
        let err = |what: &'static str, source: io::Error| NetError::Tap {
            name: name.to_string(),
            what,
            source,
        };
        // SAFETY: a constant NUL-terminated path; open returns a new fd or -1.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(err("opening /dev/net/tun", io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly opened fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may update) one struct ifreq, which `req` is (same
        // layout and size), exclusively borrowed for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            let source = io::Error::last_os_error();
            let what = match source.raw_os_error() {
                Some(libc::EBUSY) => "already in use by another process or VM",
                Some(libc::EINVAL) => "not a tap device",
                _ => "attaching (TUNSETIFF)",
            };
            return Err(err(what, source));
        }
        // The name could have been deleted (and TUNSETIFF then created a new, temporary
        // tap) between the lookup and the attach: refuse anything but the interface we saw.
        if if_index(&cname) != index {
            return Err(NetError::TapMissing(name.to_string()));
        }
        set_vnet_hdr_size(fd.as_raw_fd(), VNET_HDR_LEN as libc::c_int)
            .map_err(|e| err("setting the vnet header size", e))?;
        set_offload(fd.as_raw_fd(), 0).map_err(|e| err("turning offloads off", e))?;
        Ok(Tap {
            fd,
            name: name.to_string(),
            is_tap: true,
            offloads: 0,
        })
    }

    /// Wraps an fd that behaves like a tap: non-blocking, one frame per read and write (a
    /// datagram socket, for tests). `name` is only used in messages.
    /// TUNSETOFFLOAD is not applied to it (only recorded).
    pub fn from_fd(fd: OwnedFd, name: &str) -> Tap {
        Tap {
            fd,
            name: name.to_string(),
            is_tap: false,
            offloads: 0,
        }
    }

    /// The interface name it was opened as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the reader accepts (TUN_F_CSUM, TUN_F_TSO4, ...): it
    /// may then hand over frames with a checksum still to compute and unsegmented TCP
    /// packets of up to 64 KiB, described by the vnet header. 0: every frame complete.
    pub fn set_offloads(&mut self, flags: libc::c_uint) -> io::Result<()> {
        if self.is_tap {
            set_offload(self.fd.as_raw_fd(), flags)?;
        }
        self.offloads = flags;
        Ok(())
    }

    /// The TUN_F_* flags last set with [`Tap::set_offloads`].
    pub fn offloads(&self) -> libc::c_uint {
        self.offloads
    }

    /// Reads one frame (with its vnet header) into `buf`.
    pub(super) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes into `buf`, exclusively borrowed.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame gathered from `bufs`.
    pub(super) fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: IoSlice is ABI-compatible with struct iovec; the kernel only reads the
        // `bufs.len()` iovecs and the memory they describe, all borrowed for the call.
        let n = unsafe {
            libc::writev(
                self.fd.as_raw_fd(),
                bufs.as_ptr().cast(),
                bufs.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_interfaces_are_refused_before_any_syscall() {
        for bad in ["", "a/b", "a b", "x:1", "0123456789abcdef", ".", ".."] {
            assert!(
                matches!(Tap::open(bad), Err(NetError::BadTapName(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn a_missing_tap_is_named_in_a_one_line_error_and_not_created() {
        let name = format!("forkdt{}x", std::process::id() % 100_000);
        let err = Tap::open(&name).unwrap_err();
        let msg = forkd_store::error_chain(&err);
        assert!(msg.contains(&name), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let cname = CString::new(name).unwrap();
        assert_eq!(if_index(&cname), 0, "opening the tap created it");
    }
}
