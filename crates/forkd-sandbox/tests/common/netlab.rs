//! A small network lab for the per-child network tests, all in namespaces this test creates
//! (nothing on the real host changes, no traffic leaves them):
//!
//! - `forkdt-<pid>-<tag>-host` plays the host: children's veths end there, its `forkd` table
//!   and forwarding are the ones under test;
//! - `...-srv` (10.201.0.2) is a server the policy allows; `...-deny` (10.202.0.2, and the
//!   metadata address 169.254.169.254) one it does not. Both hang off the host namespace.
//!
//! A fake guest (a tap opened by the test in a child's namespace) sends and reads raw frames
//! as the guest would, so egress policy is checked without a VM.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use forkd_sandbox::net::{enter_netns, NetHost};

pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
pub const SERVER_GW: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
pub const DENIED: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];

pub fn ip(ns: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut full: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        full.extend(["-n", ns]);
    }
    full.extend(args);
    let out = Command::new("ip")
        .args(&full)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}`: {}",
            full.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The lab's namespaces; deleted on drop, even when the test fails.
pub struct Lab {
    pub host: String,
    pub server: String,
    pub denied: String,
    created: Vec<String>,
}

impl Lab {
    /// Builds the lab, or says why it cannot (no `ip`/`nft`, no nf_tables in the kernel).
    pub fn create(tag: &str) -> Result<Lab, String> {
        for tool in ["ip", "nft"] {
            Command::new(tool)
                .arg("-V")
                .output()
                .map_err(|e| format!("`{tool}` is not installed ({e})"))?;
        }
        let pid = std::process::id();
        let mut lab = Lab {
            host: format!("forkdt-{pid}-{tag}-host"),
            server: format!("forkdt-{pid}-{tag}-srv"),
            denied: format!("forkdt-{pid}-{tag}-deny"),
            created: Vec::new(),
        };
        for ns in [lab.host.clone(), lab.server.clone(), lab.denied.clone()] {
            let _ = ip(None, &["netns", "del", &ns]);
            ip(None, &["netns", "add", &ns])?;
            lab.created.push(ns.clone());
            ip(Some(&ns), &["link", "set", "lo", "up"])?;
        }
        // nf_tables must work in a namespace (a kernel without it fails here).
        let probe = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.host,
                "nft",
                "add",
                "table",
                "inet",
                "forkdprobe",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !probe.status.success() {
            return Err(format!(
                "nftables does not work here ({})",
                String::from_utf8_lossy(&probe.stderr).trim()
            ));
        }
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.host,
                "nft",
                "delete",
                "table",
                "inet",
                "forkdprobe",
            ])
            .output();
        lab.link("forkdtsrv", &lab.server.clone(), "10.201.0", &[])?;
        lab.link(
            "forkdtdeny",
            &lab.denied.clone(),
            "10.202.0",
            &["169.254.169.254/32"],
        )?;
        ip(
            Some(&lab.host),
            &["route", "add", "169.254.169.254/32", "via", "10.202.0.2"],
        )?;
        Ok(lab)
    }

    /// A veth from the host namespace (`net.1`) to `ns` (`net.2`, default route back).
    fn link(&self, veth: &str, ns: &str, net: &str, extra: &[&str]) -> Result<(), String> {
        let h = Some(self.host.as_str());
        ip(
            h,
            &[
                "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        ip(h, &["addr", "add", &format!("{net}.1/30"), "dev", veth])?;
        ip(h, &["link", "set", veth, "up"])?;
        ip(
            Some(ns),
            &["addr", "add", &format!("{net}.2/30"), "dev", "eth0"],
        )?;
        for a in extra {
            ip(Some(ns), &["addr", "add", a, "dev", "eth0"])?;
        }
        ip(Some(ns), &["link", "set", "eth0", "up"])?;
        ip(
            Some(ns),
            &["route", "add", "default", "via", &format!("{net}.1")],
        )?;
        Ok(())
    }

    pub fn net_host(&self) -> NetHost {
        NetHost {
            range: "10.200.0.0/16".parse().unwrap(),
            netns: Some(self.host.clone()),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/run/forkd-net-{}.lock", self.host));
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(None, &["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Runs `f` on a thread inside namespace `ns`.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns).expect("enter the namespace");
            f()
        })
        .join()
        .expect("thread in the namespace panicked")
    })
}

pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| (u32::from(c[0]) << 8) | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet of `proto` from `src` to `dst` around `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8u8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"forkd-net-test-payload");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    icmp
}

/// The test playing the guest on a child's tap: it opens the tap (as the VMM would) and
/// exchanges raw Ethernet frames through it.
pub struct FakeGuest {
    fd: OwnedFd,
    tap_mac: [u8; 6],
    seq: u16,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

impl FakeGuest {
    pub fn open(ns: &str, tap: &str) -> FakeGuest {
        let fd = in_ns(ns, || {
            // SAFETY: a NUL-terminated literal path; open returns a new fd or -1.
            let fd = unsafe {
                libc::open(
                    c"/dev/net/tun".as_ptr(),
                    libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            };
            assert!(fd >= 0, "/dev/net/tun: {}", std::io::Error::last_os_error());
            // SAFETY: fd was just opened and is owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut req = IfReq {
                name: [0; 16],
                flags: (libc::IFF_TAP | libc::IFF_NO_PI) as i16,
                _pad: [0; 22],
            };
            req.name[..tap.len()].copy_from_slice(tap.as_bytes());
            // SAFETY: TUNSETIFF reads and writes one ifreq, a live local of the right size.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
            assert_eq!(r, 0, "TUNSETIFF {tap}: {}", std::io::Error::last_os_error());
            fd
        });
        let link = ip(Some(ns), &["-o", "link", "show", tap]).expect("the tap");
        let mac = link
            .split("link/ether ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("tap MAC");
        let mut tap_mac = [0u8; 6];
        for (b, h) in tap_mac.iter_mut().zip(mac.split(':')) {
            *b = u8::from_str_radix(h, 16).unwrap();
        }
        // The namespace knows the guest's MAC without asking (the fake guest answers no ARP).
        ip(
            Some(ns),
            &[
                "neigh",
                "replace",
                &GUEST_IP.to_string(),
                "lladdr",
                "06:00:ac:10:00:02",
                "dev",
                tap,
                "nud",
                "permanent",
            ],
        )
        .expect("static neighbour");
        FakeGuest {
            fd,
            tap_mac,
            seq: 0,
        }
    }

    pub fn send_ip(&self, packet: &[u8]) {
        let mut frame = self.tap_mac.to_vec();
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(packet);
        // SAFETY: write reads `frame`, alive for the call.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(
            n as usize,
            frame.len(),
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next IPv4 packet the namespace sends the guest within `timeout` that `want` accepts.
    pub fn recv_ip(&self, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: read writes at most buf.len() bytes into `buf`.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let frame = &buf[..n as usize];
            if frame.len() > 34 && frame[12..14] == [0x08, 0x00] && want(&frame[14..]) {
                return Some(frame[14..].to_vec());
            }
        }
        None
    }

    /// Sends an echo request from the guest to `dst`; true when its reply comes back.
    pub fn echo(&mut self, dst: Ipv4Addr) -> bool {
        self.seq += 1;
        let (id, seq) = (0x4b4e, self.seq);
        self.send_ip(&ipv4(GUEST_IP, dst, 1, &echo_request(id, seq)));
        self.recv_ip(Duration::from_millis(1500), |p| {
            p[9] == 1
                && p[12..16] == dst.octets()
                && p[20] == 0
                && p[24..26] == id.to_be_bytes()
                && p[26..28] == seq.to_be_bytes()
        })
        .is_some()
    }
}

/// Sends `count` echo requests to `dst` from this thread's namespace over a raw ICMP socket,
/// each answered within `timeout`. Err names what was missing.
pub fn ping(dst: Ipv4Addr, count: u16, timeout: Duration) -> Result<(), String> {
    // SAFETY: plain socket creation; returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(format!(
            "raw ICMP socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval, a local that outlives the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
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
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    let id = (std::process::id() & 0xffff) as u16;
    for seq in 1..=count {
        let req = echo_request(id, seq);
        let deadline = Instant::now() + timeout;
        let mut next_send = Instant::now();
        'wait: loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no echo reply from {dst} for seq {seq} within {timeout:?}"
                ));
            }
            if now >= next_send {
                // SAFETY: sendto reads `req` and `addr`, both alive for the call.
                unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        req.as_ptr().cast(),
                        req.len(),
                        0,
                        (&addr as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                };
                // Resend now and then: the first request may wait for ARP.
                next_send = now + Duration::from_secs(1);
            }
            let mut buf = [0u8; 1500];
            // SAFETY: recv writes at most buf.len() bytes into `buf`.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let pkt = &buf[..n as usize];
            let ihl = usize::from(pkt[0] & 15) * 4;
            if pkt.len() < ihl + 8 || pkt[12..16] != dst.octets() {
                continue;
            }
            let icmp = &pkt[ihl..];
            if icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() && icmp[6..8] == seq.to_be_bytes() {
                break 'wait;
            }
        }
    }
    Ok(())
}
