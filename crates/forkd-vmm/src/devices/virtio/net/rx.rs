//! Receive: frames from the tap into the guest's posted buffers.
//!
//! Without MRG_RXBUF a frame goes into one buffer (header with `num_buffers` = 1, then the
//! frame); a buffer too small for it is left for the next frame and the frame dropped, since
//! such a driver posts buffers of one size. With MRG_RXBUF a frame takes as many buffers as it
//! needs, in ring order, each returned with the bytes it holds and the first one's header
//! saying how many there are. Buffers are only returned once the whole frame fits: until then
//! they go back to the ring unconsumed and the frame waits.
//!
//! A frame that waits (no buffer, or not enough) stops the reading of the tap and is the only
//! time the device wants rx kicks: it asks for one past the avail index it saw (so buffers
//! it put back do not count) and otherwise keeps rx kicks off, so a guest refilling its ring
//! does not exit for nothing.

use std::io::ErrorKind;

use virtio_queue::QueueT;

use super::hdr::{rx_header, VnetHdr};
use super::{Net, MAX_BUFFER_LEN, RX, VIRTIO_NET_F_MRG_RXBUF, VNET_HDR_LEN};
use crate::devices::virtio::queue::{
    add_used, enable_notification_after, needs_notification, pop_chain, Chain,
};

/// Frames taken from the tap per call before the device thread serves other devices (the tap
/// stays armed, so the event loop comes back).
const RX_BATCH: usize = 256;

/// What happened to the pending frame.
enum Delivery {
    Delivered,
    /// Not enough usable buffers are posted: keep the frame, stop reading the tap, and ask for
    /// a kick once the driver's avail index moves past this one.
    NoBuffer(u16),
    /// The frame cannot be delivered: too large for the next buffer (without MRG_RXBUF) or
    /// for a full ring, or with offloads the driver did not accept. The buffers stay
    /// available for the next frame.
    Dropped,
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
                    // A runt, or a frame longer than any the device delivers (a stand-in tap
                    // truncates it to the buffer, which is one byte longer than that).
                    Ok(n) if !(VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&n) => {
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.arm_tap(true);
                        // Nothing waits: rx kicks are of no use until something does.
                        if let Some(active) = self.active.as_mut() {
                            let _ = active.queues[RX].disable_notification(&active.mem);
                        }
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // A frame larger than the read buffer: the tap dropped it, and works on.
                    Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                        self.stats.rx_dropped += 1;
                        continue;
                    }
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
                Delivery::Dropped => {
                    self.rx_len = 0;
                    self.stats.rx_dropped += 1;
                }
                Delivery::NoBuffer(seen) => {
                    let active = self.active.as_mut().expect("deliver found it active");
                    if enable_notification_after(&mut active.queues[RX], &active.mem, seen) {
                        // Buffers were posted meanwhile: try again with them.
                        continue;
                    }
                    // Keep the frame; read nothing more until the guest posts buffers.
                    self.arm_tap(false);
                    break;
                }
                Delivery::Broken => {
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

    /// Puts the pending frame into the next usable receive buffers; malformed buffers met on
    /// the way are returned empty.
    fn deliver(&mut self, used_any: &mut bool) -> Delivery {
        let Net {
            active,
            rx_frame,
            rx_len,
            stats,
            features,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return Delivery::Broken;
        };
        let len = *rx_len;
        let Some(mut hdr) = rx_header(
            VnetHdr::parse(&rx_frame[..VNET_HDR_LEN]),
            len - VNET_HDR_LEN,
            *features,
        ) else {
            tracing::debug!(
                "virtio-net: a frame from the tap with offloads the guest did not accept; dropped"
            );
            return Delivery::Dropped;
        };
        let mergeable = *features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let queue = &mut active.queues[RX];
        let mut chains: Vec<Chain> = Vec::new();
        loop {
            let mut room = 0u64;
            while room < len as u64 {
                let chain = match pop_chain(queue, &active.mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => {
                        // Not enough: put what was gathered back, unconsumed.
                        let seen = queue.next_avail();
                        queue.set_next_avail(seen.wrapping_sub(chains.len() as u16));
                        let descriptors: usize =
                            chains.iter().map(|c| c.writable.segments().len()).sum();
                        if !chains.is_empty() && descriptors >= usize::from(queue.size()) {
                            // The whole ring is posted and the frame still does not fit.
                            tracing::debug!(
                                "virtio-net: {len}-byte frame larger than the whole rx ring; dropped"
                            );
                            return Delivery::Dropped;
                        }
                        return Delivery::NoBuffer(seen);
                    }
                    Err(e) => {
                        tracing::warn!("virtio-net: rx queue: {e}; device needs reset");
                        active.interrupt.mark_needs_reset();
                        return Delivery::Broken;
                    }
                };
                // The first buffer holds at least the header; later ones at least a byte.
                let least = if chains.is_empty() { VNET_HDR_LEN } else { 1 };
                let usable = chain.is_well_formed()
                    && chain.readable.is_empty()
                    && chain.writable.len() >= least as u64;
                if !usable {
                    tracing::debug!("virtio-net: malformed rx buffer {}", chain.head);
                    stats.malformed += 1;
                    // Buffers gathered for this frame come before it in the ring, and the
                    // driver reads a frame's buffers in a row: they go back empty too, and the
                    // frame starts over with the next ones.
                    for c in chains.drain(..) {
                        *used_any |= add_used(queue, &active.mem, c.head, 0);
                    }
                    *used_any |= add_used(queue, &active.mem, chain.head, 0);
                    room = 0;
                    continue;
                }
                if !mergeable && chain.writable.len() < len as u64 {
                    tracing::debug!(
                        "virtio-net: {len}-byte frame does not fit rx buffer {} ({} bytes); dropped",
                        chain.head,
                        chain.writable.len()
                    );
                    // Give the buffer back to the avail ring's next slot: it was not consumed.
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    return Delivery::Dropped;
                }
                room += chain.writable.len();
                chains.push(chain);
            }
            // At most a queue's size of chains.
            hdr.num_buffers = chains.len() as u16;
            rx_frame[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
            let frame = &rx_frame[..len];
            // Each buffer is filled in turn; all but the last one to the brim.
            let share =
                |done: usize, c: &Chain| (c.writable.len().min((len - done) as u64)) as usize;
            let mut done = 0usize;
            let written = chains.iter().all(|c| {
                let n = share(done, c);
                let ok = c
                    .writable
                    .write_at(&active.mem, 0, &frame[done..done + n])
                    .is_ok();
                done += n;
                ok
            });
            if !written {
                // Bounds were checked when the chain was taken; a buffer guest memory will not
                // take all the same is malformed, and the frame tries the next buffers.
                stats.malformed += 1;
                for c in chains.drain(..) {
                    *used_any |= add_used(queue, &active.mem, c.head, 0);
                }
                continue;
            }
            let mut done = 0usize;
            for c in &chains {
                let n = share(done, c);
                *used_any |= add_used(queue, &active.mem, c.head, n as u32);
                done += n;
            }
            return Delivery::Delivered;
        }
    }
}
