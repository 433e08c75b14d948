//! virtio-vsock with Firecracker's "hybrid" host side: guest streams map to Unix sockets.
//!
//! - Host → guest: a host process connects to the device's Unix socket (`uds_path`) and writes
//!   `CONNECT <port>\n`; the device sends the guest a connection REQUEST to `<port>` from a
//!   fresh host port; when the guest answers RESPONSE the device writes `OK <host_port>\n` to
//!   the host process, and from then on bytes flow both ways. A guest RST closes the socket.
//! - Guest → host: a guest connect to host port P makes the device connect to
//!   `<uds_path>_<P>`; if that fails the guest gets RST.
//!
//! Flow control is the virtio credit scheme: the device never sends the guest more than the
//! guest's advertised `buf_alloc - (sent - fwd_cnt)`, and advertises its own per-connection
//! buffer ([`CONN_BUF_SIZE`]) with a `fwd_cnt` of bytes already passed on to the host socket.
//!
//! Host sockets are watched by the device's own epoll, whose fd is the device's
//! `host_event_fd` in the device event loop. A connection's read interest is dropped once it
//! signals readable and re-armed when a read would block, so a connection the guest cannot
//! take data from (no credit, no rx buffers) never makes the loop spin.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueOwnedT};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use self::packet::*;
use super::mmio::read_config_bytes;
use super::queue::{add_used, needs_notification, pop_chain, Chain};
use super::{Interrupt, VirtioDevice, VirtioError, TYPE_VSOCK, VIRTIO_F_VERSION_1};
use crate::devices::virtio::Active;
use crate::memory::GuestMemory;

pub const HOST_CID: u64 = 2;
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Buffer space the device advertises per connection (bytes from the guest not yet written to
/// the host socket).
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Largest payload the device puts in one rx packet or accepts in one tx packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Connections allowed at once; more get RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets (RST, RESPONSE, credit) waiting for rx buffers; beyond this they are dropped.
const MAX_PENDING_CONTROL: usize = 4096;
/// Host ports for host-initiated connections start here (below are "well known" guest ports).
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;
/// The longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;

const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
pub(crate) const QUEUE_COUNT: usize = QUEUE_SIZES.len();
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;

/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
const EVENT_TRANSPORT_RESET: u32 = 0;

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = u64::MAX;
/// How long a host-initiated connection waits for the guest's answer before the host gets EOF
/// (the guest may not be up yet; the host retries). Generous because a guest that is alive
/// may still answer slowly: a hundred freshly forked children share the host's cores, and on
/// an emulating (PVM) host each one polls its queues only every few hundred milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock socket {path}: {error}")]
    Bind {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("vsock guest CID {0} is reserved (CIDs 0-2 and u32::MAX are not guest addresses)")]
    BadCid(u64),
    #[error("vsock epoll: {0}")]
    Epoll(std::io::Error),
}

/// Device state worth saving (connections never survive a snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub pending_transport_reset: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    /// The host-side port.
    local_port: u32,
    /// The guest-side port.
    peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated; REQUEST sent to the guest, waiting for RESPONSE.
    LocalInit,
    Established,
}

struct Connection {
    key: ConnKey,
    stream: UnixStream,
    state: ConnState,
    /// Guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes from the guest written to the host socket.
    fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    fwd_cnt_sent: u32,
    /// Bytes from the guest waiting for the host socket to accept them.
    to_host: Vec<u8>,
    /// The guest said it will send no more: shut the host socket's write side once drained.
    guest_done_sending: bool,
    /// The guest closed both directions: remove the connection (and answer RST) as soon as
    /// `to_host` has been written out, so no data the guest sent before closing is lost.
    close_when_flushed: bool,
    /// The host socket reached EOF (the host will send no more); the guest was told with
    /// SHUTDOWN(SEND). The guest may still send to the host.
    host_eof: bool,
    /// The socket signalled readable and has not yet been read until it would block.
    readable_hint: bool,
    /// Interest currently registered with epoll (None: not registered).
    registered: Option<EventSet>,
    hung_up: bool,
    created: Instant,
}

impl Connection {
    fn new(key: ConnKey, stream: UnixStream, state: ConnState) -> Connection {
        Connection {
            key,
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_host: Vec::new(),
            guest_done_sending: false,
            close_when_flushed: false,
            host_eof: false,
            readable_hint: false,
            registered: None,
            hung_up: false,
            created: Instant::now(),
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.readable_hint
            && !self.host_eof
            && !self.close_when_flushed
    }

    fn wanted_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.wants_read() {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Writes as much of `to_host` as the socket takes; Err on a broken socket.
    fn flush_to_host(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            // MSG_NOSIGNAL: a host peer that went away must not SIGPIPE the VMM.
            // SAFETY: the pointer/length describe our own live buffer.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    self.to_host.as_ptr().cast(),
                    self.to_host.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.kind() {
                    ErrorKind::WouldBlock => return Ok(()),
                    ErrorKind::Interrupted => continue,
                    _ => return Err(err),
                }
            }
            let n = n as usize;
            self.to_host.drain(..n);
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// A host process that connected to the Unix socket and has not yet sent its CONNECT line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

enum Target {
    Pending(PendingHost),
    Conn(Connection),
}

/// A packet for the guest waiting for an rx buffer.
struct Control {
    header: PacketHeader,
    /// Fill in buf_alloc / fwd_cnt from this connection at send time.
    conn: Option<u64>,
}

/// The vsock device model.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// Fires when the oldest host-initiated connection's wait for the guest is over.
    timer: TimerFd,
    timer_armed: bool,
    connect_timeout: Duration,
    active: Option<Active>,
    /// Registered fds by token (listener is token 0).
    targets: HashMap<u64, Target>,
    by_key: HashMap<ConnKey, u64>,
    next_token: u64,
    next_local_port: u32,
    control: VecDeque<Control>,
    /// Connections that may have data to read, served round-robin.
    ready: VecDeque<u64>,
    pending_transport_reset: bool,
    config: [u8; 8],
}

impl Vsock {
    /// Binds `uds_path` (which must not exist) and serves guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::BadCid(guest_cid));
        }
        let listener = UnixListener::bind(uds_path).map_err(|error| VsockError::Bind {
            path: uds_path.to_path_buf(),
            error,
        })?;
        let setup = || -> Result<(Epoll, TimerFd), VsockError> {
            listener.set_nonblocking(true).map_err(VsockError::Epoll)?;
            let epoll = Epoll::new().map_err(VsockError::Epoll)?;
            let timer = TimerFd::new().map_err(|e| VsockError::Epoll(e.into()))?;
            for (fd, token) in [
                (listener.as_raw_fd(), LISTENER_TOKEN),
                (timer.as_raw_fd(), TIMER_TOKEN),
            ] {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(VsockError::Epoll)?;
            }
            Ok((epoll, timer))
        };
        let (epoll, timer) = match setup() {
            Ok(e) => e,
            Err(e) => {
                let _ = std::fs::remove_file(uds_path);
                return Err(e);
            }
        };
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            timer,
            timer_armed: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            active: None,
            targets: HashMap::new(),
            by_key: HashMap::new(),
            next_token: 1,
            next_local_port: FIRST_EPHEMERAL_PORT,
            control: VecDeque::new(),
            ready: VecDeque::new(),
            pending_transport_reset: false,
            config: guest_cid.to_le_bytes(),
        })
    }

    /// How long host-initiated connections wait for the guest ([`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
    }

    fn arm_connect_timer(&mut self, after: Duration) {
        if self.timer_armed {
            return;
        }
        match self.timer.reset(after.max(Duration::from_millis(1)), None) {
            Ok(()) => self.timer_armed = true,
            Err(e) => tracing::warn!("vsock: arming the connect timer: {e}"),
        }
    }

    /// Host-initiated connections the guest did not answer in time: the host gets EOF, the
    /// guest an RST (in case it answers late).
    fn expire_host_connects(&mut self) {
        let _ = self.timer.wait();
        self.timer_armed = false;
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut next_deadline: Option<Instant> = None;
        for (token, target) in &self.targets {
            if let Target::Conn(c) = target {
                if c.state != ConnState::LocalInit {
                    continue;
                }
                let deadline = c.created + self.connect_timeout;
                if deadline <= now {
                    expired.push((*token, c.key));
                } else {
                    next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
                }
            }
        }
        for (token, key) in expired {
            tracing::debug!(
                "vsock: guest did not answer a connection to port {}",
                key.peer_port
            );
            self.remove_conn(token);
            self.send_rst(key);
        }
        if let Some(deadline) = next_deadline {
            self.arm_connect_timer(deadline - now);
        }
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Number of live guest connections (any state).
    pub fn connection_count(&self) -> usize {
        self.by_key.len()
    }

    pub fn save_state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            pending_transport_reset: self.pending_transport_reset,
        }
    }

    /// Applies saved device state to this (new) device: only the pending transport reset
    /// carries over. The guest CID stays the one this device was created with; a Linux guest
    /// re-reads it when it handles the transport reset.
    pub fn restore_state(&mut self, state: &VsockState) {
        if state.pending_transport_reset {
            self.pending_transport_reset = true;
            self.deliver_events();
        }
    }

    /// Queues VIRTIO_VSOCK_EVENT_TRANSPORT_RESET for the guest (delivered as soon as the event
    /// queue has a buffer) and drops every connection: after a snapshot/restore the guest's
    /// streams refer to host sockets that no longer exist.
    pub fn queue_transport_reset(&mut self) {
        self.pending_transport_reset = true;
        self.drop_all_connections();
        self.deliver_events();
    }

    pub fn transport_reset_pending(&self) -> bool {
        self.pending_transport_reset
    }

    fn drop_all_connections(&mut self) {
        let tokens: Vec<u64> = self.by_key.values().copied().collect();
        for token in tokens {
            self.remove_conn(token);
        }
        self.control.clear();
        self.ready.clear();
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .wrapping_add(1)
                .max(FIRST_EPHEMERAL_PORT);
            if !self.by_key.contains_key(&ConnKey {
                local_port: port,
                peer_port,
            }) {
                return port;
            }
        }
    }

    fn header_to_guest(&self, key: ConnKey, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: 0,
        }
    }

    fn push_control(&mut self, header: PacketHeader, conn: Option<u64>) {
        if self.control.len() >= MAX_PENDING_CONTROL {
            tracing::warn!(
                "vsock: control queue full, dropping op {} to the guest",
                header.op
            );
            return;
        }
        self.control.push_back(Control { header, conn });
    }

    fn send_rst(&mut self, key: ConnKey) {
        let h = self.header_to_guest(key, OP_RST);
        self.push_control(h, None);
    }

    fn conn_mut(&mut self, token: u64) -> Option<&mut Connection> {
        match self.targets.get_mut(&token) {
            Some(Target::Conn(c)) => Some(c),
            _ => None,
        }
    }

    fn remove_conn(&mut self, token: u64) {
        if let Some(Target::Conn(conn)) = self.targets.remove(&token) {
            if conn.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            self.by_key.remove(&conn.key);
            self.ready.retain(|t| *t != token);
        }
    }

    /// Brings a connection's epoll registration in line with what it needs.
    fn update_interest(&mut self, token: u64) {
        let epoll_fd = self.epoll.as_raw_fd();
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        if conn.hung_up {
            return;
        }
        let want = conn.wanted_interest();
        let fd = conn.stream.as_raw_fd();
        let result = match conn.registered {
            None => epoll_ctl(epoll_fd, ControlOperation::Add, fd, want, token),
            Some(have) if have != want => {
                epoll_ctl(epoll_fd, ControlOperation::Modify, fd, want, token)
            }
            Some(_) => Ok(()),
        };
        match result {
            Ok(()) => conn.registered = Some(want),
            Err(e) => tracing::warn!("vsock: epoll registration of a connection failed: {e}"),
        }
    }

    // ---- guest → device (tx queue) ----

    fn process_tx(&mut self) {
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
                Err(reason) => tracing::warn!("vsock: dropped malformed tx packet: {reason}"),
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
                self.remove_conn(token);
                self.send_rst(key);
            }
            (OP_RST, Some(token)) => self.remove_conn(token),
            (OP_RST, None) => {}
            (_, None) => self.send_rst(key),
            (op, Some(token)) => self.guest_packet_on_conn(token, op, &h, payload),
        }
    }

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
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        let token = self.alloc_token();
        self.targets.insert(token, Target::Conn(conn));
        self.by_key.insert(key, token);
        let resp = self.header_to_guest(key, OP_RESPONSE);
        self.push_control(resp, Some(token));
        self.update_interest(token);
    }

    fn guest_packet_on_conn(&mut self, token: u64, op: u16, h: &PacketHeader, payload: Vec<u8>) {
        let (key, readable) = {
            let Some(conn) = self.conn_mut(token) else {
                return;
            };
            // Every packet carries the guest's current credit.
            conn.peer_buf_alloc = h.buf_alloc;
            conn.peer_fwd_cnt = h.fwd_cnt;
            (conn.key, conn.readable_hint)
        };
        if readable {
            self.mark_ready(token);
        }
        match op {
            OP_RESPONSE => {
                let Some(conn) = self.conn_mut(token) else {
                    return;
                };
                if conn.state != ConnState::LocalInit {
                    self.remove_conn(token);
                    self.send_rst(key);
                    return;
                }
                conn.state = ConnState::Established;
                // The "OK" line is not guest payload: write it without touching fwd_cnt.
                let line = format!("OK {}\n", key.local_port);
                let fd = conn.stream.as_raw_fd();
                // SAFETY: sending from our own buffer on our own socket.
                let n = unsafe {
                    libc::send(
                        fd,
                        line.as_ptr().cast(),
                        line.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if n != line.len() as isize {
                    self.remove_conn(token);
                    self.send_rst(key);
                    return;
                }
                // Data the host wrote after its CONNECT line may already be waiting.
                conn.readable_hint = true;
                self.mark_ready(token);
                self.update_interest(token);
            }
            OP_RW => {
                let Some(conn) = self.conn_mut(token) else {
                    return;
                };
                if conn.state != ConnState::Established || conn.guest_done_sending {
                    self.remove_conn(token);
                    self.send_rst(key);
                    return;
                }
                if conn.to_host.len() + payload.len() > CONN_BUF_SIZE as usize {
                    tracing::warn!("vsock: guest overran its credit on port {}", key.local_port);
                    self.remove_conn(token);
                    self.send_rst(key);
                    return;
                }
                conn.to_host.extend_from_slice(&payload);
                let result = conn.flush_to_host();
                if result.is_err() {
                    self.remove_conn(token);
                    self.send_rst(key);
                    return;
                }
                self.maybe_credit_update(token);
                self.update_interest(token);
            }
            OP_CREDIT_UPDATE => self.mark_ready(token),
            OP_CREDIT_REQUEST => {
                let h = self.header_to_guest(key, OP_CREDIT_UPDATE);
                self.push_control(h, Some(token));
            }
            OP_SHUTDOWN => {
                let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
                let Some(conn) = self.conn_mut(token) else {
                    return;
                };
                let guest_done =
                    h.flags & both == both || (h.flags & SHUTDOWN_SEND != 0 && conn.host_eof);
                if guest_done {
                    // Fully closed from the guest's side: finish with RST, as the spec wants,
                    // once everything it sent has reached the host socket.
                    conn.guest_done_sending = true;
                    let flushed = conn.flush_to_host();
                    if flushed.is_err() || conn.to_host.is_empty() {
                        self.remove_conn(token);
                        self.send_rst(key);
                    } else {
                        conn.close_when_flushed = true;
                        conn.readable_hint = false;
                        self.update_interest(token);
                    }
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                    let _ = conn.flush_to_host();
                    self.update_interest(token);
                }
            }
            _ => {
                self.remove_conn(token);
                self.send_rst(key);
            }
        }
    }

    /// Tells the guest about freed buffer space once a good part of it is free again, so a
    /// sender blocked on credit resumes without having to ask.
    fn maybe_credit_update(&mut self, token: u64) {
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        let unannounced = conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent);
        if unannounced >= CONN_BUF_SIZE / 4 {
            let key = conn.key;
            // Mark as announced now so repeated flushes do not queue duplicates.
            conn.fwd_cnt_sent = conn.fwd_cnt;
            let h = self.header_to_guest(key, OP_CREDIT_UPDATE);
            self.push_control(h, Some(token));
        }
    }

    fn mark_ready(&mut self, token: u64) {
        if !self.ready.contains(&token) {
            self.ready.push_back(token);
        }
    }

    // ---- host side ----

    fn accept_host_connections(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.alloc_token();
                    let fd = stream.as_raw_fd();
                    if let Err(e) = self.epoll.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    ) {
                        tracing::warn!("vsock: cannot watch a host connection: {e}");
                        continue;
                    }
                    self.targets.insert(
                        token,
                        Target::Pending(PendingHost {
                            stream,
                            line: Vec::new(),
                        }),
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line one byte at a time (so no payload after it is
    /// consumed); then asks the guest to accept the connection.
    fn read_connect_line(&mut self, token: u64) {
        let Some(Target::Pending(pending)) = self.targets.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let outcome = loop {
            match pending.stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT".to_string()),
                Ok(_) if byte[0] == b'\n' => break Ok(true),
                Ok(_) => {
                    pending.line.push(byte[0]);
                    if pending.line.len() > MAX_CONNECT_LINE {
                        break Err("CONNECT line too long".to_string());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let port = match outcome {
            Ok(false) => return,
            Ok(true) => parse_connect_line(&pending.line),
            Err(e) => Err(e),
        };
        let Some(Target::Pending(pending)) = self.targets.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            pending.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let peer_port = match port {
            Ok(p) => p,
            Err(reason) => {
                tracing::debug!("vsock: host connection refused: {reason}");
                return; // dropping the stream closes it
            }
        };
        if self.by_key.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: connection limit reached; refusing host connection");
            return;
        }
        let local_port = self.alloc_local_port(peer_port);
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let conn = Connection::new(key, pending.stream, ConnState::LocalInit);
        self.arm_connect_timer(self.connect_timeout);
        self.targets.insert(token, Target::Conn(conn));
        self.by_key.insert(key, token);
        let req = self.header_to_guest(key, OP_REQUEST);
        self.push_control(req, Some(token));
        // Watch for the host hanging up while we wait for the guest.
        self.update_interest(token);
    }

    fn host_conn_event(&mut self, token: u64, events: EventSet) {
        let epoll_fd = self.epoll.as_raw_fd();
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) && !conn.hung_up {
            // HUP is reported whatever the interest; stop watching and let the read path
            // find the EOF (after any data still buffered).
            let _ = epoll_ctl(
                epoll_fd,
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EventSet::empty(),
                token,
            );
            conn.hung_up = true;
            conn.registered = None;
            conn.readable_hint = true;
            if conn.close_when_flushed {
                // Nobody will read the rest any more.
                let key = conn.key;
                self.remove_conn(token);
                self.send_rst(key);
                return;
            }
        }
        if events.contains(EventSet::IN) {
            conn.readable_hint = true;
        }
        if events.contains(EventSet::OUT) && !conn.to_host.is_empty() {
            let key = conn.key;
            if conn.flush_to_host().is_err() || (conn.close_when_flushed && conn.to_host.is_empty())
            {
                self.remove_conn(token);
                self.send_rst(key);
                return;
            }
            self.maybe_credit_update(token);
        }
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        if conn.state == ConnState::LocalInit && conn.hung_up {
            // The host gave up before the guest answered.
            let key = conn.key;
            self.remove_conn(token);
            self.send_rst(key);
            return;
        }
        if conn.readable_hint {
            self.mark_ready(token);
        }
        self.update_interest(token);
    }

    // ---- device → guest (rx queue) ----

    /// Fills guest rx buffers: control packets first, then data from readable connections
    /// (round-robin, within each connection's credit).
    fn pump_rx(&mut self) {
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
                    Some(conn) => {
                        ctl.header.fwd_cnt = conn.fwd_cnt;
                        conn.fwd_cnt_sent = conn.fwd_cnt;
                    }
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
        if conn.state != ConnState::Established
            || !conn.readable_hint
            || conn.host_eof
            || conn.close_when_flushed
        {
            return None;
        }
        let credit = conn.peer_credit() as usize;
        let want = credit.min(room);
        if want == 0 {
            // Blocked on the guest's credit (a CREDIT_UPDATE re-queues it) or on a too-small
            // buffer (the next buffer may be larger).
            return None;
        }
        let mut buf = vec![0u8; want];
        let key = conn.key;
        let result = conn.stream.read(&mut buf);
        let mut header = PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: 0,
        };
        let conn = self.conn_mut(token)?;
        header.fwd_cnt = conn.fwd_cnt;
        match result {
            Ok(0) => {
                // The host will send no more; it may still read what the guest sends.
                conn.host_eof = true;
                conn.readable_hint = false;
                header.op = OP_SHUTDOWN;
                header.flags = SHUTDOWN_SEND;
                self.update_interest(token);
                write_packet(mem, chain, &header, &[])
            }
            Ok(n) => {
                conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                conn.fwd_cnt_sent = conn.fwd_cnt;
                header.len = n as u32;
                // More may be waiting: keep it in the rotation.
                self.ready.push_back(token);
                write_packet(mem, chain, &header, &buf[..n])
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                conn.readable_hint = false;
                self.update_interest(token);
                None
            }
            Err(e) => {
                tracing::debug!("vsock: host socket read failed: {e}");
                self.remove_conn(token);
                header.op = OP_RST;
                write_packet(mem, chain, &header, &[])
            }
        }
    }

    // ---- event queue ----

    fn deliver_events(&mut self) {
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

/// Parses a tx chain into (header, payload).
fn read_tx_packet(mem: &GuestMemory, chain: &Chain) -> Result<(PacketHeader, Vec<u8>), String> {
    if !chain.is_well_formed() {
        return Err(format!("chain {} is malformed", chain.head));
    }
    if chain.readable.len() < HEADER_LEN as u64 {
        return Err(format!("chain {} is shorter than a header", chain.head));
    }
    let mut raw = [0u8; HEADER_LEN];
    chain
        .readable
        .read_at(mem, 0, &mut raw)
        .map_err(|e| e.to_string())?;
    let header = PacketHeader::from_bytes(&raw);
    let len = header.len as usize;
    if len > MAX_PAYLOAD {
        return Err(format!("payload of {len} bytes exceeds {MAX_PAYLOAD}"));
    }
    if (chain.readable.len() - HEADER_LEN as u64) < len as u64 {
        return Err(format!("payload of {len} bytes does not fit the chain"));
    }
    let mut payload = vec![0u8; len];
    chain
        .readable
        .read_at(mem, HEADER_LEN as u64, &mut payload)
        .map_err(|e| e.to_string())?;
    Ok((header, payload))
}

fn parse_connect_line(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8".to_string())?;
    let text = text.trim_end_matches('\r');
    let port = text
        .strip_prefix("CONNECT ")
        .ok_or_else(|| format!("expected `CONNECT <port>`, got {text:?}"))?;
    port.trim()
        .parse::<u32>()
        .map_err(|_| format!("bad port in {text:?}"))
}

fn epoll_ctl(
    epoll_fd: RawFd,
    op: ControlOperation,
    fd: RawFd,
    events: EventSet,
    token: u64,
) -> std::io::Result<()> {
    let mut event = libc::epoll_event {
        events: events.bits(),
        u64: token,
    };
    let op = match op {
        ControlOperation::Add => libc::EPOLL_CTL_ADD,
        ControlOperation::Modify => libc::EPOLL_CTL_MOD,
        ControlOperation::Delete => libc::EPOLL_CTL_DEL,
    };
    // SAFETY: plain epoll_ctl on fds we own, with a valid event struct.
    let rc = unsafe { libc::epoll_ctl(epoll_fd, op, fd, &mut event) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
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
        self.deliver_events();
        self.pump_rx();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.drop_all_connections();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX => self.pump_rx(),
            TX => {
                self.process_tx();
                self.pump_rx();
            }
            EVT => self.deliver_events(),
            _ => {}
        }
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        // Keep polling until nothing is ready: accepting a connection registers a new fd
        // whose data is already waiting. Bounded so one busy device cannot starve the others
        // (the outer loop calls again while the epoll fd stays readable).
        for _ in 0..16 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: epoll_wait: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let token = event.data();
                if token == TIMER_TOKEN {
                    self.expire_host_connects();
                    continue;
                }
                if token == LISTENER_TOKEN {
                    self.accept_host_connections();
                    continue;
                }
                match self.targets.get(&token) {
                    Some(Target::Pending(_)) => self.read_connect_line(token),
                    Some(Target::Conn(_)) => self.host_conn_event(token, event.event_set()),
                    None => {}
                }
            }
            if n == 0 {
                break;
            }
        }
        self.pump_rx();
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
