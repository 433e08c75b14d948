//! The nftables rulesets, as text for one `nft -f -` each.

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::{GuestNet, Ipv4Cidr, NetHost, NetPolicy, Publish, HOST_VETH_PREFIX, NS_VETH, TABLE};

/// What happens to the guest's traffic that the policy does not allow: an ICMP (or TCP reset)
/// answer that makes the guest's connect fail at once.
const REFUSE: &str = "reject with icmpx type admin-prohibited";

/// Ranges a child never reaches unless an `--allow` falls inside them: the metadata range,
/// loopback, and the children's own range (siblings and the host's ends of their veths).
fn protected(host: &NetHost) -> Vec<Ipv4Cidr> {
    vec![
        Ipv4Cidr {
            addr: Ipv4Addr::new(169, 254, 0, 0),
            prefix: 16,
        },
        Ipv4Cidr {
            addr: Ipv4Addr::new(127, 0, 0, 0),
            prefix: 8,
        },
        host.range,
    ]
}

/// The child's namespace: 1:1 NAT between its address (`ns_addr`) and the guest, egress
/// dropped unless the policy allows it, nothing reaching the namespace's own stack (the
/// guest's attempts, e.g. at the namespace's address, are refused at once). Every
/// verdict on the guest's traffic counts its packets (`nft list ruleset` in the namespace
/// shows what was allowed and refused).
pub fn child(host: &NetHost, guest: &GuestNet, policy: &NetPolicy, ns_addr: Ipv4Addr) -> String {
    let from_guest = format!("iifname \"{}\" oifname \"{NS_VETH}\"", guest.tap);
    let mut fwd = String::new();
    let protected = protected(host);
    let inside = |a: &super::Allow| protected.iter().any(|p| p.contains(&a.net));
    // Allows that name a protected range come before its drop; the rest after.
    for a in policy.allow.iter().filter(|a| inside(a)) {
        allow_rule(&mut fwd, &from_guest, a);
    }
    // Refused, not dropped: a denied connection fails at once instead of timing out.
    for p in &protected {
        let _ = writeln!(fwd, "    {from_guest} ip daddr {p} counter {REFUSE}");
    }
    if policy.allow_dns {
        let to = match policy.dns.as_slice() {
            [] => String::new(),
            dns => format!(
                " ip daddr {{ {} }}",
                dns.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let _ = writeln!(
            fwd,
            "    {from_guest}{to} meta l4proto {{ tcp, udp }} th dport 53 counter accept"
        );
    }
    for a in policy.allow.iter().filter(|a| !inside(a)) {
        allow_rule(&mut fwd, &from_guest, a);
    }
    let _ = writeln!(fwd, "    iifname \"{}\" counter {REFUSE}", guest.tap);
    format!(
        "table inet {TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{NS_VETH}\" ip daddr {ns_addr} dnat ip to {guest_ip}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{NS_VETH}\" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"{NS_VETH}\" oifname \"{tap}\" ip daddr {guest_ip} counter accept
{fwd}  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iif lo accept
    ct state established,related accept
    iifname \"{tap}\" counter {REFUSE}
  }}
}}
",
        guest_ip = guest.guest,
        tap = guest.tap,
    )
}

fn allow_rule(out: &mut String, from_guest: &str, a: &super::Allow) {
    let port = a
        .port
        .map(|p| format!(" meta l4proto {{ tcp, udp }} th dport {p}"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "    {from_guest} ip daddr {}{port} counter accept",
        a.net
    );
}

/// The host side, shared by every child: children never reach each other nor the host's own
/// services (only replies to what the host started come back in), and their traffic leaving
/// the host is masqueraded. Published ports are added to `prerouting`/`output` per child.
/// `add` is idempotent: the table is declared only when it does not exist yet (the caller
/// holds the host lock).
pub fn host(host: &NetHost) -> String {
    let v = format!("\"{HOST_VETH_PREFIX}*\"");
    format!(
        "table inet {TABLE} {{
  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
    iifname {v} oifname {v} drop
  }}
  chain input {{
    type filter hook input priority filter - 5; policy accept;
    iifname {v} ct state established,related accept
    iifname {v} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {range} oifname != {v} masquerade
    oifname {v} ip saddr 127.0.0.0/8 masquerade
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
  }}
}}
",
        range = host.range
    )
}

/// The comment that marks a child's published-port rules on the host, so they can be found
/// and deleted with it (or by a sweep).
pub fn publish_comment(host_veth: &str) -> String {
    host_veth.to_string()
}

/// Rules forwarding the host's ports to a child's address (the namespace DNATs on to the
/// guest). Connections to any of the host's own addresses are forwarded, loopback included.
pub fn publish(host_veth: &str, ns_addr: Ipv4Addr, ports: &[Publish]) -> String {
    let mut s = String::new();
    let comment = publish_comment(host_veth);
    for p in ports {
        for chain in ["prerouting", "output"] {
            let _ = writeln!(
                s,
                "add rule inet {TABLE} {chain} fib daddr type local tcp dport {} dnat ip to {ns_addr}:{} comment \"{comment}\"",
                p.host_port, p.guest_port
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{parse, Allow};

    fn host() -> NetHost {
        NetHost {
            range: parse::range("10.200.0.0/16").unwrap(),
            netns: None,
        }
    }

    #[test]
    fn child_rules_drop_protected_ranges_before_general_allows() {
        let policy = NetPolicy {
            allow: vec![
                "0.0.0.0/0".parse::<Allow>().unwrap(),
                "169.254.169.254:80".parse().unwrap(),
            ],
            allow_dns: true,
            dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
        };
        let g = GuestNet::standard("tap0");
        let r = child(&host(), &g, &policy, Ipv4Addr::new(10, 200, 0, 2));
        let pos = |needle: &str| r.find(needle).unwrap_or_else(|| panic!("{needle} in {r}"));
        assert!(
            pos("169.254.169.254/32 meta l4proto { tcp, udp } th dport 80 counter accept")
                < pos("169.254.0.0/16 counter reject")
        );
        assert!(pos("10.200.0.0/16 counter reject") < pos("0.0.0.0/0 counter accept"));
        assert!(pos("127.0.0.0/8 counter reject") < pos("0.0.0.0/0 counter accept"));
        assert!(r.contains(
            "ip daddr { 192.0.2.53 } meta l4proto { tcp, udp } th dport 53 counter accept"
        ));
        assert!(r.contains("ip daddr 10.200.0.2 dnat ip to 10.0.2.15"));
    }

    #[test]
    fn without_allows_only_replies_and_inbound_pass() {
        let g = GuestNet::standard("tap0");
        let r = child(
            &host(),
            &g,
            &NetPolicy::default(),
            Ipv4Addr::new(10, 200, 0, 2),
        );
        assert!(!r.contains(" accept\n    iifname \"tap0\" oifname \"forkd0\" ip daddr 0"));
        assert!(!r.contains("th dport 53"));
        assert!(r.contains("policy drop"));
    }

    #[test]
    fn kernel_ip_argument() {
        assert_eq!(
            GuestNet::standard("tap0").kernel_ip_arg(),
            "ip=10.0.2.15::10.0.2.1:255.255.255.0::eth0:off"
        );
    }
}
