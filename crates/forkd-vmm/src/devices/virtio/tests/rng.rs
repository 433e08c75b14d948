use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::testutil::*;
use crate::devices::virtio::{DeviceEventLoop, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1};

#[test]
fn rng_fills_buffers_with_non_constant_bytes_through_the_event_loop() {
    let mem = guest_memory(1 << 20);
    let dev: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Rng::new()));
    let mut t = MmioTransport::new(dev, mem.clone()).unwrap();
    let _loop = DeviceEventLoop::spawn(vec![t.event_source().unwrap()]).unwrap();
    let mut q = TestQueue::new(0x1000, 16);
    init_device(&mut t, VIRTIO_F_VERSION_1, &[TestQueue::new(0x1000, 16)]);
    // Split over two descriptors to check scatter.
    q.add_chain(&mem, &[(0x8000, 100, true), (0x9000, 156, true)]);
    write_reg(&mut t, 0x50, 0);
    wait_used(&mem, &q, 1, "rng request");
    assert_eq!(q.used_elem(&mem, 0), (0, 256));
    let mut a = [0u8; 100];
    let mut b = [0u8; 156];
    mem.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
    mem.read_slice(&mut b, GuestAddress(0x9000)).unwrap();
    let distinct: std::collections::HashSet<u8> = a.iter().chain(b.iter()).copied().collect();
    assert!(
        distinct.len() > 16,
        "random bytes look constant: {distinct:?}"
    );
}

#[test]
fn rng_refuses_readable_buffers_and_caps_request_size() {
    let mem = guest_memory(1 << 20);
    let mut rng = Rng::new();
    let mut q = TestQueue::new(0x1000, 16);
    let irq = Arc::new(crate::devices::virtio::Interrupt::new().unwrap());
    rng.activate(mem.clone(), vec![q.queue()], irq).unwrap();
    mem.write_slice(&[0x5a; 64], GuestAddress(0x8000)).unwrap();
    q.add_chain(&mem, &[(0x8000, 64, false)]);
    // A buffer far larger than the cap (but inside memory).
    q.add_chain(&mem, &[(0x10000, 0x80000, true)]);
    rng.process_queue(0);
    assert_eq!(q.used_idx(&mem), 2);
    assert_eq!(q.used_elem(&mem, 0).1, 0);
    let mut buf = [0u8; 64];
    mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
    assert_eq!(buf, [0x5a; 64], "a device-readable buffer was written");
    assert_eq!(
        q.used_elem(&mem, 1).1 as u64,
        crate::devices::virtio::rng::MAX_REQUEST_BYTES
    );
}

/// Pages the device writes (the guest buffer and the used ring) are recorded in guest memory's
/// dirty bitmap, which diff snapshots merge with KVM's dirty log; pages it only reads are not.
#[test]
fn device_writes_mark_guest_pages_dirty() {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryBackend;

    let mem = guest_memory(1 << 20);
    let mut rng = Rng::new();
    let mut q = TestQueue::new(0x1000, 16);
    let irq = Arc::new(crate::devices::virtio::Interrupt::new().unwrap());
    rng.activate(mem.clone(), vec![q.queue()], irq).unwrap();
    q.add_chain(&mem, &[(0x8000, 64, true)]);
    // The test wrote the rings itself through the same memory: start from a clean bitmap.
    let region = mem.iter().next().unwrap();
    region.bitmap().reset();
    rng.process_queue(0);
    let dirty = |addr: u64| region.bitmap().dirty_at(addr as usize);
    assert!(
        dirty(0x8000),
        "the filled buffer's page is not marked dirty"
    );
    assert!(
        dirty(q.used & !0xfff),
        "the used ring's page is not marked dirty"
    );
    assert!(!dirty(0x20000), "an untouched page is marked dirty");
}
