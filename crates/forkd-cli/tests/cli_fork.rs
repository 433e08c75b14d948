//! `forkd fork` / `forkd demo` through the real binary and real KVM: children in their own
//! processes continue from the snapshot; bad input fails before any VM exists.

mod common;

use std::path::Path;

use common::{assert_no_run_dirs_left, forkd, snapshot_demo};
use forkd_test_support::kvm_available;

#[test]
fn demo_forks_children_that_continue_from_the_snapshot() {
    if !kvm_available("demo_forks_children_that_continue_from_the_snapshot") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let out = forkd(home.path(), &["demo", "-n", "8", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["requested"], 8);
    assert_eq!(report["alive"], 8);
    let children = report["children"].as_array().unwrap();
    let mut pids: Vec<u64> = children
        .iter()
        .map(|c| c["pid"].as_u64().unwrap())
        .collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 8, "one process per child");
    for c in children {
        assert!(c["error"].is_null(), "{c}");
        assert!(c["counter"].as_u64().unwrap() > 0, "{c}");
        assert!(c["memory_after_fork"]["uss_kib"].as_u64().unwrap() > 0);
    }
    assert!(report["kvm_floor"]["p50_ms"].as_f64().unwrap() > 0.0);
    // The snapshot was built once and is reused. Runs killed before they cleaned up (a pid
    // that cannot exist) are swept by the next one.
    let stale = common::run_parents(home.path()).map(|parent| parent.join("fork-4194305"));
    for dir in &stale {
        std::fs::create_dir_all(dir.join("leftover")).unwrap();
    }
    let out = forkd(home.path(), &["demo", "-n", "2"]);
    for dir in &stale {
        assert!(!dir.exists(), "{} was not swept", dir.display());
    }
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("forked 2/2 children of forkd-demo"), "{text}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("snapshotting"));
    // Children are gone and their run directory removed.
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists() || is_zombie_free(pid));
    }
    assert_no_run_dirs_left(home.path());

    // A demo snapshot of another build of the guest (as after an upgrade) is rebuilt.
    let manifest = home.path().join("snapshots/forkd-demo/manifest.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let current = text
        .lines()
        .find(|l| l.starts_with("kernel = \"builtin:demo@"))
        .unwrap_or_else(|| panic!("the demo manifest names its guest build:\n{text}"))
        .to_string();
    std::fs::write(
        &manifest,
        text.replace(&current, "kernel = \"builtin:demo@000000000000\""),
    )
    .unwrap();
    let out = forkd(home.path(), &["demo", "-n", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("changed since forkd-demo was taken"),
        "{stderr}"
    );
    let rebuilt = std::fs::read_to_string(&manifest).unwrap();
    assert!(rebuilt.contains(&current), "{rebuilt}");
}

fn is_zombie_free(pid: u64) -> bool {
    // A recycled pid belongs to some other process; ours were reaped.
    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).map_or(true, |c| !c.contains("forkd"))
}

#[test]
fn fork_refuses_bad_input_before_creating_anything() {
    let home = tempfile::tempdir().unwrap();
    let out = forkd(home.path(), &["fork", "--tag", "nope", "-n", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no snapshot tagged \"nope\""), "{err}");
    let out = forkd(home.path(), &["fork", "--tag", "../x"]);
    assert_eq!(out.status.code(), Some(2));
    let out = forkd(home.path(), &["fork", "--tag", "x", "-n", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = forkd(
        home.path(),
        &["fork", "--tag", "x", "--eval", "1", "--exec", "--", "true"],
    );
    assert_eq!(out.status.code(), Some(2), "--eval and --exec together");
    assert_no_run_dirs_left(home.path());
}

#[test]
fn fork_eval_needs_a_guest_with_an_agent() {
    if !kvm_available("fork_eval_needs_a_guest_with_an_agent") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    snapshot_demo(home.path(), "base");
    let out = forkd(home.path(), &["fork", "--tag", "base", "--eval", "1 + 1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("forkd fork --eval needs a Linux snapshot"),
        "{err}"
    );
    assert_no_run_dirs_left(home.path());
}

#[test]
fn fork_refuses_a_corrupt_snapshot() {
    if !kvm_available("fork_refuses_a_corrupt_snapshot") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    snapshot_demo(home.path(), "base");
    let vmstate = home.path().join("snapshots/base/vmstate.json");
    // One digit of the state's checksum changed (always a change: the digit is flipped
    // between two values), so the file is whole JSON whose content no longer matches.
    let text = std::fs::read_to_string(&vmstate).unwrap();
    let at = text.find("\"sha256:").expect("vmstate.json has a checksum") + 8;
    let digit = if &text[at..at + 1] == "0" { "1" } else { "0" };
    let text = format!("{}{digit}{}", &text[..at], &text[at + 1..]);
    std::fs::write(&vmstate, text).unwrap();
    let out = forkd(home.path(), &["fork", "--tag", "base", "-n", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("vmstate.json"), "{err}");
}

#[test]
fn bench_branch_reports_and_leaves_no_snapshot_behind() {
    if !kvm_available("bench_branch_reports_and_leaves_no_snapshot_behind") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let out = forkd(
        home.path(),
        &[
            "bench",
            "branch",
            "--mem-mib",
            "64",
            "--dirty-mib",
            "1",
            "--runs",
            "2",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["pause_diff"]["p50_ms"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(report["spawn_by_depth"].as_array().unwrap().len(), 4);
    assert_eq!(report["cold_spawn_by_depth"].as_array().unwrap().len(), 4);
    // Full branches, diff links and the chain are all removed afterwards.
    let snapshots = home.path().join("snapshots");
    let left: Vec<_> = std::fs::read_dir(&snapshots)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}
