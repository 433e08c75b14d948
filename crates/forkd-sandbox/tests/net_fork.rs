//! Real children of a net snapshot, each in a network of its own prepared by a NetPool: every
//! child keeps the snapshot's IP, MAC and tap name in its namespace, answers ping there, and
//! is reached through its veth and NAT from a server the policy allows. Nothing is left once
//! the children have stopped and the pool is dropped.
//!
//! One test in this binary so that the pool forks with no other test threads running.

mod common;

use std::time::{Duration, Instant};

use common::netlab::*;
use forkd_sandbox::fork::{fork_snapshot_net, ChildCheck, ForkPlan};
use forkd_sandbox::net::{leftovers, GuestNet, NetPolicy, NetPool};
use forkd_store::{Store, Tag};
use forkd_test_support::{kvm_available, skip};
use forkd_vmm::devices::virtio::{NetConfig, VirtioConfig};
use forkd_vmm::snapshot::{AfterSnapshot, LoadedSnapshot, Machine, SnapshotMode};
use forkd_vmm::{KernelSource, SerialOutput, SharedBuffer, VmConfig};

const CHILDREN: usize = 3;

/// Boots the net guest on `tap0` of namespace `ns` and snapshots it once it is ready.
fn net_snapshot(ns: &str, store: &Store, tag: &Tag) {
    ip(Some(ns), &["tuntap", "add", "dev", "tap0", "mode", "tap"]).unwrap();
    ip(Some(ns), &["link", "set", "tap0", "up"]).unwrap();
    let serial = SharedBuffer::new();
    let mut config = VmConfig::new(KernelSource::parse("builtin:net").unwrap());
    config.mem_mib = 32;
    config.serial = SerialOutput::Buffer(serial.clone());
    let virtio = VirtioConfig {
        net: Some(NetConfig::new("tap0")),
        ..VirtioConfig::default()
    };
    let mut m = in_ns(ns, || Machine::boot(&config, &virtio)).expect("boot the net guest");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serial.text().contains("READY net") {
        assert!(Instant::now() < deadline, "no READY net: {}", serial.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    m.snapshot(store, tag, SnapshotMode::Full, AfterSnapshot::StayPaused)
        .unwrap();
    m.stop();
}

#[test]
fn forked_children_each_answer_in_their_own_network_and_leave_nothing() {
    let test = "forked_children_each_answer_in_their_own_network_and_leave_nothing";
    if !kvm_available(test) {
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return skip(test, "/dev/net/tun does not exist");
    }
    let lab = match Lab::create("fork") {
        Ok(lab) => lab,
        Err(e) => return skip(test, format!("no network namespace lab here: {e}")),
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let tag = Tag::parse("net").unwrap();
    // The boot namespace is the lab's server: the snapshot's tap only has to exist there.
    net_snapshot(&lab.server, &store, &tag);
    ip(Some(&lab.server), &["link", "del", "tap0"]).unwrap();

    let loaded = LoadedSnapshot::load(&store, &tag).unwrap();
    let tap = loaded
        .state()
        .devices
        .net
        .as_ref()
        .expect("a net device")
        .tap
        .clone();
    let host = lab.net_host();
    let policy = NetPolicy {
        allow: vec!["10.201.0.2/32".parse().unwrap()],
        ..NetPolicy::default()
    };
    let mut nets = NetPool::new(host.clone(), GuestNet::standard(&tap), policy).unwrap();
    nets.prepare(0..CHILDREN).unwrap();
    let names: Vec<String> = nets.children().map(|(_, n)| n.netns.clone()).collect();
    let plan = ForkPlan {
        n: CHILDREN,
        run_dir: dir.path().join("run").into(),
        snapshot_counter: None,
        timeout: Duration::from_secs(60),
        dirty_kib: None,
        jail: Default::default(),
    };
    let (mut pool, report) =
        fork_snapshot_net(&loaded, &plan, false, &ChildCheck::StartOnly, Some(&nets)).unwrap();
    assert_eq!(report.alive, CHILDREN, "{report:#?}");

    for (i, net) in nets.children() {
        let inside = in_ns(&net.netns, || ping(GUEST_IP, 3, Duration::from_secs(20)));
        assert!(inside.is_ok(), "child {i} in {}: {inside:?}", net.netns);
        let neigh = ip(Some(&net.netns), &["neigh", "show", "dev", &tap]).unwrap();
        assert!(
            neigh.contains("10.0.2.15") && neigh.contains("06:00:ac:10:00:02"),
            "child {i} keeps the snapshot's IP and MAC: {neigh}"
        );
        let addr = net.address;
        let from_server = in_ns(&lab.server, || ping(addr, 2, Duration::from_secs(20)));
        assert!(
            from_server.is_ok(),
            "child {i} at {addr} from the server: {from_server:?}"
        );
    }

    let stopped = pool.stop_all(Duration::from_secs(10));
    assert!(stopped.iter().all(|s| s.is_clean()), "{stopped:?}");
    drop(pool);
    drop(nets);
    let left: Vec<&String> = names
        .iter()
        .filter(|n| std::path::Path::new(&format!("/run/netns/{n}")).exists())
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let rest = leftovers(&host, Some(std::process::id() as i32));
    assert!(rest.host_veths.is_empty() && !rest.table, "left: {rest:?}");
}
