//! Helpers shared by forkd's integration tests.

pub mod http;

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

/// A plain error for test doubles of the engine's traits (a fake child body, say): it is
/// its message, and converts from strings so `?` and `.into()` read as they would on `String`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Failure {
        Failure(message.to_string())
    }
}

/// Renders `err` as the CLI does (`a: b: c`, see [`forkd_store::error_chain`]) and fails when
/// any layer's message repeats the message of one of its sources: every cause renders once.
pub fn assert_renders_once(err: &(dyn std::error::Error + 'static)) -> String {
    let mut layers = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        layers.push(cause.to_string());
        source = cause.source();
    }
    for (i, outer) in layers.iter().enumerate() {
        for inner in layers[i + 1..].iter().filter(|m| !m.trim().is_empty()) {
            assert!(
                !outer.contains(inner.as_str()),
                "error layer {outer:?} repeats its source {inner:?}"
            );
        }
    }
    forkd_store::error_chain(err)
}
