//! Boots the virtio test guests (guests/blk.c, rng.c, vsock.c) through real KVM with the
//! virtio-mmio devices attached, and checks what they did from the host side.

mod common;

use std::path::Path;

use common::*;
use forkd_vmm::devices::virtio::block::CowDisk;
use forkd_vmm::devices::virtio::{attach, BlockConfig, VirtioConfig, VirtioDevices, VsockConfig};
use forkd_vmm::snapshot::Persist;
use forkd_vmm::{build, SerialOutput, SharedBuffer, StopReason, VmConfig, Vmm};

/// Builds `guest`, attaches `virtio`, starts it.
fn start_with(guest: &str, virtio: &VirtioConfig) -> (Vmm, VirtioDevices, SharedBuffer) {
    let serial = SharedBuffer::new();
    let mut config = VmConfig::new(builtin(guest));
    config.mem_mib = 64;
    config.serial = SerialOutput::Buffer(serial.clone());
    let mut vmm = build(&config).expect("build VM");
    let devices = attach(&mut vmm, virtio).expect("attach virtio devices");
    vmm.start().expect("start VM");
    (vmm, devices, serial)
}

fn base_pattern(o: usize) -> u8 {
    (o ^ (o >> 9) ^ 0x5a) as u8
}

fn written_pattern(o: usize) -> u8 {
    ((o * 7) ^ 0xc3) as u8
}

fn make_base(path: &Path, sectors: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..sectors * 512).map(base_pattern).collect();
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn block_guest_writes_land_in_the_overlay_and_never_in_the_base() {
    if !kvm_available("block_guest_writes_land_in_the_overlay_and_never_in_the_base") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let overlay = dir.path().join("vm.overlay");
    let base_before = make_base(&base, 2048);
    let virtio = VirtioConfig {
        block: Some(BlockConfig {
            base: base.clone(),
            overlay: overlay.clone(),
            read_only: false,
            id: "forkd-blk-test".into(),
        }),
        ..VirtioConfig::default()
    };
    let (mut vmm, mut devices, serial) = start_with("blk", &virtio);
    let reason = wait(&mut vmm);
    devices.stop();
    let out = serial.text();
    assert_eq!(reason, StopReason::GuestExit(0), "serial output:\n{out}");
    assert!(out.contains("capacity 2048 sectors"), "{out}");
    assert!(out.contains("blk: id forkd-blk-test\n"), "{out}");
    assert!(out.contains("blk: all checks passed"), "{out}");

    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "the base image changed"
    );
    drop(devices);
    let disk = CowDisk::open(&base, &overlay).expect("overlay persisted by the guest's flush");
    let mut seen = vec![0u8; 16 * 512];
    disk.read_at(0, &mut seen).unwrap();
    for (o, byte) in seen.iter().enumerate() {
        let written = (3 * 512..4 * 512).contains(&o) || o >= 8 * 512;
        let want = if written {
            written_pattern(o)
        } else {
            base_pattern(o)
        };
        assert_eq!(*byte, want, "disk offset {o}");
    }
    // Sector 3 and sectors 8-15 live in 4 KiB blocks 0 and 1.
    assert_eq!(disk.allocated_blocks(), 2);
}

#[test]
fn misbehaving_block_guest_gets_errors_and_resets_not_a_vmm_crash() {
    if !kvm_available("misbehaving_block_guest_gets_errors_and_resets_not_a_vmm_crash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let base_before = make_base(&base, 64);
    let virtio = VirtioConfig {
        block: Some(BlockConfig {
            base: base.clone(),
            overlay: dir.path().join("overlay"),
            read_only: false,
            id: "misuse".into(),
        }),
        ..VirtioConfig::default()
    };
    let (mut vmm, mut devices, serial) = start_with("blk_misuse", &virtio);
    let reason = wait(&mut vmm);
    devices.stop();
    let out = serial.text();
    assert_eq!(reason, StopReason::GuestExit(0), "serial output:\n{out}");
    assert!(out.contains("blk_misuse: all checks passed"), "{out}");
    assert_eq!(std::fs::read(&base).unwrap(), base_before);
    assert_eq!(
        devices
            .block
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .disk()
            .allocated_blocks(),
        0
    );
}

#[test]
fn rng_guest_gets_non_constant_bytes() {
    if !kvm_available("rng_guest_gets_non_constant_bytes") {
        return;
    }
    let virtio = VirtioConfig {
        rng: true,
        ..VirtioConfig::default()
    };
    let (mut vmm, _devices, serial) = start_with("rng", &virtio);
    let reason = wait(&mut vmm);
    let out = serial.text();
    assert_eq!(reason, StopReason::GuestExit(0), "serial output:\n{out}");
    let hex = out
        .lines()
        .find_map(|l| l.strip_prefix("rng: bytes "))
        .unwrap_or_else(|| panic!("no bytes line:\n{out}"));
    assert_eq!(hex.len(), 128);
    let distinct: std::collections::HashSet<char> = hex.chars().collect();
    assert!(distinct.len() > 4, "guest saw near-constant bytes: {hex}");
}

#[test]
fn device_interrupt_reaches_the_guest_through_irqfd_and_ioapic() {
    if !kvm_available("device_interrupt_reaches_the_guest_through_irqfd_and_ioapic") {
        return;
    }
    let virtio = VirtioConfig {
        rng: true,
        ..VirtioConfig::default()
    };
    let (mut vmm, _devices, serial) = start_with("virtio_irq", &virtio);
    let reason = wait(&mut vmm);
    let out = serial.text();
    assert_eq!(reason, StopReason::GuestExit(0), "serial output:\n{out}");
    assert!(out.contains("virtio_irq: ok"), "{out}");
    assert!(out.contains("status 1,"), "{out}");
}

#[test]
fn guest_without_the_device_reports_it() {
    if !kvm_available("guest_without_the_device_reports_it") {
        return;
    }
    let (mut vmm, _devices, serial) = start_with("rng", &VirtioConfig::default());
    assert_eq!(
        wait(&mut vmm),
        StopReason::GuestExit(10),
        "{}",
        serial.text()
    );
}

mod vsock {
    use super::*;
    use forkd_vmm::memory::{Bytes, GuestAddress};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;

    const IO_TIMEOUT: Duration = Duration::from_secs(60);

    fn connect_guest(uds: &Path, port: u32) -> (UnixStream, String) {
        let mut s = UnixStream::connect(uds).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        (s, String::from_utf8_lossy(&line).into_owned())
    }

    /// Pseudo-random bytes, different per stream.
    fn stream_data(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn vsock_guest_announces_itself_and_echoes_1mib_over_concurrent_streams() {
        if !kvm_available("vsock_guest_announces_itself_and_echoes_1mib_over_concurrent_streams") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let ready = UnixListener::bind(format!("{}_1025", uds.display())).unwrap();
        let virtio = VirtioConfig {
            vsock: Some(VsockConfig::new(uds.clone())),
            ..VirtioConfig::default()
        };
        let (mut vmm, mut devices, serial) = start_with("vsock", &virtio);

        // Guest-initiated connection: READY on host port 1025.
        let (ready_conn, _) = ready.accept().unwrap();
        ready_conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut line = String::new();
        BufReader::new(ready_conn).read_line(&mut line).unwrap();
        assert_eq!(line, "READY vsock\n", "serial:\n{}", serial.text());

        // A port nobody listens on is refused: no OK line, just EOF.
        let (_, refused) = connect_guest(&uds, 2000);
        assert_eq!(refused, "");

        // 4 concurrent streams × 256 KiB = 1 MiB echoed, written and read at the same time.
        const STREAMS: u64 = 4;
        const PER_STREAM: usize = 256 * 1024;
        let workers: Vec<_> = (0..STREAMS)
            .map(|i| {
                let uds = uds.clone();
                std::thread::spawn(move || {
                    let (stream, ok) = connect_guest(&uds, 1024);
                    assert!(ok.starts_with("OK "), "stream {i}: no OK line, got {ok:?}");
                    let data = stream_data(i, PER_STREAM);
                    let mut writer = stream.try_clone().unwrap();
                    let to_send = data.clone();
                    let sender = std::thread::spawn(move || {
                        for chunk in to_send.chunks(10_000) {
                            writer.write_all(chunk).unwrap();
                        }
                        writer.shutdown(std::net::Shutdown::Write).unwrap();
                    });
                    let mut echoed = Vec::with_capacity(PER_STREAM);
                    let mut reader = stream;
                    reader.read_to_end(&mut echoed).unwrap();
                    sender.join().unwrap();
                    assert_eq!(echoed.len(), PER_STREAM, "stream {i}: short echo");
                    assert!(echoed == data, "stream {i}: echoed bytes differ");
                })
            })
            .collect();
        for w in workers {
            w.join().expect("echo stream failed");
        }
        assert!(
            vmm.stop_reason().is_none(),
            "guest stopped early:\n{}",
            serial.text()
        );
        vmm.request_stop();
        assert_eq!(wait(&mut vmm), StopReason::Requested);
        devices.stop();
        assert_eq!(
            devices
                .vsock
                .as_ref()
                .unwrap()
                .lock()
                .unwrap()
                .connection_count(),
            0
        );
    }

    fn read_line(s: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        String::from_utf8_lossy(&line).into_owned()
    }

    fn accept_ready(listener: &UnixListener) -> String {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        read_line(&mut conn)
    }

    #[test]
    fn demo_guest_answers_counter_requests_and_serves_again_after_transport_reset() {
        if !kvm_available(
            "demo_guest_answers_counter_requests_and_serves_again_after_transport_reset",
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("demo.sock");
        let ready = UnixListener::bind(format!("{}_1025", uds.display())).unwrap();
        let virtio = VirtioConfig {
            vsock: Some(VsockConfig::new(uds.clone())),
            ..VirtioConfig::default()
        };
        let (mut vmm, mut devices, serial) = start_with("demo", &virtio);
        assert_eq!(
            accept_ready(&ready),
            "READY demo",
            "serial:\n{}",
            serial.text()
        );

        let (mut s, ok) = connect_guest(&uds, 1024);
        assert!(ok.starts_with("OK "), "{ok:?}");
        let mut values = Vec::new();
        for nonce in ["n1", "second-nonce"] {
            writeln!(s, "COUNTER {nonce}").unwrap();
            let reply = read_line(&mut s);
            let parts: Vec<&str> = reply.split(' ').collect();
            assert_eq!(parts.len(), 3, "{reply:?}");
            assert_eq!((parts[0], parts[2]), ("COUNTER", nonce), "{reply:?}");
            values.push(parts[1].parse::<u64>().expect("counter value"));
        }
        // Requests answered in the same poll see the same value; never an older one.
        assert!(values[1] >= values[0], "counter went backwards: {values:?}");
        let in_memory = forkd_vmm::guests::demo_counter(vmm.memory()).expect("demo counter");
        assert!(
            in_memory >= values[1],
            "reply {values:?} ahead of memory {in_memory}"
        );
        // Once the counter in memory has moved on, the answer reflects it.
        wait_until("the demo counter to advance", || {
            forkd_vmm::guests::demo_counter(vmm.memory()).unwrap_or(0) > values[1]
        });
        writeln!(s, "COUNTER later").unwrap();
        let later: u64 = read_line(&mut s)
            .split(' ')
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("counter value");
        assert!(later > values[1], "{later} after {values:?}");
        writeln!(s, "HELLO").unwrap();
        assert_eq!(read_line(&mut s), "ERROR unknown request");

        // DIRTY <kib> touches one byte per page of a scratch area at 32 MiB.
        let page = |addr: u64| {
            let mut b = [0u8; 1];
            vmm.memory().read_slice(&mut b, GuestAddress(addr)).unwrap();
            b[0]
        };
        assert_eq!(page(0x200_0000 + 0x3000), 0);
        writeln!(s, "DIRTY 64").unwrap();
        assert_eq!(read_line(&mut s), "DIRTY 64");
        let touched = (0..16u64)
            .filter(|i| page(0x200_0000 + i * 4096) != 0)
            .count();
        assert_eq!(touched, 16, "pages written");
        assert_eq!(
            page(0x200_0000 + 64 * 1024),
            0,
            "wrote past the requested size"
        );
        for bad in ["DIRTY", "DIRTY -1", "DIRTY 99999999", "DIRTY 12x"] {
            writeln!(s, "{bad}").unwrap();
            assert_eq!(read_line(&mut s), "ERROR unknown request", "{bad}");
        }

        // What snapshot/restore does: a transport reset drops the streams; the guest serves new
        // ones (it announces READY only once, at boot).
        devices
            .vsock
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .queue_transport_reset();
        assert_eq!(read_line(&mut s), "", "stream survived the transport reset");
        let (mut s2, ok) = connect_guest(&uds, 1024);
        assert!(ok.starts_with("OK "), "{ok:?}");
        writeln!(s2, "COUNTER again").unwrap();
        assert!(read_line(&mut s2).ends_with(" again"));

        vmm.request_stop();
        assert_eq!(wait(&mut vmm), StopReason::Requested);
        devices.stop();
    }

    #[test]
    fn device_state_saved_from_a_running_guest_restores_into_new_devices() {
        if !kvm_available("device_state_saved_from_a_running_guest_restores_into_new_devices") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("a.sock");
        let ready = UnixListener::bind(format!("{}_1025", uds.display())).unwrap();
        let config_a = VirtioConfig {
            vsock: Some(VsockConfig::new(uds.clone())),
            rng: true,
            ..VirtioConfig::default()
        };
        let (mut vmm, devices, serial) = start_with("demo", &config_a);
        assert_eq!(accept_ready(&ready), "READY demo", "{}", serial.text());
        vmm.pause().unwrap();
        let saved = devices.save().unwrap();
        vmm.request_stop();
        wait(&mut vmm);
        let vsock_state = &saved.transports[0];
        assert!(vsock_state.activated);
        assert!(
            vsock_state.queues[1].next_avail > 0,
            "the guest's tx packets are counted"
        );
        assert!(
            !saved.transports[1].activated,
            "the demo never drives the rng"
        );
        let json = serde_json::to_string(&saved).unwrap();

        // A second VM with the same device kinds takes the state (as a restored child would).
        let mut config_b = config_a.clone();
        config_b.vsock = Some(VsockConfig::new(dir.path().join("b.sock")));
        let mut vm_config = VmConfig::new(builtin("demo"));
        vm_config.mem_mib = 64;
        let mut vmm_b = build(&vm_config).unwrap();
        let mut devices_b = attach(&mut vmm_b, &config_b).unwrap();
        devices_b
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();
        let again = devices_b.save().unwrap();
        assert_eq!(again.transports[0].queues, saved.transports[0].queues);
        assert_eq!(again.transports[0].status, saved.transports[0].status);

        // Device lists that differ are refused.
        let mut vmm_c = build(&vm_config).unwrap();
        let mut devices_c = attach(
            &mut vmm_c,
            &VirtioConfig {
                rng: true,
                ..VirtioConfig::default()
            },
        )
        .unwrap();
        let err = devices_c.restore(&saved).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
    }
}
