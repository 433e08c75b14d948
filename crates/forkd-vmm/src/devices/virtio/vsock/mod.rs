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
//!
//! The code is split along those lines:
//! - `connection`: one stream's state, credit and shutdown rules, generic over its host
//!   stream so they are unit-tested without sockets;
//! - `host`: the Unix listener, the `CONNECT` handshake, host socket events and the connect
//!   timeout;
//! - `tx`: packets from the guest (with a short protocol primer);
//! - `rx`: packets and events to the guest;
//! - `persist`: the state a snapshot keeps;
//! - [`packet`]: the packet header.

mod connection;
mod host;
pub mod packet;
mod persist;
mod rx;
mod tx;

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use self::connection::{ConnKey, Connection};
use self::host::PendingHost;
use self::packet::{PacketHeader, OP_RST, TYPE_STREAM};
use self::rx::Control;
use super::mmio::read_config_bytes;
use super::{Interrupt, VirtioDevice, VirtioError, TYPE_VSOCK, VIRTIO_F_VERSION_1};
use crate::devices::virtio::Active;
use crate::memory::GuestMemory;

pub use self::persist::VsockState;

/// The host's CID as the 64-bit packet header field carries it.
pub const HOST_CID: u64 = forkd_guest_abi::HOST_CID as u64;
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

const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
pub(crate) const QUEUE_COUNT: usize = QUEUE_SIZES.len();
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = u64::MAX;
/// How long a host-initiated connection waits for the guest's answer before the host gets EOF
/// (the guest may not be up yet; the host retries). Generous because a guest that is alive
/// may still answer slowly: a hundred freshly forked children share the host's cores, and on
/// an emulating (PVM) host each one polls its queues only every few hundred milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("binding vsock socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock guest CID {0} is reserved (CIDs 0-2 and u32::MAX are not guest addresses)")]
    BadCid(u64),
    #[error("setting up the vsock device's host socket polling")]
    Epoll(#[source] std::io::Error),
}

/// A live connection on a real host socket.
type HostConn = Connection<UnixStream>;

/// What an epoll token stands for.
enum Target {
    Pending(PendingHost),
    Conn(HostConn),
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
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
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

    /// Queues a control packet for the guest; with `conn`, its fwd_cnt is filled in from that
    /// connection when it is sent.
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

    fn conn_mut(&mut self, token: u64) -> Option<&mut HostConn> {
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

    /// Drops connection `token` and tells the guest with RST.
    fn reset_conn(&mut self, token: u64, key: ConnKey) {
        self.remove_conn(token);
        self.send_rst(key);
    }

    fn mark_ready(&mut self, token: u64) {
        if !self.ready.contains(&token) {
            self.ready.push_back(token);
        }
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

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn bind_errors_name_the_path_and_leave_the_cause_to_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("v.sock");
        let err = Vsock::new(3, &path).err().unwrap();
        let top = err.to_string();
        let cause = err
            .source()
            .expect("the io error is the source")
            .to_string();
        assert!(top.contains("v.sock"), "{top}");
        assert!(
            !top.contains(&cause),
            "cause repeated in the message: {top}"
        );
        assert_eq!(forkd_store::error_chain(&err), format!("{top}: {cause}"));
    }
}
