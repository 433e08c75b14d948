//! Child processes forked from the calling process.
//!
//! A child VMM lives in its own process so that a crash, a panic or a KVM internal error
//! takes down only that child. Children are forked (not exec'd) so they inherit the
//! zygote's already-parsed snapshot and its copy-on-write memory mapping.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s} ({})", signal_name(*s)),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// Number of threads in this process (fork is only safe to reason about with one).
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(1)
}

/// Forks; the child closes `close_in_child`, arranges to die with its parent, runs `body`
/// and exits with its return value without unwinding into the parent's stack or running
/// the parent's exit handlers. Returns the child's pid in the parent.
pub fn fork_child(close_in_child: &[RawFd], body: impl FnOnce() -> i32) -> io::Result<libc::pid_t> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: fork(2) itself takes no pointers. The child starts with a copy of this address
    // space and only the calling thread; it never returns into the parent's stack frames (it
    // runs `body` and leaves with _exit below), so nothing borrowed by another thread is used
    // there after its owner vanished. glibc's fork re-initialises the allocator and stdio
    // locks in the child, so `body` may allocate; callers fork while single-threaded where
    // that matters (see `thread_count`).
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: prctl(PR_SET_PDEATHSIG), getppid, _exit and close take only integers.
            // The descriptors closed are ones the caller lists as not for the child; whatever
            // owns them in this copy of the parent's memory is never dropped here (the child
            // leaves with _exit), so nothing closes or uses them after this. An fd that is not
            // open just makes close fail with EBADF.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(70); // the parent died before PDEATHSIG was armed
                }
                for fd in close_in_child {
                    libc::close(*fd);
                }
            }
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
            // SAFETY: _exit takes an integer and does not return. It deliberately skips the
            // destructors and atexit handlers, which belong to the parent's state (flushing its
            // buffers or removing its files from the child would be wrong).
            unsafe { libc::_exit(code) }
        }
        pid => Ok(pid),
    }
}

/// Waits for `pid` to end (blocking).
pub fn wait(pid: libc::pid_t) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid only writes the exit status through the pointer, which is a live,
        // exclusive borrow of a local c_int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(decode(status));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The status of `pid` if it has ended, without blocking.
pub fn try_wait(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    // SAFETY: waitpid only writes the exit status through the pointer, which is a live,
    // exclusive borrow of a local c_int.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    match r {
        0 => Ok(None),
        r if r == pid => Ok(Some(decode(status))),
        _ => Err(io::Error::last_os_error()),
    }
}

fn decode(status: i32) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

/// Sends `sig` to `pid`.
pub fn kill(pid: libc::pid_t, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes only integers and touches no memory of ours; a pid that is gone
    // makes it fail with ESRCH, which is returned.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The raw fd of an owned descriptor, for `close_in_child` lists.
pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_exit_codes_and_signals_are_reported() {
        let pid = fork_child(&[], || 7).unwrap();
        assert_eq!(wait(pid).unwrap(), ExitStatus::Code(7));
        let pid = fork_child(&[], || std::process::abort()).unwrap();
        let status = wait(pid).unwrap();
        assert_eq!(status, ExitStatus::Signal(libc::SIGABRT));
        assert!(status.to_string().contains("SIGABRT"));
        let pid = fork_child(&[], || panic!("boom")).unwrap();
        assert_eq!(wait(pid).unwrap(), ExitStatus::Code(101));
    }

    #[test]
    fn child_writes_do_not_reach_the_parent() {
        let mut value = vec![1u8; 4096];
        // The child writes the very same heap page, in its copy of the address space.
        let pid = fork_child(&[], || {
            value[0] = 9;
            i32::from(value[0])
        })
        .unwrap();
        assert_eq!(wait(pid).unwrap(), ExitStatus::Code(9));
        assert_eq!(value[0], 1);
        value[0] = 2;
    }
}
