//! virtio-net end to end: the net test guest (guests/net.c, 10.0.2.15) behind a tap in a
//! network namespace of its own, answering ARP and ICMP echo from that namespace; then
//! snapshotted while it runs, and a child restored in a second namespace, on that namespace's
//! own `tap0`, answers with the same address and MAC while the parent still answers in the
//! first.
//!
//! Namespaces, taps and pings: `common/netns.rs`. Without `ip`, network namespaces or
//! /dev/net/tun the tests print a `SKIP:` line and pass.

mod common;

use std::time::{Duration, Instant};

use common::netns::*;
use common::*;
use forkd_store::{Store, Tag};
use forkd_vmm::devices::virtio::net::DEFAULT_MAC;
use forkd_vmm::devices::virtio::NetConfig;
use forkd_vmm::snapshot::{restore, AfterSnapshot, Machine, RestoreIdentity, SnapshotMode};
use forkd_vmm::{SerialOutput, SharedBuffer};

#[test]
fn net_guest_answers_ping_through_a_tap_before_and_after_a_snapshot_and_in_a_restored_child() {
    let test =
        "net_guest_answers_ping_through_a_tap_before_and_after_a_snapshot_and_in_a_restored_child";
    if !kvm_available(test) {
        return;
    }
    let Some(ns1) = netns_or_skip(test, 1) else {
        return;
    };
    let ns2 = NetNs::create(2).expect("a second namespace");
    let mac = DEFAULT_MAC.to_string();

    let serial = SharedBuffer::new();
    let (config, virtio) = net_vm(&serial);
    let mut parent = ns1
        .run(|| Machine::boot(&config, &virtio))
        .expect("boot the net guest on ns1's tap0");
    wait_for_line(&serial, "READY net");
    assert!(
        serial
            .text()
            .contains(&format!("net: mac {mac} ip 10.0.2.15")),
        "{}",
        serial.text()
    );
    ns1.run(|| ping(GUEST_IP, 3, PING_TIMEOUT))
        .unwrap_or_else(|e| panic!("parent before the snapshot: {e}\n{}", serial.text()));
    let neigh = ns1.neighbours();
    assert!(
        neigh.contains("10.0.2.15") && neigh.contains(&mac),
        "{neigh}"
    );

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let tag = Tag::parse("net").unwrap();
    parent
        .snapshot(&store, &tag, SnapshotMode::Full, AfterSnapshot::Resume)
        .expect("snapshot the running guest");

    // A child in the second namespace: its own tap0, the snapshot's IP and MAC.
    let child_serial = SharedBuffer::new();
    let cdir = dir.path().join("child");
    std::fs::create_dir_all(&cdir).unwrap();
    let mut id = RestoreIdentity::in_dir(&cdir);
    id.serial = SerialOutput::Buffer(child_serial.clone());
    let child = ns2
        .run(|| restore(&store, &tag, &id))
        .expect("restore a child on ns2's tap0");
    ns2.run(|| ping(GUEST_IP, 3, PING_TIMEOUT))
        .unwrap_or_else(|e| panic!("restored child: {e}\n{}", child_serial.text()));
    assert!(
        child_serial.text().contains("net: echo reply to 10.0.2.1"),
        "the child's own serial shows no reply:\n{}",
        child_serial.text()
    );
    let neigh = ns2.neighbours();
    assert!(
        neigh.contains("10.0.2.15") && neigh.contains(&mac),
        "{neigh}"
    );

    // The parent kept running after the snapshot and still answers in its namespace.
    let before = serial.text().matches("net: echo reply").count();
    ns1.run(|| ping(GUEST_IP, 2, PING_TIMEOUT))
        .unwrap_or_else(|e| panic!("parent after the snapshot: {e}\n{}", serial.text()));
    assert!(serial.text().matches("net: echo reply").count() > before);

    let stats = child.devices.net.as_ref().unwrap().lock().unwrap().stats();
    assert!(stats.rx_frames >= 3 && stats.tx_frames >= 3, "{stats:?}");
    assert_eq!(stats.malformed, 0, "{stats:?}");
    child.stop();
    parent.stop();
}

#[test]
fn a_tap_that_does_not_exist_is_a_one_line_error_naming_it() {
    let test = "a_tap_that_does_not_exist_is_a_one_line_error_naming_it";
    if !kvm_available(test) {
        return;
    }
    let Some(ns) = netns_or_skip(test, 3) else {
        return;
    };
    let serial = SharedBuffer::new();
    let (config, mut virtio) = net_vm(&serial);
    virtio.net = Some(NetConfig::new("nosuchtap7"));
    let err = ns
        .run(|| Machine::boot(&config, &virtio))
        .expect_err("booted with a missing tap");
    let msg = forkd_store::error_chain(&err);
    assert!(msg.contains("\"nosuchtap7\""), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");

    // Restoring: a tap name given at restore that is not there; the snapshot's own name where
    // its tap is taken (by the running parent) and where there is none.
    let (config, virtio) = net_vm(&serial);
    let mut m = ns.run(|| Machine::boot(&config, &virtio)).expect("boot");
    wait_for_line(&serial, "READY net");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let tag = Tag::parse("net-bad").unwrap();
    m.snapshot(&store, &tag, SnapshotMode::Full, AfterSnapshot::Resume)
        .unwrap();
    let mut id = RestoreIdentity::in_dir(dir.path());
    id.net_tap = Some("nosuchtap8".into());
    let err = ns.run(|| restore(&store, &tag, &id)).expect_err("restored");
    let msg = forkd_store::error_chain(&err);
    assert!(
        msg.contains("\"nosuchtap8\"") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");

    let id = RestoreIdentity::in_dir(dir.path());
    let err = ns.run(|| restore(&store, &tag, &id)).expect_err("restored");
    let msg = forkd_store::error_chain(&err);
    assert!(msg.contains("\"tap0\"") && msg.contains("in use"), "{msg}");
    m.stop();

    let empty = NetNs::create(4).expect("namespace");
    ip(&["-n", &empty.name, "link", "del", TAP]).unwrap();
    let err = empty
        .run(|| restore(&store, &tag, &id))
        .expect_err("restored");
    let msg = forkd_store::error_chain(&err);
    assert!(
        msg.contains("\"tap0\"") && msg.contains("does not exist"),
        "{msg}"
    );
}

/// A tap whose interface is deleted while an active device polls it reports an error to
/// epoll (whatever the interest); the device must drop it from its polling rather than make the
/// device thread spin. (An inactive device's tap has no read interest and is not woken.)
#[test]
fn a_deleted_tap_is_dropped_from_polling() {
    use std::sync::Arc;

    use forkd_vmm::devices::virtio::net::Net;
    use forkd_vmm::devices::virtio::{Interrupt, VirtioDevice};
    use forkd_vmm::memory::{GuestAddress, GuestMemory};
    use virtio_queue::QueueT;

    let test = "a_deleted_tap_is_dropped_from_polling";
    let Some(ns) = netns_or_skip(test, 5) else {
        return;
    };
    let mut dev = ns.run(|| Net::open(TAP, DEFAULT_MAC)).expect("open tap0");
    let epfd = dev.host_event_fd().unwrap();
    let readable = |fd| {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd, a local borrowed for the call.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    };
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let queues = vec![
        virtio_queue::Queue::new(256).unwrap(),
        virtio_queue::Queue::new(256).unwrap(),
    ];
    dev.activate(mem, queues, Arc::new(Interrupt::new().unwrap()))
        .unwrap();
    assert!(!readable(epfd), "an idle device's epoll is readable");
    ip(&["-n", &ns.name, "link", "del", TAP]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !readable(epfd) {
        assert!(
            Instant::now() < deadline,
            "the deleted tap was never reported"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    dev.process_host_events();
    assert!(!readable(epfd), "the failed tap is still polled");
    // The device goes on without it.
    dev.process_queue(1);
    dev.process_host_events();
}
