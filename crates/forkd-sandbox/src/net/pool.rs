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
        let per_thread = indices.len().div_ceil(PARALLEL).max(1);
        let (host, guest, policy) = (&self.host, &self.guest, &self.policy);
        let made: Vec<(usize, Result<ChildNet, NetError>)> = std::thread::scope(|s| {
            let workers: Vec<_> = indices
                .chunks(per_thread)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|&i| (i, ChildNet::create(host, guest, policy)))
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
        for (i, r) in made {
            match r {
                Ok(net) => ok.push((i, net)),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            drop(ok);
            return Err(e);
        }
        if ok.len() != indices.len() {
            return Err(NetError::Missing("a network setup thread panicked".into()));
        }
        self.nets.extend(ok);
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
