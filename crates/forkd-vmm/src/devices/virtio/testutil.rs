//! Test helpers: guest memory, hand-laid split virtqueues, and a register-level "driver".

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::mmio::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use crate::devices::BusDevice;
use crate::memory::GuestMemory;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

pub fn guest_memory(size: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// A small deterministic PRNG (xorshift64*) so fuzz runs are reproducible from their seed.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A split virtqueue laid out by hand in guest memory.
pub struct TestQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    avail_idx: u16,
    next_desc: u16,
}

impl TestQueue {
    /// Rings at `base` (descriptor table, then avail ring, then a 4-aligned used ring).
    pub fn new(base: u64, size: u16) -> TestQueue {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        TestQueue {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            next_desc: 0,
        }
    }

    /// A ready Queue object pointing at these rings (for driving a device without transport).
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        mem.write_obj(addr.to_le(), at).unwrap();
        mem.write_obj(len.to_le(), at.unchecked_add(8)).unwrap();
        mem.write_obj(flags.to_le(), at.unchecked_add(12)).unwrap();
        mem.write_obj(next.to_le(), at.unchecked_add(14)).unwrap();
    }

    /// Writes a chain of (addr, len, writable) buffers into free descriptors and publishes it.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc % self.size;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let next = (index + 1) % self.size;
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(mem, index, addr, len, flags, next);
        }
        self.next_desc = self.next_desc.wrapping_add(bufs.len() as u16);
        self.publish(mem, head);
        head
    }

    /// Puts `head` in the avail ring and bumps avail idx.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    pub fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// (descriptor id, length) of used element `n`.
    pub fn used_elem(&self, mem: &GuestMemory, n: u16) -> (u32, u32) {
        let at = GuestAddress(self.used + 4 + 8 * u64::from(n % self.size));
        let id: u32 = mem.read_obj(at).unwrap();
        let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// Programs these rings into the transport as queue `index` (status must be FEATURES_OK).
    pub fn program(&self, t: &mut MmioTransport, index: u32) {
        write_reg(t, 0x30, index);
        assert!(
            read_reg(t, 0x34) >= u32::from(self.size),
            "queue {index} too small"
        );
        write_reg(t, 0x38, u32::from(self.size));
        write_reg(t, 0x80, self.desc as u32);
        write_reg(t, 0x84, (self.desc >> 32) as u32);
        write_reg(t, 0x90, self.avail as u32);
        write_reg(t, 0x94, (self.avail >> 32) as u32);
        write_reg(t, 0xa0, self.used as u32);
        write_reg(t, 0xa4, (self.used >> 32) as u32);
        write_reg(t, 0x44, 1);
    }
}

pub fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

pub fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Runs the driver initialisation sequence (spec 3.1.1) accepting `features`, programs
/// `queues`, and sets DRIVER_OK. Returns the final status register.
pub fn init_device(t: &mut MmioTransport, features: u64, queues: &[TestQueue]) -> u32 {
    assert_eq!(read_reg(t, 0x00), 0x7472_6976);
    assert_eq!(read_reg(t, 0x04), 2);
    write_reg(t, 0x70, 0);
    write_reg(t, 0x70, STATUS_ACKNOWLEDGE);
    write_reg(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_reg(t, 0x24, 0);
    write_reg(t, 0x20, features as u32);
    write_reg(t, 0x24, 1);
    write_reg(t, 0x20, (features >> 32) as u32);
    write_reg(
        t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_ne!(
        read_reg(t, 0x70) & STATUS_FEATURES_OK,
        0,
        "features refused"
    );
    for (i, q) in queues.iter().enumerate() {
        q.program(t, i as u32);
    }
    write_reg(
        t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    read_reg(t, 0x70)
}

/// Waits (bounded) until the used ring index reaches `target`; panics with `what` otherwise.
pub fn wait_used(mem: &GuestMemory, q: &TestQueue, target: u16, what: &str) {
    for _ in 0..2000 {
        if q.used_idx(mem) == target {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!(
        "{what}: used idx {} never reached {target}",
        q.used_idx(mem)
    );
}

/// Number of seeds a fuzz test runs: `default`, or FORKD_FUZZ_SEEDS for longer local runs.
pub fn fuzz_seeds(default: u64) -> u64 {
    std::env::var("FORKD_FUZZ_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
