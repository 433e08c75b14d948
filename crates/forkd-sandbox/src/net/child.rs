//! One child's network: its namespace (tap + veth end + policy) and its host-side veth slot.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use super::cmd::{self, run};
use super::{
    rules, GuestNet, NetError, NetHost, NetPolicy, Publish, GATEWAY_MAC, HOST_VETH_PREFIX,
    NETNS_PREFIX, NS_VETH,
};

/// Namespaces this process created, for unique names (`forkd-<pid>-<seq>`).
static SEQ: AtomicU32 = AtomicU32::new(0);

/// A prepared network for one child: everything is removed on drop.
#[derive(Debug)]
pub struct ChildNet {
    /// The namespace the child enters before opening its tap.
    pub netns: String,
    /// The host end of the veth pair (`forkdv<slot>`), once claimed.
    pub host_veth: Option<String>,
    pub slot: u32,
    /// The child's address as the host sees it (the namespace end of the veth).
    pub address: Ipv4Addr,
    /// The host end's address (the namespace's default gateway).
    pub host_address: Ipv4Addr,
    /// How long its setup took (off the fork path).
    pub setup: std::time::Duration,
    /// The namespace's handle, open in this process so that a forked child can enter it
    /// after its jail hid /run/netns.
    handle: Option<std::os::fd::OwnedFd>,
    host: NetHost,
    published: bool,
}

impl ChildNet {
    /// Creates the namespace, claims a slot, and sets up the tap, the veth, forwarding and the
    /// policy inside it. A failure on the way removes what was created.
    pub fn create(
        host: &NetHost,
        guest: &GuestNet,
        policy: &NetPolicy,
    ) -> Result<ChildNet, NetError> {
        let t = std::time::Instant::now();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let netns = format!("{NETNS_PREFIX}{}-{seq}", std::process::id());
        run(None, "ip", &["netns", "add", &netns], None)?;
        let mut net = ChildNet {
            netns,
            host_veth: None,
            slot: 0,
            address: Ipv4Addr::UNSPECIFIED,
            host_address: Ipv4Addr::UNSPECIFIED,
            setup: std::time::Duration::ZERO,
            handle: None,
            host: host.clone(),
            published: false,
        };
        net.claim_slot(seq)?;
        net.set_up_inside(guest, policy)?;
        net.handle = Some(cmd::open_netns(&net.netns)?);
        net.setup = t.elapsed();
        Ok(net)
    }

    /// Creates the host end `forkdv<slot>` with its peer `forkd0` inside the namespace, trying
    /// slots from one spread by pid and sequence until the kernel accepts a name.
    fn claim_slot(&mut self, seq: u32) -> Result<(), NetError> {
        let slots = self.host.slots();
        let start = (std::process::id().wrapping_mul(2_654_435_761) ^ seq.wrapping_mul(97)) % slots;
        for i in 0..slots.min(64) {
            let slot = (start + i) % slots;
            let veth = format!("{HOST_VETH_PREFIX}{slot}");
            let (host_addr, ns_addr) = self.host.slot_addresses(slot);
            let batch = format!(
                "link add {veth} type veth peer name {NS_VETH} netns {ns}\n\
                 addr add {host_addr}/30 dev {veth}\n\
                 link set {veth} up\n",
                ns = self.netns
            );
            match run(
                self.host.netns.as_deref(),
                "ip",
                &["-batch", "-"],
                Some(&batch),
            ) {
                Ok(_) => {
                    self.host_veth = Some(veth);
                    self.slot = slot;
                    self.address = ns_addr;
                    self.host_address = host_addr;
                    return Ok(());
                }
                // The name (so the slot) is another child's: try the next one.
                Err(NetError::Command { stderr, .. }) if stderr.contains("File exists") => {
                    // The link may exist half-set-up if the `addr add` failed: only the first
                    // command's failure means someone else's slot.
                    if !stderr.contains("-:1") {
                        let _ = run(
                            self.host.netns.as_deref(),
                            "ip",
                            &["link", "del", &veth],
                            None,
                        );
                        self.host_veth = None;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(NetError::NoSlot(self.host.range))
    }

    fn set_up_inside(&self, guest: &GuestNet, policy: &NetPolicy) -> Result<(), NetError> {
        let ns = Some(self.netns.as_str());
        let tap = &guest.tap;
        // The tap gets the same MAC in every namespace (and in the parent's): a guest that
        // resolved its gateway before the snapshot keeps a valid neighbour entry in every child.
        let batch = format!(
            "link set lo up\n\
             tuntap add dev {tap} mode tap\n\
             link set {tap} address {GATEWAY_MAC}\n\
             addr add {gw}/{prefix} dev {tap}\n\
             link set {tap} up\n\
             addr add {addr}/30 dev {NS_VETH}\n\
             link set {NS_VETH} up\n\
             route add default via {host_addr}\n",
            gw = guest.gateway,
            prefix = guest.prefix,
            addr = self.address,
            host_addr = self.host_address,
        );
        run(ns, "ip", &["-batch", "-"], Some(&batch))?;
        cmd::ipv4_sysctl(ns, "ip_forward", "1")?;
        // The policy refuses with ICMP errors, all addressed to the one guest: unlimited, so
        // a guest trying many denied destinations in a row gets each refusal at once (the
        // default allows a burst of 6, then one a second).
        cmd::ipv4_sysctl(ns, "icmp_ratelimit", "0")?;
        let ruleset = rules::child(&self.host, guest, policy, self.address);
        run(ns, "nft", &["-f", "-"], Some(&ruleset))?;
        Ok(())
    }

    /// The namespace's handle (see [`super::enter_netns_fd`]).
    pub fn handle(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.handle.as_ref().map(|h| h.as_raw_fd())
    }

    /// Forwards host ports to this child (TCP, any of the host's addresses, loopback
    /// included).
    pub fn publish(&mut self, ports: &[Publish]) -> Result<(), NetError> {
        let Some(veth) = self.host_veth.clone() else {
            return Err(NetError::Missing(format!("{} has no veth", self.netns)));
        };
        if ports.is_empty() {
            return Ok(());
        }
        // Loopback sources reach the veth only with route_localnet (then masqueraded).
        cmd::ipv4_sysctl(
            self.host.netns.as_deref(),
            &format!("conf/{veth}/route_localnet"),
            "1",
        )?;
        let batch = rules::publish(&veth, self.address, ports);
        self.published = true;
        run(
            self.host.netns.as_deref(),
            "nft",
            &["-f", "-"],
            Some(&batch),
        )?;
        Ok(())
    }

    /// Removes the veth pair, the namespace (its tap and policy go with it) and any published
    /// ports. Idempotent; errors are logged, not returned (this runs on drop).
    pub fn remove(&mut self) {
        self.handle = None;
        let hns = self.host.netns.clone();
        if let Some(veth) = self.host_veth.take() {
            if self.published {
                super::sweep::unpublish(hns.as_deref(), &veth);
            }
            if let Err(e) = run(hns.as_deref(), "ip", &["link", "del", &veth], None) {
                tracing::warn!("removing {veth}: {e}");
            }
        }
        if !self.netns.is_empty() {
            if let Err(e) = run(None, "ip", &["netns", "del", &self.netns], None) {
                tracing::warn!("removing network namespace {}: {e}", self.netns);
            }
            self.netns.clear();
        }
    }
}

impl Drop for ChildNet {
    fn drop(&mut self) {
        self.remove();
    }
}
