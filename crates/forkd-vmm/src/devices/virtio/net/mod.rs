//! virtio-net (device type 1) over a TAP interface.
//!
//! Two queues: receive (0) and transmit (1). Configuration space: the MAC (6 bytes), then the
//! status word (the link is always up).
//!
//! Features offered ([`NET_FEATURES`]), each because a guest↔host TCP stream pays for its
//! absence in exits, copies or segments:
//! - VERSION_1, MAC, STATUS.
//! - CSUM and HOST_TSO4/HOST_TSO6: the guest sends TCP in packets of up to 64 KiB with the
//!   checksum left to do; its header goes to the tap as it is, and the host's kernel
//!   segments and checksums only if the packet really leaves (a local socket takes it whole).
//!   One chain, one tap write, one kick per 64 KiB instead of per 1.5 KiB.
//! - GUEST_CSUM and GUEST_TSO4/GUEST_TSO6: the tap is told (TUNSETOFFLOAD) that the reader
//!   takes partial checksums and unsegmented TCP, so the host hands over 64 KiB at a time.
//!   Without GUEST_CSUM the tap gets no offload at all, without GUEST_TSO no TSO: the kernel
//!   then checksums and segments before the frame reaches the device.
//! - MRG_RXBUF: a received frame spans as many posted buffers as it needs, so a guest posts
//!   page-sized buffers yet takes 64 KiB frames (without it a GUEST_TSO driver must post 64 KiB
//!   per buffer).
//! - VIRTIO_RING_F_EVENT_IDX on both queues: the guest says after which used index it wants
//!   an interrupt (NAPI keeps them off while it polls), and the device after which avail
//!   index it wants a kick: on tx one past the last chain it took, on rx only while a frame
//!   waits for buffers, so refilling the receive ring costs the guest no exit.
//!
//! Not offered: HOST_UFO/GUEST_UFO (Linux no longer produces UFO; nothing to gain),
//! HOST_ECN/GUEST_ECN (without them each side's kernel segments ECN-marked TCP itself, and
//! Linux asks for ECN on no connection it opens by default), USO, MTU, the control
//! queue (no runtime offload changes, no multiqueue) and CTRL_GUEST_OFFLOADS.
//!
//! - [`tap`]: opening the host's tap by name (in the calling thread's network namespace), with
//!   the matching vnet header size, non-blocking, offloads off until the device sets them.
//! - [`hdr`]: the vnet header, what the guest may send in it and what it may be given, and
//!   the tap offloads a feature set implies.
//! - `tx`: each transmit chain (header + frame, device-readable only) becomes one write to the
//!   tap. A header that asks for what was not negotiated or points past the frame is dropped
//!   and counted (as is one the kernel refuses with EINVAL).
//! - `rx`: frames read from the tap go into posted receive buffers, one buffer per frame
//!   without MRG_RXBUF, as many as needed with it (`num_buffers` in the first header). A frame
//!   the posted buffers cannot hold yet is kept and the tap is not read again until the guest
//!   posts more (an rx queue kick): nothing is dropped for lack of buffers, and an idle guest
//!   does not make the device thread spin. Dropped: a frame too large for the next buffer
//!   without MRG_RXBUF, or for the whole ring with it, and one whose offloads the guest did
//!   not accept.
//!
//! The tap is watched by the device's own epoll (its `host_event_fd` in the device event
//! loop), which is how reading is switched off and on. A tap that fails (its interface was
//! deleted) is dropped from that epoll: the device then discards what the guest sends.
//!
//! Snapshots: the transport saves the accepted features and the queues (their event index
//! setting included) like every device; the MAC and the tap name are part of the machine's
//! device list. The tap itself is not state: a restored child opens its own, by name, in the
//! namespace it is restored in, with offloads off, and keeps the snapshot's MAC; the
//! transport's restore then activates the device with the saved features, which sets the
//! tap's offloads to what the guest negotiated before the snapshot. No state of the device's
//! own is saved (a snapshot from before these features restores with none of them). A frame
//! that was waiting for receive buffers at the snapshot is not saved (as if the wire dropped
//! it).
//!
//! Malformed chains (a transmit chain with a device-writable part, too short for the header
//! or longer than [`MAX_BUFFER_LEN`]; a receive buffer that is read-only, or shorter than the
//! header when a frame starts in it) are returned to the guest with length 0 and counted;
//! never a panic. Buffers already gathered for a mergeable frame when a malformed one turns
//! up are returned empty with it (a driver reads a frame's buffers in a row).

pub mod hdr;
mod rx;
pub mod tap;
mod tx;

use std::fmt;
use std::os::fd::AsRawFd;
use std::os::unix::io::RawFd;
use std::str::FromStr;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::mmio::read_config_bytes;
use super::{
    Interrupt, VirtioDevice, VirtioError, TYPE_NET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::virtio::Active;
use crate::memory::GuestMemory;

pub use self::tap::Tap;

/// The device takes frames with a partial checksum (NEEDS_CSUM) from the driver.
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// The driver takes frames with a partial checksum (or DATA_VALID) from the device.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// The device has a MAC address in its configuration space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The driver takes unsegmented TCP/IPv4 packets (up to 64 KiB) from the device.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
/// The driver takes unsegmented TCP/IPv6 packets from the device.
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
/// The device takes unsegmented TCP/IPv4 packets from the driver (the host's kernel segments
/// them, or does not have to at all).
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
/// The device takes unsegmented TCP/IPv6 packets from the driver.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// One received frame may span several receive buffers (`num_buffers` in its header).
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// The configuration space has a link status word.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

/// Everything the device offers (see the module doc for why each, and why not the rest).
pub const NET_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_STATUS
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_MRG_RXBUF;
/// Status word: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Largest header + frame accepted or delivered: a 64 KiB (GSO) packet in an Ethernet frame
/// with a VLAN tag, and its vnet header.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + 14 + 4 + 65536;

const QUEUE_SIZES: [u16; 2] = [256, 256];
pub(crate) const QUEUE_COUNT: usize = QUEUE_SIZES.len();
const RX: usize = 0;
const TX: usize = 1;

const TAP_TOKEN: u64 = 1;

/// The MAC a net device gets when none is given (locally administered, unicast).
pub const DEFAULT_MAC: MacAddr = MacAddr([0x06, 0x00, 0xac, 0x10, 0x00, 0x02]);

/// An Ethernet address; written and parsed as `06:00:ac:10:00:02`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex bytes separated by ':', e.g. 06:00:ac:10:00:02)")]
pub struct BadMac(String);

impl FromStr for MacAddr {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<MacAddr, BadMac> {
        let bad = || BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap device name {0:?} is not an interface name (1-15 bytes, no '/', ':' or spaces)")]
    BadTapName(String),
    #[error("tap device {0:?} does not exist in this network namespace (create it first, e.g. `ip tuntap add dev {0} mode tap`)")]
    TapMissing(String),
    #[error("tap device {name:?}: {what}")]
    Tap {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the virtio-net device's tap polling")]
    Epoll(#[source] std::io::Error),
}

/// Counters of what the device did, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames put into receive buffers.
    pub rx_frames: u64,
    /// Frames read from the tap that no receive buffer could hold (too large, or a runt).
    pub rx_dropped: u64,
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Well-formed transmit chains the tap did not take (full, gone).
    pub tx_dropped: u64,
    /// Malformed chains returned with length 0 (either queue).
    pub malformed: u64,
    /// Transmit frames whose vnet header asked for what was not negotiated or pointed past
    /// the frame (or that the kernel refused with EINVAL): dropped.
    pub tx_bad_header: u64,
}

/// The virtio-net device model.
pub struct Net {
    tap: Tap,
    mac: MacAddr,
    epoll: Epoll,
    /// Whether the tap is in `epoll` with read interest.
    tap_armed: bool,
    /// The tap failed (its interface is gone): removed from `epoll`, writes are dropped.
    tap_failed: bool,
    active: Option<Active>,
    /// What the driver accepted (at FEATURES_OK; 0 after a reset).
    features: u64,
    config: [u8; 8],
    /// The frame read from the tap last, with its header; `rx_len` bytes of it wait for a
    /// receive buffer (0: none).
    rx_frame: Vec<u8>,
    rx_len: usize,
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl Net {
    /// A device with MAC `mac` on `tap`.
    pub fn new(tap: Tap, mac: MacAddr) -> Result<Net, NetError> {
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        // Registered without interest until the driver activates the device.
        epoll
            .ctl(
                ControlOperation::Add,
                tap.as_raw_fd(),
                EpollEvent::new(EventSet::empty(), TAP_TOKEN),
            )
            .map_err(NetError::Epoll)?;
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac.0);
        config[6..].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        Ok(Net {
            tap,
            mac,
            epoll,
            tap_armed: false,
            tap_failed: false,
            active: None,
            features: 0,
            config,
            // One byte more than any frame delivered, to tell a truncated read.
            rx_frame: vec![0; MAX_BUFFER_LEN + 1],
            rx_len: 0,
            tx_buf: vec![0; MAX_BUFFER_LEN],
            stats: NetStats::default(),
        })
    }

    /// Opens the tap `tap_name` (see [`Tap::open`]) and builds the device on it.
    pub fn open(tap_name: &str, mac: MacAddr) -> Result<Net, NetError> {
        Net::new(Tap::open(tap_name)?, mac)
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.features
    }

    /// The TUN_F_* offloads the tap was last told the guest accepts.
    pub fn tap_offloads(&self) -> libc::c_uint {
        self.tap.offloads()
    }

    /// Tells the tap what the driver can receive. A failure leaves the tap as it was, which
    /// is safe: receive headers are checked against the features anyway (a frame the guest
    /// cannot take is dropped), and with fewer offloads the kernel just does the work.
    fn apply_offloads(&mut self, flags: libc::c_uint) {
        if self.tap.offloads() == flags {
            return;
        }
        if let Err(e) = self.tap.set_offloads(flags) {
            tracing::warn!(
                "virtio-net: tap {:?}: setting offloads {flags:#x}: {e}",
                self.tap.name()
            );
        }
    }

    /// Turns read interest in the tap on or off (a no-op once the tap failed).
    fn arm_tap(&mut self, on: bool) {
        if self.tap_failed || self.tap_armed == on {
            return;
        }
        let events = if on { EventSet::IN } else { EventSet::empty() };
        match self.epoll.ctl(
            ControlOperation::Modify,
            self.tap.as_raw_fd(),
            EpollEvent::new(events, TAP_TOKEN),
        ) {
            Ok(()) => self.tap_armed = on,
            Err(e) => self.fail_tap(&e),
        }
    }

    /// The tap cannot be used any more: stop watching it (an fd in error is reported by
    /// epoll whatever the interest, and would make the device thread spin).
    fn fail_tap(&mut self, e: &std::io::Error) {
        if self.tap_failed {
            return;
        }
        tracing::warn!(
            "virtio-net: tap {:?} failed ({e}); the guest's network is down",
            self.tap.name()
        );
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.tap.as_raw_fd(),
            EpollEvent::default(),
        );
        self.tap_failed = true;
        self.tap_armed = false;
        self.rx_len = 0;
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        NET_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.features = features & NET_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), VirtioError> {
        self.active = Some(Active::new(mem, queues, interrupt, QUEUE_COUNT)?);
        // Also how a restored child's fresh tap learns what its guest negotiated before the
        // snapshot: the transport's restore activates the device with the saved features.
        self.apply_offloads(hdr::tap_offloads(self.features));
        self.arm_tap(true);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.features = 0;
        self.rx_len = 0;
        self.arm_tap(false);
        self.apply_offloads(0);
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX => self.process_rx(),
            TX => self.process_tx(),
            _ => {}
        }
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 1];
        match self.epoll.wait(0, &mut events) {
            Ok(1)
                if events[0]
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP) =>
            {
                self.fail_tap(&std::io::Error::other("the tap reported an error"));
                return;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => tracing::warn!("virtio-net: epoll_wait: {e}"),
        }
        self.process_rx();
    }
}
