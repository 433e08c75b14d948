//! Ctrl-C and SIGTERM as a flag, so a command that owns children can stop them and remove
//! their files instead of dying with them half-cleaned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT / SIGTERM set the flag instead of ending the process. Install it after
/// forking pool children: they keep the default disposition (and die with the terminal's
/// Ctrl-C), which is what the parent then cleans up after.
pub fn install() {
    // SAFETY: signal(2) takes integers and a function pointer. `on_interrupt` has the
    // `extern "C" fn(c_int)` signature a handler must have and is async-signal-safe: it only
    // stores to a static atomic (no allocation, no locks), so it may interrupt any code.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Installs the handler and blocks until Ctrl-C or SIGTERM.
pub fn wait() {
    install();
    while !interrupted() {
        std::thread::sleep(Duration::from_millis(100));
    }
}
