//! Per-child networks without a VM: the test plays the guest on each child's tap (see
//! common/netlab.rs) to check the policy, NAT both ways, published ports, isolation between
//! children and from the host, and that nothing is left behind — after a clean drop and after
//! the owner is killed with SIGKILL and the sweep runs.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use common::netlab::*;
use forkd_sandbox::net::{leftovers, sweep, GuestNet, NetPolicy, NetPool};
use forkd_test_support::skip;

fn lab_or_skip(test: &str, tag: &str) -> Option<Lab> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        skip(test, "/dev/net/tun does not exist");
        return None;
    }
    match Lab::create(tag) {
        Ok(lab) => Some(lab),
        Err(e) => {
            skip(test, format!("no network namespace lab here: {e}"));
            None
        }
    }
}

fn policy(allow: &[&str]) -> NetPolicy {
    NetPolicy {
        allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
        ..NetPolicy::default()
    }
}

fn gone(netns: &[String]) -> Vec<String> {
    netns
        .iter()
        .filter(|n| std::path::Path::new(&format!("/run/netns/{n}")).exists())
        .cloned()
        .collect()
}

/// The fake guest answers one echo request that reaches it (after the namespace's DNAT).
fn answer_one_echo(g: &FakeGuest) -> Option<Ipv4Addr> {
    let req = g.recv_ip(Duration::from_secs(5), |p| {
        p[9] == 1 && p[16..20] == GUEST_IP.octets() && p[20] == 8
    })?;
    let src = Ipv4Addr::new(req[12], req[13], req[14], req[15]);
    let mut icmp = req[20..].to_vec();
    icmp[0] = 0;
    icmp[2..4].copy_from_slice(&[0, 0]);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    g.send_ip(&ipv4(GUEST_IP, src, 1, &icmp));
    Some(src)
}

#[test]
fn egress_is_denied_unless_allowed_and_children_reach_neither_siblings_nor_the_host() {
    let test = "egress_is_denied_unless_allowed_and_children_reach_neither_siblings_nor_the_host";
    let Some(lab) = lab_or_skip(test, "pol") else {
        return;
    };
    let host = lab.net_host();
    let guest = GuestNet::standard("tap0");
    let mut allowed =
        NetPool::new(host.clone(), guest.clone(), policy(&["10.201.0.2/32"])).unwrap();
    allowed.prepare(0..2).unwrap();
    let mut meta = NetPool::new(host.clone(), guest.clone(), policy(&["169.254.169.254"])).unwrap();
    meta.prepare(0..1).unwrap();
    let names: Vec<String> = allowed
        .children()
        .chain(meta.children())
        .map(|(_, n)| n.netns.clone())
        .collect();
    let (c0, c1, m0) = (
        allowed.child(0).unwrap(),
        allowed.child(1).unwrap(),
        meta.child(0).unwrap(),
    );
    assert_ne!(c0.address, c1.address, "each child has its own address");

    let mut g0 = FakeGuest::open(&c0.netns, "tap0");
    assert!(g0.echo(SERVER), "the allowed server answers child 0");
    assert!(!g0.echo(DENIED), "a destination not allowed is unreachable");
    g0.send_ip(&ipv4(GUEST_IP, DENIED, 1, &echo_request(7, 7)));
    let refused = g0.recv_ip(Duration::from_secs(1), |p| {
        p[9] == 1 && p[20] == 3 && p[21] == 13
    });
    assert!(
        refused.is_some(),
        "a denied destination is refused at once (ICMP administratively prohibited)"
    );
    assert!(
        !g0.echo(METADATA),
        "the metadata address is closed by default"
    );
    assert!(!g0.echo(c1.address), "a sibling is unreachable");
    assert!(
        !g0.echo(c0.host_address),
        "the host's end of the veth is closed"
    );
    assert!(!g0.echo(SERVER_GW), "the host's other addresses are closed");
    assert!(
        !g0.echo(Ipv4Addr::LOCALHOST),
        "loopback via the veth is closed"
    );

    let mut gm = FakeGuest::open(&m0.netns, "tap0");
    assert!(
        gm.echo(METADATA),
        "an --allow inside the metadata range opens it"
    );
    assert!(!gm.echo(SERVER), "another child's allow is not this one's");

    // Inbound: the server reaches child 0 at its address; the namespace hands it to the guest.
    let to = c0.address;
    let server = lab.server.clone();
    let pinger = std::thread::spawn(move || in_ns(&server, || ping(to, 1, Duration::from_secs(5))));
    assert_eq!(
        answer_one_echo(&g0),
        Some(SERVER),
        "the guest sees the server's address"
    );
    pinger
        .join()
        .unwrap()
        .expect("the server's echo is answered by the guest");

    // Published: a host port reaches the guest's port, on a host address and on loopback.
    allowed.publish(0, &["18080:80".parse().unwrap()]).unwrap();
    for target in [SERVER_GW, Ipv4Addr::LOCALHOST] {
        let h = lab.host.clone();
        let connect = std::thread::spawn(move || {
            in_ns(&h, || {
                let _ = TcpStream::connect_timeout(
                    &SocketAddr::from((target, 18080)),
                    Duration::from_secs(2),
                );
            })
        });
        let syn = g0.recv_ip(Duration::from_secs(3), |p| {
            p[9] == 6 && p[16..20] == GUEST_IP.octets() && p[22..24] == 80u16.to_be_bytes()
        });
        assert!(
            syn.is_some(),
            "a connection to {target}:18080 reaches guest port 80"
        );
        connect.join().unwrap();
    }

    drop((g0, gm));
    drop(allowed);
    drop(meta);
    let left = leftovers(&host, Some(std::process::id() as i32));
    assert_eq!(gone(&names), Vec::<String>::new(), "namespaces left");
    assert_eq!(left.host_veths, Vec::<String>::new(), "host veths left");
    assert!(
        !left.table,
        "the host's forkd table is removed once no child uses it"
    );
}

#[test]
fn a_killed_owners_networks_are_swept() {
    let test = "a_killed_owners_networks_are_swept";
    let Some(lab) = lab_or_skip(test, "kill") else {
        return;
    };
    let host = lab.net_host();
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fork(2) takes no pointers; the child never returns into this test's frames (it
    // leaves with _exit) and glibc's fork resets the allocator's locks.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let host = host.clone();
        let code = std::panic::catch_unwind(move || {
            let mut pool =
                NetPool::new(host, GuestNet::standard("tap0"), NetPolicy::default()).unwrap();
            pool.prepare(0..3).unwrap();
            // SAFETY: writes one byte from a static buffer to the pipe's write end.
            unsafe { libc::write(fds[1], b"r".as_ptr().cast(), 1) };
            std::mem::forget(pool); // it is killed, never dropped
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        // SAFETY: _exit takes an integer and does not return.
        unsafe { libc::_exit(if code.is_ok() { 0 } else { 101 }) };
    }
    // SAFETY: closes this process's copy of the write end (the child keeps its own), so a
    // child that dies early ends the read below.
    unsafe { libc::close(fds[1]) };
    let mut b = [0u8; 1];
    // SAFETY: read writes at most one byte into `b`.
    let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
    if n != 1 {
        // SAFETY: waitpid writes the status into a live local.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let _ = sweep(&host);
        panic!("the owner failed to prepare its networks");
    }
    let before = leftovers(&host, Some(pid));
    assert_eq!(before.netns.len(), 3, "{before:?}");
    assert_eq!(before.host_veths.len(), 3, "{before:?}");
    assert!(before.table);
    // SAFETY: kill and waitpid take integers and a pointer to a live local.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::close(fds[0]);
    }
    let removed = sweep(&host).unwrap();
    assert_eq!(removed.netns.len(), 3, "{removed:?}");
    let after = leftovers(&host, Some(pid));
    assert!(after.is_empty(), "left after the sweep: {after:?}");
}

#[test]
fn a_test_that_fails_with_networks_prepared_leaves_nothing() {
    let test = "a_test_that_fails_with_networks_prepared_leaves_nothing";
    let Some(lab) = lab_or_skip(test, "fail") else {
        return;
    };
    let host = lab.net_host();
    let names = std::sync::Mutex::new(Vec::new());
    // A failing test body: the pool is dropped while the panic unwinds.
    let failed = std::panic::catch_unwind(|| {
        let mut pool = NetPool::new(
            host.clone(),
            GuestNet::standard("tap0"),
            NetPolicy::default(),
        )
        .unwrap();
        pool.prepare(0..2).unwrap();
        names
            .lock()
            .unwrap()
            .extend(pool.children().map(|(_, n)| n.netns.clone()));
        panic!("the test failed");
    });
    assert!(failed.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    assert_eq!(gone(&names), Vec::<String>::new(), "namespaces left");
    let left = leftovers(&host, None);
    assert!(left.host_veths.is_empty() && !left.table, "left: {left:?}");
}
