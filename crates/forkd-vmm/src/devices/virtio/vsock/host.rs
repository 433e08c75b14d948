//! The host side: the device's Unix listener, the `CONNECT <port>\n` handshake of
//! host-initiated connections and its timeout, and readiness events from host sockets
//! (all watched by the device's own epoll).

use std::io::{ErrorKind, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::connection::{ConnKey, ConnState, Connection, Verdict};
use super::packet::OP_REQUEST;
use super::{Target, Vsock, MAX_CONNECTIONS};

/// The longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;

/// A host process that connected to the Unix socket and has not yet sent its CONNECT line.
pub(super) struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Why a host connection was refused before it reached the guest.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectLineError {
    #[error("closed before CONNECT")]
    Closed,
    #[error("CONNECT line too long")]
    TooLong,
    #[error("CONNECT line is not UTF-8")]
    NotUtf8,
    #[error("expected `CONNECT <port>`, got {0:?}")]
    NotConnect(String),
    #[error("bad port in {0:?}")]
    BadPort(String),
    #[error("reading the CONNECT line")]
    Read(#[source] std::io::Error),
}

impl Vsock {
    pub(super) fn accept_host_connections(&mut self) {
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
    pub(super) fn read_connect_line(&mut self, token: u64) {
        let Some(Target::Pending(pending)) = self.targets.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let outcome = loop {
            match pending.stream.read(&mut byte) {
                Ok(0) => break Err(ConnectLineError::Closed),
                Ok(_) if byte[0] == b'\n' => break Ok(true),
                Ok(_) => {
                    pending.line.push(byte[0]);
                    if pending.line.len() > MAX_CONNECT_LINE {
                        break Err(ConnectLineError::TooLong);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(ConnectLineError::Read(e)),
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
                tracing::debug!(
                    "vsock: host connection refused: {}",
                    forkd_store::error_chain(&reason)
                );
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

    /// Readiness (or hang-up) of a connection's host socket.
    pub(super) fn host_conn_event(&mut self, token: u64, events: EventSet) {
        let epoll_fd = self.epoll.as_raw_fd();
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        let key = conn.key;
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
            conn.registered = None;
            if conn.host_hung_up() == Verdict::Reset {
                self.reset_conn(token, key);
                return;
            }
        }
        if events.contains(EventSet::IN) {
            conn.readable_hint = true;
        }
        if events.contains(EventSet::OUT) && conn.has_data_for_host() {
            if conn.host_writable() == Verdict::Reset {
                self.reset_conn(token, key);
                return;
            }
            self.maybe_credit_update(token);
        }
        let Some(conn) = self.conn_mut(token) else {
            return;
        };
        if conn.readable_hint {
            self.mark_ready(token);
        }
        self.update_interest(token);
    }

    /// Brings a connection's epoll registration in line with what it needs.
    pub(super) fn update_interest(&mut self, token: u64) {
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

    pub(super) fn arm_connect_timer(&mut self, after: Duration) {
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
    pub(super) fn expire_host_connects(&mut self) {
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
            self.reset_conn(token, key);
        }
        if let Some(deadline) = next_deadline {
            self.arm_connect_timer(deadline - now);
        }
    }
}

fn parse_connect_line(line: &[u8]) -> Result<u32, ConnectLineError> {
    let text = std::str::from_utf8(line).map_err(|_| ConnectLineError::NotUtf8)?;
    let text = text.trim_end_matches('\r');
    let port = text
        .strip_prefix("CONNECT ")
        .ok_or_else(|| ConnectLineError::NotConnect(text.to_string()))?;
    port.trim()
        .parse::<u32>()
        .map_err(|_| ConnectLineError::BadPort(text.to_string()))
}

/// epoll_ctl with our own token (vmm-sys-util's `Epoll::ctl` needs an `Epoll` borrow, which
/// the callers cannot take while they hold a connection).
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
    // SAFETY: epoll_ctl only reads `event`, a live local struct of the type it expects, for
    // the duration of the call; bad or closed fds make it fail with EBADF, never touch memory.
    let rc = unsafe { libc::epoll_ctl(epoll_fd, op, fd, &mut event) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_to_ports() {
        assert_eq!(parse_connect_line(b"CONNECT 1024").unwrap(), 1024);
        assert_eq!(parse_connect_line(b"CONNECT 52\r").unwrap(), 52, "CRLF");
        assert_eq!(parse_connect_line(b"CONNECT  7 ").unwrap(), 7);
        assert_eq!(parse_connect_line(b"CONNECT 4294967295").unwrap(), u32::MAX);
    }

    #[test]
    fn bad_connect_lines_say_why() {
        assert!(matches!(
            parse_connect_line(b"connect 1"),
            Err(ConnectLineError::NotConnect(l)) if l == "connect 1"
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT x"),
            Err(ConnectLineError::BadPort(_))
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT 4294967296"),
            Err(ConnectLineError::BadPort(_))
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT \xff"),
            Err(ConnectLineError::NotUtf8)
        ));
    }

    #[test]
    fn connect_line_read_errors_render_their_cause_once() {
        let err = ConnectLineError::Read(std::io::Error::from(ErrorKind::ConnectionReset));
        let rendered = forkd_store::error_chain(&err);
        assert_eq!(rendered.matches("reset").count(), 1, "{rendered}");
        assert!(
            rendered.starts_with("reading the CONNECT line: "),
            "{rendered}"
        );
    }
}
