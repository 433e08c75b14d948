//! virtio-blk driven through the transport and the event loop, as a guest driver would.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::block::*;
use crate::devices::virtio::testutil::*;
use crate::devices::virtio::{
    DeviceEventLoop, Interrupt, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;

pub(super) fn make_base(dir: &Path, sectors: usize) -> PathBuf {
    let path = dir.join("base.img");
    let data: Vec<u8> = (0..sectors * 512)
        .map(|i| ((i / 512) as u8) ^ (i as u8))
        .collect();
    std::fs::write(&path, data).unwrap();
    path
}

pub(super) fn header(mem: &GuestMemory, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

pub(super) fn status_at(mem: &GuestMemory, at: u64) -> u8 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;

#[test]
fn block_read_write_flush_get_id_through_transport() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 64);
    let base_before = std::fs::read(&base).unwrap();
    let overlay = dir.path().join("vm.overlay");
    let disk = CowDisk::create(&base, &overlay).unwrap();
    let mem = guest_memory(1 << 20);
    let block = Arc::new(Mutex::new(Block::new(disk, "forkd-test-disk", false)));
    let dev: Arc<Mutex<dyn VirtioDevice>> = block.clone();
    let mut t = MmioTransport::new(dev, mem.clone()).unwrap();
    let _loop = DeviceEventLoop::spawn(vec![t.event_source().unwrap()]).unwrap();

    // Config space: capacity in sectors, readable in 4-byte halves as Linux does.
    assert_eq!(read_reg(&mut t, 0x100), 64);
    assert_eq!(read_reg(&mut t, 0x104), 0);
    assert_ne!(read_reg(&mut t, 0x10) & (1 << 9), 0, "FLUSH offered");
    assert_ne!(read_reg(&mut t, 0x10) & (1 << 2), 0, "SEG_MAX offered");
    assert_eq!(read_reg(&mut t, 0x10c), SEG_MAX);
    assert_eq!(
        read_reg(&mut t, 0x110),
        0,
        "past the config space reads as zero"
    );

    let mut q = TestQueue::new(0x1000, 16);
    let status = init_device(
        &mut t,
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH,
        &[TestQueue::new(0x1000, 16)],
    );
    assert_eq!(status & 0x40, 0);
    let mut used = 0;
    let mut submit = |q: &mut TestQueue, t: &mut MmioTransport, bufs: &[(u64, u32, bool)]| {
        q.add_chain(&mem, bufs);
        write_reg(t, 0x50, 0);
        used += 1;
        wait_used(&mem, q, used, "block request");
        q.used_elem(&mem, used - 1)
    };

    // Read sectors 2..4.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    let (_, len) = submit(
        &mut q,
        &mut t,
        &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
    );
    assert_eq!(len, 1025);
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, base_before[1024..2048]);

    // Write sector 5 (one 512-byte sector inside a 4 KiB COW block), then read it back.
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 5);
    let (_, len) = submit(
        &mut q,
        &mut t,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    assert_eq!((len, status_at(&mem, STATUS)), (1, VIRTIO_BLK_S_OK));

    header(&mem, HDR, VIRTIO_BLK_T_IN, 4);
    submit(
        &mut q,
        &mut t,
        &[(HDR, 16, false), (DATA, 1536, true), (STATUS, 1, true)],
    );
    mem.read_slice(&mut got[..], GuestAddress(DATA)).unwrap();
    let mut full = vec![0u8; 1536];
    mem.read_slice(&mut full, GuestAddress(DATA)).unwrap();
    assert_eq!(full[..512], base_before[2048..2560]);
    assert_eq!(full[512..1024], [0xab; 512]);
    assert_eq!(full[1024..], base_before[3072..3584]);

    // Flush persists the map; GET_ID returns the id.
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    submit(&mut q, &mut t, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK);
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let (_, len) = submit(
        &mut q,
        &mut t,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
    assert_eq!(len, 21, "20 id bytes (zero padded) + status");
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..15], b"forkd-test-disk");
    assert_eq!(id[15..], [0; 5]);

    // The base is untouched; the overlay, reopened from disk, holds the write.
    assert_eq!(std::fs::read(&base).unwrap(), base_before);
    let reopened = CowDisk::open(&base, &overlay).unwrap();
    let mut sector5 = [0u8; 512];
    reopened.read_at(5 * 512, &mut sector5).unwrap();
    assert_eq!(sector5, [0xab; 512]);
    assert_eq!(reopened.allocated_blocks(), 1);
    assert_eq!(block.lock().unwrap().disk().allocated_blocks(), 1);
}

/// A block device activated directly on a hand-laid queue (no transport).
pub(super) fn direct_block(
    dir: &Path,
    sectors: usize,
    read_only: bool,
    mem: &GuestMemory,
    q: &TestQueue,
) -> (Block, Arc<Interrupt>, PathBuf) {
    let base = make_base(dir, sectors);
    let disk = CowDisk::create(&base, &dir.join("overlay")).unwrap();
    let mut block = Block::new(disk, "id", read_only);
    let irq = Arc::new(Interrupt::new().unwrap());
    block
        .activate(mem.clone(), vec![q.queue()], irq.clone())
        .unwrap();
    (block, irq, base)
}

/// Every malformed-request case the spec lets a driver get wrong, each answered with a status.
#[test]
fn malformed_block_requests_get_error_status() {
    let dir = tempfile::tempdir().unwrap();
    let mem = guest_memory(32 << 20);
    let mut q = TestQueue::new(0x1000, 64);
    let (mut block, irq, base) = direct_block(dir.path(), 64, false, &mem, &q);
    let base_before = std::fs::read(&base).unwrap();
    let far = 1u64 << 40; // not guest memory

    struct Case {
        name: &'static str,
        kind: u32,
        sector: u64,
        bufs: Vec<(u64, u32, bool)>,
        expect: Option<u8>,
    }
    let cases = vec![
        Case {
            name: "sector past the end",
            kind: VIRTIO_BLK_T_IN,
            sector: 64,
            bufs: vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            expect: Some(VIRTIO_BLK_S_IOERR),
        },
        Case {
            name: "range crosses the end",
            kind: VIRTIO_BLK_T_OUT,
            sector: 63,
            bufs: vec![(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
            expect: Some(VIRTIO_BLK_S_IOERR),
        },
        Case {
            name: "sector overflow",
            kind: VIRTIO_BLK_T_IN,
            sector: u64::MAX,
            bufs: vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            expect: Some(VIRTIO_BLK_S_IOERR),
        },
        Case {
            name: "not a sector multiple",
            kind: VIRTIO_BLK_T_IN,
            sector: 0,
            bufs: vec![(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)],
            expect: Some(VIRTIO_BLK_S_IOERR),
        },
        Case {
            name: "header too short",
            kind: VIRTIO_BLK_T_IN,
            sector: 0,
            bufs: vec![(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)],
            expect: Some(VIRTIO_BLK_S_IOERR),
        },
        Case {
            name: "IN data device-readable (wrong direction)",
            kind: VIRTIO_BLK_T_IN,
            sector: 0,
            bufs: vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            expect: Some(VIRTIO_BLK_S_IOERR),
        },
        Case {
            name: "OUT data device-writable (wrong direction)",
            kind: VIRTIO_BLK_T_OUT,
            sector: 0,
            bufs: vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            expect: Some(VIRTIO_BLK_S_IOERR),
        },
        Case {
            name: "readable after writable",
            kind: VIRTIO_BLK_T_OUT,
            sector: 0,
            bufs: vec![(HDR, 16, false), (STATUS, 1, true), (DATA, 512, false)],
            expect: None,
        },
        Case {
            name: "data outside guest memory",
            kind: VIRTIO_BLK_T_IN,
            sector: 0,
            bufs: vec![(HDR, 16, false), (far, 512, true), (STATUS, 1, true)],
            expect: Some(VIRTIO_BLK_S_IOERR),
        },
        Case {
            name: "data straddles the end of guest memory",
            kind: VIRTIO_BLK_T_IN,
            sector: 0,
            bufs: vec![
                (HDR, 16, false),
                ((32 << 20) - 256, 512, true),
                (STATUS, 1, true),
            ],
            expect: Some(VIRTIO_BLK_S_IOERR),
        },
        Case {
            name: "oversized request",
            kind: VIRTIO_BLK_T_OUT,
            sector: 0,
            bufs: vec![
                (HDR, 16, false),
                (0x100000, 8 << 20, false),
                (0x100000, 8 << 20, false),
                (0x100000, 1 << 20, false),
                (STATUS, 1, true),
            ],
            expect: Some(VIRTIO_BLK_S_IOERR),
        },
        Case {
            name: "unknown request type",
            kind: 77,
            sector: 0,
            bufs: vec![(HDR, 16, false), (STATUS, 1, true)],
            expect: Some(VIRTIO_BLK_S_UNSUPP),
        },
        Case {
            name: "discard is unsupported",
            kind: 11,
            sector: 0,
            bufs: vec![(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
            expect: Some(VIRTIO_BLK_S_UNSUPP),
        },
    ];
    let mut used = 0u16;
    for case in cases {
        header(&mem, HDR, case.kind, case.sector);
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        q.add_chain(&mem, &case.bufs);
        block.process_queue(0);
        used += 1;
        assert_eq!(
            q.used_idx(&mem),
            used,
            "{}: request not returned",
            case.name
        );
        match case.expect {
            Some(status) => assert_eq!(status_at(&mem, STATUS), status, "{}", case.name),
            None => {
                // The status byte is not the last writable byte; the chain is still answered
                // with an error in the last writable byte (here STATUS).
                assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_IOERR, "{}", case.name)
            }
        }
    }

    // No writable descriptor at all: nothing can be reported, the chain comes back with len 0.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    q.add_chain(&mem, &[(HDR, 16, false), (DATA, 512, false)]);
    // Status byte outside guest memory.
    q.add_chain(
        &mem,
        &[(HDR, 16, false), (DATA, 512, false), (far, 1, true)],
    );
    block.process_queue(0);
    assert_eq!(q.used_idx(&mem), used + 2);
    assert_eq!(q.used_elem(&mem, used).1, 0);
    assert_eq!(q.used_elem(&mem, used + 1).1, 0);

    assert!(!irq.needs_reset());
    assert_eq!(std::fs::read(&base).unwrap(), base_before);
    assert_eq!(
        block.disk().allocated_blocks(),
        0,
        "no failed write reached the overlay"
    );
}

#[test]
fn read_only_block_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mem = guest_memory(1 << 20);
    let mut q = TestQueue::new(0x1000, 16);
    let (mut block, _irq, _) = direct_block(dir.path(), 8, true, &mem, &q);
    assert_ne!(block.avail_features() & VIRTIO_BLK_F_RO, 0);
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    q.add_chain(
        &mem,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    block.process_queue(0);
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    assert_eq!(block.disk().allocated_blocks(), 0);
}

#[test]
fn avail_index_too_far_ahead_marks_device_needs_reset() {
    let dir = tempfile::tempdir().unwrap();
    let mem = guest_memory(1 << 20);
    let q = TestQueue::new(0x1000, 16);
    let (mut block, irq, _) = direct_block(dir.path(), 8, false, &mem, &q);
    q.set_avail_idx(&mem, 100);
    block.process_queue(0);
    assert!(irq.needs_reset());
    assert_eq!(q.used_idx(&mem), 0);
}

/// The parser does not depend on how the driver splits the request into descriptors.
#[test]
fn block_requests_with_any_framing_are_understood() {
    let dir = tempfile::tempdir().unwrap();
    let mem = guest_memory(1 << 20);
    let mut q = TestQueue::new(0x1000, 16);
    let (mut block, _irq, base) = direct_block(dir.path(), 16, false, &mem, &q);
    let base_data = std::fs::read(&base).unwrap();

    // OUT with header and data in one descriptor.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 2);
    mem.write_slice(&[0x77; 512], GuestAddress(HDR + 16))
        .unwrap();
    q.add_chain(&mem, &[(HDR, 16 + 512, false), (STATUS, 1, true)]);
    block.process_queue(0);
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK);

    // IN with the header split in two and data + status in one writable descriptor.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    q.add_chain(
        &mem,
        &[
            (HDR, 5, false),
            (HDR + 5, 11, false),
            (DATA, 1024 + 1, true),
        ],
    );
    block.process_queue(0);
    assert_eq!(q.used_elem(&mem, 1).1, 1025);
    assert_eq!(status_at(&mem, DATA + 1024), VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got[..512], base_data[512..1024]);
    assert_eq!(got[512..], [0x77; 512]);
}
