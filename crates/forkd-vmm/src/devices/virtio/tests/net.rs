//! virtio-net against a hand-driven "guest", with a datagram socket pair standing in for the
//! tap (one frame per read and write, non-blocking, like a tap fd).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::net::hdr::*;
use crate::devices::virtio::net::*;
use crate::devices::virtio::testutil::*;
use crate::devices::virtio::{
    DeviceEventLoop, Interrupt, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::memory::GuestMemory;
use crate::snapshot::Persist;

pub const RX_RINGS: u64 = 0x1000;
pub const TX_RINGS: u64 = 0x4000;
const RX_BUFS: u64 = 0x100000;
const TX_BUFS: u64 = 0x800000;
/// Room per posted buffer (the largest frame fits one).
const SLOT: u64 = 0x20000;
const MEM: usize = 16 << 20;

/// A device on one end of a datagram pair; the other end is "the host network".
pub fn net_pair() -> (Net, UnixDatagram) {
    let (dev_end, host_end) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    host_end.set_nonblocking(true).unwrap();
    let tap = Tap::from_fd(OwnedFd::from(dev_end), "test-tap");
    (Net::new(tap, DEFAULT_MAC).unwrap(), host_end)
}

struct Guest {
    mem: GuestMemory,
    dev: Net,
    host: UnixDatagram,
    rx: TestQueue,
    tx: TestQueue,
    irq: Arc<Interrupt>,
    rx_slot: u64,
    tx_slot: u64,
}

impl Guest {
    fn new() -> Guest {
        Guest::with(0, 64)
    }

    /// A driver that accepted `features` (beyond VERSION_1), with queues of `size`.
    fn with(features: u64, size: u16) -> Guest {
        let mem = guest_memory(MEM);
        let (mut dev, host) = net_pair();
        let rx = TestQueue::new(RX_RINGS, size);
        let tx = TestQueue::new(TX_RINGS, size);
        let irq = Arc::new(Interrupt::new().unwrap());
        dev.set_acked_features(VIRTIO_F_VERSION_1 | features);
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = [rx.queue(), tx.queue()].map(|mut q| {
            q.set_event_idx(event_idx);
            q
        });
        dev.activate(mem.clone(), queues.into(), irq.clone())
            .unwrap();
        Guest {
            mem,
            dev,
            host,
            rx,
            tx,
            irq,
            rx_slot: 0,
            tx_slot: 0,
        }
    }

    /// Posts a receive buffer of `len` bytes; returns its address.
    fn post_rx(&mut self, len: u32) -> u64 {
        let addr = RX_BUFS + SLOT * self.rx_slot;
        self.rx_slot += 1;
        self.rx.add_chain(&self.mem, &[(addr, len, true)]);
        addr
    }

    /// Puts `hdr` + `frame` in the tx ring (one descriptor) and kicks.
    fn send(&mut self, hdr: [u8; VNET_HDR_LEN], frame: &[u8]) {
        let addr = TX_BUFS + SLOT * self.tx_slot;
        self.tx_slot += 1;
        self.mem.write_slice(&hdr, GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(frame, GuestAddress(addr + VNET_HDR_LEN as u64))
            .unwrap();
        let len = (VNET_HDR_LEN + frame.len()) as u32;
        self.tx.add_chain(&self.mem, &[(addr, len, false)]);
        self.dev.process_queue(1);
    }

    /// The host sends a frame "from the wire" (with the tap's vnet header).
    fn wire_send(&self, frame: &[u8]) {
        self.wire_send_with(VnetHdr::default(), frame);
    }

    fn wire_send_with(&self, hdr: VnetHdr, frame: &[u8]) {
        let mut pkt = hdr.to_bytes().to_vec();
        pkt.extend_from_slice(frame);
        self.host.send(&pkt).unwrap();
    }

    /// The driver's `used_event` for queue `q` (interrupt me once used idx passes it).
    fn set_used_event(&self, q: &TestQueue, idx: u16) {
        let at = q.avail + 4 + 2 * u64::from(q.size);
        self.mem.write_obj(idx.to_le(), GuestAddress(at)).unwrap();
    }

    /// The device's `avail_event` for queue `q` (kick me once avail idx passes it).
    fn avail_event(&self, q: &TestQueue) -> u16 {
        let at = q.used + 4 + 8 * u64::from(q.size);
        u16::from_le(self.mem.read_obj(GuestAddress(at)).unwrap())
    }

    /// Takes the used-ring interrupt: true when one was raised since the last call.
    fn take_irq(&self) -> bool {
        let raised = self.irq.status() & 1 != 0;
        self.irq.ack(1);
        raised
    }

    fn wire_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        match self.host.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(_) => None,
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn frame(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

#[test]
fn config_space_holds_the_mac_then_a_link_up_status() {
    let (dev, _host) = net_pair();
    let mut cfg = [0u8; 10];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &DEFAULT_MAC.0);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(&cfg[8..], &[0, 0]);
    assert_eq!(dev.avail_features(), NET_FEATURES);
    assert_eq!(
        NET_FEATURES,
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_MRG_RXBUF
    );
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes().len(), 2);
}

#[test]
fn mac_addresses_parse_print_and_serialize_as_text() {
    let mac: MacAddr = "06:00:ac:10:00:02".parse().unwrap();
    assert_eq!(mac, DEFAULT_MAC);
    assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
    assert_eq!(
        serde_json::to_string(&mac).unwrap(),
        "\"06:00:ac:10:00:02\""
    );
    let back: MacAddr = serde_json::from_str("\"0A:1b:2C:3d:4E:5f\"").unwrap();
    assert_eq!(back.0, [0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]);
    for bad in [
        "",
        "06:00:ac:10:00",
        "06:00:ac:10:00:02:03",
        "6:00:ac:10:00:02",
        "zz:00:ac:10:00:02",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn a_transmitted_frame_is_one_tap_write_with_its_header() {
    let mut g = Guest::new();
    let f = frame(60, 1);
    g.send([0; VNET_HDR_LEN], &f);
    let got = g.wire_recv().expect("a frame on the tap");
    assert_eq!(&got[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
    assert_eq!(g.tx.used_idx(&g.mem), 1);
    assert_eq!(g.tx.used_elem(&g.mem, 0), (0, 0));
    assert!(g.irq.status() & 1 != 0, "no used-ring interrupt");
    assert_eq!(g.dev.stats().tx_frames, 1);
    assert!(g.wire_recv().is_none());
}

/// A TCP segmentation request with a partial checksum, as Linux sends one with TSO.
fn tso4_header(gso_size: u16) -> VnetHdr {
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

const OFFLOADS: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6;

#[test]
fn a_negotiated_segmentation_request_reaches_the_tap_with_its_header_as_sent() {
    let mut g = Guest::with(OFFLOADS, 64);
    let f = frame(30_000, 2);
    let hdr = tso4_header(1448).to_bytes();
    g.send(hdr, &f);
    let got = g.wire_recv().expect("a frame on the tap");
    assert_eq!(&got[..VNET_HDR_LEN], &hdr);
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
    assert_eq!(g.dev.stats().tx_frames, 1);
    assert_eq!(g.dev.stats().tx_bad_header, 0);
}

#[test]
fn headers_asking_for_what_was_not_negotiated_are_dropped_and_counted() {
    // Checksum offload only: no segmentation, and nothing at all without it.
    let mut g = Guest::with(VIRTIO_NET_F_CSUM, 64);
    let f = frame(3000, 3);
    g.send(tso4_header(1448).to_bytes(), &f);
    let partial = VnetHdr {
        gso_type: VIRTIO_NET_HDR_GSO_NONE,
        gso_size: 0,
        ..tso4_header(0)
    };
    g.send(partial.to_bytes(), &f[..1000]);
    let mut plain = Guest::new();
    plain.send(partial.to_bytes(), &f[..1000]);
    // A checksum field past the end, an unknown segmentation type, DATA_VALID on transmit.
    let past = VnetHdr {
        csum_start: 990,
        ..partial
    };
    g.send(past.to_bytes(), &f[..1000]);
    let odd = VnetHdr {
        gso_type: 0x42,
        ..tso4_header(1448)
    };
    g.send(odd.to_bytes(), &f);
    let mut valid = [0u8; VNET_HDR_LEN];
    valid[0] = VIRTIO_NET_HDR_F_DATA_VALID;
    g.send(valid, &f[..100]);

    assert_eq!(g.tx.used_idx(&g.mem), 5, "every chain comes back");
    assert_eq!(g.dev.stats().tx_bad_header, 4);
    assert_eq!(
        g.dev.stats().tx_frames,
        1,
        "only the partial checksum goes out"
    );
    assert_eq!(&g.wire_recv().unwrap()[..VNET_HDR_LEN], &partial.to_bytes());
    assert!(g.wire_recv().is_none());
    assert_eq!(plain.dev.stats().tx_bad_header, 1);
    assert!(plain.wire_recv().is_none());
}

#[test]
fn a_transmit_chain_split_over_descriptors_is_gathered() {
    let mut g = Guest::new();
    let f = frame(100, 2);
    g.mem
        .write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(TX_BUFS))
        .unwrap();
    g.mem.write_slice(&f[..30], GuestAddress(0x300000)).unwrap();
    g.mem.write_slice(&f[30..], GuestAddress(0x310000)).unwrap();
    g.tx.add_chain(
        &g.mem,
        &[
            (TX_BUFS, VNET_HDR_LEN as u32, false),
            (0x300000, 30, false),
            (0x310000, 70, false),
        ],
    );
    g.dev.process_queue(1);
    let got = g.wire_recv().unwrap();
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
}

#[test]
fn received_frames_land_in_posted_buffers_with_num_buffers_one() {
    let mut g = Guest::new();
    let a = g.post_rx(2048);
    let b = g.post_rx(2048);
    let f1 = frame(42, 3);
    let f2 = frame(1514, 4);
    g.wire_send(&f1);
    g.wire_send(&f2);
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 2);
    assert_eq!(g.rx.used_elem(&g.mem, 0), (0, (VNET_HDR_LEN + 42) as u32));
    assert_eq!(g.rx.used_elem(&g.mem, 1), (1, (VNET_HDR_LEN + 1514) as u32));
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[10] = 1;
    assert_eq!(g.read(a, VNET_HDR_LEN), hdr);
    assert_eq!(g.read(b, VNET_HDR_LEN), hdr);
    assert_eq!(g.read(a + VNET_HDR_LEN as u64, 42), f1);
    assert_eq!(g.read(b + VNET_HDR_LEN as u64, 1514), f2);
    assert!(g.irq.status() & 1 != 0);
    assert_eq!(g.dev.stats().rx_frames, 2);
}

#[test]
fn frames_wait_for_buffers_in_order_and_the_tap_is_not_polled_meanwhile() {
    let mut g = Guest::new();
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(64 + i, i as u8)).collect();
    for f in &frames {
        g.wire_send(f);
    }
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 0);
    // One frame is held by the device; its epoll no longer reports the tap.
    let epfd = g.dev.host_event_fd().unwrap();
    let mut pfd = libc::pollfd {
        fd: epfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd, a local borrowed for the call.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0, "tap still armed");
    let bufs: Vec<u64> = (0..3).map(|_| g.post_rx(256)).collect();
    g.dev.process_queue(0);
    assert_eq!(g.rx.used_idx(&g.mem), 3);
    for (f, addr) in frames.iter().zip(&bufs) {
        assert_eq!(&g.read(addr + VNET_HDR_LEN as u64, f.len()), f);
    }
    assert_eq!(g.dev.stats().rx_dropped, 0);
}

#[test]
fn malformed_receive_buffers_come_back_empty_and_the_frame_goes_to_the_next_one() {
    let mut g = Guest::new();
    // Read-only buffer, buffer shorter than the header, then a good one.
    let ro = RX_BUFS + 0x80000;
    g.mem.write_slice(&[0x77; 64], GuestAddress(ro)).unwrap();
    g.rx.add_chain(&g.mem, &[(ro, 64, false)]);
    g.rx.add_chain(&g.mem, &[(RX_BUFS + 0x90000, 8, true)]);
    let good = g.post_rx(2048);
    let f = frame(60, 9);
    g.wire_send(&f);
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 3);
    assert_eq!(g.rx.used_elem(&g.mem, 0).1, 0);
    assert_eq!(g.rx.used_elem(&g.mem, 1).1, 0);
    assert_eq!(g.rx.used_elem(&g.mem, 2).1, (VNET_HDR_LEN + 60) as u32);
    assert_eq!(
        g.read(ro, 64),
        vec![0x77; 64],
        "a read-only buffer was written"
    );
    assert_eq!(g.read(good + VNET_HDR_LEN as u64, 60), f);
    assert_eq!(g.dev.stats().malformed, 2);
}

#[test]
fn a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept_for_the_next() {
    let mut g = Guest::new();
    let buf = g.post_rx(100);
    g.wire_send(&frame(200, 1));
    let small = frame(50, 2);
    g.wire_send(&small);
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 1);
    assert_eq!(g.rx.used_elem(&g.mem, 0), (0, (VNET_HDR_LEN + 50) as u32));
    assert_eq!(g.read(buf + VNET_HDR_LEN as u64, 50), small);
    assert_eq!(g.dev.stats().rx_dropped, 1);
}

#[test]
fn malformed_transmit_chains_come_back_empty_and_send_nothing() {
    let mut g = Guest::new();
    // A device-writable descriptor in a tx chain.
    g.tx.add_chain(
        &g.mem,
        &[(TX_BUFS, 12, false), (TX_BUFS + 0x1000, 64, true)],
    );
    // Only a header (no frame), and shorter than a header.
    g.tx.add_chain(&g.mem, &[(TX_BUFS + 0x2000, 12, false)]);
    g.tx.add_chain(&g.mem, &[(TX_BUFS + 0x3000, 5, false)]);
    // Larger than MAX_BUFFER_LEN.
    g.tx.add_chain(&g.mem, &[(TX_BUFS, (MAX_BUFFER_LEN + 1) as u32, false)]);
    // Outside guest memory.
    g.tx.add_chain(&g.mem, &[(1 << 40, 100, false)]);
    g.dev.process_queue(1);
    assert_eq!(g.tx.used_idx(&g.mem), 5);
    for n in 0..5 {
        assert_eq!(g.tx.used_elem(&g.mem, n).1, 0);
    }
    assert!(g.wire_recv().is_none(), "a malformed chain reached the tap");
    assert_eq!(g.dev.stats().malformed, 5);
    // The device still works.
    g.send([0; VNET_HDR_LEN], &frame(60, 5));
    assert!(g.wire_recv().is_some());
}

#[test]
fn the_largest_frame_goes_through_both_ways() {
    let mut g = Guest::new();
    let f = frame(MAX_BUFFER_LEN - VNET_HDR_LEN, 7);
    g.send([0; VNET_HDR_LEN], &f);
    assert_eq!(g.wire_recv().unwrap().len(), MAX_BUFFER_LEN);
    let addr = g.post_rx(MAX_BUFFER_LEN as u32);
    g.wire_send(&f);
    g.dev.process_host_events();
    assert_eq!(g.rx.used_elem(&g.mem, 0).1, MAX_BUFFER_LEN as u32);
    assert_eq!(g.read(addr + VNET_HDR_LEN as u64, f.len()), f);
}

#[test]
fn reset_drops_the_held_frame_and_stops_reading() {
    let mut g = Guest::new();
    g.wire_send(&frame(60, 1));
    g.dev.process_host_events();
    g.dev.reset();
    assert!(!g.dev.is_activated());
    g.dev.process_host_events();
    g.dev.process_queue(0);
    assert_eq!(g.dev.stats().rx_frames, 0);
}

#[test]
fn a_tap_whose_peer_is_gone_drops_frames_without_stopping_the_guest() {
    let mut g = Guest::new();
    let (dummy, _) = UnixDatagram::pair().unwrap();
    drop(std::mem::replace(&mut g.host, dummy));
    g.send([0; VNET_HDR_LEN], &frame(60, 1));
    assert_eq!(g.tx.used_idx(&g.mem), 1);
    assert_eq!(g.dev.stats().tx_dropped, 1);
    g.post_rx(2048);
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 0);
}

/// Through the transport and the device event loop, as a guest driver sees it: the
/// handshake with VERSION_1 | MAC, then a frame each way, with no manual processing.
#[test]
fn net_through_the_transport_and_event_loop() {
    let mem = guest_memory(MEM);
    let (dev, host) = net_pair();
    let dev: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(dev));
    let mut t = MmioTransport::new(dev, mem.clone()).unwrap();
    let _loop = DeviceEventLoop::spawn(vec![t.event_source().unwrap()]).unwrap();
    assert_eq!(read_reg(&mut t, 0x08), 1);
    let mut rx = TestQueue::new(RX_RINGS, 16);
    let mut tx = TestQueue::new(TX_RINGS, 16);
    let status = init_device(
        &mut t,
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC,
        &[TestQueue::new(RX_RINGS, 16), TestQueue::new(TX_RINGS, 16)],
    );
    assert_eq!(status & 0x40, 0);
    let mut mac = [0u8; 6];
    crate::devices::BusDevice::read(&mut t, 0x100, &mut mac);
    assert_eq!(mac, DEFAULT_MAC.0);

    rx.add_chain(&mem, &[(RX_BUFS, 2048, true)]);
    write_reg(&mut t, 0x50, 0);
    let f = frame(98, 3);
    let mut pkt = vec![0u8; VNET_HDR_LEN];
    pkt.extend_from_slice(&f);
    host.send(&pkt).unwrap();
    wait_used(&mem, &rx, 1, "rx frame");
    assert_eq!(rx.used_elem(&mem, 0).1, pkt.len() as u32);

    mem.write_slice(&pkt, GuestAddress(TX_BUFS)).unwrap();
    tx.add_chain(&mem, &[(TX_BUFS, pkt.len() as u32, false)]);
    write_reg(&mut t, 0x50, 1);
    wait_used(&mem, &tx, 1, "tx frame");
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.set_nonblocking(false).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = host.recv(&mut buf).unwrap();
    assert_eq!(&buf[VNET_HDR_LEN..n], &f[..]);
}

/// Reads the `n` used buffers from used element `first` on, in order, as one byte string (what
/// a driver reassembles from a mergeable frame).
fn gather_used(g: &Guest, first: u16, n: u16, bufs: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in first..first + n {
        let (id, len) = g.rx.used_elem(&g.mem, i);
        out.extend(g.read(bufs[id as usize], len as usize));
    }
    out
}

const MRG: u64 = VIRTIO_NET_F_MRG_RXBUF;

#[test]
fn received_headers_lose_what_the_driver_did_not_accept() {
    let mut g = Guest::new();
    let buf = g.post_rx(2048);
    // A segmented frame for a driver without GUEST_TSO: dropped, its buffer kept.
    g.wire_send_with(tso4_header(1448), &frame(3000, 1));
    let valid = VnetHdr {
        flags: VIRTIO_NET_HDR_F_DATA_VALID,
        hdr_len: 14,
        ..VnetHdr::default()
    };
    let f = frame(100, 2);
    g.wire_send_with(valid, &f);
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 1);
    assert_eq!(g.rx.used_elem(&g.mem, 0), (0, (VNET_HDR_LEN + 100) as u32));
    let want = VnetHdr {
        num_buffers: 1,
        ..VnetHdr::default()
    };
    assert_eq!(VnetHdr::parse(&g.read(buf, VNET_HDR_LEN)), want);
    assert_eq!(g.read(buf + VNET_HDR_LEN as u64, 100), f);
    assert_eq!(g.dev.stats().rx_dropped, 1);

    // With GUEST_CSUM, DATA_VALID is passed on.
    let mut g = Guest::with(VIRTIO_NET_F_GUEST_CSUM, 64);
    let buf = g.post_rx(2048);
    g.wire_send_with(valid, &f);
    g.dev.process_host_events();
    let got = VnetHdr::parse(&g.read(buf, VNET_HDR_LEN));
    assert_eq!(got.flags, VIRTIO_NET_HDR_F_DATA_VALID);
    assert_eq!(got.num_buffers, 1);
}

#[test]
fn a_large_frame_spans_mergeable_buffers_with_num_buffers_and_its_header() {
    let mut g = Guest::with(OFFLOADS | MRG, 64);
    let bufs: Vec<u64> = (0..6).map(|_| g.post_rx(4096)).collect();
    let big = frame(20_000, 4);
    let hdr = tso4_header(1448);
    g.wire_send_with(hdr, &big);
    let small = frame(80, 5);
    g.wire_send(&small);
    g.dev.process_host_events();

    // 12 + 20000 bytes: four full buffers and 3628 bytes of a fifth; then the small frame.
    assert_eq!(g.rx.used_idx(&g.mem), 6);
    let lens: Vec<u32> = (0..5).map(|i| g.rx.used_elem(&g.mem, i).1).collect();
    assert_eq!(lens, [4096, 4096, 4096, 4096, 3628]);
    let got = gather_used(&g, 0, 5, &bufs);
    let got_hdr = VnetHdr::parse(&got);
    assert_eq!(
        got_hdr,
        VnetHdr {
            num_buffers: 5,
            ..hdr
        }
    );
    assert_eq!(&got[VNET_HDR_LEN..], &big[..]);
    assert_eq!(g.rx.used_elem(&g.mem, 5), (5, (VNET_HDR_LEN + 80) as u32));
    assert_eq!(
        VnetHdr::parse(&g.read(bufs[5], VNET_HDR_LEN)).num_buffers,
        1
    );
    assert_eq!(g.read(bufs[5] + VNET_HDR_LEN as u64, 80), small);
    assert_eq!(g.dev.stats().rx_frames, 2);
    assert_eq!(g.dev.stats().rx_dropped, 0);
}

#[test]
fn a_frame_waits_for_enough_mergeable_buffers_and_then_goes_in_ring_order() {
    let mut g = Guest::with(MRG | VIRTIO_RING_F_EVENT_IDX, 64);
    let mut bufs: Vec<u64> = (0..2).map(|_| g.post_rx(4096)).collect();
    let big = frame(10_000, 6);
    let next = frame(100, 7);
    g.wire_send(&big);
    g.wire_send(&next);
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 0, "a partial frame was delivered");
    assert_eq!(g.dev.stats().rx_dropped, 0);
    // The device asked to be kicked once a buffer is posted past the two it put back.
    assert_eq!(g.avail_event(&g.rx), 2);
    let epfd = g.dev.host_event_fd().unwrap();
    let mut pfd = libc::pollfd {
        fd: epfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd, a local borrowed for the call.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0, "tap still armed");

    bufs.push(g.post_rx(4096));
    g.dev.process_queue(0);
    // 10012 bytes: the two buffers from before, then 1820 bytes of the new one.
    assert_eq!(g.rx.used_idx(&g.mem), 3);
    assert_eq!(g.rx.used_elem(&g.mem, 0), (0, 4096));
    assert_eq!(g.rx.used_elem(&g.mem, 1), (1, 4096));
    assert_eq!(g.rx.used_elem(&g.mem, 2), (2, 1820));
    let got = gather_used(&g, 0, 3, &bufs);
    assert_eq!(VnetHdr::parse(&got).num_buffers, 3);
    assert_eq!(&got[VNET_HDR_LEN..], &big[..]);
    // The next frame now waits in turn.
    assert_eq!(g.avail_event(&g.rx), 3);
    bufs.push(g.post_rx(4096));
    g.dev.process_queue(0);
    assert_eq!(g.rx.used_idx(&g.mem), 4);
    assert_eq!(g.read(bufs[3] + VNET_HDR_LEN as u64, 100), next);
    assert_eq!(g.dev.stats().rx_frames, 2);
}

#[test]
fn a_frame_larger_than_the_whole_ring_is_dropped_and_the_ring_kept() {
    let mut g = Guest::with(MRG, 4);
    let bufs: Vec<u64> = (0..4).map(|_| g.post_rx(100)).collect();
    g.wire_send(&frame(1000, 1));
    let small = frame(50, 2);
    g.wire_send(&small);
    g.dev.process_host_events();
    assert_eq!(g.dev.stats().rx_dropped, 1);
    assert_eq!(g.rx.used_idx(&g.mem), 1);
    assert_eq!(g.rx.used_elem(&g.mem, 0), (0, (VNET_HDR_LEN + 50) as u32));
    assert_eq!(g.read(bufs[0] + VNET_HDR_LEN as u64, 50), small);
}

#[test]
fn a_malformed_buffer_inside_a_mergeable_frame_sends_the_gathered_ones_back_empty() {
    let mut g = Guest::with(MRG, 64);
    let a = g.post_rx(4096);
    let ro = RX_BUFS + 0x700000;
    g.mem.write_slice(&[0x55; 64], GuestAddress(ro)).unwrap();
    g.rx.add_chain(&g.mem, &[(ro, 4096, false)]);
    let b = g.post_rx(4096);
    let c = g.post_rx(4096);
    let f = frame(6000, 8);
    g.wire_send(&f);
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 4);
    assert_eq!(g.rx.used_elem(&g.mem, 0), (0, 0));
    assert_eq!(g.rx.used_elem(&g.mem, 1), (1, 0));
    assert_eq!(g.rx.used_elem(&g.mem, 2), (2, 4096));
    assert_eq!(g.rx.used_elem(&g.mem, 3), (3, 6012 - 4096));
    assert_eq!(
        g.read(ro, 64),
        vec![0x55; 64],
        "a read-only buffer was written"
    );
    let mut got = g.read(b, 4096);
    got.extend(g.read(c, 6012 - 4096));
    assert_eq!(VnetHdr::parse(&got).num_buffers, 2);
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
    assert_eq!(g.dev.stats().malformed, 1);
    let _ = a;
}

#[test]
fn event_idx_holds_tx_interrupts_until_the_driver_wants_one_and_asks_for_the_next_kick() {
    let mut g = Guest::with(VIRTIO_RING_F_EVENT_IDX, 64);
    g.set_used_event(&g.tx, 0);
    g.send([0; VNET_HDR_LEN], &frame(60, 1));
    assert!(g.take_irq(), "used idx passed used_event 0");
    // Kick me for the chain after the one taken.
    assert_eq!(g.avail_event(&g.tx), 1);
    // The driver wants an interrupt only once used idx passes 3.
    g.set_used_event(&g.tx, 3);
    g.send([0; VNET_HDR_LEN], &frame(60, 2));
    assert!(!g.take_irq(), "interrupt at used idx 2");
    g.send([0; VNET_HDR_LEN], &frame(60, 3));
    assert!(!g.take_irq(), "interrupt at used idx 3");
    g.send([0; VNET_HDR_LEN], &frame(60, 4));
    assert!(g.take_irq(), "no interrupt at used idx 4");
    assert_eq!(g.avail_event(&g.tx), 4);
    assert_eq!(g.tx.used_idx(&g.mem), 4);
    assert_eq!(g.dev.stats().tx_frames, 4);
}

#[test]
fn event_idx_holds_rx_interrupts_and_asks_for_rx_kicks_only_while_a_frame_waits() {
    let mut g = Guest::with(VIRTIO_RING_F_EVENT_IDX, 64);
    for _ in 0..4 {
        g.post_rx(2048);
    }
    g.set_used_event(&g.rx, 1);
    g.wire_send(&frame(60, 1));
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 1);
    assert!(!g.take_irq(), "interrupt at used idx 1");
    g.wire_send(&frame(60, 2));
    g.dev.process_host_events();
    assert!(g.take_irq(), "no interrupt at used idx 2");
    // Buffers to spare: no kick asked for (avail_event untouched since the driver zeroed it).
    assert_eq!(g.avail_event(&g.rx), 0);
    g.set_used_event(&g.rx, 3);
    for i in 0..3 {
        g.wire_send(&frame(60, 10 + i));
    }
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 4);
    assert!(g.take_irq());
    // The last frame waits: kick me once a buffer is posted past avail idx 4.
    assert_eq!(g.avail_event(&g.rx), 4);
    g.post_rx(2048);
    g.dev.process_queue(0);
    assert_eq!(g.rx.used_idx(&g.mem), 5);
    assert_eq!(g.dev.stats().rx_frames, 5);
}

#[test]
fn without_event_idx_the_used_flags_ask_for_rx_kicks_only_while_a_frame_waits() {
    let mut g = Guest::new();
    let flags = |g: &Guest| -> u16 { g.mem.read_obj(GuestAddress(g.rx.used)).unwrap() };
    g.post_rx(2048);
    g.wire_send(&frame(60, 1));
    g.dev.process_host_events();
    assert_eq!(g.rx.used_idx(&g.mem), 1);
    assert_eq!(flags(&g), 1, "VRING_USED_F_NO_NOTIFY while nothing waits");
    g.wire_send(&frame(60, 2));
    g.dev.process_host_events();
    assert_eq!(flags(&g), 0, "kicks wanted while a frame waits");
    g.post_rx(2048);
    g.dev.process_queue(0);
    assert_eq!(g.rx.used_idx(&g.mem), 2);
    // Every interrupt is sent without EVENT_IDX.
    assert!(g.take_irq());
}

/// The features a driver accepts, the tap offloads they imply and the queues' event index all
/// come back in a device restored from the transport's saved state (as in a restored child,
/// whose tap is a fresh one); an old snapshot without them restores without them.
#[test]
fn offloads_and_event_idx_come_back_in_a_restored_device() {
    let mem = guest_memory(MEM);
    let features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_RING_F_EVENT_IDX | MRG | OFFLOADS;
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    let (dev, _host) = net_pair();
    let net = Arc::new(Mutex::new(dev));
    let mut t = MmioTransport::new(net.clone(), mem.clone()).unwrap();
    let queues = [TestQueue::new(RX_RINGS, 16), TestQueue::new(TX_RINGS, 16)];
    assert_eq!(init_device(&mut t, features, &queues) & 0x40, 0);
    {
        let n = net.lock().unwrap();
        assert_eq!(n.acked_features(), features);
        assert_eq!(n.tap_offloads(), all);
        assert!(n.queues().iter().all(|q| q.event_idx_enabled()));
    }
    let state = t.save().unwrap();
    assert!(state.queues.iter().all(|q| q.event_idx_enabled));

    // A new device on a fresh tap, restored.
    let (dev, host) = net_pair();
    let net2 = Arc::new(Mutex::new(dev));
    assert_eq!(net2.lock().unwrap().tap_offloads(), 0);
    let mut t2 = MmioTransport::new(net2.clone(), mem.clone()).unwrap();
    t2.restore(&state).unwrap();
    {
        let n = net2.lock().unwrap();
        assert!(n.is_activated());
        assert_eq!(n.acked_features(), features);
        assert_eq!(n.tap_offloads(), all);
        assert!(n.queues().iter().all(|q| q.event_idx_enabled()));
    }
    // It delivers mergeable, segmented frames like the original would have.
    let mut rx = TestQueue::new(RX_RINGS, 16);
    let bufs: Vec<u64> = (0..3)
        .map(|i| {
            let addr = RX_BUFS + SLOT * i;
            rx.add_chain(&mem, &[(addr, 4096, true)]);
            addr
        })
        .collect();
    let mut pkt = tso4_header(1448).to_bytes().to_vec();
    pkt.extend(frame(10_000, 9));
    host.send(&pkt).unwrap();
    net2.lock().unwrap().process_host_events();
    assert_eq!(rx.used_idx(&mem), 3);
    let first = {
        let mut b = vec![0u8; VNET_HDR_LEN];
        mem.read_slice(&mut b, GuestAddress(bufs[0])).unwrap();
        VnetHdr::parse(&b)
    };
    assert_eq!(first.num_buffers, 3);
    assert_eq!(first.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);

    // A reset turns the tap's offloads off again.
    write_reg(&mut t2, 0x70, 0);
    assert_eq!(net2.lock().unwrap().tap_offloads(), 0);

    // A snapshot taken before these features existed: none of them, no event index.
    let mut old = state.clone();
    old.acked_features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC;
    for q in &mut old.queues {
        q.event_idx_enabled = false;
    }
    let (dev, _host3) = net_pair();
    let net3 = Arc::new(Mutex::new(dev));
    let mut t3 = MmioTransport::new(net3.clone(), mem).unwrap();
    t3.restore(&old).unwrap();
    let n = net3.lock().unwrap();
    assert!(n.is_activated());
    assert_eq!(n.tap_offloads(), 0);
    assert!(n.queues().iter().all(|q| !q.event_idx_enabled()));
}
