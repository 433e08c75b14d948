//! One child's network: its namespace (tap + veth end + policy) and its host-side veth slot.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use super::cmd::{self, run};
use super::sweep::{ensure_table, HostLock};
use super::{
    rules, GuestNet, NetError, NetHost, NetPolicy, Publish, GATEWAY_MAC, HOST_VETH_PREFIX,
    NETNS_PREFIX, NS_VETH, TABLE,
};

/// Namespaces this process created, for unique names (`forkd-<pid>-<seq>`).
static SEQ: AtomicU32 = AtomicU32::new(0);

/// A prepared network for one child: everything is removed on drop.
#[derive(Debug)]
pub struct ChildNet {
    /// The namespace the child enters before opening its tap: `forkd-<owner pid>-<seq>`.
    pub netns: String,
    /// Its number among the namespaces this process created (the name's `<seq>`).
    seq: u32,
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
    guest: GuestNet,
    /// Host ports forwarded to it.
    published: Vec<Publish>,
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
            seq,
            host_veth: None,
            slot: 0,
            address: Ipv4Addr::UNSPECIFIED,
            host_address: Ipv4Addr::UNSPECIFIED,
            setup: std::time::Duration::ZERO,
            handle: None,
            host: host.clone(),
            guest: guest.clone(),
            published: Vec::new(),
        };
        // Opened first: removal goes by the handle (see `remove`).
        net.handle = Some(cmd::open_netns(&net.netns)?);
        net.claim_slot(seq)?;
        net.set_up_inside(guest, policy)?;
        net.setup = t.elapsed();
        Ok(net)
    }

    /// Hands the network to process `pid` (the child that uses it, forked after it was
    /// made): its namespace is renamed `forkd-<pid>-<seq>`, so that a sweep removes it once
    /// that process is dead, however long the process that made it lives on.
    pub fn set_owner(&mut self, pid: i32) -> Result<(), NetError> {
        let name = format!("{NETNS_PREFIX}{pid}-{}", self.seq);
        if name != self.netns {
            cmd::rename_netns(&self.netns, &name)?;
            self.netns = name;
        }
        Ok(())
    }

    /// Replaces the policy its namespace was set up with (before its child runs: a
    /// connection the old policy allowed stays open).
    pub fn set_policy(&self, policy: &NetPolicy) -> Result<(), NetError> {
        let ruleset = format!(
            "delete table inet {TABLE}\n{}",
            rules::child(&self.host, &self.guest, policy, self.address)
        );
        self.run_inside("nft", &["-f", "-"], Some(&ruleset))?;
        Ok(())
    }

    /// Runs `program` inside its namespace, by its handle.
    fn run_inside(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, NetError> {
        use std::os::fd::AsRawFd;
        let Some(handle) = &self.handle else {
            return Err(NetError::Missing(format!("{} has no handle", self.netns)));
        };
        cmd::run_in_fd(handle.as_raw_fd(), &self.netns, program, args, input)
    }

    /// The host ports forwarded to it.
    pub fn published(&self) -> &[Publish] {
        &self.published
    }

    /// Creates the host end `forkdv<slot>` with its peer `forkd0` inside the namespace, trying
    /// slots from one spread by pid and sequence until the kernel accepts a name. Under the
    /// host lock, with the host's table made again if a sweep removed it meanwhile (no veth
    /// was left on the host then): a child's veth never comes up without the host's rules.
    fn claim_slot(&mut self, seq: u32) -> Result<(), NetError> {
        let _lock = HostLock::take(&self.host)?;
        ensure_table(&self.host)?;
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
    /// included). A port that any child on this host already has is refused
    /// ([`NetError::PortTaken`]), and nothing is forwarded then.
    pub fn publish(&mut self, ports: &[Publish]) -> Result<(), NetError> {
        let Some(veth) = self.host_veth.clone() else {
            return Err(NetError::Missing(format!("{} has no veth", self.netns)));
        };
        if ports.is_empty() {
            return Ok(());
        }
        let _lock = HostLock::take(&self.host)?;
        let taken = super::sweep::published_ports(&self.host);
        if let Some(p) = ports.iter().find(|p| taken.contains(&p.host_port)) {
            return Err(NetError::PortTaken(p.host_port));
        }
        // Loopback sources reach the veth only with route_localnet (then masqueraded).
        cmd::ipv4_sysctl(
            self.host.netns.as_deref(),
            &format!("conf/{veth}/route_localnet"),
            "1",
        )?;
        let batch = rules::publish(&veth, self.address, ports);
        self.published.extend_from_slice(ports);
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
    ///
    /// It goes by the namespace's handle, not by names: once its owner died, a sweep may
    /// have removed the namespace already and its slot (so its veth's name) may be another
    /// child's by now. The pair is removed from inside the namespace, the host's rules only
    /// while the pair is still this one's, and the name only while it names this namespace.
    pub fn remove(&mut self) {
        use std::os::fd::AsRawFd;
        if let Some(veth) = self.host_veth.take() {
            // Held so that nobody claims the slot between the pair going and its rules.
            let _lock = HostLock::take(&self.host);
            // Deleting the namespace's end removes the pair; it fails when the pair is gone.
            let ours = self.run_inside("ip", &["link", "del", NS_VETH], None);
            match ours {
                Ok(_) if !self.published.is_empty() => {
                    super::sweep::unpublish(self.host.netns.as_deref(), &veth)
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("{veth} is gone already: {e}"),
            }
        }
        self.published.clear();
        let named = match &self.handle {
            Some(h) => cmd::names_netns(&self.netns, h.as_raw_fd()),
            None => !self.netns.is_empty(),
        };
        self.handle = None;
        if named {
            if let Err(e) = run(None, "ip", &["netns", "del", &self.netns], None) {
                tracing::warn!("removing network namespace {}: {e}", self.netns);
            }
        }
        self.netns.clear();
    }
}

impl Drop for ChildNet {
    fn drop(&mut self) {
        self.remove();
    }
}
