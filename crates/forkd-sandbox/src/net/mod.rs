//! A network per child: every child's tap lives in a network namespace of its own, reached
//! from the host through a veth pair with NAT, behind an nftables policy that denies egress
//! by default.
//!
//! Names (everything carries the `forkd` prefix so a sweep can find it):
//! - namespace `forkd-<owner pid>-<seq>`: the owner is the process whose life the network
//!   follows, so a sweep removes those whose owner is dead (a `kill -9` of the parent). For
//!   `forkd fork`/`run` that is the process that prepared it (its children die with it); a
//!   daemon sandbox's network is handed to the sandbox's own VMM process
//!   ([`ChildNet::set_owner`]), which outlives the daemon;
//! - host side of the veth pair `forkdv<slot>`; its peer inside the namespace is `forkd0`;
//! - nftables table `inet forkd` inside each namespace (the child's policy; it dies with the
//!   namespace) and one `inet forkd` table on the host side (isolation between children, the
//!   host's own services, masquerade), removed when no `forkdv*` link is left.
//!
//! Address plan: slot `s` of the range (default 10.200.0.0/16) is the /30 at `base + 4s`; the
//! host end of the veth is `.1`, the namespace end `.2`. The namespace end is the child's
//! address as the host sees it: inbound traffic to it is DNATed to the guest, the guest's
//! outbound traffic is masqueraded to it, so every child keeps the snapshot's guest IP, MAC and
//! tap name. A slot is claimed by creating its host veth: the kernel refuses a second link of
//! the same name, so two processes never share a slot.

mod child;
mod cmd;
mod parse;
mod policy;
mod pool;
mod rules;
mod sweep;

use std::net::Ipv4Addr;

pub use child::ChildNet;
pub use cmd::{enter_netns, enter_netns_fd, NetnsGuard, NETNS_DIR};
pub use parse::{Ipv4Cidr, ParseError};
pub use policy::{host_resolvers, parse_allows, policy_for, ChosenPolicy};
pub use pool::{NetPool, ShellNets};
pub use sweep::{leftovers, sweep, Leftovers};

/// Prefix of every namespace forkd creates for a child.
pub const NETNS_PREFIX: &str = "forkd-";
/// Prefix of the host end of every child's veth pair.
pub const HOST_VETH_PREFIX: &str = "forkdv";
/// The namespace end of the veth pair.
pub const NS_VETH: &str = "forkd0";
/// The nftables table forkd owns, on the host side and in each child's namespace.
pub const TABLE: &str = "forkd";
/// The MAC of the guest's gateway (the tap's namespace side), the same in every namespace
/// (locally administered, unicast).
pub const GATEWAY_MAC: &str = "06:00:0a:00:02:01";
/// Where child addresses come from unless configured (`FORKD_NET_RANGE`).
pub const DEFAULT_RANGE: &str = "10.200.0.0/16";

/// One allowed destination of a child's egress: a network, and optionally one port (TCP and
/// UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allow {
    pub net: Ipv4Cidr,
    pub port: Option<u16>,
}

/// A host port forwarded to a guest port (TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    pub host_port: u16,
    pub guest_port: u16,
}

/// What a child may reach. Everything else is dropped: egress is denied by default, and the
/// metadata range, other children and the host's loopback stay closed unless an `allow`
/// falls inside them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPolicy {
    pub allow: Vec<Allow>,
    /// Open DNS (TCP and UDP port 53) to `dns`.
    pub allow_dns: bool,
    /// The resolvers `allow_dns` opens (default: the host's non-loopback nameservers).
    pub dns: Vec<Ipv4Addr>,
}

/// The guest's side of the network, as the snapshot's guest was configured: its tap's name
/// (the one the snapshot records), its address, and the gateway the namespace plays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    pub tap: String,
    pub guest: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl GuestNet {
    /// The plan the test guest (`guests/net.c`) and forkd's Linux images use:
    /// 10.0.2.15/24 behind 10.0.2.1, on the snapshot's tap.
    pub fn standard(tap: &str) -> GuestNet {
        GuestNet {
            tap: tap.to_string(),
            guest: Ipv4Addr::new(10, 0, 2, 15),
            gateway: Ipv4Addr::new(10, 0, 2, 1),
            prefix: 24,
        }
    }

    /// The kernel command line's static configuration for this plan (`ip=` of
    /// Documentation/admin-guide/nfs/nfsroot.rst): the guest's interface is up with its
    /// address the moment the kernel has booted, so a restored child needs no DHCP.
    pub fn kernel_ip_arg(&self) -> String {
        let mask = Ipv4Cidr {
            addr: self.guest,
            prefix: self.prefix,
        }
        .mask();
        format!(
            "ip={}::{}:{}::eth0:off",
            self.guest,
            self.gateway,
            Ipv4Addr::from(mask)
        )
    }
}

/// Where the host side of the children's networks lives: the address range, and the network
/// namespace playing "the host" (None: the host itself; tests use a namespace of their own so
/// that nothing on the real host changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetHost {
    pub range: Ipv4Cidr,
    pub netns: Option<String>,
}

impl NetHost {
    /// The host itself, with the range from `FORKD_NET_RANGE` or the default.
    /// `FORKD_NET_HOST_NETNS` names an existing namespace to play the host instead (a nested
    /// setup, or a benchmark that must leave the real host untouched).
    pub fn from_env() -> Result<NetHost, NetError> {
        let range = std::env::var("FORKD_NET_RANGE").unwrap_or_else(|_| DEFAULT_RANGE.into());
        let netns = std::env::var("FORKD_NET_HOST_NETNS")
            .ok()
            .filter(|n| !n.is_empty());
        if let Some(n) = &netns {
            if !std::path::Path::new(cmd::NETNS_DIR).join(n).exists() {
                return Err(NetError::Missing(format!(
                    "FORKD_NET_HOST_NETNS {n:?}: no such network namespace"
                )));
            }
        }
        Ok(NetHost {
            range: parse::range(&range)?,
            netns,
        })
    }

    /// Number of /30 slots in the range.
    pub fn slots(&self) -> u32 {
        1u32 << (30 - u32::from(self.range.prefix).min(30))
    }

    /// The host end (`.1`) and namespace end (`.2`) of slot `slot`.
    pub fn slot_addresses(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.range.addr) + slot * 4;
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }
}

/// The tap of the network device the snapshot in `dir` has (None: it has none), from its
/// vmstate.json; for a caller that does not load the snapshot (the daemon checking a
/// request's network section).
pub fn snapshot_tap(dir: &std::path::Path) -> Result<Option<String>, NetError> {
    use forkd_vmm::snapshot::{vmstate_file, MachineState};
    let path = dir.join(forkd_store::VMSTATE_FILE);
    let (_, state) = vmstate_file::load::<MachineState>(&path)
        .map_err(|e| NetError::Missing(forkd_store::error_chain(&e)))?;
    Ok(state.devices.net.map(|n| n.tap))
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("`{what}` failed: {stderr}")]
    Command { what: String, stderr: String },
    #[error("running `{what}`")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {name}")]
    Netns {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no free address slot in {0} (every forkdv<slot> link exists)")]
    NoSlot(Ipv4Cidr),
    #[error("host port {0} is already published to another child")]
    PortTaken(u16),
    #[error("{0}")]
    Missing(String),
}
