//! Networking options of `forkd fork` and `forkd run` (`--net`, `--allow`, `--allow-dns`,
//! `--publish`), and `forkd net sweep`.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use forkd_sandbox::net::{
    self, Allow, ChosenPolicy, GuestNet, NetHost, NetPolicy, NetPool, Publish,
};
use forkd_store::NetRecord;
use forkd_vmm::snapshot::LoadedSnapshot;

/// Networking for the children: each in its own network namespace behind NAT, egress denied
/// unless allowed.
#[derive(Args, Debug, Default, Clone)]
pub struct NetOptions {
    /// Give every child a network: its tap in a namespace of its own, reached from the host
    /// through a veth pair and NAT (the snapshot needs a network device). Egress is denied
    /// unless --allow / --allow-dns open it. Implied by --allow, --allow-dns and --publish.
    #[arg(long)]
    pub net: bool,
    /// Let the children reach CIDR (an address is a /32), on PORT only when given (TCP and
    /// UDP); repeatable.
    #[arg(long = "allow", value_name = "CIDR[:PORT]")]
    pub allow: Vec<String>,
    /// Let the children reach the host's resolvers (TCP and UDP port 53).
    #[arg(long)]
    pub allow_dns: bool,
    /// Forward the host's TCP port HOST_PORT to the child's GUEST_PORT (one child only);
    /// repeatable.
    #[arg(long = "publish", value_name = "HOST_PORT:GUEST_PORT")]
    pub publish: Vec<String>,
}

impl NetOptions {
    /// The --allow values, parsed (checked before any work: a bad value is a one-line error
    /// naming it). Taken as strings so clap's multi-line usage error is not what users see.
    pub fn allows(&self) -> Result<Vec<Allow>> {
        Ok(self
            .allow
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, net::ParseError>>()?)
    }

    pub fn publishes(&self) -> Result<Vec<Publish>> {
        Ok(self
            .publish
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, net::ParseError>>()?)
    }

    /// Checks every value, so a bad one fails the command before it loads anything.
    pub fn validate(&self) -> Result<()> {
        self.allows()?;
        self.publishes()?;
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.net || !self.allow.is_empty() || self.allow_dns || !self.publish.is_empty()
    }

    /// Whether these options set a policy of their own (else a snapshot's recorded one
    /// applies).
    fn sets_policy(&self) -> bool {
        !self.allow.is_empty() || self.allow_dns
    }

    /// The policy of their own these options set, in the words of a manifest (None: they
    /// set none).
    pub fn own_policy(&self) -> Option<NetRecord> {
        self.sets_policy().then(|| NetRecord {
            allow: self.allow.clone(),
            allow_dns: self.allow_dns,
        })
    }

    /// The policy a snapshot taken with these options records (None: egress denied).
    pub fn record(&self) -> Result<Option<NetRecord>> {
        self.validate()?;
        Ok(self.own_policy())
    }

    /// The policy children of `loaded` get (see [`net::policy_for`]); a recorded policy
    /// left closed is said on stderr.
    fn effective_policy(&self, loaded: &LoadedSnapshot) -> Result<ChosenPolicy> {
        self.validate()?;
        let m = loaded.manifest();
        let pulled_as = (!m.name.is_empty()).then_some(m.name.as_str());
        let chosen = net::policy_for(self.own_policy().as_ref(), m.net.as_ref(), pulled_as)
            .with_context(|| format!("the network policy recorded in {}", loaded.tag()))?;
        if let Some(note) = &chosen.note {
            eprintln!("forkd: {}{note}", loaded.tag());
        }
        Ok(chosen)
    }

    /// The children's networks for indices `0..n`, prepared ahead of the fork: with --net
    /// (or --allow, --allow-dns, --publish), and always for a snapshot with a network device
    /// (each child's tap needs a namespace of its own). None otherwise. Networks a killed
    /// forkd left behind are swept first.
    pub fn prepare(&self, loaded: &LoadedSnapshot, n: usize) -> Result<Option<NetPool>> {
        let device = loaded.state().devices.net.as_ref();
        if !self.enabled() && device.is_none() {
            return Ok(None);
        }
        let publish = self.publishes()?;
        if !self.publish.is_empty() && n != 1 {
            bail!("--publish forwards a host port to one child; use it with -n 1");
        }
        let Some(device) = device else {
            bail!(
                "--net: snapshot {} has no network device (boot it with a tap, e.g. forkd vm run --net-tap)",
                loaded.tag()
            );
        };
        let chosen = self.effective_policy(loaded)?;
        let host = NetHost::from_env()?;
        if let Err(e) = net::sweep(&host) {
            tracing::warn!("sweeping networks left by dead forkd processes: {e}");
        }
        // The resolvers are the host's: the snapshot's resolv.conf (forkd.dns= at its boot)
        // names the same ones when it was taken on this host.
        let policy = chosen.net_policy();
        let mut pool = NetPool::new(host, GuestNet::standard(&device.tap), policy)
            .context("preparing the children's networks")?;
        pool.prepare(0..n)
            .context("preparing the children's networks")?;
        if !publish.is_empty() {
            pool.publish(0, &publish).context("--publish")?;
        }
        Ok(Some(pool))
    }
}

/// The parent's network for `forkd snapshot --net`: one namespace set up like a child's (its
/// tap `tap0` behind 10.0.2.1, the policy of --allow / --allow-dns), and the kernel command
/// line arguments that configure the guest's interface (and resolvers) as it boots.
pub fn boot_network(opts: &NetOptions) -> Result<(NetPool, String)> {
    if !opts.publish.is_empty() {
        bail!("--publish applies to running children (forkd fork --hold, forkd run), not to a snapshot");
    }
    let host = NetHost::from_env()?;
    if let Err(e) = net::sweep(&host) {
        tracing::warn!("sweeping networks left by dead forkd processes: {e}");
    }
    let dns = if opts.allow_dns {
        net::host_resolvers()
    } else {
        Vec::new()
    };
    let guest = GuestNet::standard("tap0");
    let mut args = guest.kernel_ip_arg();
    if !dns.is_empty() {
        let list: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
        args.push_str(&format!(" forkd.dns={}", list.join(",")));
    }
    let policy = NetPolicy {
        allow: opts.allows()?,
        allow_dns: opts.allow_dns,
        dns,
    };
    let mut pool = NetPool::new(host, guest, policy).context("preparing the parent's network")?;
    pool.prepare(0..1)
        .context("preparing the parent's network")?;
    Ok((pool, args))
}

#[derive(Args)]
pub struct NetArgs {
    #[command(subcommand)]
    what: NetCommand,
}

#[derive(Subcommand)]
enum NetCommand {
    /// Remove the networks (namespaces, veths, taps, published ports) of forkd processes that
    /// died without removing them, and the host's forkd table once unused.
    Sweep,
}

pub fn run(args: NetArgs) -> Result<ExitCode> {
    match args.what {
        NetCommand::Sweep => {
            let host = NetHost::from_env()?;
            let removed = net::sweep(&host).context("sweeping networks")?;
            println!(
                "removed {} namespace(s){}",
                removed.netns.len(),
                if removed.table {
                    " and the host's forkd table"
                } else {
                    ""
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_set_a_policy_of_their_own_only_with_allow_or_allow_dns() {
        let net_only = NetOptions {
            net: true,
            ..NetOptions::default()
        };
        assert_eq!(net_only.own_policy(), None, "--net alone sets no policy");
        let dns = NetOptions {
            allow_dns: true,
            ..NetOptions::default()
        };
        assert_eq!(
            dns.own_policy(),
            Some(NetRecord {
                allow: Vec::new(),
                allow_dns: true
            }),
            "--allow-dns alone replaces the recorded policy"
        );
        let allow = NetOptions {
            allow: vec!["10.7.0.1".into()],
            ..NetOptions::default()
        };
        assert_eq!(allow.own_policy().unwrap().allow, ["10.7.0.1"]);
    }
}
