//! Children's networks prepared ahead of a fork, like the pool's VM shells: creating a
//! namespace, its veth, tap and policy takes a few process launches, so they are made before
//! `go` (in parallel) and a child only enters its namespace on the fork path.

use std::collections::BTreeMap;

use super::sweep::{ensure_host, remove_host_table_if_unused};
use super::{ChildNet, GuestNet, NetError, NetHost, NetPolicy, Publish};

/// Most `ip`/`nft` setups run at once (each is a few short processes).
const PARALLEL: usize = 8;

/// One prepared network per child index; all removed on drop (and the host's table once no
/// child is left on it).
#[derive(Debug)]
pub struct NetPool {
    host: NetHost,
    guest: GuestNet,
    policy: NetPolicy,
    nets: BTreeMap<usize, ChildNet>,
}

impl NetPool {
    /// An empty pool (the host side made ready: forwarding on, the shared table present).
    pub fn new(host: NetHost, guest: GuestNet, policy: NetPolicy) -> Result<NetPool, NetError> {
        ensure_host(&host)?;
        Ok(NetPool {
            host,
            guest,
            policy,
            nets: BTreeMap::new(),
        })
    }

    /// The resolvers the policy opens, when it allows DNS.
    pub fn resolvers(&self) -> Option<Vec<std::net::IpAddr>> {
        self.policy
            .allow_dns
            .then(|| self.policy.dns.iter().copied().map(Into::into).collect())
    }

    /// Prepares networks for child indices `indices` (in parallel). On an error, the networks
    /// made by this call are removed again and the error returned.
    pub fn prepare(&mut self, indices: impl IntoIterator<Item = usize>) -> Result<(), NetError> {
        let indices: Vec<usize> = indices.into_iter().collect();
        let made = create_many(&self.host, &self.guest, &self.policy, indices.len())?;
        self.nets.extend(indices.into_iter().zip(made));
        Ok(())
    }

    /// The namespace child `index` enters before it opens its tap.
    pub fn netns_of(&self, index: usize) -> Option<&str> {
        self.nets.get(&index).map(|n| n.netns.as_str())
    }

    /// The handle of child `index`'s namespace, inherited by the forked child.
    pub fn netns_fd(&self, index: usize) -> Option<std::os::fd::RawFd> {
        self.nets.get(&index).and_then(|n| n.handle())
    }

    pub fn child(&self, index: usize) -> Option<&ChildNet> {
        self.nets.get(&index)
    }

    pub fn children(&self) -> impl Iterator<Item = (usize, &ChildNet)> {
        self.nets.iter().map(|(i, n)| (*i, n))
    }

    pub fn host(&self) -> &NetHost {
        &self.host
    }

    /// Forwards host ports to child `index`.
    pub fn publish(&mut self, index: usize, ports: &[Publish]) -> Result<(), NetError> {
        let net = self
            .nets
            .get_mut(&index)
            .ok_or_else(|| NetError::Missing(format!("no network prepared for child {index}")))?;
        net.publish(ports)
    }

    /// Removes child `index`'s network (the child has stopped).
    pub fn remove(&mut self, index: usize) {
        self.nets.remove(&index);
    }
}

impl Drop for NetPool {
    fn drop(&mut self) {
        self.nets.clear();
        remove_host_table_if_unused(&self.host);
    }
}

/// `n` networks made in parallel; on an error, those made are removed again.
fn create_many(
    host: &NetHost,
    guest: &GuestNet,
    policy: &NetPolicy,
    n: usize,
) -> Result<Vec<ChildNet>, NetError> {
    let per_thread = n.div_ceil(PARALLEL).max(1);
    let counts: Vec<usize> = (0..n)
        .step_by(per_thread)
        .map(|start| per_thread.min(n - start))
        .collect();
    let made: Vec<Result<ChildNet, NetError>> = std::thread::scope(|s| {
        let workers: Vec<_> = counts
            .iter()
            .map(|&count| {
                s.spawn(move || {
                    (0..count)
                        .map(|_| ChildNet::create(host, guest, policy))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let mut first_error = None;
    let mut ok = Vec::new();
    for r in made {
        match r {
            Ok(net) => ok.push(net),
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    if let Some(e) = first_error {
        drop(ok);
        return Err(e);
    }
    if ok.len() != n {
        return Err(NetError::Missing("a network setup thread panicked".into()));
    }
    Ok(ok)
}

/// Networks for a pool whose children come and go (a zygote's warm shells, each becoming a
/// daemon sandbox): each is made just before its child is forked, with the policy children
/// get unless told otherwise, and handed to that child ([`ChildNet::set_owner`]); the pool
/// keeps it with the child and removes it when the child is gone. The host's table goes
/// with the last network on the host, when this is dropped.
#[derive(Debug)]
pub struct ShellNets {
    host: NetHost,
    guest: GuestNet,
    policy: NetPolicy,
}

impl ShellNets {
    /// Makes the host side ready (forwarding on, the shared table present).
    pub fn new(host: NetHost, guest: GuestNet, policy: NetPolicy) -> Result<ShellNets, NetError> {
        ensure_host(&host)?;
        Ok(ShellNets {
            host,
            guest,
            policy,
        })
    }

    /// `n` networks with the default policy (in parallel).
    pub fn create(&self, n: usize) -> Result<Vec<ChildNet>, NetError> {
        create_many(&self.host, &self.guest, &self.policy, n)
    }

    /// The policy its networks are made with.
    pub fn policy(&self) -> &NetPolicy {
        &self.policy
    }

    pub fn guest(&self) -> &GuestNet {
        &self.guest
    }

    pub fn host(&self) -> &NetHost {
        &self.host
    }

    /// Removes the host's table when no child's network is left on the host (a pool that
    /// keeps none warm, after its last child went); the next network makes it again.
    pub fn remove_host_table_if_unused(&self) {
        remove_host_table_if_unused(&self.host);
    }
}

impl Drop for ShellNets {
    fn drop(&mut self) {
        remove_host_table_if_unused(&self.host);
    }
}
