//! virtio-vsock against a hand-driven "guest": packets are put in the tx ring and read from
//! the rx ring exactly as a guest driver would, with real host Unix sockets on the other side.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::testutil::*;
use crate::devices::virtio::vsock::packet::*;
use crate::devices::virtio::vsock::{Vsock, VsockError, VsockState, CONN_BUF_SIZE, HOST_CID};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::memory::GuestMemory;

const GUEST_CID: u64 = 3;
const RX_BUF: u64 = 0x100000;
const RX_BUF_SIZE: u32 = 4096 + 44;
const TX_BUF: u64 = 0x200000;

struct Guest {
    mem: GuestMemory,
    dev: Vsock,
    rx: TestQueue,
    tx: TestQueue,
    evt: TestQueue,
    irq: Arc<Interrupt>,
    rx_seen: u16,
    tx_slot: u64,
    _dir: tempfile::TempDir,
    uds: PathBuf,
}

impl Guest {
    fn new() -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mem = guest_memory(4 << 20);
        let mut dev = Vsock::new(GUEST_CID, &uds).unwrap();
        let rx = TestQueue::new(0x1000, 64);
        let tx = TestQueue::new(0x4000, 64);
        let evt = TestQueue::new(0x8000, 8);
        let irq = Arc::new(Interrupt::new().unwrap());
        dev.activate(
            mem.clone(),
            vec![rx.queue(), tx.queue(), evt.queue()],
            irq.clone(),
        )
        .unwrap();
        let mut g = Guest {
            mem,
            dev,
            rx,
            tx,
            evt,
            irq,
            rx_seen: 0,
            tx_slot: 0,
            _dir: dir,
            uds,
        };
        for i in 0..32u64 {
            g.rx.add_chain(&g.mem, &[(RX_BUF + i * 0x2000, RX_BUF_SIZE, true)]);
        }
        g
    }

    fn send(&mut self, h: PacketHeader, payload: &[u8]) {
        let at = TX_BUF + (self.tx_slot % 32) * 0x11000;
        self.tx_slot += 1;
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(at + 44))
            .unwrap();
        self.tx
            .add_chain(&self.mem, &[(at, 44 + payload.len() as u32, false)]);
        self.dev.process_queue(1);
    }

    fn hdr(&self, op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    /// Packets the device put in the rx ring since last time; their buffers are recycled.
    fn recv(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        self.dev.process_host_events();
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx(&self.mem) {
            let (id, len) = self.rx.used_elem(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = {
                let d = GuestAddress(self.rx.desc + 16 * u64::from(id));
                self.mem.read_obj::<u64>(d).unwrap()
            };
            assert!(len >= 44, "short rx packet ({len})");
            let mut raw = [0u8; 44];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let h = PacketHeader::from_bytes(&raw);
            assert_eq!(len, 44 + h.len, "used length disagrees with header");
            let mut payload = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + 44))
                .unwrap();
            out.push((h, payload));
            self.rx.add_chain(&self.mem, &[(addr, RX_BUF_SIZE, true)]);
        }
        self.dev.process_queue(0);
        out
    }

    fn recv_one(&mut self) -> (PacketHeader, Vec<u8>) {
        let mut p = self.recv();
        let summary: Vec<_> = p
            .iter()
            .map(|(h, d)| (h.op, h.src_port, h.dst_port, d.len()))
            .collect();
        assert_eq!(
            p.len(),
            1,
            "expected one packet, got (op, src, dst, len) {summary:?}"
        );
        p.remove(0)
    }

    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = connect(&self.uds);
        writeln!(s, "CONNECT {port}").unwrap();
        let (req, _) = self.recv_one();
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port),
            (HOST_CID, GUEST_CID, port)
        );
        self.send(self.hdr(OP_RESPONSE, port, req.src_port, 0), &[]);
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (s, req.src_port)
    }
}

/// A host client whose blocking reads fail instead of hanging a broken test.
fn connect(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s
}

#[test]
fn host_initiated_connection_flows_both_ways_and_closes() {
    let mut g = Guest::new();
    let (mut host, host_port) = g.host_connect(1024);
    assert!(host_port >= 1 << 30);

    host.write_all(b"ping from host").unwrap();
    let (h, data) = g.recv_one();
    assert_eq!((h.op, h.dst_port, h.src_port), (OP_RW, 1024, host_port));
    assert_eq!(data, b"ping from host");
    assert_eq!(h.buf_alloc, CONN_BUF_SIZE);

    g.send(g.hdr(OP_RW, 1024, host_port, 5), b"pong!");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong!");

    // The guest closes: the device answers RST and the host sees EOF.
    let mut shut = g.hdr(OP_SHUTDOWN, 1024, host_port, 0);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shut, &[]);
    let (h, _) = g.recv_one();
    assert_eq!(h.op, OP_RST);
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_1025", g.uds.display())).unwrap();
    g.send(g.hdr(OP_REQUEST, 5000, 1025, 0), &[]);
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 1025, 5000));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    g.send(g.hdr(OP_RW, 5000, 1025, 11), b"READY demo\n");
    let mut line = String::new();
    BufReader::new(&mut host).read_line(&mut line).unwrap();
    assert_eq!(line, "READY demo\n");
    host.write_all(b"hi").unwrap();
    let (h, data) = g.recv_one();
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"hi"[..]));

    // Host half-closes: the guest is told the host will send no more, and can still send.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    g.send(g.hdr(OP_RW, 5000, 1025, 3), b"bye");
    let mut rest = Vec::new();
    let mut shut = g.hdr(OP_SHUTDOWN, 5000, 1025, 0);
    shut.flags = SHUTDOWN_SEND;
    g.send(shut, &[]);
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    let (h, _) = g.recv_one();
    assert_eq!(h.op, OP_RST);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn guest_connect_to_missing_port_gets_rst_and_unknown_streams_get_rst() {
    let mut g = Guest::new();
    g.send(g.hdr(OP_REQUEST, 5000, 4444, 0), &[]);
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 4444, 5000));
    g.send(g.hdr(OP_RW, 5001, 4444, 2), b"xx");
    assert_eq!(g.recv_one().0.op, OP_RST);
    // RST for an unknown stream is not answered (no RST storms).
    g.send(g.hdr(OP_RST, 5001, 4444, 0), &[]);
    assert!(g.recv().is_empty());
    // Wrong CIDs are ignored.
    let mut h = g.hdr(OP_REQUEST, 1, 2, 0);
    h.src_cid = 99;
    g.send(h, &[]);
    assert!(g.recv().is_empty());
    // Non-stream socket types are refused.
    let mut h = g.hdr(OP_REQUEST, 1, 2, 0);
    h.type_ = 2;
    g.send(h, &[]);
    assert_eq!(g.recv_one().0.op, OP_RST);
}

#[test]
fn device_respects_guest_credit() {
    let mut g = Guest::new();
    let mut s = connect(&g.uds);
    writeln!(s, "CONNECT 1024").unwrap();
    let (req, _) = g.recv_one();
    let host_port = req.src_port;
    let mut resp = g.hdr(OP_RESPONSE, 1024, host_port, 0);
    resp.buf_alloc = 1000;
    g.send(resp, &[]);
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).unwrap();

    s.write_all(&[7u8; 5000]).unwrap();
    let got: usize = g.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 1000, "sent beyond the guest's buf_alloc");
    assert!(g.recv().is_empty());
    // The guest consumed it all and says so.
    let mut upd = g.hdr(OP_CREDIT_UPDATE, 1024, host_port, 0);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    g.send(upd, &[]);
    let got: usize = g.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 1000);

    // CREDIT_REQUEST is answered with our credit.
    let mut req = g.hdr(OP_CREDIT_REQUEST, 1024, host_port, 0);
    req.buf_alloc = 1000;
    req.fwd_cnt = 1000;
    g.send(req, &[]);
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.buf_alloc), (OP_CREDIT_UPDATE, CONN_BUF_SIZE));
}

#[test]
fn guest_overrunning_device_credit_is_reset() {
    let mut g = Guest::new();
    let (mut host, host_port) = g.host_connect(1024);
    // Do not read on the host side: fill the socket buffer, then the device buffer.
    let chunk = vec![1u8; 60 * 1024];
    let mut rst = false;
    for _ in 0..200 {
        g.send(g.hdr(OP_RW, 1024, host_port, chunk.len() as u32), &chunk);
        if g.recv().iter().any(|(h, _)| h.op == OP_RST) {
            rst = true;
            break;
        }
    }
    assert!(rst, "a guest ignoring credit was never reset");
    assert_eq!(g.dev.connection_count(), 0);
    host.set_nonblocking(false).unwrap();
    let mut sink = Vec::new();
    host.read_to_end(&mut sink).unwrap();
    assert!(!sink.is_empty() && sink.iter().all(|b| *b == 1));
}

#[test]
fn transport_reset_event_is_delivered_and_drops_connections() {
    let mut g = Guest::new();
    let (mut host, _) = g.host_connect(1024);
    // No event buffer yet: the event stays pending until the guest supplies one.
    g.dev.queue_transport_reset();
    assert!(g.dev.transport_reset_pending());
    assert!(g.dev.save_state().pending_transport_reset);
    g.evt.add_chain(&g.mem, &[(0x300000, 4, true)]);
    g.dev.process_queue(2);
    assert_eq!(g.evt.used_idx(&g.mem), 1);
    assert_eq!(g.evt.used_elem(&g.mem, 0).1, 4);
    assert_eq!(g.mem.read_obj::<u32>(GuestAddress(0x300000)).unwrap(), 0);
    assert!(!g.dev.transport_reset_pending());
    assert_eq!(g.dev.connection_count(), 0);
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    assert_eq!(g.irq.status() & 1, 1);
}

#[test]
fn bad_connect_lines_close_the_host_socket() {
    let mut g = Guest::new();
    for line in [
        "HELLO 5\n",
        "CONNECT x\n",
        "CONNECT 99999999999\n",
        "CONNECT 1024 1024 1024 1024 1024\n",
    ] {
        let mut s = connect(&g.uds);
        s.write_all(line.as_bytes()).unwrap();
        assert!(g.recv().is_empty(), "{line:?} reached the guest");
        let mut b = [0u8; 8];
        assert_eq!(s.read(&mut b).unwrap(), 0, "{line:?} left the socket open");
    }
    // A host that hangs up before the guest answers makes the device reset the request.
    let mut s = connect(&g.uds);
    writeln!(s, "CONNECT 1024").unwrap();
    let (req, _) = g.recv_one();
    drop(s);
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.src_port), (OP_RST, req.src_port));
}

#[test]
fn bad_device_parameters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Vsock::new(2, &dir.path().join("a")),
        Err(VsockError::BadCid(2))
    ));
    let path = dir.path().join("taken");
    let _first = Vsock::new(3, &path).unwrap();
    let err = Vsock::new(4, &path).err().unwrap();
    assert!(err.to_string().contains("taken"), "{err}");
}

#[test]
fn many_concurrent_host_streams_stay_separate() {
    let mut g = Guest::new();
    let mut hosts: Vec<(UnixStream, u32)> = (0..8).map(|_| g.host_connect(1024)).collect();
    for (i, (s, _)) in hosts.iter_mut().enumerate() {
        s.write_all(format!("stream {i}").as_bytes()).unwrap();
    }
    let packets = g.recv();
    assert_eq!(packets.len(), 8);
    for (h, data) in packets {
        let i = hosts.iter().position(|(_, p)| *p == h.src_port).unwrap();
        assert_eq!(data, format!("stream {i}").as_bytes());
    }
}

/// Fuzz: random tx packets (random header fields, lengths, chain shapes) and random rx buffer
/// shapes. No panic; memory changes only in writable buffers and used rings.
#[test]
fn fuzz_vsock_queues() {
    for seed in 0..fuzz_seeds(150) {
        let mut rng = Prng::new(seed);
        let mut g = Guest::new();
        let _listener = UnixListener::bind(format!("{}_1025", g.uds.display())).unwrap();
        for _ in 0..40 {
            let mut h = g.hdr(
                OP_REQUEST,
                rng.below(4) as u32,
                1024 + rng.below(3) as u32,
                0,
            );
            h.op = rng.below(9) as u16;
            if rng.chance(10) {
                h.type_ = rng.below(4) as u16;
            }
            if rng.chance(10) {
                h.src_cid = rng.below(5);
            }
            h.buf_alloc = rng.next_u64() as u32;
            h.fwd_cnt = rng.next_u64() as u32;
            h.flags = rng.below(4) as u32;
            let payload_len = rng.below(300) as usize;
            h.len = if rng.chance(90) {
                payload_len as u32
            } else {
                rng.next_u64() as u32
            };
            let at = TX_BUF;
            g.mem.write_slice(&h.to_bytes(), GuestAddress(at)).unwrap();
            let chain_len = if rng.chance(85) {
                44 + payload_len as u32
            } else {
                rng.below(100) as u32
            };
            let writable = rng.chance(5);
            let addr = if rng.chance(5) { 1 << 40 } else { at };
            g.tx.add_chain(&g.mem, &[(addr, chain_len, writable)]);
            g.dev.process_queue(1);
            if rng.chance(20) {
                // A malformed rx buffer: too short, readable, or outside memory.
                let shape = rng.below(3);
                let (a, l, w) = match shape {
                    0 => (0x380000, 10, true),
                    1 => (0x380000, 100, false),
                    _ => (1 << 41, 100, true),
                };
                g.rx.add_chain(&g.mem, &[(a, l, w)]);
            }
            let _ = g.recv();
        }
        assert!(!g.irq.needs_reset(), "seed {seed}");
        // Memory outside the rings and buffers: the region 0x390000.. must be untouched.
        let mut tail = vec![0u8; 0x10000];
        g.mem.read_slice(&mut tail, GuestAddress(0x390000)).unwrap();
        assert!(tail.iter().all(|b| *b == 0), "seed {seed}: stray write");
    }
}

#[test]
fn restored_state_delivers_the_pending_transport_reset() {
    let mut g = Guest::new();
    g.evt.add_chain(&g.mem, &[(0x300000, 4, true)]);
    g.dev.process_queue(2);
    assert_eq!(g.evt.used_idx(&g.mem), 0, "no event pending yet");
    g.dev.restore_state(&VsockState {
        guest_cid: 3,
        pending_transport_reset: true,
    });
    assert_eq!(g.evt.used_idx(&g.mem), 1);
    assert!(!g.dev.transport_reset_pending());
    assert_eq!(
        g.dev.save_state(),
        VsockState {
            guest_cid: 3,
            pending_transport_reset: false
        }
    );
}

#[test]
fn data_sent_before_a_guest_close_reaches_a_slow_host() {
    let mut g = Guest::new();
    let (host, host_port) = g.host_connect(1024);
    // More than the socket buffer takes while the host is not reading.
    let total = 240 * 1024;
    let mut sent = 0;
    let mut seq = 0u8;
    while sent < total {
        let n = (total - sent).min(60 * 1024);
        let chunk: Vec<u8> = (0..n).map(|i| seq.wrapping_add(i as u8)).collect();
        seq = seq.wrapping_add(n as u8);
        g.send(g.hdr(OP_RW, 1024, host_port, n as u32), &chunk);
        sent += n;
    }
    let mut shut = g.hdr(OP_SHUTDOWN, 1024, host_port, 0);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shut, &[]);
    assert_eq!(
        g.dev.connection_count(),
        1,
        "closed before the data was flushed"
    );
    let reader = std::thread::spawn(move || {
        let mut host = host;
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        all
    });
    let mut rst = false;
    for _ in 0..2000 {
        if g.recv().iter().any(|(h, _)| h.op == OP_RST) {
            rst = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(rst, "no RST after the flush");
    let all = reader.join().unwrap();
    assert_eq!(all.len(), total);
    let expected: Vec<u8> = (0..total).map(|i| i as u8).collect();
    assert!(all == expected, "bytes reordered or corrupted");
}

#[test]
fn host_connection_the_guest_never_answers_is_closed_after_the_timeout() {
    let mut g = Guest::new();
    g.dev
        .set_connect_timeout(std::time::Duration::from_millis(50));
    let mut s = connect(&g.uds);
    writeln!(s, "CONNECT 1024").unwrap();
    let (req, _) = g.recv_one();
    assert_eq!(req.op, OP_REQUEST);
    // The guest stays silent. Poll (bounded) until the device gives up.
    let mut rst = None;
    for _ in 0..1000 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        if let Some(p) = g.recv().into_iter().find(|(h, _)| h.op == OP_RST) {
            rst = Some(p.0);
            break;
        }
    }
    let rst = rst.expect("the device never timed the connection out");
    assert_eq!(rst.src_port, req.src_port);
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap(), 0, "the host was not told");
    assert_eq!(g.dev.connection_count(), 0);
    // An answered connection is not affected by the timer.
    let (mut host, port) = g.host_connect(1024);
    std::thread::sleep(std::time::Duration::from_millis(120));
    assert!(g.recv().is_empty());
    g.send(g.hdr(OP_RW, 1024, port, 2), b"ok");
    host.read_exact(&mut b[..2]).unwrap();
    assert_eq!(&b[..2], b"ok");
}
