//! `tcp_connect`: turns an agent connection into a TCP stream to a port of the guest's
//! loopback, so the host reaches guest services over vsock without any guest network.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use super::{ConnStream, OpError};
use crate::protocol::{ErrorCode, TcpConnectRequest, TcpConnectResult};

/// A local port that takes longer than this to accept is as good as closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const COPY_LEN: usize = 64 << 10;

/// Connects to the port on IPv4 loopback, then IPv6 loopback. `alone` says no other request
/// is in flight on the connection (their replies would land in the TCP stream).
pub(super) fn connect(
    req: &TcpConnectRequest,
    alone: bool,
) -> Result<(TcpStream, TcpConnectResult), OpError> {
    let context = format!("tcp_connect {}", req.port);
    if !alone {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!("{context}: send it as the only request of a fresh connection"),
        ));
    }
    if req.port == 0 {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!("{context}: port 0 is not a port"),
        ));
    }
    let mut last = None;
    for ip in ["127.0.0.1", "::1"] {
        let address = SocketAddr::new(ip.parse().expect("a loopback literal"), req.port);
        match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                let result = TcpConnectResult {
                    address: address.to_string(),
                };
                return Ok((tcp, result));
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("two addresses were tried");
    Err(OpError::new(
        ErrorCode::Io,
        format!("{context}: nothing accepts connections on this port ({e})"),
    ))
}

/// Copies bytes both ways until each side has closed its half; returns when both are done.
pub(super) fn splice<S: ConnStream>(conn: S, tcp: TcpStream) {
    let (Ok(conn_out), Ok(tcp_in)) = (conn.try_clone_stream(), tcp.try_clone()) else {
        tracing::warn!("tcp tunnel: cannot duplicate its sockets");
        return;
    };
    let upstream = std::thread::Builder::new()
        .name("tcp-tunnel".into())
        .spawn(move || {
            copy_until_eof(tcp_in, conn_out, |out| {
                let _ = out.shutdown_write();
            })
        });
    copy_until_eof(conn, tcp, |tcp| {
        let _ = tcp.shutdown(Shutdown::Write);
    });
    if let Ok(thread) = upstream {
        let _ = thread.join();
    }
}

/// Copies `from` into `to` until `from` ends (or either fails), then closes `to`'s writing half.
fn copy_until_eof<R: Read, W: Write>(mut from: R, mut to: W, close: impl FnOnce(&W)) {
    let mut buf = vec![0u8; COPY_LEN];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    close(&to);
}
