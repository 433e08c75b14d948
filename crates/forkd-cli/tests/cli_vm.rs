//! `forkd vm run`: exit codes, serial output and bad inputs, through the real binary and KVM.

use std::io::{BufRead, BufReader};
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn hello_guest_exits_zero_with_serial_on_stdout() {
    if !kvm_available("hello_guest_exits_zero_with_serial_on_stdout") {
        return;
    }
    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        "builtin:hello",
        "--cmdline",
        "quiet forkd=1",
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("Hello from forkd guest!"), "{out}");
    assert!(out.contains("cmdline: quiet forkd=1"), "{out}");
}

#[test]
fn serial_goes_to_a_file() {
    if !kvm_available("serial_goes_to_a_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        "builtin:smp",
        "--vcpus",
        "2",
        "--mem-mib",
        "32",
        "--serial",
        log.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    assert!(o.stdout.is_empty());
    let serial = std::fs::read_to_string(&log).unwrap();
    assert!(serial.contains("all 2 cpus online"), "{serial}");
}

#[test]
fn guest_exit_code_becomes_the_exit_status() {
    if !kvm_available("guest_exit_code_becomes_the_exit_status") {
        return;
    }
    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        "builtin:exit_code",
        "--cmdline",
        "exit=5",
    ]);
    assert_eq!(o.status.code(), Some(5));
    assert!(text(&o.stderr).contains("guest exited with code 5"));
}

#[test]
fn reset_is_a_clean_stop() {
    if !kvm_available("reset_is_a_clean_stop") {
        return;
    }
    let o = forkd(&["vm", "run", "--kernel", "builtin:reset"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
}

#[test]
fn acpi_poweroff_and_reboot_are_clean_stops() {
    if !kvm_available("acpi_poweroff_and_reboot_are_clean_stops") {
        return;
    }
    // The guest finds the power-off and reset registers through the FADT and \_S5_, as Linux's
    // `poweroff` and default `reboot` do.
    for (action, said) in [
        ("poweroff", "acpi_power: S5 SLP_TYP 5, powering off"),
        ("reboot", "acpi_power: resetting"),
    ] {
        let o = forkd(&[
            "vm",
            "run",
            "--kernel",
            "builtin:acpi_power",
            "--cmdline",
            &format!("console=ttyS0 {action}"),
        ]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{action}: stderr: {}",
            text(&o.stderr)
        );
        assert!(text(&o.stdout).contains(said), "{}", text(&o.stdout));
        assert!(o.stderr.is_empty(), "{action}: {}", text(&o.stderr));
    }
}

#[test]
fn a_triple_fault_is_one_error_line_with_the_registers() {
    if !kvm_available("a_triple_fault_is_one_error_line_with_the_registers") {
        return;
    }
    let o = forkd(&["vm", "run", "--kernel", "builtin:triple_fault"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("forkd: error: vCPU 0 triple fault, KVM_EXIT_SHUTDOWN (rip=0x"),
        "{err}"
    );
    for field in [" rsp=0x", " cr0=0x", " cr3=0x", " cr4=0x", " efer=0x"] {
        assert!(err.contains(field), "{err} lacks {field}");
    }
}

#[test]
fn guest_fault_is_one_clear_error_line() {
    if !kvm_available("guest_fault_is_one_clear_error_line") {
        return;
    }
    let o = forkd(&["vm", "run", "--kernel", "builtin:fault"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("forkd: error: "), "{err}");
    assert!(err.contains("(rip=0x"), "{err}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(err.contains("KVM_EXIT_INTERNAL_ERROR"), "{err}");
        assert!(
            err.contains("PVM") && err.contains("see forkd doctor"),
            "{err}"
        );
    }
}

#[test]
fn demo_guest_runs_until_killed() {
    if !kvm_available("demo_guest_runs_until_killed") {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["vm", "run", "--kernel", "builtin:demo"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "forkd demo guest running");
    let counter = lines.next().unwrap().unwrap();
    assert!(counter.starts_with("counter "), "{counter}");
    assert_eq!(child.try_wait().unwrap(), None, "still running");
    // SIGTERM is a stop request: a clean stop, exit status 0.
    // SAFETY: kill(2) takes only integers and touches no memory of ours; the pid is our own
    // child, not yet waited for, so it still names that process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let not_kernel = dir.path().join("notes.txt");
    std::fs::write(&not_kernel, "just text\n").unwrap();
    let truncated = dir.path().join("truncated.elf");
    std::fs::write(&truncated, &forkd_vmm::guests::HELLO[..100]).unwrap();
    let needs_kvm = kvm_available("bad_inputs_are_one_line_errors (kernel-format cases)");
    let huge_initrd = dir.path().join("huge.img");
    std::fs::File::create(&huge_initrd)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();

    let mut cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), "/nonexistent/vmlinux".into()],
            "cannot read kernel /nonexistent/vmlinux",
        ),
        (
            vec!["--kernel".into(), "builtin:nope".into()],
            "no built-in guest named \"nope\"",
        ),
        (
            vec![
                "--kernel".into(),
                "builtin:hello".into(),
                "--vcpus".into(),
                "0".into(),
            ],
            "vCPU count 0",
        ),
        (
            vec![
                "--kernel".into(),
                "builtin:hello".into(),
                "--mem-mib".into(),
                "2".into(),
            ],
            "memory size 2 MiB",
        ),
        (
            vec![
                "--kernel".into(),
                "builtin:hello".into(),
                "--serial".into(),
                "/nonexistent/dir/log".into(),
            ],
            "serial output /nonexistent/dir/log",
        ),
        (
            vec![
                "--kernel".into(),
                "builtin:hello".into(),
                "--initrd".into(),
                "/nonexistent/initramfs.img".into(),
            ],
            "initrd /nonexistent/initramfs.img: No such file",
        ),
        (
            vec![
                "--kernel".into(),
                "builtin:hello".into(),
                "--mem-mib".into(),
                "16".into(),
                "--initrd".into(),
                huge_initrd.display().to_string(),
            ],
            "is 33554432 bytes but only",
        ),
    ];
    if needs_kvm {
        cases.push((
            vec!["--kernel".into(), not_kernel.display().to_string()],
            "neither an ELF vmlinux nor a bzImage",
        ));
        cases.push((
            vec!["--kernel".into(), truncated.display().to_string()],
            "malformed or truncated",
        ));
        cases.push((
            vec![
                "--kernel".into(),
                "builtin:net".into(),
                "--net-tap".into(),
                "nosuchtap9".into(),
            ],
            "tap device \"nosuchtap9\" does not exist",
        ));
    }
    for (extra, expected) in cases {
        let mut args = vec!["vm".to_string(), "run".to_string()];
        args.extend(extra.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = forkd(&argv);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{argv:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{argv:?}: {err}");
        assert!(err.contains(expected), "{argv:?}: {err}");
    }
    // A MAC that is not one, and a MAC without a tap, are usage errors (exit 2).
    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        "builtin:net",
        "--net-tap",
        "t",
        "--net-mac",
        "01:02",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("not a MAC address"));
    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        "builtin:net",
        "--net-mac",
        "06:00:00:00:00:01",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--net-tap"));
    // clap rejects a missing --kernel with its usage error (exit 2).
    let o = forkd(&["vm", "run"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--kernel"));
}

/// The line `hello` prints about the initrd it found in the zero page.
fn initrd_line(out: &str) -> Option<&str> {
    out.lines().find(|l| l.starts_with("initrd: at "))
}

#[test]
fn initrd_is_passed_explicitly_or_taken_from_a_cached_kernel() {
    if !kvm_available("initrd_is_passed_explicitly_or_taken_from_a_cached_kernel") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("my.img");
    std::fs::write(&initrd, vec![0x5a; 5000]).unwrap();
    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        "builtin:hello",
        "--mem-mib",
        "32",
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let out = text(&o.stdout);
    let line = initrd_line(&out).unwrap_or_else(|| panic!("no initrd seen:\n{out}"));
    assert!(line.contains(" size 5000 "), "{line}");

    // A kernel laid out like a `forkd kernel fetch` cache entry brings its initramfs along.
    let entry = dir.path().join("kernels").join("6.1.0-test");
    std::fs::create_dir_all(&entry).unwrap();
    std::fs::write(entry.join("vmlinuz"), forkd_vmm::guests::HELLO).unwrap();
    std::fs::write(entry.join("kernel.json"), "{}").unwrap();
    std::fs::write(entry.join("initramfs.img"), vec![0x17; 7000]).unwrap();
    let vmlinuz = entry.join("vmlinuz");
    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        vmlinuz.to_str().unwrap(),
        "--mem-mib",
        "32",
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let out = text(&o.stdout);
    let line = initrd_line(&out).unwrap_or_else(|| panic!("cached initramfs not used:\n{out}"));
    assert!(line.contains(" size 7000 "), "{line}");

    // The same file under another name is just a kernel: no initrd.
    let other = dir.path().join("hello.elf");
    std::fs::write(&other, forkd_vmm::guests::HELLO).unwrap();
    let o = forkd(&[
        "vm",
        "run",
        "--kernel",
        other.to_str().unwrap(),
        "--mem-mib",
        "32",
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    assert!(initrd_line(&text(&o.stdout)).is_none());
}
