//! Device → guest: the rx queue (control packets, then host data round-robin) and the event
//! queue (transport reset).

use virtio_queue::QueueOwnedT;

use super::connection::ToGuest;
use super::packet::*;
use super::{Vsock, EVT, MAX_PAYLOAD, RX};
use crate::devices::virtio::queue::{add_used, needs_notification, pop_chain, Chain};
use crate::memory::GuestMemory;

/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
const EVENT_TRANSPORT_RESET: u32 = 0;

/// A packet for the guest waiting for an rx buffer.
pub(super) struct Control {
    pub(super) header: PacketHeader,
    /// Fill in fwd_cnt from this connection at send time.
    pub(super) conn: Option<u64>,
}

impl Vsock {
    /// Fills guest rx buffers: control packets first, then data from readable connections
    /// (round-robin, within each connection's credit).
    pub(super) fn pump_rx(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mut used_any = false;
        loop {
            if self.control.is_empty() && self.ready.is_empty() {
                break;
            }
            let chain = match pop_chain(&mut active.queues[RX], &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("vsock: rx queue: {e}; device needs reset");
                    active.interrupt.mark_needs_reset();
                    break;
                }
            };
            if !chain.is_well_formed()
                || !chain.readable.is_empty()
                || chain.writable.len() < HEADER_LEN as u64
            {
                tracing::warn!("vsock: malformed rx buffer {} returned unused", chain.head);
                used_any |= add_used(&mut active.queues[RX], &active.mem, chain.head, 0);
                continue;
            }
            match self.next_rx_packet(&active.mem, &chain) {
                Some(len) => {
                    used_any |= add_used(&mut active.queues[RX], &active.mem, chain.head, len);
                }
                None => {
                    // Nothing to send after all: give the buffer back to the ring.
                    active.queues[RX].go_to_previous_position();
                    if self.control.is_empty() && self.ready.is_empty() {
                        break;
                    }
                }
            }
        }
        if used_any && needs_notification(&mut active.queues[RX], &active.mem) {
            active.interrupt.signal_used_queue();
        }
        self.active = Some(active);
    }

    /// Writes one packet into `chain`; returns its length, or None when nothing was ready.
    fn next_rx_packet(&mut self, mem: &GuestMemory, chain: &Chain) -> Option<u32> {
        while let Some(mut ctl) = self.control.pop_front() {
            if let Some(token) = ctl.conn {
                match self.conn_mut(token) {
                    Some(conn) => ctl.header.fwd_cnt = conn.announce_fwd_cnt(),
                    // The connection died meanwhile: its REQUEST/RESPONSE/credit is moot.
                    None => continue,
                }
            }
            let bytes = ctl.header.to_bytes();
            return match chain.writable.write_at(mem, 0, &bytes) {
                Ok(()) => Some(HEADER_LEN as u32),
                Err(_) => Some(0),
            };
        }
        while let Some(token) = self.ready.pop_front() {
            if let Some(len) = self.rx_data_packet(token, mem, chain) {
                return Some(len);
            }
        }
        None
    }

    /// Reads from connection `token` into `chain` as an RW packet (or SHUTDOWN on EOF, RST on
    /// error). None when the connection has nothing to send now.
    fn rx_data_packet(&mut self, token: u64, mem: &GuestMemory, chain: &Chain) -> Option<u32> {
        let room = (chain.writable.len() - HEADER_LEN as u64).min(MAX_PAYLOAD as u64) as usize;
        let conn = self.conn_mut(token)?;
        let outcome = conn.read_for_guest(room);
        let key = conn.key;
        let fwd_cnt = conn.fwd_cnt();
        let mut header = self.header_to_guest(key, OP_RW);
        header.fwd_cnt = fwd_cnt;
        match outcome {
            ToGuest::Nothing => None,
            ToGuest::WouldBlock => {
                self.update_interest(token);
                None
            }
            ToGuest::Eof => {
                header.op = OP_SHUTDOWN;
                header.flags = SHUTDOWN_SEND;
                self.update_interest(token);
                write_packet(mem, chain, &header, &[])
            }
            ToGuest::Data(data) => {
                header.len = data.len() as u32;
                // More may be waiting: keep it in the rotation.
                self.ready.push_back(token);
                write_packet(mem, chain, &header, &data)
            }
            ToGuest::Failed(e) => {
                tracing::debug!("vsock: host socket read failed: {e}");
                self.remove_conn(token);
                header.op = OP_RST;
                write_packet(mem, chain, &header, &[])
            }
        }
    }

    /// Delivers a pending transport reset event if the guest has an event buffer.
    pub(super) fn deliver_events(&mut self) {
        if !self.pending_transport_reset {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let queue = &mut active.queues[EVT];
        let chain = match pop_chain(queue, &active.mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("vsock: event queue: {e}; device needs reset");
                active.interrupt.mark_needs_reset();
                return;
            }
        };
        let mut len = 0;
        if chain.is_well_formed() && chain.writable.len() >= 4 {
            let event = EVENT_TRANSPORT_RESET.to_le_bytes();
            if chain.writable.write_at(&active.mem, 0, &event).is_ok() {
                len = 4;
                self.pending_transport_reset = false;
            }
        }
        add_used(queue, &active.mem, chain.head, len);
        if needs_notification(queue, &active.mem) {
            active.interrupt.signal_used_queue();
        }
    }
}

fn write_packet(
    mem: &GuestMemory,
    chain: &Chain,
    header: &PacketHeader,
    payload: &[u8],
) -> Option<u32> {
    let ok = chain.writable.write_at(mem, 0, &header.to_bytes()).is_ok()
        && chain
            .writable
            .write_at(mem, HEADER_LEN as u64, payload)
            .is_ok();
    Some(if ok {
        (HEADER_LEN + payload.len()) as u32
    } else {
        0
    })
}
