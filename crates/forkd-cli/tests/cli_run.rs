//! `forkd run`, `forkd fork --exec` and `forkd snapshot --warmup` through the real binary:
//! every bad input is one clear line, before anything is forked or booted, leaving nothing
//! behind. (Running commands in real Linux children is linux_e2e.rs; the host-side plumbing
//! against the real agent is forkd-sandbox's agent_exec.rs / agent_fork.rs.)

mod common;

use std::process::Output;

use common::{assert_no_run_dirs_left, forkd, snapshot_demo};
use forkd_test_support::kvm_available;

/// Exit code 1 and exactly one stderr line containing every `needle`.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

#[test]
fn run_refuses_bad_input_before_forking() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let out = forkd(h, &["run", "--tag", "nope", "--", "true"]);
    assert_one_line_error(&out, &["run nope", "no snapshot tagged \"nope\""]);

    let out = forkd(h, &["run", "--tag", "nope"]);
    assert_one_line_error(&out, &["no command given", "--"]);
    let out = forkd(h, &["run", "--tag", "nope", "--"]);
    assert_one_line_error(&out, &["no command given"]);

    let out = forkd(h, &["run", "--tag", "nope", "--timeout", "0", "--", "true"]);
    assert_one_line_error(&out, &["--timeout must be at least 1 second"]);
    let out = forkd(h, &["run", "--tag", "nope", "--cwd", "tmp", "--", "true"]);
    assert_one_line_error(&out, &["--cwd: ", "\"tmp\"", "absolute"]);

    // clap's own refusals (exit code 2) name the input.
    let out = forkd(
        h,
        &["run", "--tag", "nope", "--env", "NOEQUALS", "--", "true"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"NOEQUALS\" is not KEY=VALUE"));
    let out = forkd(h, &["run", "--tag", "../x", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert_no_run_dirs_left(h);
}

#[test]
fn fork_exec_refuses_bad_input_before_forking() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let out = forkd(h, &["fork", "--tag", "nope", "-n", "2", "--exec"]);
    assert_one_line_error(&out, &["--exec: no command given"]);
    let out = forkd(h, &["fork", "--tag", "nope", "-n", "2", "--", "uname"]);
    assert_one_line_error(&out, &["\"uname\" given without --exec"]);
    let out = forkd(
        h,
        &[
            "fork",
            "--tag",
            "nope",
            "--exec",
            "--exec-timeout",
            "0",
            "--",
            "true",
        ],
    );
    assert_one_line_error(&out, &["--exec-timeout must be at least 1 second"]);
    let out = forkd(h, &["fork", "--tag", "nope", "--exec", "--", "true"]);
    assert_one_line_error(&out, &["no snapshot tagged \"nope\""]);
    let out = forkd(h, &["fork", "--tag", "nope", "--exec-timeout", "3"]);
    assert_eq!(out.status.code(), Some(2), "--exec-timeout requires --exec");
    // The command's options are checked as `forkd run` checks them (one engine check).
    let out = forkd(
        h,
        &[
            "fork", "--tag", "nope", "--exec", "--cwd", "tmp", "--", "pwd",
        ],
    );
    assert_one_line_error(&out, &["--cwd: ", "\"tmp\"", "absolute"]);
    let out = forkd(h, &["fork", "--tag", "nope", "--cwd", "/tmp"]);
    assert_one_line_error(&out, &["--env and --cwd apply to the command of --exec"]);
    assert_no_run_dirs_left(h);
}

#[test]
fn run_and_fork_exec_refuse_a_snapshot_without_an_agent() {
    if !kvm_available("run_and_fork_exec_refuse_a_snapshot_without_an_agent") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    snapshot_demo(h, "demo");
    let out = forkd(h, &["run", "--tag", "demo", "--", "uname", "-a"]);
    assert_one_line_error(
        &out,
        &[
            "snapshot demo is of the built-in guest builtin:demo, which has no forkd-agent",
            "forkd run needs a Linux snapshot",
        ],
    );
    let out = forkd(
        h,
        &["fork", "--tag", "demo", "-n", "3", "--exec", "--", "true"],
    );
    assert_one_line_error(&out, &["which has no forkd-agent", "forkd fork --exec"]);
    assert_no_run_dirs_left(h);
    // The demo snapshot itself still forks the ordinary way.
    let out = forkd(h, &["fork", "--tag", "demo", "-n", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_run_dirs_left(h);
}

#[test]
fn snapshot_warmup_refuses_what_cannot_work_before_booting() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let base = ["snapshot", "--tag", "w", "--kernel", "builtin:demo"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        forkd(h, &args)
    };
    let out = with(&["--warmup", "true"]);
    assert_one_line_error(
        &out,
        &[
            "--warmup needs a guest running forkd-agent",
            "builtin:demo has none",
        ],
    );
    let out = with(&["--warmup-eval", "import numpy"]);
    assert_one_line_error(&out, &["--warmup needs a guest running forkd-agent"]);
    let out = with(&["--warmup", "  "]);
    assert_one_line_error(&out, &["a warm-up step is empty"]);
    let out = with(&["--warmup", "true", "--warmup-timeout", "0"]);
    assert_one_line_error(&out, &["--warmup-timeout must be at least 1 second"]);
    assert!(!h.join("snapshots/w").exists());
    let listed = forkd(h, &["images", "--json"]);
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("\"w\""),
        "no snapshot may be published"
    );
}
