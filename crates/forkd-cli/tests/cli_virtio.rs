//! `forkd vm run --rootfs / --vsock-uds`: virtio devices through the real binary and KVM.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::process::{Command, Output, Stdio};

use forkd_test_support::kvm_available;

fn forkd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run forkd")
}

#[test]
fn rootfs_is_served_to_the_guest_and_never_written() {
    if !kvm_available("rootfs_is_served_to_the_guest_and_never_written") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("rootfs.img");
    // The blk guest expects byte o of the disk to be o ^ (o >> 9) ^ 0x5a.
    let data: Vec<u8> = (0..64 * 512usize)
        .map(|o| (o ^ (o >> 9) ^ 0x5a) as u8)
        .collect();
    std::fs::write(&base, &data).unwrap();
    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        "builtin:blk",
        "--rootfs",
        base.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("blk: all checks passed"), "{stdout}");
    assert_eq!(
        std::fs::read(&base).unwrap(),
        data,
        "the rootfs image was written"
    );
}

#[test]
fn vsock_uds_reaches_the_guest() {
    if !kvm_available("vsock_uds_reaches_the_guest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let ready = UnixListener::bind(format!("{}_1025", uds.display())).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args([
            "vm",
            "run",
            "--kernel",
            "builtin:demo",
            "--serial",
            "/dev/null",
        ])
        .arg("--vsock-uds")
        .arg(&uds)
        .stdin(Stdio::null())
        .spawn()
        .expect("run forkd");
    let (conn, _) = ready.accept().unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(line, "READY demo\n");
}

#[test]
fn bad_virtio_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        "builtin:hello",
        "--rootfs",
        missing.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    if stderr.contains("/dev/kvm") {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("SKIP: the rest: no usable /dev/kvm ({stderr})\n").as_bytes(),
        );
        return;
    }
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("disk base image") && stderr.contains("missing.img"),
        "{stderr}"
    );

    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        "builtin:hello",
        "--vsock-uds",
        "/nonexistent-dir/v.sock",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("vsock socket /nonexistent-dir/v.sock"),
        "{stderr}"
    );
}
