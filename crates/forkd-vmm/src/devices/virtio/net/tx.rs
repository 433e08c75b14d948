//! Transmit: each chain the guest posts (vnet header + frame, device-readable only) becomes
//! one write to the tap, header included: checksum and segmentation requests the driver
//! negotiated go to the host's kernel as they are (see [`super::hdr::check_tx`]).
//!
//! Kicks: the queue is drained with the driver's notifications off, then they are turned back
//! on (with EVENT_IDX: "kick me past the last chain I took") and the ring looked at once more,
//! so a chain added meanwhile is not left waiting for a kick the driver will not send.

use std::io::{ErrorKind, IoSlice};

use virtio_queue::QueueT;

use super::hdr::{check_tx, VnetHdr};
use super::{Net, MAX_BUFFER_LEN, TX, VNET_HDR_LEN};
use crate::devices::virtio::queue::{add_used, needs_notification, pop_chain};

impl Net {
    pub(super) fn process_tx(&mut self) {
        let Net {
            active,
            tap,
            tap_failed,
            tx_buf,
            stats,
            features,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return;
        };
        let queue = &mut active.queues[TX];
        loop {
            // Errors here mean the rings are outside memory, which the pops below report.
            let _ = queue.disable_notification(&active.mem);
            let mut used_any = false;
            let mut broken = false;
            loop {
                let chain = match pop_chain(queue, &active.mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("virtio-net: tx queue: {e}; device needs reset");
                        active.interrupt.mark_needs_reset();
                        broken = true;
                        break;
                    }
                };
                let len = chain.readable.len();
                let well_formed = chain.is_well_formed()
                    && chain.writable.is_empty()
                    && chain.writable.segments().is_empty()
                    && len > VNET_HDR_LEN as u64
                    && len <= MAX_BUFFER_LEN as u64;
                let len = len as usize;
                let read = well_formed
                    && chain
                        .readable
                        .read_at(&active.mem, 0, &mut tx_buf[..len])
                        .is_ok();
                if !read {
                    tracing::debug!("virtio-net: malformed tx chain {}", chain.head);
                    stats.malformed += 1;
                } else if *tap_failed {
                    stats.tx_dropped += 1;
                } else if let Err(why) = check_tx(
                    &VnetHdr::parse(&tx_buf[..VNET_HDR_LEN]),
                    len - VNET_HDR_LEN,
                    *features,
                ) {
                    tracing::debug!("virtio-net: tx chain {}: bad header ({why:?})", chain.head);
                    stats.tx_bad_header += 1;
                } else {
                    match tap.write_vectored(&[IoSlice::new(&tx_buf[..len])]) {
                        Ok(_) => stats.tx_frames += 1,
                        // The kernel's own header checks (virtio_net_hdr_to_skb) said no.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            tracing::debug!(
                                "virtio-net: tx chain {}: the tap refused its header",
                                chain.head
                            );
                            stats.tx_bad_header += 1;
                        }
                        Err(e) => {
                            // A full tap queue (WouldBlock) or the interface gone: the frame
                            // is lost, as on a wire.
                            if e.kind() != ErrorKind::WouldBlock && stats.tx_dropped == 0 {
                                tracing::warn!(
                                    "virtio-net: writing a frame to tap {:?}: {e}",
                                    tap.name()
                                );
                            }
                            stats.tx_dropped += 1;
                        }
                    }
                }
                used_any |= add_used(queue, &active.mem, chain.head, 0);
            }
            if used_any && needs_notification(queue, &active.mem) {
                active.interrupt.signal_used_queue();
            }
            if broken {
                break;
            }
            match queue.enable_notification(&active.mem) {
                // The driver added chains after the ring was found empty.
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!("virtio-net: tx queue: {e}; device needs reset");
                    active.interrupt.mark_needs_reset();
                    break;
                }
            }
        }
    }
}
