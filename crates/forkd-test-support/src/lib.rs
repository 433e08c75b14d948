//! Helpers shared by forkd's integration tests.

use std::fmt::Display;
use std::io::Write;

/// Prints one `SKIP: <test>: <why>` line straight to stderr, past the test harness's output
/// capture, so the suite's log (and scripts/test.sh's summary) shows what did not run.
pub fn skip(test: &str, why: impl Display) {
    let _ = writeln!(std::io::stderr(), "SKIP: {test}: {why}");
}

/// True when /dev/kvm opens read-write; otherwise prints the skip line for `test`.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skip(test, format!("/dev/kvm is not usable here ({e})"));
            false
        }
    }
}

pub mod vsock_agent;
