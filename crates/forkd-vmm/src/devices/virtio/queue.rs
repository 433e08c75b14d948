//! Queue helpers shared by the device models: a serializable mirror of a queue's state, and
//! descriptor chains flattened into bounds-checked scatter/gather lists.
//!
//! Every guest memory access here goes through [`GuestMemory`]'s checked `read_slice` /
//! `write_slice`, so a descriptor pointing outside guest RAM produces an error, never an access
//! outside the mapping; and writes mark the dirty bitmap.

use std::sync::atomic::{fence, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _, Permissions};

use super::VirtioError;
use crate::memory::GuestMemory;

/// Everything needed to rebuild a queue exactly (virtio-queue's own QueueState is not
/// serializable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl QueueSnapshot {
    pub fn of(queue: &Queue) -> QueueSnapshot {
        QueueSnapshot {
            max_size: queue.max_size(),
            size: queue.size(),
            ready: queue.ready(),
            desc_table: queue.desc_table(),
            avail_ring: queue.avail_ring(),
            used_ring: queue.used_ring(),
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
            event_idx_enabled: queue.event_idx_enabled(),
        }
    }

    /// Rebuilds the queue; fails on values a driver could never have programmed (size not a
    /// power of two, misaligned rings).
    pub fn to_queue(&self) -> Result<Queue, VirtioError> {
        let state = virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state)
            .map_err(|e| VirtioError::Device(format!("invalid saved queue state {self:?}: {e}")))
    }
}

/// A copy of `queue` (virtio-queue's Queue is not Clone).
pub fn clone_queue(queue: &Queue) -> Result<Queue, VirtioError> {
    QueueSnapshot::of(queue).to_queue()
}

/// A list of guest buffers (one direction of a descriptor chain).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SgList {
    segments: Vec<(GuestAddress, u32)>,
    total: u64,
}

impl SgList {
    fn push(&mut self, addr: GuestAddress, len: u32) {
        self.segments.push((addr, len));
        self.total += u64::from(len);
    }

    /// Total bytes in the list.
    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn segments(&self) -> &[(GuestAddress, u32)] {
        &self.segments
    }

    /// Visits the guest ranges covering `[offset, offset + len)` of the list.
    fn for_each_range(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), vm_memory::GuestMemoryError>,
    ) -> Result<(), ChainAccessError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|end| *end <= self.total)
            .ok_or(ChainAccessError::OutOfBounds)?;
        let mut seg_start = 0u64;
        let mut done = 0usize;
        for &(addr, seg_len) in &self.segments {
            let seg_end = seg_start + u64::from(seg_len);
            let from = offset.max(seg_start);
            let to = end.min(seg_end);
            if from < to {
                let guest = addr
                    .checked_add(from - seg_start)
                    .ok_or(ChainAccessError::OutOfBounds)?;
                let n = (to - from) as usize;
                f(guest, done, n).map_err(|_| ChainAccessError::GuestMemory)?;
                done += n;
            }
            seg_start = seg_end;
            if seg_start >= end {
                break;
            }
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes starting `offset` bytes into the list out of guest memory.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainAccessError> {
        let len = buf.len();
        self.for_each_range(offset, len, |addr, at, n| {
            mem.read_slice(&mut buf[at..at + n], addr)
        })
    }

    /// Copies `data` into the guest buffers starting `offset` bytes into the list.
    pub fn write_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ChainAccessError> {
        self.for_each_range(offset, data.len(), |addr, at, n| {
            mem.write_slice(&data[at..at + n], addr)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainAccessError {
    #[error("access past the end of the descriptor chain's buffers")]
    OutOfBounds,
    #[error("descriptor buffer outside guest memory")]
    GuestMemory,
}

/// A descriptor chain flattened into its device-readable and device-writable buffers, with the
/// protocol violations found while walking it.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: SgList,
    pub writable: SgList,
    /// A device-readable descriptor came after a device-writable one (spec 2.7.4.2 forbids it).
    pub misordered: bool,
    /// Some descriptor's buffer is not entirely inside guest memory.
    pub outside_memory: bool,
    /// The chain had no descriptor at all (head index out of range, unreadable table).
    pub empty: bool,
}

impl Chain {
    /// True when the chain is structurally sound (ordering and memory bounds).
    pub fn is_well_formed(&self) -> bool {
        !self.misordered && !self.outside_memory && !self.empty
    }
}

/// Takes the next available chain from `queue`, or None when the ring is empty.
///
/// Err means the driver published an avail index more than a queue size ahead (or the ring is
/// unreadable): the device cannot continue and should be marked as needing reset.
pub fn pop_chain(queue: &mut Queue, mem: &GuestMemory) -> Result<Option<Chain>, VirtioError> {
    let mut iter = queue.iter(mem).map_err(|e| VirtioError::QueueAccess {
        index: 0,
        reason: e.to_string(),
    })?;
    let Some(desc_chain) = iter.next() else {
        return Ok(None);
    };
    let mut chain = Chain {
        head: desc_chain.head_index(),
        empty: true,
        ..Chain::default()
    };
    // The iterator stops by itself after `queue size` descriptors (loops), on an unreadable
    // descriptor table, and when the chain's total length would overflow 32 bits.
    for desc in desc_chain {
        chain.empty = false;
        let addr = desc.addr();
        let len = desc.len();
        if !mem.check_range(addr, len as usize, Permissions::Read) {
            chain.outside_memory = true;
        }
        if desc.is_write_only() {
            chain.writable.push(addr, len);
        } else {
            if !chain.writable.is_empty() || !chain.writable.segments.is_empty() {
                chain.misordered = true;
            }
            chain.readable.push(addr, len);
        }
    }
    Ok(Some(chain))
}

/// Puts `head` in the used ring with `len` bytes written. A head outside the queue (from a
/// malformed avail ring) cannot be returned; that is logged and the request dropped.
pub fn add_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("virtio: cannot return descriptor {head} to the used ring: {e}");
            false
        }
    }
}

/// Whether the driver wants an interrupt for what was just added (EVENT_IDX aware).
pub fn needs_notification(queue: &mut Queue, mem: &GuestMemory) -> bool {
    queue.needs_notification(mem).unwrap_or(true)
}

/// Asks the driver to notify the device as soon as it makes a buffer available past avail
/// index `seen` (the index the device last looked at, which may be ahead of the queue's
/// `next_avail` when the device put chains back unconsumed). Returns true when the driver
/// already has, so the caller looks again instead of waiting for a kick that will not come.
///
/// virtio-queue's `enable_notification` asks for a kick past `next_avail`; with EVENT_IDX
/// that is wrong for a device that gave chains back: the driver, already past that index,
/// would never kick.
pub fn enable_notification_after(queue: &mut Queue, mem: &GuestMemory, seen: u16) -> bool {
    if queue.event_idx_enabled() {
        // avail_event sits right after the used ring's `size` elements.
        let offset = 4 + 8 * u64::from(queue.size());
        let stored = GuestAddress(queue.used_ring())
            .checked_add(offset)
            .map(|addr| mem.store(seen.to_le(), addr, Ordering::Relaxed));
        if !matches!(stored, Some(Ok(()))) {
            return false;
        }
    } else if queue.enable_notification(mem).is_err() {
        return false;
    }
    // The avail index must be read after the request is visible to the driver.
    fence(Ordering::SeqCst);
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != seen)
}
