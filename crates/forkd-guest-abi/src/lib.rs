//! The contract between forkd's host side and the programs in its guests (forkd-agent in Linux
//! guests, the VMM's freestanding demo and test guests): which vsock addresses they use.
//!
//! Defined here once: the agent, the VMM and the sandbox manager import these, and the VMM's
//! build passes them to the C test guests as `-DFORKD_GUEST_PORT` / `-DFORKD_READY_PORT`.

/// The host's vsock context id.
pub const HOST_CID: u32 = 2;

/// Guest vsock port a guest serves on: forkd-agent's requests, the demo guest's `COUNTER`.
pub const GUEST_PORT: u32 = 1024;

/// Host vsock port a booted guest connects to once it is ready, writing `READY <name>\n`
/// (what `forkd snapshot` waits for before it snapshots).
pub const READY_PORT: u32 = 1025;

// Below 1024 a Linux guest needs CAP_NET_BIND_SERVICE to listen; the two must differ.
const _: () = assert!(GUEST_PORT >= 1024 && READY_PORT >= 1024 && GUEST_PORT != READY_PORT);
