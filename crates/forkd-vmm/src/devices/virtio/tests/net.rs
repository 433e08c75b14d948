//! virtio-net against a hand-driven "guest", with a datagram socket pair standing in for the
//! tap (one frame per read and write, non-blocking, like a tap fd).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::net::*;
use crate::devices::virtio::testutil::*;
use crate::devices::virtio::{
    DeviceEventLoop, Interrupt, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;

pub const RX_RINGS: u64 = 0x1000;
pub const TX_RINGS: u64 = 0x4000;
const RX_BUFS: u64 = 0x100000;
const TX_BUFS: u64 = 0x200000;

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
        let mem = guest_memory(4 << 20);
        let (mut dev, host) = net_pair();
        let rx = TestQueue::new(RX_RINGS, 64);
        let tx = TestQueue::new(TX_RINGS, 64);
        let irq = Arc::new(Interrupt::new().unwrap());
        dev.activate(mem.clone(), vec![rx.queue(), tx.queue()], irq.clone())
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
        let addr = RX_BUFS + 0x10000 * self.rx_slot;
        self.rx_slot += 1;
        self.rx.add_chain(&self.mem, &[(addr, len, true)]);
        addr
    }

    /// Puts `hdr` + `frame` in the tx ring (one descriptor) and kicks.
    fn send(&mut self, hdr: [u8; VNET_HDR_LEN], frame: &[u8]) {
        let addr = TX_BUFS + 0x10000 * self.tx_slot;
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
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt.extend_from_slice(frame);
        self.host.send(&pkt).unwrap();
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
    assert_eq!(
        dev.avail_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
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
fn a_transmitted_frame_is_one_tap_write_with_a_zeroed_header() {
    let mut g = Guest::new();
    let f = frame(60, 1);
    // A stray GSO request in the guest's header must not reach the tap.
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = 1;
    hdr[1] = 1;
    g.send(hdr, &f);
    let got = g.wire_recv().expect("a frame on the tap");
    assert_eq!(&got[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
    assert_eq!(g.tx.used_idx(&g.mem), 1);
    assert_eq!(g.tx.used_elem(&g.mem, 0), (0, 0));
    assert!(g.irq.status() & 1 != 0, "no used-ring interrupt");
    assert_eq!(g.dev.stats().tx_frames, 1);
    assert!(g.wire_recv().is_none());
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
    let mem = guest_memory(4 << 20);
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
