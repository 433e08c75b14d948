//! virtio-net end to end: the net test guest (guests/net.c, 10.0.2.15) behind a tap in a
//! network namespace of its own, answering ARP and ICMP echo from that namespace; then
//! snapshotted while it runs, and a child restored in a second namespace, on that namespace's
//! own `tap0`, answers with the same address and MAC while the parent still answers in the
//! first.
//!
//! Every namespace is `forkdt-<pid>-<n>` and is deleted (with its tap) by a guard, even when
//! the test fails. Without `ip`, network namespaces or /dev/net/tun the tests print a `SKIP:`
//! line and pass. There is no `ping` binary on every host, so the echo requests are sent from
//! a raw ICMP socket opened inside the namespace.

mod common;

use std::ffi::CString;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use forkd_store::{Store, Tag};
use forkd_test_support::skip;
use forkd_vmm::devices::virtio::net::DEFAULT_MAC;
use forkd_vmm::devices::virtio::{NetConfig, VirtioConfig};
use forkd_vmm::snapshot::{restore, AfterSnapshot, Machine, RestoreIdentity, SnapshotMode};
use forkd_vmm::{SerialOutput, SharedBuffer, VmConfig};

const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const TAP: &str = "tap0";

/// A network namespace with a tap `tap0` (10.0.2.1/24, up) and loopback up; deleted on drop.
struct NetNs {
    name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    fn create(n: u32) -> Result<NetNs, String> {
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err("/dev/net/tun does not exist".into());
        }
        let name = format!("forkdt-{}-{n}", std::process::id());
        // A leftover of an earlier run with this pid would make `add` fail.
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        // From here on the guard removes it.
        let ns = NetNs { name };
        let n = ns.name.as_str();
        ip(&["-n", n, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ip(&["-n", n, "addr", "add", "10.0.2.1/24", "dev", TAP])?;
        ip(&["-n", n, "link", "set", TAP, "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a thread that has entered this namespace (what it opens — taps, sockets —
    /// belongs to the namespace).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&self.name);
                f()
            })
            .join()
            .expect("thread in the namespace panicked")
        })
    }

    /// `ip neigh` as seen in the namespace.
    fn neighbours(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name, "neigh", "show", "dev", TAP])
            .output()
            .expect("ip neigh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["-n", &self.name, "link", "del", TAP]);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

fn enter_netns(name: &str) {
    let path = CString::new(format!("/var/run/netns/{name}")).unwrap();
    // SAFETY: a NUL-terminated path; open returns a new fd or -1.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "opening {path:?}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: setns takes an fd and a flag; it changes only this thread's namespace.
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closes the fd opened above, used by nothing else.
    unsafe { libc::close(fd) };
    assert_eq!(rc, 0, "setns into {name}: {err}");
}

/// Creates namespace `n`, or prints the SKIP line for `test` and returns None.
fn netns_or_skip(test: &str, n: u32) -> Option<NetNs> {
    match NetNs::create(n) {
        Ok(ns) => Some(ns),
        Err(e) => {
            skip(test, format!("no network namespace with a tap here ({e})"));
            None
        }
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` ICMP echo requests to `dst` from this thread's namespace, one at a time,
/// each answered within `timeout` (the first also waits for ARP). Err names what was missing.
fn ping(dst: [u8; 4], count: u16, timeout: Duration) -> Result<(), String> {
    // SAFETY: plain socket creation; returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(format!(
            "raw ICMP socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    let result = ping_on(fd, dst, count, timeout);
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(fd) };
    result
}

fn ping_on(fd: i32, dst: [u8; 4], count: u16, timeout: Duration) -> Result<(), String> {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval, a local that outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst),
        },
        sin_zero: [0; 8],
    };
    let id = (std::process::id() & 0xffff) as u16;
    for seq in 1..=count {
        let mut req = vec![8u8, 0, 0, 0];
        req.extend_from_slice(&id.to_be_bytes());
        req.extend_from_slice(&seq.to_be_bytes());
        req.extend((0..48u8).map(|i| i ^ seq as u8));
        let c = checksum(&req);
        req[2..4].copy_from_slice(&c.to_be_bytes());
        let deadline = Instant::now() + timeout;
        let mut next_send = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("no echo reply for seq {seq} within {timeout:?}"));
            }
            if now >= next_send {
                // SAFETY: sendto reads `req` and `addr`, both alive for the call.
                let n = unsafe {
                    libc::sendto(
                        fd,
                        req.as_ptr().cast(),
                        req.len(),
                        0,
                        (&addr as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                };
                if n < 0 {
                    return Err(format!("sendto: {}", std::io::Error::last_os_error()));
                }
                // Resend now and then: the first request waits for ARP, and the kernel keeps
                // only a few packets for an unresolved neighbour.
                next_send = now + Duration::from_secs(2);
            }
            let mut buf = [0u8; 1500];
            // SAFETY: recv writes at most buf.len() bytes into `buf`.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let pkt = &buf[..n as usize];
            let ihl = usize::from(pkt[0] & 15) * 4;
            if pkt.len() < ihl + 8 || pkt[12..16] != dst {
                continue;
            }
            let icmp = &pkt[ihl..];
            if icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() && icmp[6..8] == seq.to_be_bytes() {
                if icmp[8..] != req[8..] {
                    return Err(format!("echo reply {seq} carries other data"));
                }
                if checksum(icmp) != 0 || checksum(&pkt[..ihl]) != 0 {
                    return Err(format!("echo reply {seq} has a bad checksum"));
                }
                break;
            }
        }
    }
    Ok(())
}

fn net_vm(serial: &SharedBuffer) -> (VmConfig, VirtioConfig) {
    let mut config = VmConfig::new(builtin("net"));
    config.mem_mib = 32;
    config.serial = SerialOutput::Buffer(serial.clone());
    let virtio = VirtioConfig {
        net: Some(NetConfig::new(TAP)),
        ..VirtioConfig::default()
    };
    (config, virtio)
}

const PING_TIMEOUT: Duration = Duration::from_secs(20);

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
