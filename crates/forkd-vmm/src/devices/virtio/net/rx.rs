//! Receive: frames from the tap into the guest's posted buffers.

use std::io::ErrorKind;

use virtio_queue::QueueT;

use super::{Net, RX, VNET_HDR_LEN};
use crate::devices::virtio::queue::{add_used, needs_notification, pop_chain};

/// Frames taken from the tap per call before the device thread serves other devices (the tap
/// stays armed, so the event loop comes back).
const RX_BATCH: usize = 256;

/// What happened to the pending frame.
enum Delivery {
    Delivered,
    /// No usable buffer is posted: keep the frame, stop reading the tap.
    NoBuffer,
    /// The next buffer is too small for this frame: the frame is dropped, the buffer stays
    /// available for the next one.
    TooLarge,
    /// The queue is broken (the device needs a reset).
    Broken,
}

impl Net {
    /// Moves frames from the tap to the guest until the tap is empty, the guest has no buffer
    /// or a batch is done.
    pub(super) fn process_rx(&mut self) {
        if self.active.is_none() || self.tap_failed {
            return;
        }
        let mut used_any = false;
        let mut taken = 0;
        loop {
            if self.rx_len == 0 {
                if taken >= RX_BATCH {
                    break;
                }
                taken += 1;
                match self.tap.read(&mut self.rx_frame) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.arm_tap(true);
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.fail_tap(&e);
                        break;
                    }
                }
            }
            match self.deliver(&mut used_any) {
                Delivery::Delivered => {
                    self.rx_len = 0;
                    self.stats.rx_frames += 1;
                }
                Delivery::TooLarge => {
                    self.rx_len = 0;
                    self.stats.rx_dropped += 1;
                }
                Delivery::NoBuffer | Delivery::Broken => {
                    // Keep the frame; read nothing more until the guest posts buffers.
                    self.arm_tap(false);
                    break;
                }
            }
        }
        if let Some(active) = self.active.as_mut() {
            if used_any && needs_notification(&mut active.queues[RX], &active.mem) {
                active.interrupt.signal_used_queue();
            }
        }
    }

    /// Puts the pending frame into the next usable receive buffer; malformed buffers met on
    /// the way are returned empty.
    fn deliver(&mut self, used_any: &mut bool) -> Delivery {
        let Some(active) = self.active.as_mut() else {
            return Delivery::NoBuffer;
        };
        let queue = &mut active.queues[RX];
        let frame = &self.rx_frame[..self.rx_len];
        loop {
            let chain = match pop_chain(queue, &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => return Delivery::NoBuffer,
                Err(e) => {
                    tracing::warn!("virtio-net: rx queue: {e}; device needs reset");
                    active.interrupt.mark_needs_reset();
                    return Delivery::Broken;
                }
            };
            let usable = chain.is_well_formed()
                && chain.readable.is_empty()
                && chain.writable.len() >= VNET_HDR_LEN as u64;
            if !usable {
                tracing::debug!("virtio-net: malformed rx buffer {}", chain.head);
                self.stats.malformed += 1;
                *used_any |= add_used(queue, &active.mem, chain.head, 0);
                continue;
            }
            if chain.writable.len() < frame.len() as u64 {
                // Give the buffer back to the avail ring's next slot: it was not consumed.
                tracing::debug!(
                    "virtio-net: {}-byte frame does not fit rx buffer {} ({} bytes); dropped",
                    frame.len(),
                    chain.head,
                    chain.writable.len()
                );
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                return Delivery::TooLarge;
            }
            // virtio_net_hdr_v1 with no offload negotiated: all zero but num_buffers = 1.
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = chain
                .writable
                .write_at(&active.mem, 0, &hdr)
                .and_then(|()| {
                    chain.writable.write_at(
                        &active.mem,
                        VNET_HDR_LEN as u64,
                        &frame[VNET_HDR_LEN..],
                    )
                });
            if written.is_err() {
                self.stats.malformed += 1;
                *used_any |= add_used(queue, &active.mem, chain.head, 0);
                continue;
            }
            *used_any |= add_used(queue, &active.mem, chain.head, frame.len() as u32);
            return Delivery::Delivered;
        }
    }
}
