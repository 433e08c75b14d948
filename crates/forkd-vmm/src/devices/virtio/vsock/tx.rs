//! Guest → device: packets from the tx queue.
//!
//! Protocol primer. Every virtio-vsock packet is a 44-byte header ([`PacketHeader`]) naming
//! both ends (cid, port), an op, and the sender's credit, then `len` payload bytes. Ops:
//! REQUEST opens a stream and RESPONSE accepts it; RW carries data; SHUTDOWN says the
//! sender will send (flag SEND) and/or receive (flag RCV) no more; RST aborts, and is also
//! the final word once both sides are done; CREDIT_UPDATE announces credit unasked and
//! CREDIT_REQUEST asks the peer for one.
//!
//! Credit: each side advertises `buf_alloc` (its receive buffer for the stream) and
//! `fwd_cnt` (bytes it has consumed so far) in every header. A sender that has sent `tx_cnt`
//! bytes may have at most `peer buf_alloc - (tx_cnt - peer fwd_cnt)` more in flight; the
//! counters are free-running u32s, so the difference is taken wrapping. The device keeps to
//! the guest's credit (`Connection::peer_credit`) and resets a guest that overruns its own.
//!
//! Hybrid vsock host side: a host process connects to the device's Unix socket and writes
//! `CONNECT <port>\n`; the device sends the guest REQUEST to that port and, on RESPONSE,
//! writes `OK <host port>\n` back, after which the socket carries the stream. A guest REQUEST
//! to host port P is served by connecting to the Unix socket `<uds>_<P>` (RST if nobody
//! listens there).

use std::os::unix::net::UnixStream;
use std::path::Path;

use super::connection::{ConnKey, ConnState, Connection, Verdict};
use super::packet::*;
use super::{ErrorChain, Target, Vsock, HOST_CID, MAX_CONNECTIONS, MAX_PAYLOAD, TX};
use crate::devices::virtio::queue::{
    add_used, needs_notification, pop_chain, Chain, ChainAccessError,
};
use crate::memory::GuestMemory;

/// Why a tx chain was dropped without being handled.
#[derive(Debug, thiserror::Error)]
pub(super) enum TxPacketError {
    #[error("chain {0} is malformed")]
    Malformed(u16),
    #[error("chain {0} is shorter than a header")]
    Short(u16),
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error("payload of {0} bytes does not fit the chain")]
    Truncated(usize),
    #[error("reading chain {head}")]
    Read {
        head: u16,
        #[source]
        source: ChainAccessError,
    },
}

impl Vsock {
    pub(super) fn process_tx(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mut used_any = false;
        loop {
            let chain = match pop_chain(&mut active.queues[TX], &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("vsock: tx queue: {e}; device needs reset");
                    active.interrupt.mark_needs_reset();
                    break;
                }
            };
            let packet = read_tx_packet(&active.mem, &chain);
            used_any |= add_used(&mut active.queues[TX], &active.mem, chain.head, 0);
            match packet {
                Ok((header, payload)) => self.handle_guest_packet(header, payload),
                Err(reason) => tracing::warn!(
                    "vsock: dropped malformed tx packet: {}",
                    ErrorChain(&reason)
                ),
            }
        }
        if used_any && needs_notification(&mut active.queues[TX], &active.mem) {
            active.interrupt.signal_used_queue();
        }
        self.active = Some(active);
    }

    fn handle_guest_packet(&mut self, h: PacketHeader, payload: Vec<u8>) {
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            tracing::debug!(
                "vsock: packet {} -> {} ignored (wrong CIDs)",
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.send_rst(key);
            }
            return;
        }
        let token = self.by_key.get(&key).copied();
        match (h.op, token) {
            (OP_REQUEST, None) => self.guest_connect(key, &h),
            (OP_REQUEST, Some(token)) => {
                // A duplicate request for a live connection is a protocol error: reset it.
                self.reset_conn(token, key);
            }
            (OP_RST, Some(token)) => self.remove_conn(token),
            (OP_RST, None) => {}
            (_, None) => self.send_rst(key),
            (op, Some(token)) => self.guest_packet_on_conn(token, op, &h, &payload),
        }
    }

    /// A guest REQUEST to host port `key.local_port`: connect to `<uds>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, h: &PacketHeader) {
        if self.by_key.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                "vsock: connection limit reached; refusing port {}",
                key.local_port
            );
            self.send_rst(key);
            return;
        }
        let mut path = self.uds_path.as_os_str().to_owned();
        path.push(format!("_{}", key.local_port));
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connect to {}: {e}",
                    Path::new(&path).display()
                );
                self.send_rst(key);
                return;
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!("vsock: {e}");
            self.send_rst(key);
            return;
        }
        let mut conn = Connection::new(key, stream, ConnState::Established);
        conn.set_peer_credit(h.buf_alloc, h.fwd_cnt);
        let token = self.alloc_token();
        self.targets.insert(token, Target::Conn(conn));
        self.by_key.insert(key, token);
        let resp = self.header_to_guest(key, OP_RESPONSE);
        self.push_control(resp, Some(token));
        self.update_interest(token);
    }

    /// A guest packet for live connection `token` (not REQUEST or RST, handled above).
    fn guest_packet_on_conn(&mut self, token: u64, op: u16, h: &PacketHeader, payload: &[u8]) {
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        // Every packet carries the guest's current credit, which may unblock reading.
        conn.set_peer_credit(h.buf_alloc, h.fwd_cnt);
        let key = conn.key;
        if conn.readable_hint {
            self.mark_ready(token);
        }
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        let verdict = match op {
            OP_RESPONSE => conn.guest_response(),
            OP_RW => conn.guest_rw(payload),
            OP_SHUTDOWN => conn.guest_shutdown(h.flags),
            OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => Verdict::Keep,
            _ => Verdict::Reset,
        };
        if verdict == Verdict::Reset {
            self.reset_conn(token, key);
            return;
        }
        match op {
            OP_RESPONSE => {
                // Data the host wrote after its CONNECT line may already be waiting.
                self.mark_ready(token);
                self.update_interest(token);
            }
            OP_RW => {
                self.maybe_credit_update(token);
                self.update_interest(token);
            }
            OP_SHUTDOWN => self.update_interest(token),
            OP_CREDIT_UPDATE => self.mark_ready(token),
            OP_CREDIT_REQUEST => {
                let h = self.header_to_guest(key, OP_CREDIT_UPDATE);
                self.push_control(h, Some(token));
            }
            _ => {}
        }
    }

    /// Tells the guest about freed buffer space once a good part of it is free again, so a
    /// sender blocked on credit resumes without having to ask.
    pub(super) fn maybe_credit_update(&mut self, token: u64) {
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        let key = conn.key;
        if conn.credit_update_due() {
            let h = self.header_to_guest(key, OP_CREDIT_UPDATE);
            self.push_control(h, Some(token));
        }
    }
}

/// Parses a tx chain into (header, payload).
fn read_tx_packet(
    mem: &GuestMemory,
    chain: &Chain,
) -> Result<(PacketHeader, Vec<u8>), TxPacketError> {
    if !chain.is_well_formed() {
        return Err(TxPacketError::Malformed(chain.head));
    }
    if chain.readable.len() < HEADER_LEN as u64 {
        return Err(TxPacketError::Short(chain.head));
    }
    let read_err = |source| TxPacketError::Read {
        head: chain.head,
        source,
    };
    let mut raw = [0u8; HEADER_LEN];
    chain.readable.read_at(mem, 0, &mut raw).map_err(read_err)?;
    let header = PacketHeader::from_bytes(&raw);
    let len = header.len as usize;
    if len > MAX_PAYLOAD {
        return Err(TxPacketError::TooLarge(len));
    }
    if (chain.readable.len() - HEADER_LEN as u64) < len as u64 {
        return Err(TxPacketError::Truncated(len));
    }
    let mut payload = vec![0u8; len];
    chain
        .readable
        .read_at(mem, HEADER_LEN as u64, &mut payload)
        .map_err(read_err)?;
    Ok((header, payload))
}
