//! Transmit: each chain the guest posts (vnet header + frame, device-readable only) becomes
//! one write to the tap.

use std::io::{ErrorKind, IoSlice};

use super::{Net, MAX_BUFFER_LEN, TX, VNET_HDR_LEN};
use crate::devices::virtio::queue::{add_used, needs_notification, pop_chain};

impl Net {
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let queue = &mut active.queues[TX];
        let mut used_any = false;
        loop {
            let chain = match pop_chain(queue, &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("virtio-net: tx queue: {e}; device needs reset");
                    active.interrupt.mark_needs_reset();
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
                    .read_at(&active.mem, 0, &mut self.tx_buf[..len])
                    .is_ok();
            if !read {
                tracing::debug!("virtio-net: malformed tx chain {}", chain.head);
                self.stats.malformed += 1;
            } else if self.tap_failed {
                self.stats.tx_dropped += 1;
            } else {
                // The guest's header is not passed on: no offload was negotiated, so the only
                // valid header is all zero, and a stray GSO request must not reach the tap.
                let hdr = [0u8; VNET_HDR_LEN];
                let bufs = [
                    IoSlice::new(&hdr),
                    IoSlice::new(&self.tx_buf[VNET_HDR_LEN..len]),
                ];
                match self.tap.write_vectored(&bufs) {
                    Ok(_) => self.stats.tx_frames += 1,
                    Err(e) => {
                        // A full tap queue (WouldBlock) or a frame the kernel refused: the
                        // frame is lost, as on a wire.
                        if e.kind() != ErrorKind::WouldBlock && self.stats.tx_dropped == 0 {
                            tracing::warn!(
                                "virtio-net: writing a frame to tap {:?}: {e}",
                                self.tap.name()
                            );
                        }
                        self.stats.tx_dropped += 1;
                    }
                }
            }
            used_any |= add_used(queue, &active.mem, chain.head, 0);
        }
        if used_any && needs_notification(queue, &active.mem) {
            active.interrupt.signal_used_queue();
        }
    }
}
