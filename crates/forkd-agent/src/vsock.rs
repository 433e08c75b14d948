//! Minimal AF_VSOCK stream sockets over libc (std has none).

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Accept connections from any CID.
pub const CID_ANY: u32 = libc::VMADDR_CID_ANY;
/// The local CID (vsock loopback), useful for tests on a host.
pub const CID_LOCAL: u32 = libc::VMADDR_CID_LOCAL;

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is a C struct of integers and a byte array, for which all-zero
    // bytes are a valid value (and the zeroed padding/reserved fields are what the kernel
    // expects).
    let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    addr
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes only integers and touches no memory of ours; the result is
    // checked before it is used.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a valid descriptor socket(2) just returned, which nothing else owns or
    // will close, so the OwnedFd may take ownership of it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    pub fn bind(cid: u32, port: u32) -> io::Result<Self> {
        let fd = new_socket()?;
        let addr = sockaddr(cid, port);
        // SAFETY: bind(2) only reads `len` bytes through the pointer during the call, and it
        // points at `addr`, a live, initialised sockaddr_vm of exactly that size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) takes only integers (an fd `fd` owns and a backlog).
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: with null address and length pointers accept4(2) writes no peer address,
            // so it touches no memory of ours; the fd is owned by `self.fd`, so it is open.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: `fd` is a valid descriptor accept4 just returned, which nothing else
                // owns or will close, so the File may take ownership of it.
                let file = unsafe { File::from_raw_fd(fd) };
                return Ok(VsockStream { file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl AsRawFd for VsockListener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A connected vsock stream. Reads and writes go straight to read(2)/write(2).
#[derive(Debug)]
pub struct VsockStream {
    // File gives us Read/Write/try_clone on an arbitrary fd without more unsafe code.
    file: File,
}

impl VsockStream {
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = new_socket()?;
        let addr = sockaddr(cid, port);
        loop {
            // SAFETY: connect(2) only reads `len` bytes through the pointer during the call,
            // and it points at `addr`, a live, initialised sockaddr_vm of exactly that size.
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                    mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                return Ok(Self {
                    file: File::from(fd),
                });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Half-closes the stream: the peer reads EOF, this side can still read.
    pub fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) takes only integers; the fd is owned by `self.file`, so open.
        if unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_WR) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
        })
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
