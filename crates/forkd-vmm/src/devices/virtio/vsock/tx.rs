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

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::connection::{ConnKey, ConnState, Connection, Verdict};
use super::packet::*;
use super::{Target, Vsock, HOST_CID, MAX_CONNECTIONS, MAX_PAYLOAD, TX};
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
                    forkd_store::error_chain(&reason)
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
        let path = PathBuf::from(path);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest connect to {}: {e}", path.display());
                self.send_rst(key);
                return;
            }
        };
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

/// Connects a non-blocking Unix stream socket to `path`. Unlike `UnixStream::connect`, this
/// never waits: a listener whose backlog is full (its owner is not accepting) gives
/// `WouldBlock` at once instead of stalling the device thread, with the device lock held, until
/// the host accepts. (A Unix stream connect completes or fails immediately when non-blocking;
/// there is no EINPROGRESS.)
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is a plain C struct (an integer and a byte array); all zeroes is a
    // valid value of it.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // Keep room for the terminating NUL, as std does.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a usable Unix socket path",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created here that nothing else owns or will close; the
    // stream takes ownership (and closes it on every return path below).
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a live, fully initialised sockaddr_un and `len` is within its size;
    // connect(2) only reads it during the call.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::io::AsRawFd;
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn nonblocking_connect_reaches_the_listener_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock_1025");
        let listener = UnixListener::bind(&path).unwrap();
        let mut guest_side = connect_nonblocking(&path).unwrap();
        let (mut host_side, _) = listener.accept().unwrap();
        host_side.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        guest_side.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let err = guest_side.read(&mut buf).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::WouldBlock,
            "the stream is non-blocking"
        );
    }

    /// UnixStream::connect would wait here until the host accepted; the guest gets RST.
    #[test]
    fn connecting_to_a_listener_that_is_not_accepting_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock_1025");
        let listener = UnixListener::bind(&path).unwrap();
        // SAFETY: listen(2) on a socket we own takes no pointers; on a listening socket it
        // only changes the backlog (0: a single pending connection).
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let mut pending = Vec::new();
        let err = loop {
            match connect_nonblocking(&path) {
                Ok(s) => pending.push(s),
                Err(e) => break e,
            }
            assert!(pending.len() < 16, "the backlog never filled up");
        };
        assert_eq!(err.kind(), ErrorKind::WouldBlock);
        // Once the host accepts, there is room again.
        let _accepted = listener.accept().unwrap();
        connect_nonblocking(&path).unwrap();
    }

    #[test]
    fn nonblocking_connect_reports_missing_and_unusable_paths() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect_nonblocking(&dir.path().join("nobody")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let long = dir.path().join("x".repeat(200));
        let err = connect_nonblocking(&long).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
}
