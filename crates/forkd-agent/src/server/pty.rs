//! Pseudo-terminals for background processes started with `pty`: the process gets the
//! terminal's slave side as its stdio and controlling terminal, in a session of its own; the
//! agent keeps the master side to read its output, write its input and resize it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::protocol::{ExecRequest, PtySize};

/// A new terminal of `size`: (master, slave), both close-on-exec.
pub(super) fn open(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty(3) writes the two descriptors into our locals; the name and termios
    // arguments are null (not wanted), the winsize is a valid local it only reads.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &winsize,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both are open descriptors that nothing else owns.
    let pair = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&pair.0, &pair.1] {
        // SAFETY: fcntl(2) on a descriptor we own, setting a flag; no memory is passed.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(pair)
}

/// `req`'s command with `slave` as its stdio and controlling terminal, leading a new session
/// (and so its own process group, which a kill takes whole).
pub(super) fn command(req: &ExecRequest, slave: &OwnedFd) -> io::Result<Command> {
    let mut cmd = super::exec::base_command(req);
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    // SAFETY: runs in the child between fork and exec, after its stdio is in place; setsid(2)
    // and ioctl(2) are async-signal-safe and the closure touches no shared memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Sets the terminal's size (the process gets SIGWINCH).
pub(super) fn resize(master: &OwnedFd, size: PtySize) -> io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, a valid local.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ as _, &winsize) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
