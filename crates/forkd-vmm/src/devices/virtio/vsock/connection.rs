//! One guest stream joined to one host stream: its state, the credit each side grants the
//! other, and what the guest's packets and the host's readiness do to it.
//!
//! The connection is generic over its host side ([`HostStream`]) so the credit accounting and
//! the shutdown rules are tested against an in-memory stream (the tests at the bottom); the
//! device uses [`UnixStream`]. The connection never touches epoll or the virtqueues: its
//! methods change its own state and return what the device must do next (a [`Verdict`], or a
//! [`ToGuest`] for the rx side). The protocol primer is in `tx.rs`.

use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::CONN_BUF_SIZE;

/// A connection's address on the host side of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ConnKey {
    /// The host-side port.
    pub(super) local_port: u32,
    /// The guest-side port.
    pub(super) peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Host-initiated; REQUEST sent to the guest, waiting for RESPONSE.
    LocalInit,
    Established,
}

/// The host end of a connection.
pub(super) trait HostStream: Read {
    /// Writes what the stream takes right now, never blocking (`WouldBlock` when it takes
    /// nothing) and never raising SIGPIPE when the peer has gone (that is an error instead).
    fn send_nonblocking(&mut self, buf: &[u8]) -> io::Result<usize>;

    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn send_nonblocking(&mut self, buf: &[u8]) -> io::Result<usize> {
        // MSG_NOSIGNAL: a host peer that went away must not SIGPIPE the VMM.
        // SAFETY: `buf` is a live, initialised slice borrowed for the whole call and the
        // kernel reads at most `buf.len()` bytes from it; the fd belongs to `self`, so it is
        // open. send() has no other memory effects.
        let n = unsafe {
            libc::send(
                self.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

/// What the device does with a connection after an event.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The connection lives on.
    Keep,
    /// The connection is over: the device drops it and sends the guest RST.
    Reset,
}

/// What a connection has for one guest rx buffer.
#[derive(Debug)]
pub(super) enum ToGuest {
    /// Nothing now: not established, not known readable, closing, or blocked on the guest's
    /// credit or the buffer's size.
    Nothing,
    /// Nothing now: the host stream had no data, so read interest must be re-armed.
    WouldBlock,
    /// Host bytes for an RW packet (already counted against the guest's credit).
    Data(Vec<u8>),
    /// The host stream reached EOF: the guest gets SHUTDOWN(SEND).
    Eof,
    /// Reading the host stream failed: the device drops the connection and sends RST.
    Failed(io::Error),
}

pub(super) struct Connection<S> {
    pub(super) key: ConnKey,
    pub(super) stream: S,
    pub(super) state: ConnState,
    /// Guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes from the guest written to the host stream.
    fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    fwd_cnt_sent: u32,
    /// Bytes from the guest waiting for the host stream to accept them.
    to_host: Vec<u8>,
    /// The guest said it will send no more: shut the host stream's write side once drained.
    guest_done_sending: bool,
    /// The guest closed both directions: drop the connection (and answer RST) as soon as
    /// `to_host` has been written out, so no data the guest sent before closing is lost.
    close_when_flushed: bool,
    /// The host stream reached EOF (the host will send no more); the guest was told with
    /// SHUTDOWN(SEND). The guest may still send to the host.
    host_eof: bool,
    /// The stream signalled readable and has not yet been read until it would block.
    pub(super) readable_hint: bool,
    /// Interest currently registered with the device's epoll (None: not registered).
    pub(super) registered: Option<EventSet>,
    /// The host hung up; the stream is no longer registered with epoll.
    pub(super) hung_up: bool,
    pub(super) created: Instant,
}

impl<S: HostStream> Connection<S> {
    pub(super) fn new(key: ConnKey, stream: S, state: ConnState) -> Connection<S> {
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

    // ---- credit ----

    /// Records the guest's credit, which every guest packet carries.
    pub(super) fn set_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the guest can still take.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes from the guest the host stream has taken (the fwd_cnt packets to the guest carry).
    pub(super) fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }

    /// The device's fwd_cnt for a control packet about to go to the guest; the guest now
    /// knows it.
    pub(super) fn announce_fwd_cnt(&mut self) -> u32 {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.fwd_cnt
    }

    /// Whether enough buffer space was freed since the guest last heard our fwd_cnt to tell
    /// it unasked (a quarter of [`CONN_BUF_SIZE`]), so a sender blocked on credit resumes. A
    /// true answer counts as announced, so repeated flushes do not queue duplicates.
    pub(super) fn credit_update_due(&mut self) -> bool {
        let unannounced = self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent);
        if unannounced >= CONN_BUF_SIZE / 4 {
            self.fwd_cnt_sent = self.fwd_cnt;
            true
        } else {
            false
        }
    }

    // ---- epoll interest ----

    fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.readable_hint
            && !self.host_eof
            && !self.close_when_flushed
    }

    /// The host-stream events this connection waits for now.
    pub(super) fn wanted_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.wants_read() {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether guest bytes are waiting for the host stream.
    pub(super) fn has_data_for_host(&self) -> bool {
        !self.to_host.is_empty()
    }

    // ---- guest → host ----

    /// Writes as much of `to_host` as the stream takes; Err on a broken stream. Once
    /// everything is out and the guest has finished sending, the stream's write side is shut.
    fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            match self.stream.send_nonblocking(&self.to_host) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// The guest accepted a host-initiated connection: the host gets `OK <host port>\n`
    /// (not guest payload, so fwd_cnt is untouched) and any data it wrote after its CONNECT
    /// line may be read.
    pub(super) fn guest_response(&mut self) -> Verdict {
        if self.state != ConnState::LocalInit {
            return Verdict::Reset;
        }
        self.state = ConnState::Established;
        let line = format!("OK {}\n", self.key.local_port);
        match self.stream.send_nonblocking(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            _ => return Verdict::Reset,
        }
        self.readable_hint = true;
        Verdict::Keep
    }

    /// Guest payload for the host: buffered and written out as far as the host takes it.
    /// Data on a connection that is not established or that the guest shut for sending, or
    /// beyond the buffer space we advertised, resets it.
    pub(super) fn guest_rw(&mut self, payload: &[u8]) -> Verdict {
        if self.state != ConnState::Established || self.guest_done_sending {
            return Verdict::Reset;
        }
        if self.to_host.len() + payload.len() > CONN_BUF_SIZE as usize {
            tracing::warn!(
                "vsock: guest overran its credit on port {}",
                self.key.local_port
            );
            return Verdict::Reset;
        }
        self.to_host.extend_from_slice(payload);
        match self.flush_to_host() {
            Ok(()) => Verdict::Keep,
            Err(_) => Verdict::Reset,
        }
    }

    /// SHUTDOWN from the guest. Once the guest is done with both directions (both flags, or
    /// SEND after the host's EOF) the connection ends with RST, as the spec wants, but only
    /// after everything the guest sent has reached the host stream. SEND alone shuts the host
    /// stream's write side once drained; RCV alone changes nothing (we keep forwarding
    /// within the guest's credit).
    pub(super) fn guest_shutdown(&mut self, flags: u32) -> Verdict {
        let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
        let sends_no_more = flags & SHUTDOWN_SEND != 0;
        let guest_done = flags & both == both || (sends_no_more && self.host_eof);
        if guest_done {
            self.guest_done_sending = true;
            let flushed = self.flush_to_host();
            if flushed.is_err() || self.to_host.is_empty() {
                return Verdict::Reset;
            }
            self.close_when_flushed = true;
            self.readable_hint = false;
        } else if sends_no_more {
            self.guest_done_sending = true;
            // A broken stream shows up as an epoll error on the pending write.
            let _ = self.flush_to_host();
        }
        Verdict::Keep
    }

    // ---- host events ----

    /// The host stream can take more: flush. A broken stream, or a connection closing
    /// once flushed that now is, ends.
    pub(super) fn host_writable(&mut self) -> Verdict {
        if self.flush_to_host().is_err() || (self.close_when_flushed && self.to_host.is_empty()) {
            return Verdict::Reset;
        }
        Verdict::Keep
    }

    /// The host hung up (or the stream errored). The caller has stopped watching the
    /// stream; what is still buffered in it will be read (to the EOF) before the guest is
    /// told. A connection waiting for the guest to answer, or one only waiting to flush to a
    /// host that will now never read, ends.
    pub(super) fn host_hung_up(&mut self) -> Verdict {
        self.hung_up = true;
        self.readable_hint = true;
        if self.close_when_flushed || self.state == ConnState::LocalInit {
            return Verdict::Reset;
        }
        Verdict::Keep
    }

    // ---- host → guest ----

    /// Reads host data for a guest rx buffer with room for `room` payload bytes, within the
    /// guest's credit.
    pub(super) fn read_for_guest(&mut self, room: usize) -> ToGuest {
        if self.state != ConnState::Established
            || !self.readable_hint
            || self.host_eof
            || self.close_when_flushed
        {
            return ToGuest::Nothing;
        }
        let want = (self.peer_credit() as usize).min(room);
        if want == 0 {
            // Blocked on the guest's credit (a CREDIT_UPDATE re-queues it) or on a too-small
            // buffer (the next buffer may be larger).
            return ToGuest::Nothing;
        }
        let mut buf = vec![0u8; want];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                // The host will send no more; it may still read what the guest sends.
                self.host_eof = true;
                self.readable_hint = false;
                ToGuest::Eof
            }
            Ok(n) => {
                self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                // The RW packet carries our fwd_cnt: the guest hears it with the data.
                self.fwd_cnt_sent = self.fwd_cnt;
                buf.truncate(n);
                ToGuest::Data(buf)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                self.readable_hint = false;
                ToGuest::WouldBlock
            }
            Err(e) => ToGuest::Failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;

    /// A host stream in memory. Reads return the queued chunks one at a time (each chunk is
    /// what one read() returns, bounded by the caller's buffer), then EOF or WouldBlock;
    /// sends take at most `accept` more bytes, then WouldBlock (or `send_error`).
    #[derive(Default)]
    struct MockStream {
        incoming: VecDeque<Vec<u8>>,
        eof: bool,
        read_error: Option<ErrorKind>,
        written: Vec<u8>,
        accept: usize,
        send_error: Option<ErrorKind>,
        interrupt_next_send: bool,
        shut: RefCell<Vec<Shutdown>>,
    }

    impl Read for MockStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if let Some(kind) = self.read_error {
                return Err(kind.into());
            }
            let Some(chunk) = self.incoming.front_mut() else {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(ErrorKind::WouldBlock.into())
                };
            };
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.incoming.pop_front();
            }
            Ok(n)
        }
    }

    impl HostStream for MockStream {
        fn send_nonblocking(&mut self, buf: &[u8]) -> io::Result<usize> {
            if std::mem::take(&mut self.interrupt_next_send) {
                return Err(ErrorKind::Interrupted.into());
            }
            if let Some(kind) = self.send_error {
                return Err(kind.into());
            }
            let n = buf.len().min(self.accept);
            if n == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.accept -= n;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn shutdown(&self, how: Shutdown) -> io::Result<()> {
            self.shut.borrow_mut().push(how);
            Ok(())
        }
    }

    const KEY: ConnKey = ConnKey {
        local_port: 1 << 30,
        peer_port: 1024,
    };

    fn stream() -> MockStream {
        MockStream {
            accept: usize::MAX,
            ..MockStream::default()
        }
    }

    fn established(stream: MockStream) -> Connection<MockStream> {
        let mut c = Connection::new(KEY, stream, ConnState::Established);
        c.set_peer_credit(CONN_BUF_SIZE, 0);
        c
    }

    fn data(conn: &mut Connection<MockStream>, room: usize) -> Vec<u8> {
        match conn.read_for_guest(room) {
            ToGuest::Data(d) => d,
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn peer_credit_is_buf_alloc_minus_bytes_in_flight() {
        let mut c = established(stream());
        c.set_peer_credit(1000, 0);
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt = 600;
        assert_eq!(c.peer_credit(), 400);
        c.set_peer_credit(1000, 500);
        assert_eq!(c.peer_credit(), 900);
        // The guest shrank its buffer below what is in flight: no credit, no underflow.
        c.set_peer_credit(50, 500);
        assert_eq!(c.peer_credit(), 0);
        // Counters wrap around u32.
        c.rx_cnt = 10;
        c.set_peer_credit(1000, u32::MAX - 9);
        assert_eq!(c.peer_credit(), 980);
    }

    #[test]
    fn forwarding_to_the_guest_stops_at_its_credit_and_resumes_on_update() {
        let mut s = stream();
        s.incoming.push_back(vec![7u8; 300]);
        let mut c = established(s);
        c.set_peer_credit(100, 0);
        c.readable_hint = true;
        assert_eq!(data(&mut c, 4096), vec![7u8; 100], "read capped by credit");
        assert_eq!(c.peer_credit(), 0);
        assert!(matches!(c.read_for_guest(4096), ToGuest::Nothing));
        // Blocked on credit, not on the host: still readable, and not asking for IN.
        assert!(c.readable_hint);
        assert!(!c.wanted_interest().contains(EventSet::IN));
        // The guest consumed 60 bytes (CREDIT_UPDATE or any packet carries that).
        c.set_peer_credit(100, 60);
        assert_eq!(data(&mut c, 4096), vec![7u8; 60]);
        c.set_peer_credit(100, 160);
        assert_eq!(data(&mut c, 4096).len(), 100);
        assert_eq!(c.rx_cnt, 260);
    }

    #[test]
    fn forwarding_to_the_guest_is_capped_by_the_buffer_room() {
        let mut s = stream();
        s.incoming.push_back(vec![1u8; 64]);
        let mut c = established(s);
        c.readable_hint = true;
        assert!(matches!(c.read_for_guest(0), ToGuest::Nothing));
        assert_eq!(data(&mut c, 10).len(), 10);
        assert_eq!(data(&mut c, 4096).len(), 54);
        assert_eq!(c.rx_cnt, 64);
    }

    #[test]
    fn nothing_is_read_before_established_or_without_a_readable_hint() {
        let mut s = stream();
        s.incoming.push_back(b"early".to_vec());
        let mut c = Connection::new(KEY, s, ConnState::LocalInit);
        c.set_peer_credit(CONN_BUF_SIZE, 0);
        c.readable_hint = true;
        assert!(matches!(c.read_for_guest(4096), ToGuest::Nothing));
        c.state = ConnState::Established;
        c.readable_hint = false;
        assert!(matches!(c.read_for_guest(4096), ToGuest::Nothing));
        c.readable_hint = true;
        assert_eq!(data(&mut c, 4096), b"early");
    }

    #[test]
    fn a_read_that_would_block_rearms_read_interest() {
        let mut c = established(stream());
        c.readable_hint = true;
        assert!(c.wanted_interest().is_empty());
        assert!(matches!(c.read_for_guest(4096), ToGuest::WouldBlock));
        assert!(!c.readable_hint);
        assert_eq!(c.wanted_interest(), EventSet::IN);
    }

    #[test]
    fn host_eof_is_reported_once_and_stops_reading() {
        let mut s = stream();
        s.incoming.push_back(b"last".to_vec());
        s.eof = true;
        let mut c = established(s);
        c.readable_hint = true;
        assert_eq!(data(&mut c, 4096), b"last");
        assert!(matches!(c.read_for_guest(4096), ToGuest::Eof));
        assert!(c.host_eof && !c.readable_hint);
        assert!(c.wanted_interest().is_empty(), "no read interest after EOF");
        c.readable_hint = true;
        assert!(matches!(c.read_for_guest(4096), ToGuest::Nothing));
    }

    #[test]
    fn a_failing_host_read_is_reported() {
        let mut s = stream();
        s.read_error = Some(ErrorKind::ConnectionReset);
        let mut c = established(s);
        c.readable_hint = true;
        match c.read_for_guest(4096) {
            ToGuest::Failed(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[test]
    fn fwd_cnt_advances_by_bytes_the_host_took() {
        let mut s = stream();
        s.accept = 5;
        let mut c = established(s);
        assert_eq!(c.guest_rw(b"hello world"), Verdict::Keep);
        assert_eq!(c.fwd_cnt, 5);
        assert_eq!(c.stream.written, b"hello");
        assert_eq!(c.to_host, b" world");
        c.stream.accept = 100;
        assert_eq!(c.host_writable(), Verdict::Keep);
        assert_eq!(c.fwd_cnt, 11);
        assert_eq!(c.announce_fwd_cnt(), 11);
        assert_eq!(c.fwd_cnt_sent, 11);
    }

    #[test]
    fn partial_writes_keep_pending_bytes_in_order() {
        let mut s = stream();
        s.accept = 3;
        let mut c = established(s);
        assert_eq!(c.guest_rw(b"abcdef"), Verdict::Keep);
        assert_eq!(c.guest_rw(b"ghij"), Verdict::Keep);
        assert_eq!(c.to_host, b"defghij");
        assert_eq!(c.wanted_interest(), EventSet::IN | EventSet::OUT);
        for accept in [2, 0, 4] {
            c.stream.accept = accept;
            assert_eq!(c.host_writable(), Verdict::Keep);
        }
        c.stream.accept = 1;
        c.stream.interrupt_next_send = true;
        assert_eq!(c.host_writable(), Verdict::Keep);
        assert_eq!(c.stream.written, b"abcdefghij");
        assert!(!c.has_data_for_host());
        assert_eq!(c.fwd_cnt, 10);
        assert_eq!(
            c.wanted_interest(),
            EventSet::IN,
            "OUT dropped once drained"
        );
    }

    #[test]
    fn guest_overrunning_the_advertised_buffer_is_reset() {
        let mut s = stream();
        s.accept = 0;
        let mut c = established(s);
        let chunk = vec![0u8; CONN_BUF_SIZE as usize / 2];
        assert_eq!(c.guest_rw(&chunk), Verdict::Keep);
        assert_eq!(c.guest_rw(&chunk), Verdict::Keep);
        assert_eq!(c.to_host.len(), CONN_BUF_SIZE as usize);
        assert_eq!(c.guest_rw(b"x"), Verdict::Reset);
    }

    #[test]
    fn data_before_established_or_after_guest_shutdown_send_is_reset() {
        let mut c = Connection::new(KEY, stream(), ConnState::LocalInit);
        assert_eq!(c.guest_rw(b"too early"), Verdict::Reset);
        let mut c = established(stream());
        assert_eq!(c.guest_shutdown(SHUTDOWN_SEND), Verdict::Keep);
        assert_eq!(c.guest_rw(b"too late"), Verdict::Reset);
    }

    #[test]
    fn a_broken_host_stream_resets_on_write() {
        let mut s = stream();
        s.send_error = Some(ErrorKind::BrokenPipe);
        let mut c = established(s);
        assert_eq!(c.guest_rw(b"x"), Verdict::Reset);
    }

    #[test]
    fn credit_update_is_due_after_a_quarter_of_the_buffer_is_freed() {
        let mut s = stream();
        s.accept = 0;
        let mut c = established(s);
        let quarter = CONN_BUF_SIZE as usize / 4;
        assert_eq!(c.guest_rw(&vec![0u8; quarter]), Verdict::Keep);
        c.stream.accept = quarter - 1;
        assert_eq!(c.host_writable(), Verdict::Keep);
        assert!(!c.credit_update_due(), "one byte short of a quarter");
        c.stream.accept = 1;
        assert_eq!(c.host_writable(), Verdict::Keep);
        assert!(c.credit_update_due());
        assert!(!c.credit_update_due(), "announced once, not again");
        assert_eq!(c.fwd_cnt_sent, quarter as u32);
    }

    #[test]
    fn data_sent_to_the_guest_announces_fwd_cnt() {
        let mut s = stream();
        s.incoming.push_back(b"reply".to_vec());
        let mut c = established(s);
        assert_eq!(
            c.guest_rw(&vec![0u8; CONN_BUF_SIZE as usize / 2]),
            Verdict::Keep
        );
        c.readable_hint = true;
        assert_eq!(data(&mut c, 4096), b"reply");
        // The RW packet carried fwd_cnt, so no separate update is due.
        assert_eq!(c.fwd_cnt_sent, CONN_BUF_SIZE / 2);
        assert!(!c.credit_update_due());
        // A control packet (CREDIT_UPDATE answering a CREDIT_REQUEST, RESPONSE) announces too.
        assert_eq!(
            c.guest_rw(&vec![0u8; CONN_BUF_SIZE as usize / 4]),
            Verdict::Keep
        );
        assert_eq!(c.announce_fwd_cnt(), CONN_BUF_SIZE / 4 * 3);
        assert!(!c.credit_update_due());
    }

    #[test]
    fn guest_response_completes_the_host_handshake() {
        let mut c = Connection::new(KEY, stream(), ConnState::LocalInit);
        assert!(
            c.wanted_interest().is_empty(),
            "no reads before the guest answers"
        );
        c.set_peer_credit(4096, 0);
        assert_eq!(c.guest_response(), Verdict::Keep);
        assert_eq!(c.state, ConnState::Established);
        assert_eq!(
            c.stream.written,
            format!("OK {}\n", KEY.local_port).as_bytes()
        );
        assert_eq!(c.fwd_cnt, 0, "the OK line is not guest payload");
        assert!(
            c.readable_hint,
            "host data after CONNECT may already be waiting"
        );
        assert_eq!(c.guest_response(), Verdict::Reset, "a second RESPONSE");
    }

    #[test]
    fn guest_response_the_host_cannot_take_whole_is_reset() {
        let mut s = stream();
        s.accept = 2;
        let mut c = Connection::new(KEY, s, ConnState::LocalInit);
        assert_eq!(c.guest_response(), Verdict::Reset);
    }

    #[test]
    fn guest_shutdown_send_shuts_the_host_write_side_once_drained() {
        let mut s = stream();
        s.accept = 2;
        let mut c = established(s);
        assert_eq!(c.guest_rw(b"bye"), Verdict::Keep);
        assert_eq!(c.guest_shutdown(SHUTDOWN_SEND), Verdict::Keep);
        assert!(
            c.stream.shut.borrow().is_empty(),
            "not while data is pending"
        );
        assert!(!c.close_when_flushed);
        c.stream.accept = 10;
        assert_eq!(c.host_writable(), Verdict::Keep);
        assert_eq!(c.stream.written, b"bye");
        assert_eq!(*c.stream.shut.borrow(), [Shutdown::Write]);
        // The host may still talk to the guest.
        assert_eq!(c.wanted_interest(), EventSet::IN);
    }

    #[test]
    fn guest_shutdown_rcv_alone_changes_nothing() {
        let mut c = established(stream());
        assert_eq!(c.guest_shutdown(SHUTDOWN_RCV), Verdict::Keep);
        assert_eq!(c.guest_shutdown(0), Verdict::Keep);
        assert!(!c.guest_done_sending && !c.close_when_flushed);
        assert!(c.stream.shut.borrow().is_empty());
        assert_eq!(c.guest_rw(b"still fine"), Verdict::Keep);
    }

    #[test]
    fn guest_shutdown_both_with_nothing_pending_resets_at_once() {
        let mut c = established(stream());
        assert_eq!(c.guest_rw(b"all out"), Verdict::Keep);
        assert_eq!(
            c.guest_shutdown(SHUTDOWN_RCV | SHUTDOWN_SEND),
            Verdict::Reset
        );
        assert_eq!(c.stream.written, b"all out");
    }

    #[test]
    fn guest_shutdown_send_after_host_eof_is_a_full_close() {
        let mut s = stream();
        s.eof = true;
        let mut c = established(s);
        c.readable_hint = true;
        assert!(matches!(c.read_for_guest(4096), ToGuest::Eof));
        assert_eq!(c.guest_shutdown(SHUTDOWN_SEND), Verdict::Reset);
    }

    #[test]
    fn guest_shutdown_both_waits_for_pending_data_then_resets() {
        let mut s = stream();
        s.accept = 1;
        let mut c = established(s);
        c.readable_hint = true;
        assert_eq!(c.guest_rw(b"abc"), Verdict::Keep);
        assert_eq!(
            c.guest_shutdown(SHUTDOWN_RCV | SHUTDOWN_SEND),
            Verdict::Keep
        );
        assert!(c.close_when_flushed);
        // No more reading from the host; only waiting to write.
        assert!(!c.readable_hint);
        assert_eq!(c.wanted_interest(), EventSet::OUT);
        assert!(matches!(c.read_for_guest(4096), ToGuest::Nothing));
        c.stream.accept = 1;
        assert_eq!(c.host_writable(), Verdict::Keep);
        c.stream.accept = 1;
        assert_eq!(c.host_writable(), Verdict::Reset, "flushed: now RST");
        assert_eq!(c.stream.written, b"abc");
        assert_eq!(*c.stream.shut.borrow(), [Shutdown::Write]);
    }

    #[test]
    fn guest_shutdown_both_on_a_broken_stream_resets() {
        let mut s = stream();
        s.accept = 0;
        let mut c = established(s);
        assert_eq!(c.guest_rw(b"abc"), Verdict::Keep);
        c.stream.send_error = Some(ErrorKind::BrokenPipe);
        assert_eq!(
            c.guest_shutdown(SHUTDOWN_RCV | SHUTDOWN_SEND),
            Verdict::Reset
        );
    }

    #[test]
    fn host_hang_up_keeps_an_established_connection_until_its_data_is_read() {
        let mut s = stream();
        s.incoming.push_back(b"tail".to_vec());
        s.eof = true;
        let mut c = established(s);
        assert_eq!(c.host_hung_up(), Verdict::Keep);
        assert!(c.hung_up && c.readable_hint);
        assert_eq!(data(&mut c, 4096), b"tail");
        assert!(matches!(c.read_for_guest(4096), ToGuest::Eof));
    }

    #[test]
    fn host_hang_up_before_the_guest_answers_resets() {
        let mut c = Connection::new(KEY, stream(), ConnState::LocalInit);
        assert_eq!(c.host_hung_up(), Verdict::Reset);
    }

    #[test]
    fn host_hang_up_while_draining_a_closed_connection_resets() {
        let mut s = stream();
        s.accept = 0;
        let mut c = established(s);
        assert_eq!(c.guest_rw(b"unsent"), Verdict::Keep);
        assert_eq!(
            c.guest_shutdown(SHUTDOWN_RCV | SHUTDOWN_SEND),
            Verdict::Keep
        );
        assert_eq!(c.host_hung_up(), Verdict::Reset);
    }
}
