//! `forkd snapshot` and `forkd compact` through the real binary and KVM: the happy path with
//! the demo guest and every bad input (each one line, non-zero exit, nothing left behind).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use forkd_test_support::kvm_available;

fn forkd(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(args)
        .env("FORKD_HOME", home)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run forkd")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Entries of the snapshots directory (published tags and any leftover staging dirs).
fn snapshot_entries(home: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.join("snapshots"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Runs a command expected to fail with a one-line error mentioning every `needle`.
fn fails(home: &Path, args: &[&str], needles: &[&str]) {
    let o = forkd(home, args);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
    }
}

#[test]
fn snapshot_of_the_demo_guest_is_published_and_compacts() {
    if !kvm_available("snapshot_of_the_demo_guest_is_published_and_compacts") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let o = forkd(
        h,
        &[
            "snapshot",
            "--tag",
            "demo",
            "--kernel",
            "builtin:demo",
            "--mem-mib",
            "32",
            "--json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tag"], "demo");
    assert_eq!(v["memory_mib"], 32);
    assert!(v["pages_written"].as_u64().unwrap() > 0);
    let dir = h.join("snapshots/demo");
    for f in ["manifest.toml", "memory.bin", "vmstate.json"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert_eq!(
        std::fs::metadata(dir.join("memory.bin")).unwrap().len(),
        32 << 20
    );
    let o = forkd(h, &["verify", "demo"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));

    // The same tag again is refused and the original is untouched.
    fails(
        h,
        &["snapshot", "--tag", "demo", "--kernel", "builtin:demo"],
        &["\"demo\" already exists"],
    );

    let o = forkd(h, &["compact", "--from", "demo", "--to", "flat"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = forkd(h, &["inspect", "flat", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["depth"], 0);
    fails(
        h,
        &["compact", "--from", "missing", "--to", "x"],
        &["no snapshot tagged \"missing\""],
    );
    fails(
        h,
        &["compact", "--from", "demo", "--to", "flat"],
        &["\"flat\" already exists"],
    );
    // With a disk: the snapshot stores the disk as the guest saw it; the image is untouched.
    let disk = h.join("disk.img");
    let content: Vec<u8> = (0..256 * 1024).map(|i: usize| (i % 253) as u8).collect();
    std::fs::write(&disk, &content).unwrap();
    let o = forkd(
        h,
        &[
            "snapshot",
            "--tag",
            "withdisk",
            "--kernel",
            "builtin:demo",
            "--mem-mib",
            "16",
            "--rootfs",
            disk.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).starts_with("snapshot withdisk: 16 MiB"));
    let rootfs = h.join("snapshots/withdisk/rootfs.ext4");
    assert_eq!(std::fs::read(rootfs).unwrap(), content);
    assert_eq!(std::fs::read(&disk).unwrap(), content);
    assert_eq!(snapshot_entries(h), vec!["demo", "flat", "withdisk"]);
}

#[test]
fn snapshot_bad_inputs_leave_nothing_behind() {
    if !kvm_available("snapshot_bad_inputs_leave_nothing_behind") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // A guest that runs but never says READY.
    fails(
        h,
        &[
            "snapshot",
            "--tag",
            "t1",
            "--kernel",
            "builtin:serial_echo",
            "--mem-mib",
            "16",
            "--ready-timeout",
            "1",
        ],
        &[
            "did not report ready within 1 s",
            "READY",
            "ready for input",
        ],
    );
    // A guest that exits first.
    fails(
        h,
        &[
            "snapshot",
            "--tag",
            "t2",
            "--kernel",
            "builtin:hello",
            "--mem-mib",
            "16",
        ],
        &["stopped before it was ready", "exited with code 0"],
    );
    fails(
        h,
        &[
            "snapshot",
            "--tag",
            "t3",
            "--kernel",
            "builtin:demo",
            "--rootfs",
            "/nonexistent/disk",
        ],
        &["rootfs /nonexistent/disk", "No such file"],
    );
    fails(
        h,
        &[
            "snapshot",
            "--tag",
            "t4",
            "--kernel",
            "/nonexistent/vmlinux",
        ],
        &["/nonexistent/vmlinux"],
    );
    fails(
        h,
        &[
            "snapshot",
            "--tag",
            "t4i",
            "--kernel",
            "builtin:demo",
            "--initrd",
            "/nonexistent/initramfs.img",
        ],
        &["initrd /nonexistent/initramfs.img", "No such file"],
    );
    fails(
        h,
        &[
            "snapshot",
            "--tag",
            "t5",
            "--kernel",
            "builtin:demo",
            "--mem-mib",
            "1",
        ],
        &["memory size 1 MiB"],
    );
    fails(
        h,
        &[
            "snapshot",
            "--tag",
            "t6",
            "--kernel",
            "builtin:demo",
            "--ready-timeout",
            "0",
        ],
        &["--ready-timeout"],
    );
    let o = forkd(
        h,
        &["snapshot", "--tag", "bad tag", "--kernel", "builtin:demo"],
    );
    assert_eq!(o.status.code(), Some(2), "clap usage error");
    assert!(text(&o.stderr).contains("invalid tag"));
    assert!(
        snapshot_entries(h).is_empty(),
        "left behind: {:?}",
        snapshot_entries(h)
    );
}
