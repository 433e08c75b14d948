//! virtio-blk: one request queue over a [`CowDisk`].
//!
//! Requests (spec 5.2.6): a device-readable 16-byte header {type u32, reserved u32, sector u64},
//! then data (device-readable for OUT, device-writable for IN / GET_ID), then one
//! device-writable status byte — the last byte of the chain. The parser is framing-agnostic
//! (header and data may be split over descriptors any way) and answers anything malformed
//! with IOERR / UNSUPP instead of failing.

pub mod cow;

use std::sync::Arc;

use virtio_queue::Queue;

pub use cow::{CowDisk, DiskError, COW_BLOCK_SIZE};

use super::mmio::read_config_bytes;
use super::queue::{add_used, needs_notification, pop_chain, Chain};
use super::{Interrupt, VirtioDevice, VirtioError, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::devices::virtio::Active;
use crate::memory::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;
/// The largest data transfer one request may carry; larger ones get IOERR so a guest cannot
/// make the VMM allocate without bound.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Largest bounce buffer kept between requests.
const SCRATCH_KEEP_BYTES: usize = 1 << 20;
const QUEUE_SIZES: [u16; 1] = [256];
pub(crate) const QUEUE_COUNT: usize = QUEUE_SIZES.len();
const HEADER_LEN: u64 = 16;
const ID_LEN: usize = 20;

/// The device announces the most segments one request may have (so Linux builds multi-segment
/// requests instead of one segment each).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Segments per request announced in config space (queue size minus header and status).
pub const SEG_MAX: u32 = QUEUE_SIZES[0] as u32 - 2;

fn block_config(capacity_sectors: u64) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c
}
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The block device model.
pub struct Block {
    disk: CowDisk,
    id: [u8; ID_LEN],
    read_only: bool,
    /// Config space: capacity (u64, sectors) at 0, size_max (u32) at 8, seg_max (u32) at 12.
    config: [u8; 16],
    active: Option<Active>,
    /// Bounce buffer reused across requests (grows to the largest request seen).
    scratch: Vec<u8>,
}

impl Block {
    /// `id` is what GET_ID returns (truncated to 20 bytes); `read_only` offers VIRTIO_BLK_F_RO
    /// and refuses OUT requests.
    pub fn new(disk: CowDisk, id: &str, read_only: bool) -> Block {
        let mut id_bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let capacity_sectors = disk.size() / SECTOR_SIZE;
        if !disk.size().is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                "virtio-blk: {} is {} bytes, not a multiple of 512; the tail is not visible",
                disk.base_path().display(),
                disk.size()
            );
        }
        Block {
            disk,
            id: id_bytes,
            read_only,
            config: block_config(capacity_sectors),
            active: None,
            scratch: Vec::new(),
        }
    }

    pub fn disk(&self) -> &CowDisk {
        &self.disk
    }

    pub fn disk_mut(&mut self) -> &mut CowDisk {
        &mut self.disk
    }

    fn capacity_sectors(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// Executes one request; returns (status, bytes of data written to the guest).
    fn execute(&mut self, mem: &GuestMemory, chain: &Chain) -> (u8, u32) {
        if !chain.is_well_formed() || chain.writable.is_empty() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        if chain.readable.len() < HEADER_LEN {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let mut header = [0u8; HEADER_LEN as usize];
        if chain.readable.read_at(mem, 0, &mut header).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        // The writable area minus the trailing status byte.
        let in_len = chain.writable.len() - 1;
        // Data in the wrong direction (IN data the device may only read, OUT data it may
        // write) means the driver built the chain wrong.
        let extra_readable = chain.readable.len() > HEADER_LEN;
        match request_type {
            VIRTIO_BLK_T_IN if extra_readable => (VIRTIO_BLK_S_IOERR, 0),
            VIRTIO_BLK_T_IN => self.read_request(mem, chain, sector, in_len),
            VIRTIO_BLK_T_OUT if in_len != 0 => (VIRTIO_BLK_S_IOERR, 0),
            VIRTIO_BLK_T_OUT => (self.write_request(mem, chain, sector), 0),
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    tracing::error!("virtio-blk: flush failed: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = (in_len as usize).min(ID_LEN);
                match chain.writable.write_at(mem, 0, &self.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            other => {
                tracing::debug!("virtio-blk: unsupported request type {other}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    /// Byte offset of a transfer, if `[sector, sector + len/512)` is a valid sector range.
    fn transfer_offset(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) || len > MAX_REQUEST_BYTES {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.capacity_sectors()).then(|| sector * SECTOR_SIZE)
    }

    fn read_request(
        &mut self,
        mem: &GuestMemory,
        chain: &Chain,
        sector: u64,
        len: u64,
    ) -> (u8, u32) {
        let Some(offset) = self.transfer_offset(sector, len) else {
            tracing::debug!("virtio-blk: read of {len} bytes at sector {sector} refused");
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        self.scratch.resize(len as usize, 0);
        let buf = &mut self.scratch[..len as usize];
        if let Err(e) = self.disk.read_at(offset, buf) {
            tracing::error!("virtio-blk: {e}");
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        match chain.writable.write_at(mem, 0, buf) {
            Ok(()) => (VIRTIO_BLK_S_OK, len as u32),
            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        }
    }

    fn write_request(&mut self, mem: &GuestMemory, chain: &Chain, sector: u64) -> u8 {
        if self.read_only {
            return VIRTIO_BLK_S_IOERR;
        }
        let len = chain.readable.len() - HEADER_LEN;
        let Some(offset) = self.transfer_offset(sector, len) else {
            tracing::debug!("virtio-blk: write of {len} bytes at sector {sector} refused");
            return VIRTIO_BLK_S_IOERR;
        };
        self.scratch.resize(len as usize, 0);
        let buf = &mut self.scratch[..len as usize];
        if chain.readable.read_at(mem, HEADER_LEN, buf).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        match self.disk.write_at(offset, buf) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                tracing::error!("virtio-blk: {e}");
                VIRTIO_BLK_S_IOERR
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
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
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        if index != 0 {
            return;
        }
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mut used_any = false;
        loop {
            let chain = match pop_chain(&mut active.queues[0], &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("virtio-blk: {e}; device needs reset");
                    active.interrupt.mark_needs_reset();
                    break;
                }
            };
            let (status, data_len) = self.execute(&active.mem, &chain);
            if self.scratch.capacity() > SCRATCH_KEEP_BYTES {
                // Do not keep a rare huge request's buffer for the VM's lifetime.
                self.scratch = Vec::new();
            }
            let mut used_len = 0;
            if !chain.writable.is_empty() {
                let status_at = chain.writable.len() - 1;
                if chain
                    .writable
                    .write_at(&active.mem, status_at, &[status])
                    .is_ok()
                {
                    used_len = data_len + 1;
                }
            }
            used_any |= add_used(&mut active.queues[0], &active.mem, chain.head, used_len);
        }
        if used_any && needs_notification(&mut active.queues[0], &active.mem) {
            active.interrupt.signal_used_queue();
        }
        self.active = Some(active);
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }
}
