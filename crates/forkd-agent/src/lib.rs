//! forkd-agent: the guest agent of forkd.
//!
//! - [`protocol`]: the versioned wire protocol (frames of JSON header + raw payload), documented
//!   there in full, with serde types for every request and result.
//! - [`client`]: the host-side client ([`client::AgentClient`]) over any `Read + Write` stream,
//!   plus the hybrid-vsock `CONNECT` handshake.
//! - [`server`]: the agent itself ([`server::Agent`]): exec, eval, files, ping and the
//!   `restored` hook, serving vsock or Unix-socket connections. The `forkd-agent` binary wraps it.
//! - [`vsock`]: AF_VSOCK stream sockets.
//! - [`loopback`]: bringing the guest's `lo` up (the binary does at start in a guest).

pub mod client;
pub mod frame;
pub mod loopback;
pub mod protocol;
pub mod server;
pub mod vsock;
