//! Fuzz-style tests: randomized descriptor tables, avail rings and register accesses thrown at
//! the device models and the transport with no guest. Each run is seeded, so a failure names
//! the seed that reproduces it.
//!
//! Invariants checked: no panic; guest memory changes only inside the used ring (avail_event
//! included) and inside buffers some descriptor marked device-writable; every published in-range head comes back
//! exactly once (or the device flags NEEDS_RESET); block status bytes are valid codes; the
//! base image never changes.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::block::{direct_block, header};
use crate::devices::virtio::block::*;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::testutil::*;
use crate::devices::virtio::{Interrupt, MmioTransport, VirtioDevice};
use crate::devices::BusDevice;
use crate::memory::GuestMemory;

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 32;
const RINGS: u64 = 0x1000;

/// Fills the descriptor table with random descriptors: addresses mostly inside memory, some
/// straddling its end or far outside; random lengths, flags (NEXT / WRITE / INDIRECT) and next
/// indices (including loops and out-of-range ones). Returns the (addr, len) of every descriptor
/// marked WRITE, which are the only buffers a device may write.
fn random_table(mem: &GuestMemory, q: &TestQueue, rng: &mut Prng) -> Vec<(u64, u64)> {
    let mut writable = Vec::new();
    for i in 0..q.size {
        let addr = match rng.below(10) {
            0 => (MEM_SIZE as u64) - rng.below(600),
            1 => rng.next_u64(),
            _ => 0x10000 + rng.below(0xe0000),
        };
        let len = match rng.below(6) {
            0 => 0,
            1 => 1,
            2 => 16,
            3 => 512 * (1 + rng.below(8)) as u32,
            4 => rng.next_u64() as u32,
            _ => rng.below(5000) as u32,
        };
        let mut flags = 0u16;
        if rng.chance(55) {
            flags |= VIRTQ_DESC_F_NEXT;
        }
        if rng.chance(50) {
            flags |= VIRTQ_DESC_F_WRITE;
        }
        if rng.chance(3) {
            flags |= 4; // INDIRECT
        }
        let next = if rng.chance(90) {
            rng.below(u64::from(q.size)) as u16
        } else {
            rng.next_u64() as u16
        };
        q.write_desc(mem, i, addr, len, flags, next);
        if flags & VIRTQ_DESC_F_WRITE != 0 {
            writable.push((addr, u64::from(len)));
        }
        // Indirect tables are read from guest memory too; their entries may be writable
        // anywhere, so record the indirect table's own range as "could describe writes".
        if flags & 4 != 0 {
            writable.push((0, MEM_SIZE as u64));
        }
    }
    writable
}

/// Some well-formed block requests mixed in, so the fuzz also exercises successful paths.
fn plant_block_request(
    mem: &GuestMemory,
    q: &TestQueue,
    rng: &mut Prng,
    writable: &mut Vec<(u64, u64)>,
) {
    let head = rng.below(u64::from(q.size - 3)) as u16;
    let hdr = 0x40000 + 64 * u64::from(head);
    let kind = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        9,
    ][rng.below(5) as usize];
    header(mem, hdr, kind, rng.below(80));
    let data = 0x50000 + 0x1000 * u64::from(head);
    let data_writable = kind != VIRTIO_BLK_T_OUT;
    q.write_desc(mem, head, hdr, 16, VIRTQ_DESC_F_NEXT, head + 1);
    let dflags = VIRTQ_DESC_F_NEXT | if data_writable { VIRTQ_DESC_F_WRITE } else { 0 };
    q.write_desc(mem, head + 1, data, 512, dflags, head + 2);
    q.write_desc(
        mem,
        head + 2,
        0x80000 + u64::from(head),
        1,
        VIRTQ_DESC_F_WRITE,
        0,
    );
    if data_writable {
        writable.push((data, 512));
    }
    writable.push((0x80000 + u64::from(head), 1));
}

fn snapshot(mem: &GuestMemory) -> Vec<u8> {
    let mut v = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

fn assert_only_allowed_changes(
    seed: u64,
    before: &[u8],
    after: &[u8],
    q: &TestQueue,
    writable: &[(u64, u64)],
) {
    // flags, idx, the elements, and avail_event (written with EVENT_IDX).
    let used_ring = (q.used, q.used + 6 + 8 * u64::from(q.size));
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        if a == b {
            continue;
        }
        let i = i as u64;
        let in_used = i >= used_ring.0 && i < used_ring.1;
        let in_writable = writable
            .iter()
            .any(|&(addr, len)| i >= addr && i < addr.saturating_add(len));
        assert!(
            in_used || in_writable,
            "seed {seed}: byte {i:#x} changed ({a:#x} -> {b:#x}) outside the used ring and every writable buffer"
        );
    }
}

/// Publishes random heads (mostly in range) and returns how many in-range heads were published.
fn publish_random_heads(mem: &GuestMemory, q: &mut TestQueue, rng: &mut Prng) -> u16 {
    let count = 1 + rng.below(u64::from(q.size)) as u16;
    let mut in_range = 0;
    for _ in 0..count {
        let head = if rng.chance(95) {
            rng.below(u64::from(q.size)) as u16
        } else {
            q.size + rng.below(1000) as u16
        };
        if head < q.size {
            in_range += 1;
        }
        q.publish(mem, head);
    }
    in_range
}

#[test]
fn fuzz_block_descriptor_chains() {
    for seed in 0..fuzz_seeds(300) {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Prng::new(seed);
        let mem = guest_memory(MEM_SIZE);
        let mut q = TestQueue::new(RINGS, QSIZE);
        let (mut block, irq, base) = direct_block(dir.path(), 64, rng.chance(20), &mem, &q);
        let base_before = std::fs::read(&base).unwrap();
        let mut writable = random_table(&mem, &q, &mut rng);
        if rng.chance(70) {
            plant_block_request(&mem, &q, &mut rng, &mut writable);
        }
        let before = snapshot(&mem);
        let in_range = publish_random_heads(&mem, &mut q, &mut rng);
        let before_with_ring = {
            let mut b = before.clone();
            // The avail ring was written by publish(); take it from live memory.
            let live = snapshot(&mem);
            let avail = (
                q.avail as usize,
                (q.avail + 4 + 2 * u64::from(q.size)) as usize,
            );
            b[avail.0..avail.1].copy_from_slice(&live[avail.0..avail.1]);
            b
        };
        block.process_queue(0);
        let after = snapshot(&mem);
        assert_only_allowed_changes(seed, &before_with_ring, &after, &q, &writable);
        if !irq.needs_reset() {
            assert_eq!(
                q.used_idx(&mem),
                in_range,
                "seed {seed}: chains lost or duplicated"
            );
        }
        for n in 0..q.used_idx(&mem) {
            let (id, _) = q.used_elem(&mem, n);
            assert!(
                id < u32::from(q.size),
                "seed {seed}: used id {id} out of range"
            );
        }
        assert_eq!(
            std::fs::read(&base).unwrap(),
            base_before,
            "seed {seed}: base changed"
        );
    }
}

#[test]
fn fuzz_block_status_codes_are_valid() {
    // Chains whose last descriptor is a 1-byte writable status: whatever precedes it, the
    // status written must be OK / IOERR / UNSUPP.
    for seed in 1000..1000 + fuzz_seeds(200) {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Prng::new(seed);
        let mem = guest_memory(MEM_SIZE);
        let mut q = TestQueue::new(RINGS, QSIZE);
        let (mut block, _irq, _) = direct_block(dir.path(), 64, false, &mem, &q);
        let status_addr = 0x90000;
        mem.write_obj(0xeeu8, GuestAddress(status_addr)).unwrap();
        header(&mem, 0x40000, rng.below(12) as u32, rng.below(70));
        let mut bufs = vec![(0x40000, 16 + rng.below(3) as u32 * 8, false)];
        for _ in 0..rng.below(4) {
            bufs.push((
                0x50000 + rng.below(0x10000),
                rng.below(3000) as u32,
                rng.chance(50),
            ));
        }
        bufs.push((status_addr, 1, true));
        q.add_chain(&mem, &bufs);
        block.process_queue(0);
        assert_eq!(q.used_idx(&mem), 1, "seed {seed}");
        let status = status_at(&mem, status_addr);
        assert!(
            status <= 2,
            "seed {seed}: status {status:#x} written for {bufs:?}"
        );
    }
}

fn status_at(mem: &GuestMemory, at: u64) -> u8 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

#[test]
fn fuzz_rng_descriptor_chains() {
    for seed in 0..fuzz_seeds(300) {
        let mut rng = Prng::new(seed);
        let mem = guest_memory(MEM_SIZE);
        let mut q = TestQueue::new(RINGS, QSIZE);
        let mut dev = Rng::new();
        let irq = Arc::new(Interrupt::new().unwrap());
        dev.activate(mem.clone(), vec![q.queue()], irq.clone())
            .unwrap();
        let writable = random_table(&mem, &q, &mut rng);
        let in_range = publish_random_heads(&mem, &mut q, &mut rng);
        let before = snapshot(&mem);
        dev.process_queue(0);
        let after = snapshot(&mem);
        assert_only_allowed_changes(seed, &before, &after, &q, &writable);
        if !irq.needs_reset() {
            assert_eq!(q.used_idx(&mem), in_range, "seed {seed}");
        }
    }
}

/// virtio-net, both queues at once: random tables on the rx and tx rings, random heads
/// published on each, and frames of random sizes waiting on the "tap". Besides the common
/// invariants: every in-range tx head comes back exactly once, with length 0; an rx head
/// comes back at most as often as published, with a length that is 0 or a whole delivered
/// frame; nothing malformed reaches the tap (every frame written there has a zero header and
/// a length the guest could have meant).
#[test]
fn fuzz_net_descriptor_chains() {
    use crate::devices::virtio::net::{MAX_BUFFER_LEN, VNET_HDR_LEN};
    const RX_RINGS: u64 = 0x1000;
    const TX_RINGS: u64 = 0x3000;
    for seed in 0..fuzz_seeds(200) {
        let mut rng = Prng::new(seed);
        let mem = guest_memory(MEM_SIZE);
        let mut rxq = TestQueue::new(RX_RINGS, QSIZE);
        let mut txq = TestQueue::new(TX_RINGS, QSIZE);
        let (mut dev, host) = super::net::net_pair();
        let irq = Arc::new(Interrupt::new().unwrap());
        dev.activate(mem.clone(), vec![rxq.queue(), txq.queue()], irq.clone())
            .unwrap();
        let mut writable = random_table(&mem, &rxq, &mut rng);
        writable.extend(random_table(&mem, &txq, &mut rng));
        let frames = rng.below(6);
        let mut sizes = Vec::new();
        for _ in 0..frames {
            let len = match rng.below(4) {
                0 => rng.below(20) as usize,
                1 => 60,
                2 => 1514,
                _ => rng.below(MAX_BUFFER_LEN as u64 - VNET_HDR_LEN as u64) as usize,
            };
            let mut pkt = vec![0u8; VNET_HDR_LEN + len];
            pkt[VNET_HDR_LEN..].fill(seed as u8);
            // The socket's buffer bounds what can wait; a tap's queue would too.
            if host.send(&pkt).is_ok() {
                sizes.push(VNET_HDR_LEN + len);
            }
        }
        let rx_in_range = publish_random_heads(&mem, &mut rxq, &mut rng);
        let tx_in_range = publish_random_heads(&mem, &mut txq, &mut rng);
        let before = snapshot(&mem);
        for _ in 0..3 {
            match rng.below(3) {
                0 => dev.process_queue(0),
                1 => dev.process_queue(1),
                _ => dev.process_host_events(),
            }
        }
        dev.process_queue(1);
        dev.process_host_events();
        let after = snapshot(&mem);
        // Both used rings may change.
        let mut allowed = writable.clone();
        allowed.push((rxq.used, 6 + 8 * u64::from(QSIZE)));
        assert_only_allowed_changes(seed, &before, &after, &txq, &allowed);
        if !irq.needs_reset() {
            assert_eq!(
                txq.used_idx(&mem),
                tx_in_range,
                "seed {seed}: tx chains lost"
            );
            assert!(
                rxq.used_idx(&mem) <= rx_in_range,
                "seed {seed}: rx chains duplicated"
            );
        }
        for n in 0..txq.used_idx(&mem) {
            let (id, len) = txq.used_elem(&mem, n);
            assert!(id < u32::from(QSIZE), "seed {seed}: tx used id {id}");
            assert_eq!(len, 0, "seed {seed}: tx used length");
        }
        for n in 0..rxq.used_idx(&mem) {
            let (id, len) = rxq.used_elem(&mem, n);
            assert!(id < u32::from(QSIZE), "seed {seed}: rx used id {id}");
            assert!(
                len == 0 || sizes.contains(&(len as usize)),
                "seed {seed}: rx used length {len} is no frame's ({sizes:?})"
            );
        }
        host.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; MAX_BUFFER_LEN + 1];
        while let Ok(n) = host.recv(&mut buf) {
            assert!(
                n > VNET_HDR_LEN && n <= MAX_BUFFER_LEN,
                "seed {seed}: {n}-byte write to the tap"
            );
            assert_eq!(&buf[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN], "seed {seed}");
        }
    }
}

/// virtio-net with every feature it offers negotiated (EVENT_IDX, MRG_RXBUF, checksum and
/// segmentation offloads both ways): random tables and heads as above, guest memory full of
/// random bytes (so transmit headers are random), some well-formed transmit chains whose
/// header is valid, random or subtly wrong, and frames on the "tap" with random headers.
/// Besides the common invariants: every in-range tx head comes back exactly once with length
/// 0; rx heads come back at most as often as published; every frame that reaches the tap has a
/// header `check_tx` accepts; every frame taken from the tap is delivered or dropped once.
#[test]
fn fuzz_net_with_every_offload_negotiated() {
    use crate::devices::virtio::net::hdr::{check_tx, VnetHdr};
    use crate::devices::virtio::net::{MAX_BUFFER_LEN, NET_FEATURES, VNET_HDR_LEN};
    use crate::devices::virtio::VIRTIO_RING_F_EVENT_IDX;
    use virtio_queue::QueueT;
    const RX_RINGS: u64 = 0x1000;
    const TX_RINGS: u64 = 0x3000;
    let seeds = fuzz_seeds(200);
    // Over all seeds: segmented frames that reached the tap, headers refused, frames delivered.
    let (mut gso_out, mut refused, mut delivered) = (0, 0, 0);
    for seed in 0..seeds {
        let mut rng = Prng::new(seed ^ 0x6e65_7466);
        let mem = guest_memory(MEM_SIZE);
        let noise: Vec<u8> = (0..0xe0000).map(|_| rng.next_u64() as u8).collect();
        mem.write_slice(&noise, GuestAddress(0x10000)).unwrap();
        let mut rxq = TestQueue::new(RX_RINGS, QSIZE);
        let mut txq = TestQueue::new(TX_RINGS, QSIZE);
        let (mut dev, host) = super::net::net_pair();
        let features = if rng.chance(80) {
            NET_FEATURES
        } else {
            NET_FEATURES & !rng.next_u64()
        };
        dev.set_acked_features(features);
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = [rxq.queue(), txq.queue()].map(|mut q| {
            q.set_event_idx(event_idx);
            q
        });
        let irq = Arc::new(Interrupt::new().unwrap());
        dev.activate(mem.clone(), queues.into(), irq.clone())
            .unwrap();
        let mut writable = random_table(&mem, &rxq, &mut rng);
        writable.extend(random_table(&mem, &txq, &mut rng));
        // Well-formed transmit chains with interesting headers.
        for _ in 0..rng.below(6) {
            let head = rng.below(u64::from(QSIZE)) as u16;
            let addr = 0x20000 + 0x1000 * u64::from(head);
            let len = VNET_HDR_LEN as u32 + 1 + rng.below(3000) as u32;
            let mut h = VnetHdr::parse(&[rng.next_u64() as u8; VNET_HDR_LEN]);
            match rng.below(4) {
                0 => h = VnetHdr::default(),
                1 => {
                    h = VnetHdr {
                        flags: 1,
                        gso_type: [1u8, 4, 3, 0x81, 0][rng.below(5) as usize],
                        hdr_len: rng.below(200) as u16,
                        gso_size: rng.below(2000) as u16,
                        csum_start: rng.below(100) as u16,
                        csum_offset: [6u16, 16, 4000][rng.below(3) as usize],
                        num_buffers: 0,
                    }
                }
                2 => h.gso_type = 1,
                _ => {}
            }
            mem.write_slice(&h.to_bytes(), GuestAddress(addr)).unwrap();
            txq.write_desc(&mem, head, addr, len, 0, 0);
        }
        let frames = rng.below(6);
        let mut sent = 0;
        for _ in 0..frames {
            let len = match rng.below(4) {
                0 => rng.below(20) as usize,
                1 => 60,
                2 => 1514,
                _ => rng.below(MAX_BUFFER_LEN as u64 - VNET_HDR_LEN as u64) as usize,
            };
            let mut pkt = vec![seed as u8; VNET_HDR_LEN + len];
            let h = match rng.below(3) {
                0 => VnetHdr::default(),
                1 => VnetHdr {
                    flags: 1,
                    gso_type: 1,
                    hdr_len: 54,
                    gso_size: 1448,
                    csum_start: 34,
                    csum_offset: 16,
                    num_buffers: 0,
                },
                _ => VnetHdr::parse(&[rng.next_u64() as u8; VNET_HDR_LEN]),
            };
            pkt[..VNET_HDR_LEN].copy_from_slice(&h.to_bytes());
            if host.send(&pkt).is_ok() {
                sent += 1;
            }
        }
        let rx_in_range = publish_random_heads(&mem, &mut rxq, &mut rng);
        let tx_in_range = publish_random_heads(&mem, &mut txq, &mut rng);
        let before = snapshot(&mem);
        for _ in 0..4 {
            match rng.below(3) {
                0 => dev.process_queue(0),
                1 => dev.process_queue(1),
                _ => dev.process_host_events(),
            }
        }
        dev.process_queue(1);
        dev.process_host_events();
        let after = snapshot(&mem);
        let mut allowed = writable.clone();
        allowed.push((rxq.used, 6 + 8 * u64::from(QSIZE)));
        assert_only_allowed_changes(seed, &before, &after, &txq, &allowed);
        if !irq.needs_reset() {
            assert_eq!(
                txq.used_idx(&mem),
                tx_in_range,
                "seed {seed}: tx chains lost"
            );
            assert!(
                rxq.used_idx(&mem) <= rx_in_range,
                "seed {seed}: rx chains duplicated"
            );
        }
        for n in 0..txq.used_idx(&mem) {
            assert_eq!(txq.used_elem(&mem, n).1, 0, "seed {seed}: tx used length");
        }
        for n in 0..rxq.used_idx(&mem) {
            let (id, len) = rxq.used_elem(&mem, n);
            assert!(id < u32::from(QSIZE), "seed {seed}: rx used id {id}");
            assert!(
                len as usize <= MAX_BUFFER_LEN,
                "seed {seed}: rx used length {len}"
            );
        }
        let stats = dev.stats();
        assert!(
            stats.rx_frames + stats.rx_dropped <= sent,
            "seed {seed}: {stats:?} for {sent} frames"
        );
        host.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; MAX_BUFFER_LEN + 1];
        let mut on_tap = 0;
        while let Ok(n) = host.recv(&mut buf) {
            on_tap += 1;
            assert!(
                n > VNET_HDR_LEN && n <= MAX_BUFFER_LEN,
                "seed {seed}: {n}-byte write to the tap"
            );
            let h = VnetHdr::parse(&buf[..VNET_HDR_LEN]);
            assert_eq!(
                check_tx(&h, n - VNET_HDR_LEN, features),
                Ok(()),
                "seed {seed}: {h:?} reached the tap"
            );
            gso_out += u64::from(h.gso_type != 0);
        }
        assert_eq!(on_tap, stats.tx_frames, "seed {seed}");
        refused += stats.tx_bad_header;
        delivered += stats.rx_frames;
        // The queues keep their event index setting throughout.
        assert!(dev
            .queues()
            .iter()
            .all(|q| q.event_idx_enabled() == event_idx));
    }
    if seeds >= 100 {
        assert!(
            gso_out > 0 && refused > 0 && delivered > 0,
            "the fuzz missed a path: {gso_out} segmented frames out, {refused} headers refused, {delivered} frames in"
        );
    }
}

/// Random register reads/writes of every width at every offset, interleaved with plausible
/// driver sequences and kicks; the transport must never panic and the device may only be
/// active when the status says DRIVER_OK without NEEDS_RESET.
#[test]
fn fuzz_transport_register_accesses() {
    for seed in 0..fuzz_seeds(200) {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Prng::new(seed);
        let mem = guest_memory(MEM_SIZE);
        let kind = rng.below(4);
        let dev: Arc<Mutex<dyn VirtioDevice>> = if kind == 0 {
            Arc::new(Mutex::new(Rng::new()))
        } else if kind == 1 {
            let uds = dir.path().join("v.sock");
            Arc::new(Mutex::new(
                crate::devices::virtio::vsock::Vsock::new(3, &uds).unwrap(),
            ))
        } else if kind == 2 {
            Arc::new(Mutex::new(super::net::net_pair().0))
        } else {
            let q = TestQueue::new(RINGS, QSIZE);
            Arc::new(Mutex::new(direct_block(dir.path(), 8, false, &mem, &q).0))
        };
        dev.lock().unwrap().reset();
        let mut t = MmioTransport::new(dev.clone(), mem.clone()).unwrap();
        let interesting = [
            0x00u64, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70, 0x80,
            0x84, 0x90, 0x94, 0xa0, 0xa4, 0xfc, 0x100, 0x104, 0x108,
        ];
        for _ in 0..400 {
            let offset = if rng.chance(80) {
                interesting[rng.below(interesting.len() as u64) as usize]
            } else {
                rng.below(0x1000)
            };
            let width = [4usize, 4, 4, 1, 2, 8][rng.below(6) as usize];
            if rng.chance(40) {
                let mut buf = vec![0u8; width];
                t.read(offset, &mut buf);
            } else {
                let value: u64 = match rng.below(4) {
                    0 => rng.below(16),
                    1 => [1u64, 3, 11, 15, 0, 0x4f, 0x8f][rng.below(7) as usize],
                    2 => RINGS + rng.below(0x2000),
                    _ => rng.next_u64(),
                };
                t.write(offset, &value.to_le_bytes()[..width]);
            }
            // Drain kicks as the event loop would.
            for (i, evt) in t.queue_events().iter().enumerate() {
                if evt.read().is_ok() {
                    let mut d = dev.lock().unwrap();
                    if d.is_activated() {
                        d.process_queue(i);
                    }
                }
            }
            let status = t.status();
            if dev.lock().unwrap().is_activated() {
                assert_ne!(
                    status & 4,
                    0,
                    "seed {seed}: active without DRIVER_OK ({status:#x})"
                );
            }
        }
    }
}
