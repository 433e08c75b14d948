//! Telling the parent that a filter refused a call: a SIGSYS handler that writes one line
//! naming the system call and the kind of thread, then ends the process.
//!
//! The filters answer a refused call with SECCOMP_RET_TRAP, so the kernel sends the thread a
//! SIGSYS carrying the call's number. The handler runs on that thread, under its filter, and
//! uses only `write` and `exit_group` (allowed everywhere): the line goes to the control
//! socket (the parent turns it into "killed by seccomp: syscall 59 (execve) from the vCPU
//! thread") and to stderr, then the process exits with [`VIOLATION_EXIT`]. No allocation,
//! no locks: the thread's kind is a plain thread-local and the line is formatted on the stack.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};

use forkd_vmm::thread_jail::ThreadKind;

/// The exit code of a process a filter ended (128 + SIGSYS, as a shell would show it).
pub const VIOLATION_EXIT: i32 = 128 + libc::SIGSYS;

/// The exit code of a child whose jail could not be put in place after its restore (it must
/// not run unconfined).
pub const JAIL_FAILED_EXIT: i32 = 78;

/// Where the handler writes its line (the child's control socket); -1: stderr only.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// The calling thread's kind, once it confined itself (0: not confined).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Records the calling thread's kind for the handler.
pub fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(kind_code(kind)));
}

/// The calling thread's kind, once it confined itself.
pub fn thread_kind() -> Option<ThreadKind> {
    kind_of(KIND.with(|k| k.get()))
}

fn kind_code(kind: ThreadKind) -> u8 {
    match kind {
        ThreadKind::Main => 1,
        ThreadKind::Vcpu => 2,
        ThreadKind::Devices => 3,
        ThreadKind::Control => 4,
    }
}

fn kind_of(code: u8) -> Option<ThreadKind> {
    ThreadKind::ALL.into_iter().find(|k| kind_code(*k) == code)
}

/// Installs the SIGSYS handler, reporting to `fd` (the control socket).
pub fn install(fd: i32) -> std::io::Result<()> {
    REPORT_FD.store(fd, Ordering::SeqCst);
    // SAFETY: sigaction is a C struct of integers and a handler address; all-zero is valid.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigsys;
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sigaction(2) reads the local `action` and writes nothing back (null old
    // action); the handler it installs is async-signal-safe (see `on_sigsys`).
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The line the parent reads (a JSON message of the control protocol).
fn format_line(buf: &mut [u8; 96], syscall: i64, kind: &str) -> usize {
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        for b in bytes {
            if n < buf.len() {
                buf[n] = *b;
                n += 1;
            }
        }
    };
    put(b"{\"msg\":\"seccomp_violation\",\"syscall\":");
    let mut digits = [0u8; 20];
    let mut v = syscall.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if syscall < 0 {
        put(b"-");
    }
    put(&digits[i..]);
    put(b",\"thread\":\"");
    put(kind.as_bytes());
    put(b"\"}\n");
    n
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo's _sigsys member: {void *_call_addr; int _syscall; unsigned _arch;} after the
    // three int header fields and their padding, i.e. the call's number at byte 24.
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; for SIGSYS from
    // seccomp its union holds _sigsys, so the i32 at offset 24 is initialised.
    let syscall = unsafe { *((info as *const u8).add(24) as *const i32) };
    let kind = kind_of(KIND.with(|k| k.get())).map_or("not yet confined", ThreadKind::name);
    let mut buf = [0u8; 96];
    let len = format_line(&mut buf, i64::from(syscall), kind);
    let fd = REPORT_FD.load(Ordering::SeqCst);
    // SAFETY: write(2) reads `len` initialised bytes of the local buffer; exit_group takes
    // an integer and does not return. Both are async-signal-safe and in every allow-list.
    unsafe {
        if fd >= 0 {
            libc::write(fd, buf.as_ptr().cast(), len);
        }
        libc::write(2, b"forkd jail: ".as_ptr().cast(), 12);
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::SYS_exit_group, VIOLATION_EXIT);
    }
}

/// What the parent makes of a child's report: "syscall 59 (execve) from the vCPU thread".
pub fn describe(syscall: i64, thread: &str) -> String {
    let thread = ThreadKind::from_name(thread)
        .map_or_else(|| thread.to_string(), |k| k.describe().to_string());
    format!(
        "syscall {syscall} ({}) from the {thread}",
        super::syscall_names::name(syscall)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handlers_line_is_a_control_message() {
        let mut buf = [0u8; 96];
        let n = format_line(&mut buf, 59, "vcpu");
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert_eq!(
            line,
            "{\"msg\":\"seccomp_violation\",\"syscall\":59,\"thread\":\"vcpu\"}\n"
        );
        assert_eq!(
            describe(59, "vcpu"),
            "syscall 59 (execve) from the vCPU thread"
        );
        assert_eq!(
            describe(101, "control"),
            "syscall 101 (ptrace) from the control thread"
        );
    }
}
