//! virtio-net on a real tap, in a network namespace each test creates, with hand-laid queues
//! for the guest: what the host's kernel makes of the offloads the device negotiates.
//!
//! The host side is a packet socket on the tap with PACKET_VNET_HDR: it sees frames the device
//! writes to the tap as the kernel received them (segmentation and checksum state described by
//! the socket's own vnet header), and sends frames into the tap's transmit path with such a
//! header, as the host's stack would hand the guest a large TCP send.
//!
//! Without `ip`, network namespaces or /dev/net/tun the tests print a `SKIP:` line and pass.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::net::hdr::*;
use crate::devices::virtio::net::*;
use crate::devices::virtio::testutil::*;
use crate::devices::virtio::{
    Interrupt, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::memory::GuestMemory;
use crate::snapshot::Persist;

const TAP: &str = "tap0";
const RX_RINGS: u64 = 0x1000;
const TX_RINGS: u64 = 0x4000;
const RX_BUFS: u64 = 0x100000;
const TX_BUF: u64 = 0x800000;
const MEM: usize = 16 << 20;
/// SOL_PACKET option: a `struct virtio_net_hdr` (10 bytes) before every frame.
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_HDR_LEN: usize = 10;
const HOST_IP: [u8; 4] = [10, 0, 2, 1];
const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const MSS: u16 = 1448;

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

/// A network namespace with a tap `tap0` (10.0.2.1/24, up, no IPv6 chatter); deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn create(n: u32) -> Result<NetNs, String> {
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err("/dev/net/tun does not exist".into());
        }
        let name = format!("forkdu-{}-{n}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        // Router and neighbour solicitations would land in the guest's buffers too.
        ns.run(|| {
            for conf in ["default", "all"] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
            }
        });
        let n = ns.name.as_str();
        ip(&["-n", n, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ip(&["-n", n, "addr", "add", "10.0.2.1/24", "dev", TAP])?;
        ip(&["-n", n, "link", "set", TAP, "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a thread inside the namespace (taps and sockets it opens belong there).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let path = CString::new(format!("/var/run/netns/{}", self.name)).unwrap();
                // SAFETY: a NUL-terminated path; open returns a new fd or -1.
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                assert!(fd >= 0, "opening {path:?}");
                // SAFETY: `fd` was just opened and is owned here.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: setns takes an fd and a flag; it changes only this thread.
                let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in the namespace panicked")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["-n", &self.name, "link", "del", TAP]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn netns_or_skip(test: &str, n: u32) -> Option<NetNs> {
    match NetNs::create(n) {
        Ok(ns) => Some(ns),
        Err(e) => {
            forkd_test_support::skip(test, format!("no network namespace with a tap here ({e})"));
            None
        }
    }
}

/// A packet socket on the namespace's tap, with vnet headers, non-blocking.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens it; call inside the namespace.
    fn open() -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; returns a new fd or -1.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        };
        assert!(
            raw >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` was just created and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let on: libc::c_int = 1;
        // SAFETY: PACKET_VNET_HDR reads one c_int, a local that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_VNET_HDR,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(
            rc,
            0,
            "PACKET_VNET_HDR: {}",
            std::io::Error::last_os_error()
        );
        let name = CString::new(TAP).unwrap();
        // SAFETY: a NUL-terminated name that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0, "no {TAP} here");
        let addr = sockaddr_ll(ifindex, proto);
        // SAFETY: bind reads one sockaddr_ll, a local that outlives the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        PacketSocket { fd, ifindex }
    }

    /// Sends `frame` out of the tap (towards the device) with `hdr`.
    fn send(&self, hdr: &VnetHdr, frame: &[u8]) {
        let mut pkt = hdr.to_bytes()[..PACKET_HDR_LEN].to_vec();
        pkt.extend_from_slice(frame);
        let addr = sockaddr_ll(self.ifindex, (libc::ETH_P_IP as u16).to_be());
        // SAFETY: sendto reads `pkt` and `addr`, both alive for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            pkt.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame the tap received that `want` accepts, with the kernel's description of
    /// it; waits up to 10 s.
    fn recv_matching(&self, want: impl Fn(&[u8]) -> bool) -> Option<(VnetHdr, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 70_000];
        while Instant::now() < deadline {
            // SAFETY: recv writes at most buf.len() bytes into `buf`.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let n = n as usize;
            let mut h = [0u8; VNET_HDR_LEN];
            h[..PACKET_HDR_LEN].copy_from_slice(&buf[..PACKET_HDR_LEN]);
            let frame = &buf[PACKET_HDR_LEN..n];
            if want(frame) {
                return Some((VnetHdr::parse(&h), frame.to_vec()));
            }
        }
        None
    }
}

fn sockaddr_ll(ifindex: i32, proto_be: u16) -> libc::sockaddr_ll {
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: proto_be,
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    }
}

/// The one's complement sum of `data` as 16-bit big-endian words, added to `sum`.
fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

fn pseudo_sum(src: [u8; 4], dst: [u8; 4], tcp_len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0, 6]);
    p.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    ones_sum(&p, 0)
}

/// An Ethernet frame with one TCP/IPv4 segment carrying `payload`, its TCP checksum left as
/// the pseudo-header sum for offloading (what NEEDS_CSUM at 34 + 16 expects).
fn tcp4_frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(54 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 40 + payload.len();
    let mut iph = vec![0x45, 0];
    iph.extend_from_slice(&(total as u16).to_be_bytes());
    iph.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 6, 0, 0]);
    iph.extend_from_slice(&src);
    iph.extend_from_slice(&dst);
    let c = !(ones_sum(&iph, 0) as u16);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&iph);
    let mut tcp = vec![0x9c, 0x40, 0x13, 0x89]; // ports 40000 -> 5001
    tcp.extend_from_slice(&1u32.to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes());
    tcp.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    let partial = pseudo_sum(src, dst, 20 + payload.len()) as u16;
    tcp[16..18].copy_from_slice(&partial.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(payload);
    f
}

fn tso4(gso_size: u16) -> VnetHdr {
    VnetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: 54,
        gso_size,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    }
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// TCP/IPv4 frames between the test's addresses.
fn is_test_tcp(f: &[u8], src: [u8; 4]) -> bool {
    f.len() >= 54 && f[12..14] == [0x08, 0x00] && f[23] == 6 && f[26..30] == src
}

/// The guest: memory, queues laid out by hand, the device on the namespace's tap.
struct Guest {
    mem: GuestMemory,
    dev: Net,
    rx: TestQueue,
    tx: TestQueue,
    bufs: Vec<u64>,
    /// Used rx elements already turned into frames.
    seen: u16,
}

impl Guest {
    /// The device on `ns`'s tap for a driver that accepted `features` (beyond VERSION_1).
    fn new(ns: &NetNs, features: u64) -> Guest {
        let mut dev = ns
            .run(|| Net::open(TAP, DEFAULT_MAC))
            .expect("open the tap");
        let mem = guest_memory(MEM);
        let rx = TestQueue::new(RX_RINGS, 256);
        let tx = TestQueue::new(TX_RINGS, 256);
        dev.set_acked_features(VIRTIO_F_VERSION_1 | features);
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = [rx.queue(), tx.queue()].map(|mut q| {
            q.set_event_idx(event_idx);
            q
        });
        dev.activate(
            mem.clone(),
            queues.into(),
            Arc::new(Interrupt::new().unwrap()),
        )
        .unwrap();
        Guest {
            mem,
            dev,
            rx,
            tx,
            bufs: Vec::new(),
            seen: 0,
        }
    }

    fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = RX_BUFS + 0x10000 * self.bufs.len() as u64;
            self.rx.add_chain(&self.mem, &[(addr, len, true)]);
            self.bufs.push(addr);
        }
    }

    fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) {
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(TX_BUF))
            .unwrap();
        self.mem
            .write_slice(frame, GuestAddress(TX_BUF + VNET_HDR_LEN as u64))
            .unwrap();
        let len = (VNET_HDR_LEN + frame.len()) as u32;
        self.tx.add_chain(&self.mem, &[(TX_BUF, len, false)]);
        self.dev.process_queue(1);
    }

    /// Frames the device delivered since the last call (header and frame, reassembled from
    /// `num_buffers` buffers), polling the tap for up to 10 s until `enough` says so.
    fn receive(
        &mut self,
        enough: impl Fn(&[(VnetHdr, Vec<u8>)]) -> bool,
    ) -> Vec<(VnetHdr, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        loop {
            self.dev.process_host_events();
            while self.seen != self.rx.used_idx(&self.mem) {
                let (id, len) = self.rx.used_elem(&self.mem, self.seen);
                let mut bytes = vec![0u8; len as usize];
                self.mem
                    .read_slice(&mut bytes, GuestAddress(self.bufs[id as usize]))
                    .unwrap();
                let hdr = VnetHdr::parse(&bytes);
                self.seen += 1;
                for _ in 1..hdr.num_buffers {
                    let (id, len) = self.rx.used_elem(&self.mem, self.seen);
                    let mut more = vec![0u8; len as usize];
                    self.mem
                        .read_slice(&mut more, GuestAddress(self.bufs[id as usize]))
                        .unwrap();
                    bytes.extend(more);
                    self.seen += 1;
                }
                out.push((hdr, bytes[VNET_HDR_LEN..].to_vec()));
            }
            if enough(&out) || Instant::now() >= deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

const GUEST_TSO: u64 = VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6;

#[test]
fn a_segmentation_request_from_the_guest_enters_the_host_whole_with_its_header() {
    let test = "a_segmentation_request_from_the_guest_enters_the_host_whole_with_its_header";
    let Some(ns) = netns_or_skip(test, 1) else {
        return;
    };
    let mut g = Guest::new(
        &ns,
        VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6,
    );
    let host = ns.run(PacketSocket::open);
    // To a MAC nobody in the namespace has: the stack sees it and drops it, nothing answers.
    let frame = tcp4_frame(
        [0x02, 0, 0, 0, 0, 0x99],
        GUEST_IP,
        [10, 0, 2, 99],
        &payload(30_000),
    );
    g.send(&tso4(MSS), &frame);
    assert_eq!(g.dev.stats().tx_frames, 1, "{:?}", g.dev.stats());
    let (hdr, got) = host
        .recv_matching(|f| is_test_tcp(f, GUEST_IP))
        .expect("the frame never entered the host");
    assert_eq!(got, frame, "the host received other bytes");
    assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4, "{hdr:?}");
    assert_eq!(hdr.gso_size, MSS, "{hdr:?}");
    assert_eq!(
        hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_F_NEEDS_CSUM
    );
    assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 16), "{hdr:?}");

    // A header the kernel refuses (a checksum field inside the Ethernet header, with TSO)
    // is counted, and the device goes on.
    let bad = VnetHdr {
        csum_start: 0,
        csum_offset: 0,
        ..tso4(MSS)
    };
    g.send(&bad, &frame);
    g.send(
        &VnetHdr::default(),
        &tcp4_frame([0x02, 0, 0, 0, 0, 0x99], GUEST_IP, [10, 0, 2, 99], b"ok"),
    );
    let s = g.dev.stats();
    assert_eq!(s.tx_frames + s.tx_bad_header, 3, "{s:?}");
    assert!(host
        .recv_matching(|f| is_test_tcp(f, GUEST_IP) && f.ends_with(b"ok"))
        .is_some());
}

/// Sends one 20000-byte TCP segmentation request from the host to the guest through the tap.
fn host_sends_20k(host: &PacketSocket) -> Vec<u8> {
    let frame = tcp4_frame(DEFAULT_MAC.0, HOST_IP, GUEST_IP, &payload(20_000));
    host.send(&tso4(MSS), &frame);
    frame
}

fn tcp_frames(frames: &[(VnetHdr, Vec<u8>)]) -> Vec<&(VnetHdr, Vec<u8>)> {
    frames
        .iter()
        .filter(|(_, f)| is_test_tcp(f, HOST_IP))
        .collect()
}

/// Checks a guest that accepted GUEST_TSO with mergeable buffers receives the 20000 bytes as
/// one frame spread over 4 KiB buffers.
fn assert_received_whole(g: &mut Guest, sent: &[u8]) {
    let got = g.receive(|f| !tcp_frames(f).is_empty());
    let tcp = tcp_frames(&got);
    assert_eq!(
        tcp.len(),
        1,
        "the frame came segmented: {} frames",
        tcp.len()
    );
    let (hdr, frame) = tcp[0];
    assert_eq!(frame, sent);
    assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4, "{hdr:?}");
    assert_eq!(hdr.gso_size, MSS, "{hdr:?}");
    assert_eq!(
        hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_F_NEEDS_CSUM
    );
    // 12 + 20054 bytes in 4096-byte buffers.
    assert_eq!(hdr.num_buffers, 5, "{hdr:?}");
}

#[test]
fn with_guest_tso_the_host_hands_over_unsegmented_tcp_across_mergeable_buffers() {
    let test = "with_guest_tso_the_host_hands_over_unsegmented_tcp_across_mergeable_buffers";
    let Some(ns) = netns_or_skip(test, 2) else {
        return;
    };
    let mut g = Guest::new(&ns, GUEST_TSO | VIRTIO_NET_F_MRG_RXBUF);
    assert_eq!(
        g.dev.tap_offloads(),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    g.post_rx(64, 4096);
    let host = ns.run(PacketSocket::open);
    let sent = host_sends_20k(&host);
    assert_received_whole(&mut g, &sent);
}

#[test]
fn without_guest_tso_the_host_segments_and_checksums_before_the_tap() {
    let test = "without_guest_tso_the_host_segments_and_checksums_before_the_tap";
    let Some(ns) = netns_or_skip(test, 3) else {
        return;
    };
    let mut g = Guest::new(&ns, 0);
    assert_eq!(g.dev.tap_offloads(), 0);
    g.post_rx(64, 2048);
    let host = ns.run(PacketSocket::open);
    let sent = host_sends_20k(&host);
    let segments = 20_000usize.div_ceil(usize::from(MSS));
    let got = g.receive(|f| tcp_frames(f).len() >= segments);
    let tcp = tcp_frames(&got);
    assert_eq!(tcp.len(), segments);
    let mut data = Vec::new();
    for (hdr, f) in tcp {
        assert_eq!(
            *hdr,
            VnetHdr {
                num_buffers: 1,
                ..VnetHdr::default()
            }
        );
        assert!(f.len() <= 14 + 40 + usize::from(MSS));
        // Complete checksums: IP header and TCP over its pseudo-header both sum to all ones.
        assert_eq!(ones_sum(&f[14..34], 0), 0xffff);
        let tcp_len = f.len() - 34;
        assert_eq!(
            ones_sum(&f[34..], pseudo_sum(HOST_IP, GUEST_IP, tcp_len)),
            0xffff
        );
        data.extend_from_slice(&f[54..]);
    }
    assert_eq!(data, sent[54..]);
}

/// A restored child opens its tap fresh (offloads off); restoring the device from the
/// transport's saved state must tell that tap what the guest negotiated before the snapshot.
#[test]
fn a_restored_device_gives_its_fresh_tap_the_offloads_the_guest_negotiated() {
    let test = "a_restored_device_gives_its_fresh_tap_the_offloads_the_guest_negotiated";
    let Some(ns) = netns_or_skip(test, 4) else {
        return;
    };
    let features = VIRTIO_F_VERSION_1
        | VIRTIO_NET_F_MAC
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_NET_F_MRG_RXBUF
        | GUEST_TSO;
    let mem = guest_memory(MEM);
    let queues = [TestQueue::new(RX_RINGS, 256), TestQueue::new(TX_RINGS, 256)];
    let state = {
        let net = Arc::new(Mutex::new(ns.run(|| Net::open(TAP, DEFAULT_MAC)).unwrap()));
        let mut t = MmioTransport::new(net.clone(), mem.clone()).unwrap();
        init_device(&mut t, features, &queues);
        t.save().unwrap()
        // The parent's device and its tap fd go away here.
    };
    let net = Arc::new(Mutex::new(ns.run(|| Net::open(TAP, DEFAULT_MAC)).unwrap()));
    assert_eq!(net.lock().unwrap().tap_offloads(), 0);
    let mut t = MmioTransport::new(net.clone(), mem.clone()).unwrap();
    t.restore(&state).unwrap();
    assert_eq!(
        net.lock().unwrap().tap_offloads(),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    drop(t);
    // Drive the restored device as the guest: its queues are the saved ones.
    let dev = Arc::try_unwrap(net).ok().unwrap().into_inner().unwrap();
    let [rx, tx] = queues;
    let mut g = Guest {
        mem,
        dev,
        rx,
        tx,
        bufs: Vec::new(),
        seen: 0,
    };
    g.post_rx(64, 4096);
    let host = ns.run(PacketSocket::open);
    let sent = host_sends_20k(&host);
    assert_received_whole(&mut g, &sent);
}
