//! Helpers for the CLI tests that fork children: each test's data directory and runtime
//! directory (children's sockets and logs) live inside its own temporary home.
#![allow(dead_code)] // each test crate uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `forkd` with `home` as its data directory and `home/runtime` as its runtime directory.
pub fn forkd_command(home: &Path) -> Command {
    std::fs::create_dir_all(home.join("runtime")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
    cmd.env("FORKD_HOME", home)
        .env("XDG_RUNTIME_DIR", home.join("runtime"))
        .env_remove("RUST_LOG");
    cmd
}

pub fn forkd(home: &Path, args: &[&str]) -> Output {
    forkd_command(home).args(args).output().expect("run forkd")
}

/// Where a run's files go: overlays under the data directory, sockets and logs under the
/// runtime directory.
pub fn run_parents(home: &Path) -> [PathBuf; 2] {
    [home.join("run"), home.join("runtime/forkd")]
}

/// No run directory is left, in either place.
pub fn assert_no_run_dirs_left(home: &Path) {
    for run in run_parents(home) {
        let left = std::fs::read_dir(&run).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "{} still has entries", run.display());
    }
}

/// The demo guest's snapshot (64 MiB) tagged `tag` in `home`; panics with forkd's error.
pub fn snapshot_demo(home: &Path, tag: &str) {
    let args = [
        "snapshot",
        "--tag",
        tag,
        "--kernel",
        "builtin:demo",
        "--mem-mib",
        "64",
    ];
    let out = forkd(home, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
