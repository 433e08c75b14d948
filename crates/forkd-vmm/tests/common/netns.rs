//! Network namespaces with a tap, and ICMP echo from inside them, for the virtio-net tests.
//!
//! Every namespace is `forkdt-<pid>-<n>` with a tap `tap0` (10.0.2.1/24) and is deleted, with
//! its tap, by a guard even when a test fails. There is no `ping` binary on every host, so echo
//! requests go out of a raw ICMP socket opened inside the namespace.

use std::ffi::CString;
use std::process::Command;
use std::time::{Duration, Instant};

use forkd_test_support::skip;
use forkd_vmm::devices::virtio::{NetConfig, VirtioConfig};
use forkd_vmm::{SerialOutput, SharedBuffer, VmConfig};

use super::builtin;

pub const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
pub const TAP: &str = "tap0";

/// A network namespace with a tap `tap0` (10.0.2.1/24, up) and loopback up; deleted on drop.
pub struct NetNs {
    pub name: String,
}

pub fn ip(args: &[&str]) -> Result<(), String> {
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
    pub fn create(n: u32) -> Result<NetNs, String> {
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
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
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
    pub fn neighbours(&self) -> String {
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

pub fn enter_netns(name: &str) {
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
pub fn netns_or_skip(test: &str, n: u32) -> Option<NetNs> {
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
pub fn ping(dst: [u8; 4], count: u16, timeout: Duration) -> Result<(), String> {
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

/// The net guest's VM and devices: 32 MiB, serial into `serial`, a net device on `tap0`.
pub fn net_vm(serial: &SharedBuffer) -> (VmConfig, VirtioConfig) {
    let mut config = VmConfig::new(builtin("net"));
    config.mem_mib = 32;
    config.serial = SerialOutput::Buffer(serial.clone());
    let virtio = VirtioConfig {
        net: Some(NetConfig::new(TAP)),
        ..VirtioConfig::default()
    };
    (config, virtio)
}

pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
