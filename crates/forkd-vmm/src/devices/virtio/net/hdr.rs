//! The 12-byte `virtio_net_hdr_v1` in front of every frame, both on the queues and on the tap
//! (the tap speaks the same header, little endian, size set with TUNSETVNETHDRSZ), and what
//! each side may put in it given the features the driver accepted.
//!
//! Transmit: the guest's header goes to the tap as it is, once [`check_tx`] found it asks only
//! for offloads the driver negotiated and points inside the frame; anything else is dropped
//! and counted (the kernel would refuse most of it with EINVAL anyway, which is counted the
//! same way). Receive: the tap only produces what TUNSETOFFLOAD ([`tap_offloads`]) allows;
//! [`rx_header`] still checks each header against the negotiated features before the guest
//! sees it, so a tap configured by someone else cannot hand the guest what it did not ask for.

use super::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VNET_HDR_LEN,
};

/// flags: the checksum from `csum_start` on is still to be computed and stored at
/// `csum_start + csum_offset`.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// flags (receive only): the checksum was already validated.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// gso_type bit: the TCP segments carry ECN's CWR flag (needs HOST_ECN/GUEST_ECN, not offered).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// `struct virtio_net_hdr_v1`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> VnetHdr {
        let b: &[u8; VNET_HDR_LEN] = b[..VNET_HDR_LEN]
            .try_into()
            .expect("a slice of VNET_HDR_LEN bytes");
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// The checksum field (2 bytes at csum_start + csum_offset) lies inside `frame_len` bytes.
    fn csum_fits(&self, frame_len: usize) -> bool {
        usize::from(self.csum_start) + usize::from(self.csum_offset) + 2 <= frame_len
    }
}

/// Why a transmit header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadTxHeader {
    /// A flag other than NEEDS_CSUM (DATA_VALID and RSC_INFO are for received frames).
    Flags,
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM, or a checksum field past the frame's end.
    Checksum,
    /// A segmentation type the driver did not negotiate (or UDP/ECN, never offered).
    GsoType,
    /// Segmentation without NEEDS_CSUM or with a zero segment size (spec 5.1.6.2).
    Gso,
    /// hdr_len past the frame's end (the kernel answers EINVAL).
    HdrLen,
}

/// Checks the header of a `frame_len`-byte frame (after the header) the guest transmits,
/// against the accepted `features`.
pub fn check_tx(hdr: &VnetHdr, frame_len: usize, features: u64) -> Result<(), BadTxHeader> {
    if hdr.flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        return Err(BadTxHeader::Flags);
    }
    let needs_csum = hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    if needs_csum && (features & VIRTIO_NET_F_CSUM == 0 || !hdr.csum_fits(frame_len)) {
        return Err(BadTxHeader::Checksum);
    }
    let needed = match hdr.gso_type {
        VIRTIO_NET_HDR_GSO_NONE => 0,
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
        _ => return Err(BadTxHeader::GsoType),
    };
    if features & needed != needed {
        return Err(BadTxHeader::GsoType);
    }
    if needed != 0 && (!needs_csum || hdr.gso_size == 0) {
        return Err(BadTxHeader::Gso);
    }
    if usize::from(hdr.hdr_len) > frame_len {
        return Err(BadTxHeader::HdrLen);
    }
    Ok(())
}

/// The header the guest gets for a `frame_len`-byte frame (after the header) whose tap header
/// was `hdr`, or None when the frame cannot be delivered under `features` (segmented for a
/// driver that did not ask for it). `num_buffers` is left for the caller.
pub fn rx_header(hdr: VnetHdr, frame_len: usize, features: u64) -> Option<VnetHdr> {
    let needed = match hdr.gso_type {
        VIRTIO_NET_HDR_GSO_NONE => 0,
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_GUEST_TSO6,
        _ => return None,
    };
    if features & needed != needed || (needed != 0 && features & VIRTIO_NET_F_GUEST_CSUM == 0) {
        return None;
    }
    if features & VIRTIO_NET_F_GUEST_CSUM == 0 {
        // A checksum left to compute cannot be handed to this driver.
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            return None;
        }
        // Spec 5.1.6.4.1: without GUEST_CSUM the flags are zero (the tap may still say
        // DATA_VALID; the guest verifies the checksum itself).
        return Some(VnetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_NONE,
            ..VnetHdr::default()
        });
    }
    let mut out = hdr;
    out.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID;
    if out.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !out.csum_fits(frame_len) {
        return None;
    }
    if out.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        out.csum_start = 0;
        out.csum_offset = 0;
    }
    if needed == 0 {
        out.gso_size = 0;
        out.hdr_len = 0;
    }
    Some(out)
}

/// The TUNSETOFFLOAD flags for a driver that accepted `features`: what the kernel may hand
/// the tap's reader, i.e. what the guest said it can receive. TSO needs the checksum offload
/// (the kernel refuses TUN_F_TSO* without TUN_F_CSUM, as the spec ties GUEST_TSO* to
/// GUEST_CSUM).
pub fn tap_offloads(features: u64) -> libc::c_uint {
    if features & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = VIRTIO_NET_F_CSUM
        | VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_GUEST_TSO4
        | VIRTIO_NET_F_GUEST_TSO6
        | VIRTIO_NET_F_HOST_TSO4
        | VIRTIO_NET_F_HOST_TSO6;

    fn tso4() -> VnetHdr {
        VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    #[test]
    fn headers_round_trip_through_bytes() {
        let h = VnetHdr {
            num_buffers: 7,
            ..tso4()
        };
        assert_eq!(VnetHdr::parse(&h.to_bytes()), h);
        assert_eq!(h.to_bytes()[2..4], 66u16.to_le_bytes());
    }

    #[test]
    fn transmit_headers_ask_only_for_what_was_negotiated() {
        let frame = 10_000;
        assert_eq!(check_tx(&VnetHdr::default(), 60, 0), Ok(()));
        assert_eq!(check_tx(&tso4(), frame, ALL), Ok(()));
        assert_eq!(
            check_tx(&tso4(), frame, VIRTIO_NET_F_CSUM),
            Err(BadTxHeader::GsoType)
        );
        assert_eq!(check_tx(&tso4(), frame, 0), Err(BadTxHeader::Checksum));
        let bad = [
            (
                VnetHdr {
                    flags: VIRTIO_NET_HDR_F_DATA_VALID,
                    ..tso4()
                },
                BadTxHeader::Flags,
            ),
            (
                VnetHdr {
                    csum_start: 9990,
                    ..tso4()
                },
                BadTxHeader::Checksum,
            ),
            (
                VnetHdr {
                    gso_type: VIRTIO_NET_HDR_GSO_UDP,
                    ..tso4()
                },
                BadTxHeader::GsoType,
            ),
            (
                VnetHdr {
                    gso_type: VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
                    ..tso4()
                },
                BadTxHeader::GsoType,
            ),
            (
                VnetHdr {
                    gso_type: 0x42,
                    ..tso4()
                },
                BadTxHeader::GsoType,
            ),
            (
                VnetHdr {
                    gso_size: 0,
                    ..tso4()
                },
                BadTxHeader::Gso,
            ),
            (VnetHdr { flags: 0, ..tso4() }, BadTxHeader::Gso),
            (
                VnetHdr {
                    hdr_len: 60000,
                    ..tso4()
                },
                BadTxHeader::HdrLen,
            ),
        ];
        for (h, why) in bad {
            assert_eq!(check_tx(&h, frame, ALL), Err(why), "{h:?}");
        }
    }

    #[test]
    fn received_headers_are_cut_down_to_the_negotiated_features() {
        let valid = VnetHdr {
            flags: VIRTIO_NET_HDR_F_DATA_VALID | 4,
            hdr_len: 5,
            gso_size: 9,
            ..VnetHdr::default()
        };
        assert_eq!(rx_header(valid, 60, 0), Some(VnetHdr::default()));
        assert_eq!(
            rx_header(valid, 60, VIRTIO_NET_F_GUEST_CSUM),
            Some(VnetHdr {
                flags: VIRTIO_NET_HDR_F_DATA_VALID,
                ..VnetHdr::default()
            })
        );
        assert_eq!(rx_header(tso4(), 10_000, ALL), Some(tso4()));
        assert_eq!(rx_header(tso4(), 10_000, 0), None);
        let partial = VnetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_NONE,
            ..tso4()
        };
        assert_eq!(
            rx_header(partial, 1500, 0),
            None,
            "NEEDS_CSUM without GUEST_CSUM"
        );
        assert_eq!(
            rx_header(tso4(), 10_000, VIRTIO_NET_F_GUEST_TSO4),
            None,
            "TSO without GUEST_CSUM"
        );
        assert_eq!(rx_header(tso4(), 40, ALL), None, "checksum past the end");
    }

    #[test]
    fn the_tap_gets_tso_only_with_the_checksum_offload() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(tap_offloads(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(tap_offloads(VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(ALL),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}
