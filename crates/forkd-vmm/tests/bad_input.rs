//! Bad inputs give one clear error naming the input, never a panic.

mod common;

use std::io::Write;

use common::*;
use forkd_vmm::{build, BuildError, KernelSource, SerialOutput, VmConfig};

fn config_for(kernel: KernelSource) -> VmConfig {
    let mut c = VmConfig::new(kernel);
    c.mem_mib = 16;
    c
}

fn build_err(config: &VmConfig) -> String {
    match build(config) {
        Ok(_) => panic!("build of {config:?} should fail"),
        // As the CLI prints it: the error and its causes, each once.
        Err(e) => forkd_test_support::assert_renders_once(&e),
    }
}

fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    f
}

#[test]
fn missing_kernel_file() {
    let err = build_err(&config_for(KernelSource::Path(
        "/nonexistent/vmlinux".into(),
    )));
    assert!(
        err.starts_with("cannot read kernel /nonexistent/vmlinux:"),
        "{err}"
    );
    assert!(err.contains("No such file"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = build_err(&config_for(KernelSource::Path(dir.path().into())));
    assert!(err.contains("is a directory"), "{err}");
}

#[test]
fn unknown_builtin_lists_the_choices() {
    let err = KernelSource::parse("builtin:nope").unwrap_err().to_string();
    assert!(err.contains("\"nope\"") && err.contains("demo"), "{err}");
}

#[test]
fn bad_sizes_are_rejected_before_touching_kvm() {
    let mut c = config_for(builtin("hello"));
    c.mem_mib = 1;
    assert!(build_err(&c).contains("memory size 1 MiB"));
    let mut c = config_for(builtin("hello"));
    c.vcpus = 0;
    assert!(build_err(&c).contains("vCPU count 0"));
    let mut c = config_for(builtin("hello"));
    c.vcpus = 1000;
    assert!(build_err(&c).contains("vCPU count 1000"));
    let mut c = config_for(builtin("hello"));
    c.cmdline = "x".repeat(5000);
    assert!(build_err(&c).contains("command line is 5000 bytes"));
}

#[test]
fn serial_file_in_missing_directory() {
    let mut c = config_for(builtin("hello"));
    c.serial = SerialOutput::File("/nonexistent/dir/serial.log".into());
    let err = build_err(&c);
    assert!(
        err.starts_with("serial output /nonexistent/dir/serial.log:"),
        "{err}"
    );
}

#[test]
fn not_a_kernel() {
    if !kvm_available("not_a_kernel") {
        return;
    }
    let f = file_with(b"#!/bin/sh\necho this is not a kernel\n");
    let err = build_err(&config_for(KernelSource::Path(f.path().into())));
    assert!(err.contains(&f.path().display().to_string()), "{err}");
    assert!(
        err.contains("neither an ELF vmlinux nor a bzImage"),
        "{err}"
    );

    let f = file_with(b"");
    let err = build_err(&config_for(KernelSource::Path(f.path().into())));
    assert!(err.contains("kernel image is empty"), "{err}");
}

#[test]
fn truncated_elf() {
    if !kvm_available("truncated_elf") {
        return;
    }
    let hello = forkd_vmm::guests::HELLO;
    // Header and program headers intact, segment data cut off.
    let f = file_with(&hello[..200]);
    let err = build_err(&config_for(KernelSource::Path(f.path().into())));
    assert!(err.contains("malformed or truncated"), "{err}");
    assert!(err.contains(&f.path().display().to_string()), "{err}");
    // Cut inside the ELF header.
    let f = file_with(&hello[..40]);
    let err = build_err(&config_for(KernelSource::Path(f.path().into())));
    assert!(err.contains("malformed or truncated"), "{err}");
}

#[test]
fn elf_for_another_machine() {
    if !kvm_available("elf_for_another_machine") {
        return;
    }
    let mut image = forkd_vmm::guests::HELLO.to_vec();
    image[18] = 183; // EM_AARCH64
    let f = file_with(&image);
    let err = build_err(&config_for(KernelSource::Path(f.path().into())));
    assert!(err.contains("not a 64-bit x86_64 executable"), "{err}");
    assert!(matches!(
        build(&config_for(KernelSource::Path(f.path().into()))),
        Err(BuildError::Kernel { .. })
    ));
}

#[test]
fn kernel_larger_than_guest_memory() {
    if !kvm_available("kernel_larger_than_guest_memory") {
        return;
    }
    // A valid ELF whose segment is placed at 64 MiB, outside 16 MiB of RAM.
    let mut image = forkd_vmm::guests::HELLO.to_vec();
    let phoff = u64::from_le_bytes(image[32..40].try_into().unwrap()) as usize;
    for field in [16, 24] {
        // p_vaddr, p_paddr of the first program header
        let at = phoff + field;
        image[at..at + 8].copy_from_slice(&(64u64 << 20).to_le_bytes());
    }
    let f = file_with(&image);
    let err = build_err(&config_for(KernelSource::Path(f.path().into())));
    assert!(err.contains("does not fit in guest memory"), "{err}");
}

/// Initrd problems are found before any KVM object exists: these tests do not need /dev/kvm.
#[test]
fn bad_initrds_are_refused_with_their_path_and_the_problem() {
    let mut c = config_for(builtin("hello"));
    c.initrd = Some("/nonexistent/initramfs.img".into());
    let err = build_err(&c);
    assert!(
        err.starts_with("initrd /nonexistent/initramfs.img: ") && err.contains("No such file"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    c.initrd = Some(dir.path().into());
    let err = build_err(&c);
    assert!(err.contains("not a regular file"), "{err}");

    let empty = file_with(b"");
    c.initrd = Some(empty.path().into());
    let err = build_err(&c);
    assert!(err.ends_with(": is empty"), "{err}");

    // As large as the guest's whole RAM (sparse, so the test writes nothing).
    let big = tempfile::NamedTempFile::new().unwrap();
    big.as_file().set_len(16 << 20).unwrap();
    c.initrd = Some(big.path().into());
    let err = build_err(&c);
    assert!(
        err.contains(&format!(
            "initrd {}: is 16777216 bytes",
            big.path().display()
        )) && err.contains("give the VM more memory"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
