//! `--allow CIDR[:PORT]`, `--publish HOST_PORT:GUEST_PORT` and the address range: parsed into
//! values, or a one-line error naming the input and what is wrong with it.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::{Allow, Publish};

/// An IPv4 network: an address and a prefix length. The address is kept as given; `network`
/// is its masked form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value:?}: {why}")]
pub struct ParseError {
    pub flag: &'static str,
    pub value: String,
    pub why: String,
}

fn bad(flag: &'static str, value: &str, why: impl Into<String>) -> ParseError {
    ParseError {
        flag,
        value: value.to_string(),
        why: why.into(),
    }
}

impl Ipv4Cidr {
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// Whether `other` lies entirely inside this network.
    pub fn contains(&self, other: &Ipv4Cidr) -> bool {
        other.prefix >= self.prefix
            && u32::from(other.addr) & self.mask() == u32::from(self.network())
    }

    /// Parses `a.b.c.d/n` or a bare address (a /32); `flag` names the option in errors.
    fn parse_for(flag: &'static str, whole: &str, s: &str) -> Result<Ipv4Cidr, ParseError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| bad(flag, whole, format!("{addr:?} is not an IPv4 address")))?;
        let prefix = match prefix {
            None => 32,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= 32 => n,
                _ => return Err(bad(flag, whole, format!("prefix length {p:?} is not 0-32"))),
            },
        };
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ipv4Cidr::parse_for("address", s, s)
    }
}

fn port(flag: &'static str, whole: &str, p: &str) -> Result<u16, ParseError> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(bad(flag, whole, format!("port {p:?} is not 1-65535"))),
    }
}

impl FromStr for Allow {
    type Err = ParseError;
    /// `CIDR[:PORT]`, e.g. `203.0.113.0/24`, `198.51.100.7:443`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, p) = match s.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        };
        if net.is_empty() {
            return Err(bad(
                "--allow",
                s,
                "expected CIDR[:PORT], e.g. 10.0.0.0/8:443",
            ));
        }
        Ok(Allow {
            net: Ipv4Cidr::parse_for("--allow", s, net)?,
            port: p.map(|p| port("--allow", s, p)).transpose()?,
        })
    }
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.net),
            None => write!(f, "{}", self.net),
        }
    }
}

impl FromStr for Publish {
    type Err = ParseError;
    /// `HOST_PORT:GUEST_PORT`, e.g. `8080:80`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((h, g)) = s.split_once(':') else {
            return Err(bad(
                "--publish",
                s,
                "expected HOST_PORT:GUEST_PORT, e.g. 8080:80",
            ));
        };
        Ok(Publish {
            host_port: port("--publish", s, h)?,
            guest_port: port("--publish", s, g)?,
        })
    }
}

/// The children's address range: a network of /30 slots, at least one (prefix 0-30).
pub fn range(s: &str) -> Result<Ipv4Cidr, ParseError> {
    let cidr = Ipv4Cidr::parse_for("FORKD_NET_RANGE", s, s)?;
    if cidr.prefix > 30 || !s.contains('/') {
        return Err(bad(
            "FORKD_NET_RANGE",
            s,
            "needs a network with room for a /30, e.g. 10.200.0.0/16",
        ));
    }
    Ok(Ipv4Cidr {
        addr: cidr.network(),
        prefix: cidr.prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_values_parse() {
        let a: Allow = "10.1.2.0/24:443".parse().unwrap();
        assert_eq!(a.net.to_string(), "10.1.2.0/24");
        assert_eq!(a.port, Some(443));
        let a: Allow = "192.0.2.7".parse().unwrap();
        assert_eq!((a.net.prefix, a.port), (32, None));
        assert_eq!(a.to_string(), "192.0.2.7/32");
    }

    #[test]
    fn bad_allow_values_name_the_value_in_one_line() {
        for (v, why) in [
            ("10.0.0.0/33", "prefix length \"33\" is not 0-32"),
            ("example.com:80", "\"example.com\" is not an IPv4 address"),
            ("10.0.0.1:0", "port \"0\" is not 1-65535"),
            ("10.0.0.1:http", "port \"http\" is not 1-65535"),
            (":80", "expected CIDR[:PORT]"),
            ("", "expected CIDR[:PORT]"),
        ] {
            let e = v.parse::<Allow>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("--allow {v:?}: ")), "{e}");
            assert!(e.contains(why), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn publish_values_parse_and_bad_ones_are_named() {
        let p: Publish = "8080:80".parse().unwrap();
        assert_eq!((p.host_port, p.guest_port), (8080, 80));
        for v in ["8080", "8080:", "x:80", "70000:80", "80:0", "1:2:3"] {
            let e = v.parse::<Publish>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("--publish {v:?}: ")), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn ranges_need_room_for_a_slot() {
        assert_eq!(range("10.200.7.9/16").unwrap().to_string(), "10.200.0.0/16");
        assert!(range("10.200.0.0/31").is_err());
        assert!(range("10.200.0.0").is_err());
        let e = range("banana").unwrap_err().to_string();
        assert!(e.starts_with("FORKD_NET_RANGE \"banana\""), "{e}");
    }

    #[test]
    fn containment() {
        let meta: Ipv4Cidr = "169.254.0.0/16".parse().unwrap();
        assert!(meta.contains(&"169.254.169.254".parse().unwrap()));
        assert!(!meta.contains(&"0.0.0.0/0".parse().unwrap()));
        assert!(!meta.contains(&"10.0.0.1".parse().unwrap()));
    }
}
