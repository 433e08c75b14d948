//! Which egress policy a child gets: its own when it sets one (`forkd fork --allow`, a
//! sandbox's `network.allow`), else the one its snapshot recorded when it was taken on this
//! host. One rule for `forkd fork`/`run` and the daemon's sandboxes.

use std::net::Ipv4Addr;

use forkd_store::NetRecord;

use super::{Allow, NetPolicy, ParseError};

/// The egress a child gets, and what to tell its user about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenPolicy {
    pub allow: Vec<Allow>,
    pub allow_dns: bool,
    /// Said after the snapshot's tag when a recorded policy is not applied.
    pub note: Option<String>,
}

impl ChosenPolicy {
    /// The policy as nftables rules need it: DNS opens the host's resolvers.
    pub fn net_policy(&self) -> NetPolicy {
        NetPolicy {
            allow: self.allow.clone(),
            allow_dns: self.allow_dns,
            dns: if self.allow_dns {
                host_resolvers()
            } else {
                Vec::new()
            },
        }
    }

    /// The policy in the words of the options (as a manifest records it).
    pub fn record(&self) -> NetRecord {
        NetRecord {
            allow: self.allow.iter().map(|a| a.to_string()).collect(),
            allow_dns: self.allow_dns,
        }
    }
}

/// Parses `--allow` values (`CIDR[:PORT]`); the first bad one is the error.
pub fn parse_allows(values: &[String]) -> Result<Vec<Allow>, ParseError> {
    values.iter().map(|a| a.parse()).collect()
}

/// `own` when it is given (it replaces the recorded policy, it does not add to it); else
/// the policy `recorded` in the snapshot when it was taken on this host. A pulled snapshot's
/// (`pulled_as` its package) recorded policy is its publisher's wish, not the user's: it is
/// named in the note, not applied, and egress stays denied.
pub fn policy_for(
    own: Option<&NetRecord>,
    recorded: Option<&NetRecord>,
    pulled_as: Option<&str>,
) -> Result<ChosenPolicy, ParseError> {
    let chosen = |r: &NetRecord| -> Result<ChosenPolicy, ParseError> {
        Ok(ChosenPolicy {
            allow: parse_allows(&r.allow)?,
            allow_dns: r.allow_dns,
            note: None,
        })
    };
    if let Some(own) = own {
        return chosen(own);
    }
    let Some(recorded) = recorded else {
        return chosen(&NetRecord::default());
    };
    if let Some(package) = pulled_as {
        return Ok(ChosenPolicy {
            note: Some(format!(
                " (pulled as {package}) was taken with {}: its children's egress stays denied unless you pass them",
                recorded.as_options()
            )),
            ..chosen(&NetRecord::default())?
        });
    }
    chosen(recorded)
}

/// The host's IPv4 nameservers a child can reach (loopback ones, e.g. systemd-resolved's
/// 127.0.0.53, are the host's own services and stay closed).
pub fn host_resolvers() -> Vec<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(allow: &[&str], allow_dns: bool) -> NetRecord {
        NetRecord {
            allow: allow.iter().map(|a| a.to_string()).collect(),
            allow_dns,
        }
    }

    fn allows(list: &[&str]) -> Vec<Allow> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_recorded_policy_applies_unless_replaced_or_pulled() {
        let recorded = own(&["10.9.0.0/16:8080"], true);
        // Local snapshot, nothing of its own: what it was taken with.
        let chosen = policy_for(None, Some(&recorded), None).unwrap();
        assert_eq!(chosen.allow, allows(&["10.9.0.0/16:8080"]));
        assert!(chosen.allow_dns && chosen.note.is_none());
        assert_eq!(chosen.record(), recorded);
        // Its own replaces it (not adds to it), an empty one included.
        let chosen = policy_for(Some(&own(&["10.7.0.1"], false)), Some(&recorded), None).unwrap();
        assert_eq!(chosen.allow, allows(&["10.7.0.1"]));
        assert!(!chosen.allow_dns);
        let chosen = policy_for(Some(&own(&[], false)), Some(&recorded), None).unwrap();
        assert!(chosen.allow.is_empty() && !chosen.allow_dns);
        // Pulled: named, not applied.
        let chosen = policy_for(None, Some(&recorded), Some("acme/agent")).unwrap();
        assert!(chosen.allow.is_empty() && !chosen.allow_dns);
        let note = chosen.note.unwrap();
        assert!(
            note.contains("acme/agent") && note.contains("--allow 10.9.0.0/16:8080 --allow-dns"),
            "{note}"
        );
        // A pulled snapshot with a policy of the user's own: that one, no note.
        let chosen = policy_for(
            Some(&own(&["10.7.0.1"], false)),
            Some(&recorded),
            Some("a/b"),
        )
        .unwrap();
        assert!(chosen.note.is_none());
        // Nothing recorded and nothing of its own: egress denied.
        let chosen = policy_for(None, None, None).unwrap();
        assert!(chosen.allow.is_empty() && !chosen.allow_dns && chosen.note.is_none());
    }

    #[test]
    fn a_malformed_recorded_policy_is_an_error_not_an_open_door() {
        let err = policy_for(None, Some(&own(&["everything"], false)), None).unwrap_err();
        assert!(err.to_string().contains("everything"), "{err}");
    }
}
