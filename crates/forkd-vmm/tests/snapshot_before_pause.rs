//! `snapshot_after_ready_with`: the pre-snapshot hook (what `forkd snapshot --warmup` uses)
//! runs in the ready, running guest with its hybrid-vsock socket; a failing hook publishes
//! nothing.

mod common;

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use forkd_store::{error_chain, Store, Tag};
use forkd_vmm::snapshot::{snapshot_after_ready_with, BootSnapshot, BootSnapshotError};
use forkd_vmm::VmConfig;

fn demo() -> BootSnapshot {
    let mut vm = VmConfig::new(builtin("demo"));
    vm.mem_mib = 64;
    BootSnapshot {
        vm,
        rootfs: None,
        ready_timeout: Duration::from_secs(60),
    }
}

/// The demo guest's counter, asked through the socket the hook was given.
fn counter_through(uds: &Path) -> Result<String, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"CONNECT 1024\nCOUNTER hook\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut byte = [0u8; 1];
    while text.matches('\n').count() < 2 && s.read(&mut byte).map_err(|e| e.to_string())? == 1 {
        text.push(byte[0] as char);
    }
    Ok(text)
}

#[test]
fn the_hook_runs_in_the_running_guest_and_its_failure_publishes_nothing() {
    if !kvm_available("the_hook_runs_in_the_running_guest_and_its_failure_publishes_nothing") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let tag = Tag::parse("warm").unwrap();

    let answered = Cell::new(String::new());
    let err = snapshot_after_ready_with(
        &store,
        &tag,
        &demo(),
        Some(Box::new(|uds: &Path| {
            answered.set(counter_through(uds)?);
            Err("warm-up command \"false\" failed: exit code 1".into())
        })),
    )
    .unwrap_err();
    assert!(
        matches!(err, BootSnapshotError::BeforePause { .. }),
        "{err}"
    );
    let text = error_chain(&err);
    assert!(
        text.starts_with("the work in the ready guest before the snapshot failed")
            && text.ends_with(": warm-up command \"false\" failed: exit code 1"),
        "{text}"
    );
    let reply = answered.take();
    assert!(
        reply.starts_with("OK ") && reply.contains("COUNTER "),
        "{reply:?}"
    );
    assert!(reply.trim_end().ends_with(" hook"), "{reply:?}");
    assert!(
        !store.exists(&tag),
        "a failed hook must not publish the snapshot"
    );

    let ran = Cell::new(false);
    let report = snapshot_after_ready_with(
        &store,
        &tag,
        &demo(),
        Some(Box::new(|_: &Path| {
            ran.set(true);
            Ok(())
        })),
    )
    .unwrap();
    assert!(ran.get());
    assert!(store.exists(&tag));
    assert_eq!(report.snapshot.manifest.tag, tag);
}
