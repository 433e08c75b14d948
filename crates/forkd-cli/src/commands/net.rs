//! Networking options of `forkd fork` and `forkd run` (`--net`, `--allow`, `--allow-dns`,
//! `--publish`), and `forkd net sweep`.

use std::net::Ipv4Addr;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use forkd_sandbox::net::{self, Allow, GuestNet, NetHost, NetPolicy, NetPool, Publish};
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

    /// The policy a snapshot taken with these options records (None: egress denied).
    pub fn record(&self) -> Result<Option<NetRecord>> {
        self.validate()?;
        Ok(self.sets_policy().then(|| NetRecord {
            allow: self.allow.clone(),
            allow_dns: self.allow_dns,
        }))
    }

    /// The policy children of `loaded` get (see [`policy_for`]); a recorded policy left
    /// closed is said on stderr.
    fn effective_policy(&self, loaded: &LoadedSnapshot) -> Result<(Vec<Allow>, bool)> {
        let m = loaded.manifest();
        let pulled_as = (!m.name.is_empty()).then_some(m.name.as_str());
        let chosen = policy_for(self, m.net.as_ref(), pulled_as)
            .with_context(|| format!("the network policy recorded in {}", loaded.tag()))?;
        if let Some(note) = chosen.note {
            eprintln!("forkd: {}{note}", loaded.tag());
        }
        Ok((chosen.allow, chosen.allow_dns))
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
        let (allow, allow_dns) = self.effective_policy(loaded)?;
        let host = NetHost::from_env()?;
        if let Err(e) = net::sweep(&host) {
            tracing::warn!("sweeping networks left by dead forkd processes: {e}");
        }
        // The resolvers are the host's: the snapshot's resolv.conf (forkd.dns= at its boot)
        // names the same ones when it was taken on this host.
        let policy = NetPolicy {
            allow,
            allow_dns,
            dns: if allow_dns {
                host_resolvers()
            } else {
                Vec::new()
            },
        };
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

/// The egress a fork's children get, and what to tell the user about it.
#[derive(Debug, PartialEq)]
struct ChosenPolicy {
    allow: Vec<Allow>,
    allow_dns: bool,
    /// Said after the snapshot's tag when a recorded policy is not applied.
    note: Option<String>,
}

/// The options' policy when they set one; else the one the snapshot recorded when it was
/// taken on this host. A pulled snapshot's recorded policy is its publisher's wish, not the
/// user's: it is named, not applied.
fn policy_for(
    opts: &NetOptions,
    recorded: Option<&NetRecord>,
    pulled_as: Option<&str>,
) -> Result<ChosenPolicy> {
    let own = || -> Result<ChosenPolicy> {
        Ok(ChosenPolicy {
            allow: opts.allows()?,
            allow_dns: opts.allow_dns,
            note: None,
        })
    };
    let Some(recorded) = recorded.filter(|_| !opts.sets_policy()) else {
        return own();
    };
    if let Some(package) = pulled_as {
        return Ok(ChosenPolicy {
            note: Some(format!(
                " (pulled as {package}) was taken with {}: its children's egress stays denied unless you pass them",
                recorded.as_options()
            )),
            ..own()?
        });
    }
    Ok(ChosenPolicy {
        allow: recorded
            .allow
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, net::ParseError>>()?,
        allow_dns: recorded.allow_dns,
        note: None,
    })
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
        host_resolvers()
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

/// The host's IPv4 nameservers a child can reach (loopback ones, e.g. systemd-resolved's
/// 127.0.0.53, are the host's own services and stay closed).
fn host_resolvers() -> Vec<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
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

    fn opts(allow: &[&str], allow_dns: bool) -> NetOptions {
        NetOptions {
            allow: allow.iter().map(|a| a.to_string()).collect(),
            allow_dns,
            ..NetOptions::default()
        }
    }

    fn allows(list: &[&str]) -> Vec<Allow> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_recorded_policy_applies_unless_the_fork_sets_one_or_the_snapshot_was_pulled() {
        let recorded = NetRecord {
            allow: vec!["10.9.0.0/16:8080".into()],
            allow_dns: true,
        };
        assert_eq!(
            recorded.as_options(),
            "--allow 10.9.0.0/16:8080 --allow-dns"
        );
        // Local snapshot, no options: what it was taken with.
        let chosen = policy_for(&opts(&[], false), Some(&recorded), None).unwrap();
        assert_eq!(chosen.allow, allows(&["10.9.0.0/16:8080"]));
        assert!(chosen.allow_dns && chosen.note.is_none());
        // --net alone sets no policy either.
        let net_only = NetOptions {
            net: true,
            ..NetOptions::default()
        };
        assert_eq!(
            policy_for(&net_only, Some(&recorded), None).unwrap().allow,
            allows(&["10.9.0.0/16:8080"])
        );
        // The fork's own options replace it (not add to it).
        let chosen = policy_for(&opts(&["10.7.0.1"], false), Some(&recorded), None).unwrap();
        assert_eq!(chosen.allow, allows(&["10.7.0.1"]));
        assert!(!chosen.allow_dns);
        let chosen = policy_for(&opts(&[], true), Some(&recorded), None).unwrap();
        assert!(chosen.allow.is_empty() && chosen.allow_dns);
        // Pulled: named, not applied.
        let chosen = policy_for(&opts(&[], false), Some(&recorded), Some("acme/agent")).unwrap();
        assert!(chosen.allow.is_empty() && !chosen.allow_dns);
        let note = chosen.note.unwrap();
        assert!(
            note.contains("acme/agent") && note.contains("--allow 10.9.0.0/16:8080 --allow-dns"),
            "{note}"
        );
        // Nothing recorded: the options, or nothing.
        assert_eq!(
            policy_for(&opts(&[], false), None, None).unwrap(),
            ChosenPolicy {
                allow: Vec::new(),
                allow_dns: false,
                note: None
            }
        );
    }

    #[test]
    fn a_malformed_recorded_policy_is_an_error_not_an_open_door() {
        let recorded = NetRecord {
            allow: vec!["everything".into()],
            allow_dns: false,
        };
        let err = policy_for(&opts(&[], false), Some(&recorded), None).unwrap_err();
        assert!(err.to_string().contains("everything"), "{err}");
    }
}
