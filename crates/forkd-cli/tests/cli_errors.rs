//! Errors as a user meets them: one line, each cause once, and the command to type next added
//! by the CLI (the engine's errors carry no CLI wording).

mod common;

use std::path::Path;
use std::process::Output;

use common::{forkd, snapshot_demo};
use forkd_test_support::kvm_available;

/// Exit code 1 and one stderr line that contains every `needle` and repeats no part of itself.
fn one_clean_line(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    assert_no_repeated_part(&err);
    err
}

/// The `: `-separated parts of an error line (and the hint in parentheses) each appear once.
fn assert_no_repeated_part(line: &str) {
    let parts: Vec<&str> = line
        .trim_end()
        .split(": ")
        .flat_map(|p| p.split(" ("))
        .map(str::trim)
        .filter(|p| p.len() >= 8)
        .collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(part),
            "{part:?} appears twice in {line:?}"
        );
    }
}

#[test]
fn the_repeated_part_check_catches_a_cause_printed_twice() {
    let doubled = "forkd: error: kernel /etc/hostname: kernel image is neither an ELF \
                   vmlinux nor a bzImage: kernel image is neither an ELF vmlinux nor a bzImage";
    assert!(std::panic::catch_unwind(|| assert_no_repeated_part(doubled)).is_err());
    assert_no_repeated_part("forkd: error: kernel /etc/hostname: kernel image is empty");
}

#[test]
fn a_file_that_is_not_a_kernel_is_named_once() {
    if !kvm_available("a_file_that_is_not_a_kernel_is_named_once") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let out = forkd(home.path(), &["vm", "run", "--kernel", "/etc/hostname"]);
    one_clean_line(
        &out,
        &[
            "kernel /etc/hostname: ",
            "neither an ELF vmlinux nor a bzImage",
        ],
    );
}

#[test]
fn a_missing_kernel_is_named_once() {
    let home = tempfile::tempdir().unwrap();
    let out = forkd(
        home.path(),
        &["vm", "run", "--kernel", "/nonexistent/vmlinux"],
    );
    one_clean_line(
        &out,
        &["cannot read kernel /nonexistent/vmlinux", "No such file"],
    );
    let out = forkd(
        home.path(),
        &["snapshot", "--tag", "k", "--kernel", "/nonexistent/vmlinuz"],
    );
    one_clean_line(
        &out,
        &["snapshot k: ", "/nonexistent/vmlinuz", "No such file"],
    );
}

#[test]
fn an_unknown_tag_gets_the_command_that_lists_tags() {
    let home = tempfile::tempdir().unwrap();
    let out = forkd(home.path(), &["fork", "--tag", "nosuch"]);
    let line = one_clean_line(&out, &["no snapshot tagged \"nosuch\""]);
    assert!(line.trim_end().ends_with("(see `forkd images`)"), "{line}");
    let out = forkd(home.path(), &["rmi", "nosuch"]);
    one_clean_line(&out, &["no snapshot tagged \"nosuch\"", "forkd images"]);
}

#[test]
fn a_tampered_pack_is_refused_in_one_line() {
    if !kvm_available("a_tampered_pack_is_refused_in_one_line") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    snapshot_demo(h, "demo");
    let pack = h.join("demo.forkd-snapshot.tar.zst");
    let packed = forkd(h, &["pack", "--tag", "demo", "-o", pack.to_str().unwrap()]);
    assert!(packed.status.success(), "{packed:?}");
    tamper(&pack);
    let out = forkd(h, &["unpack", "--tag", "copy", pack.to_str().unwrap()]);
    one_clean_line(&out, &[pack.to_str().unwrap()]);
    let listed = forkd(h, &["images"]);
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("copy"),
        "a refused pack installs nothing"
    );
}

/// Flips one byte in the middle of the file (inside the compressed snapshot data).
fn tamper(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_taken_tag_gets_the_command_that_frees_it() {
    if !kvm_available("a_taken_tag_gets_the_command_that_frees_it") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    snapshot_demo(home.path(), "demo");
    let snapshot = ["snapshot", "--tag", "demo", "--kernel", "builtin:demo"];
    let out = forkd(home.path(), &snapshot);
    one_clean_line(
        &out,
        &[
            "snapshot \"demo\" already exists",
            "(remove it with `forkd rmi demo`",
        ],
    );
}
