//! Register-level behaviour of the virtio-mmio transport, driven exactly as a driver would.

use std::sync::{Arc, Mutex};

use crate::devices::virtio::mmio::*;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::testutil::*;
use crate::devices::virtio::{
    MmioTransport, VirtioDevice, INTERRUPT_USED_RING, TYPE_RNG, VIRTIO_F_VERSION_1,
};
use crate::devices::BusDevice;
use crate::snapshot::Persist;

fn rng_transport(mem_size: usize) -> (MmioTransport, crate::memory::GuestMemory) {
    let mem = guest_memory(mem_size);
    let dev: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Rng::new()));
    (MmioTransport::new(dev, mem.clone()).unwrap(), mem)
}

#[test]
fn identification_registers() {
    let (mut t, _) = rng_transport(1 << 20);
    assert_eq!(read_reg(&mut t, 0x00), 0x7472_6976);
    assert_eq!(read_reg(&mut t, 0x04), 2);
    assert_eq!(read_reg(&mut t, 0x08), TYPE_RNG);
    assert_ne!(read_reg(&mut t, 0x0c), 0);
    write_reg(&mut t, 0x14, 1);
    assert_eq!(read_reg(&mut t, 0x10), (VIRTIO_F_VERSION_1 >> 32) as u32);
    write_reg(&mut t, 0x14, 7);
    assert_eq!(read_reg(&mut t, 0x10), 0, "feature pages past 1 are empty");
    // Writes to read-only registers change nothing.
    write_reg(&mut t, 0x00, 0);
    write_reg(&mut t, 0x08, 99);
    assert_eq!(read_reg(&mut t, 0x00), 0x7472_6976);
    assert_eq!(read_reg(&mut t, 0x08), TYPE_RNG);
}

#[test]
fn misaligned_and_narrow_register_accesses_are_ignored() {
    let (mut t, _) = rng_transport(1 << 20);
    let mut two = [0xffu8; 2];
    t.read(0x00, &mut two);
    assert_eq!(two, [0, 0]);
    let mut four = [0xffu8; 4];
    t.read(0x02, &mut four);
    assert_eq!(four, [0; 4]);
    t.write(0x70, &[STATUS_ACKNOWLEDGE as u8]);
    assert_eq!(
        read_reg(&mut t, 0x70),
        0,
        "a 1-byte status write is ignored"
    );
    t.write(0x72, &1u32.to_le_bytes());
    assert_eq!(read_reg(&mut t, 0x70), 0);
}

#[test]
fn feature_negotiation_rules() {
    let (mut t, _) = rng_transport(1 << 20);
    // Driver features before DRIVER are ignored.
    write_reg(&mut t, 0x24, 1);
    write_reg(&mut t, 0x20, 1);
    write_reg(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_reg(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(
        read_reg(&mut t, 0x70) & STATUS_FEATURES_OK,
        0,
        "FEATURES_OK without VERSION_1 must be refused"
    );

    // Offering a feature the device lacks is refused too.
    write_reg(&mut t, 0x70, 0);
    write_reg(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_reg(&mut t, 0x24, 1);
    write_reg(&mut t, 0x20, 1);
    write_reg(&mut t, 0x24, 0);
    write_reg(&mut t, 0x20, 1 << 9);
    write_reg(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(read_reg(&mut t, 0x70) & STATUS_FEATURES_OK, 0);

    // The right set is accepted, and cannot be changed afterwards.
    write_reg(&mut t, 0x20, 0);
    write_reg(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_ne!(read_reg(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    write_reg(&mut t, 0x20, 1 << 9);
    assert_eq!(t.save().unwrap().acked_features, VIRTIO_F_VERSION_1);
}

#[test]
fn queue_registers_only_between_features_ok_and_driver_ok() {
    let (mut t, mem) = rng_transport(1 << 20);
    let q = TestQueue::new(0x1000, 16);
    // Before FEATURES_OK: ignored.
    write_reg(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_reg(&mut t, 0x30, 0);
    write_reg(&mut t, 0x38, 16);
    write_reg(&mut t, 0x44, 1);
    assert_eq!(read_reg(&mut t, 0x44), 0);
    assert_eq!(read_reg(&mut t, 0x34), 256);
    write_reg(&mut t, 0x30, 1);
    assert_eq!(read_reg(&mut t, 0x34), 0, "queue 1 does not exist");
    write_reg(&mut t, 0x70, 0);

    let status = init_device(&mut t, VIRTIO_F_VERSION_1, &[q]);
    assert_eq!(status & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    assert_eq!(status & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(t.device().lock().unwrap().is_activated());
    // After DRIVER_OK: queue changes are ignored.
    write_reg(&mut t, 0x30, 0);
    write_reg(&mut t, 0x44, 0);
    assert_eq!(read_reg(&mut t, 0x44), 1);
    let saved = t.save().unwrap();
    assert_eq!(saved.queues[0].desc_table, 0x1000);
    assert_eq!(saved.queues[0].size, 16);
    drop(mem);
}

#[test]
fn status_bits_cannot_be_cleared_without_reset_and_driver_ok_needs_features_ok() {
    let (mut t, _) = rng_transport(1 << 20);
    write_reg(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_reg(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    assert_eq!(read_reg(&mut t, 0x70), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_reg(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
    );
    assert_eq!(read_reg(&mut t, 0x70) & STATUS_DRIVER_OK, 0);
    assert!(!t.device().lock().unwrap().is_activated());
}

#[test]
fn queue_outside_guest_memory_sets_needs_reset_and_reset_recovers() {
    let (mut t, mem) = rng_transport(1 << 20);
    // Rings far beyond the 1 MiB of guest memory.
    let bad = TestQueue::new(0x4000_0000, 16);
    let status = init_device(&mut t, VIRTIO_F_VERSION_1, &[bad]);
    assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0, "status {status:#x}");
    assert!(!t.device().lock().unwrap().is_activated());
    assert_ne!(
        read_reg(&mut t, 0x60) & 2,
        0,
        "config-change interrupt raised"
    );
    assert_eq!(t.interrupt_event().read().unwrap(), 1);

    write_reg(&mut t, 0x70, 0);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    assert_eq!(read_reg(&mut t, 0x60), 0);
    let good = TestQueue::new(0x1000, 16);
    let status = init_device(&mut t, VIRTIO_F_VERSION_1, &[good]);
    assert_eq!(status & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(t.device().lock().unwrap().is_activated());
    drop(mem);
}

#[test]
fn notify_register_signals_queue_event_and_interrupts_are_acked() {
    let (mut t, mem) = rng_transport(1 << 20);
    let mut q = TestQueue::new(0x1000, 16);
    init_device(&mut t, VIRTIO_F_VERSION_1, &[TestQueue::new(0x1000, 16)]);
    q.add_chain(&mem, &[(0x8000, 64, true)]);
    write_reg(&mut t, 0x50, 5); // missing queue: ignored
    write_reg(&mut t, 0x50, 0);
    assert_eq!(t.queue_events()[0].read().unwrap(), 1);
    // Process as the event loop would.
    t.device().lock().unwrap().process_queue(0);
    assert_eq!(q.used_idx(&mem), 1);
    assert_eq!(read_reg(&mut t, 0x60), INTERRUPT_USED_RING);
    assert_eq!(t.interrupt_event().read().unwrap(), 1);
    write_reg(&mut t, 0x64, INTERRUPT_USED_RING);
    assert_eq!(read_reg(&mut t, 0x60), 0);
}

#[test]
fn reset_returns_every_register_to_its_initial_value() {
    let (mut t, mem) = rng_transport(1 << 20);
    let mut q = TestQueue::new(0x1000, 16);
    init_device(&mut t, VIRTIO_F_VERSION_1, &[TestQueue::new(0x1000, 16)]);
    q.add_chain(&mem, &[(0x8000, 64, true)]);
    t.device().lock().unwrap().process_queue(0);
    write_reg(&mut t, 0x70, 0);
    let s = t.save().unwrap();
    assert_eq!(s.status, 0);
    assert_eq!(s.acked_features, 0);
    assert_eq!(s.interrupt_status, 0);
    assert!(!s.activated);
    assert!(!s.queues[0].ready);
    assert_eq!(s.queues[0].next_avail, 0);
    assert_eq!(s.queues[0].size, 256);
    assert_eq!(read_reg(&mut t, 0x44), 0);
}

#[test]
fn save_and_restore_keep_queue_positions() {
    let (mut t, mem) = rng_transport(1 << 20);
    let mut q = TestQueue::new(0x1000, 16);
    init_device(&mut t, VIRTIO_F_VERSION_1, &[TestQueue::new(0x1000, 16)]);
    for _ in 0..3 {
        q.add_chain(&mem, &[(0x8000, 16, true)]);
    }
    t.device().lock().unwrap().process_queue(0);
    let saved = t.save().unwrap();
    assert!(saved.activated);
    assert_eq!(saved.queues[0].next_avail, 3);
    assert_eq!(saved.queues[0].next_used, 3);
    let json = serde_json::to_string(&saved).unwrap();

    // A new transport over the same memory continues where the old one stopped.
    let dev: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Rng::new()));
    let mut t2 = MmioTransport::new(dev, mem.clone()).unwrap();
    t2.restore(&serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(t2.save().unwrap(), saved);
    q.add_chain(&mem, &[(0x8000, 16, true)]);
    t2.device().lock().unwrap().process_queue(0);
    assert_eq!(q.used_idx(&mem), 4);

    // After restore the device is told to look at its queues again.
    let _ = t2.interrupt_event().read(); // the interrupt for request 4
    t2.notify_after_restore();
    assert_eq!(t2.queue_events()[0].read().unwrap(), 1);
    assert_eq!(t2.interrupt_event().read().unwrap(), 1);

    // State for another device type is refused, leaving the transport as it was.
    let mut wrong = saved.clone();
    wrong.device_type = 2;
    let err = t2.restore(&wrong).unwrap_err();
    assert!(err.to_string().contains("device type 2"), "{err}");
    assert!(t2.save().unwrap().activated);
}
