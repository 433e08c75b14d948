//! The host side's shared table, and the sweep that removes what a dead owner left behind
//! (a parent killed with `kill -9` cannot remove its children's namespaces).

use std::fs::File;
use std::os::fd::AsRawFd;

use super::cmd::{self, run, NETNS_DIR};
use super::{rules, NetError, NetHost, HOST_VETH_PREFIX, NETNS_PREFIX, NS_VETH, TABLE};

/// What a sweep removed, or what is left (for tests that count leaks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub netns: Vec<String>,
    pub host_veths: Vec<String>,
    /// The host side's `forkd` table exists.
    pub table: bool,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.host_veths.is_empty() && !self.table
    }
}

/// A host-wide lock around changes to the shared table (its creation and removal), so one
/// process does not delete it while another is adding a child.
pub(super) struct HostLock {
    _file: File,
}

impl HostLock {
    pub(super) fn take(host: &NetHost) -> Result<HostLock, NetError> {
        let name = host.netns.as_deref().unwrap_or("host");
        let path = format!("/run/forkd-net-{name}.lock");
        let f = File::create(&path).map_err(|source| NetError::Spawn {
            what: format!("creating {path}"),
            source,
        })?;
        // SAFETY: flock takes an fd we own for the duration of the call, and an integer.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(NetError::Spawn {
                what: format!("locking {path}"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(HostLock { _file: f })
    }
}

fn table_exists(host: &NetHost) -> bool {
    run(
        host.netns.as_deref(),
        "nft",
        &["list", "table", "inet", TABLE],
        None,
    )
    .is_ok()
}

/// Makes sure the host side is ready: forwarding on, the shared `forkd` table present.
pub fn ensure_host(host: &NetHost) -> Result<(), NetError> {
    for tool in ["ip", "nft"] {
        if run(None, tool, &["-V"], None).is_err() {
            return Err(NetError::Missing(format!(
                "`{tool}` is not installed (Debian: apt-get install {})",
                if tool == "ip" { "iproute2" } else { "nftables" }
            )));
        }
    }
    let _lock = HostLock::take(host)?;
    cmd::ipv4_sysctl(host.netns.as_deref(), "ip_forward", "1")?;
    ensure_table(host)
}

/// Creates the host's shared table unless it exists (the caller holds the host lock).
pub(super) fn ensure_table(host: &NetHost) -> Result<(), NetError> {
    if !table_exists(host) {
        run(
            host.netns.as_deref(),
            "nft",
            &["-f", "-"],
            Some(&rules::host(host)),
        )?;
    }
    Ok(())
}

/// The host ports published to children on `host` (the rules of its `prerouting` chain).
pub(super) fn published_ports(host: &NetHost) -> Vec<u16> {
    let Ok(listing) = run(
        host.netns.as_deref(),
        "nft",
        &["list", "chain", "inet", TABLE, "prerouting"],
        None,
    ) else {
        return Vec::new();
    };
    listing
        .lines()
        .filter_map(|l| l.split_once("tcp dport ")?.1.split_whitespace().next())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Removes the shared table when no child's veth is left on the host side.
pub fn remove_host_table_if_unused(host: &NetHost) {
    let Ok(_lock) = HostLock::take(host) else {
        return;
    };
    match host_veths(host) {
        Ok(v) if v.is_empty() && table_exists(host) => {
            if let Err(e) = run(
                host.netns.as_deref(),
                "nft",
                &["delete", "table", "inet", TABLE],
                None,
            ) {
                tracing::warn!("removing the host's {TABLE} table: {e}");
            }
        }
        _ => {}
    }
}

/// The `forkdv*` links on the host side.
pub fn host_veths(host: &NetHost) -> Result<Vec<String>, NetError> {
    let out = run(host.netns.as_deref(), "ip", &["-o", "link", "show"], None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with(HOST_VETH_PREFIX))
        .collect())
}

/// Namespaces named `forkd-<pid>-<seq>`, with their owner's pid.
fn forkd_namespaces() -> Vec<(String, i32)> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            let rest = name.strip_prefix(NETNS_PREFIX)?;
            let (pid, seq) = rest.split_once('-')?;
            seq.parse::<u32>().ok()?;
            Some((name.clone(), pid.parse().ok()?))
        })
        .collect()
}

/// Whether process `pid` still runs. A zombie does not: it has ended, and only waits for its
/// parent to reap it (a zygote reaps its sandboxes only while a daemon talks to it).
fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists; it takes integers.
    let r = unsafe { libc::kill(pid, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // The state follows the command name, which is in parentheses and may hold anything.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

/// Deletes a published child's rules from the host's table (by their comment).
pub fn unpublish(host_ns: Option<&str>, veth: &str) {
    let marker = format!("comment \"{}\"", rules::publish_comment(veth));
    for chain in ["prerouting", "output"] {
        let Ok(listing) = run(
            host_ns,
            "nft",
            &["-a", "list", "chain", "inet", TABLE, chain],
            None,
        ) else {
            continue;
        };
        for handle in listing
            .lines()
            .filter(|l| l.contains(&marker))
            .filter_map(|l| {
                l.rsplit_once("# handle ")
                    .map(|(_, h)| h.trim().to_string())
            })
        {
            let _ = run(
                host_ns,
                "nft",
                &["delete", "rule", "inet", TABLE, chain, "handle", &handle],
                None,
            );
        }
    }
}

/// Removes the namespaces whose owner process is dead (their veth pairs and taps with them),
/// published rules of children that are gone, and the host's table once unused. Returns
/// what it removed. The owner is the process a network was handed to
/// ([`super::ChildNet::set_owner`]: a daemon sandbox's VMM process), else the one that made
/// it.
pub fn sweep(host: &NetHost) -> Result<Leftovers, NetError> {
    let mut removed = Leftovers::default();
    for (name, pid) in forkd_namespaces() {
        if alive(pid) {
            continue;
        }
        // Deleting the namespace end removes the pair at once; a namespace left to the
        // kernel's cleanup would take its veth with it only later.
        let _ = run(Some(&name), "ip", &["link", "del", NS_VETH], None);
        match run(None, "ip", &["netns", "del", &name], None) {
            Ok(_) => removed.netns.push(name),
            // Removed (or renamed) by someone else meanwhile.
            Err(_) if !std::path::Path::new(NETNS_DIR).join(&name).exists() => {}
            Err(e) => return Err(e),
        }
    }
    {
        // Under the lock: a child claiming a slot and publishing holds it too.
        let _lock = HostLock::take(host)?;
        let veths = host_veths(host)?;
        if table_exists(host) {
            for chain_rule in published_veths(host) {
                if !veths.contains(&chain_rule) {
                    unpublish(host.netns.as_deref(), &chain_rule);
                    removed.host_veths.push(chain_rule);
                }
            }
        }
    }
    let had_table = table_exists(host);
    remove_host_table_if_unused(host);
    removed.table = had_table && !table_exists(host);
    Ok(removed)
}

/// Veth names that published rules on the host refer to.
fn published_veths(host: &NetHost) -> Vec<String> {
    let mut out = Vec::new();
    for chain in ["prerouting", "output"] {
        let Ok(listing) = run(
            host.netns.as_deref(),
            "nft",
            &["list", "chain", "inet", TABLE, chain],
            None,
        ) else {
            continue;
        };
        for l in listing.lines() {
            if let Some((_, c)) = l.split_once("comment \"") {
                let name = c.trim_end_matches('"').to_string();
                if name.starts_with(HOST_VETH_PREFIX) && !out.contains(&name) {
                    out.push(name);
                }
            }
        }
    }
    out
}

/// What is left on `host` (and in namespaces owned by `owner`, or by anyone when None).
pub fn leftovers(host: &NetHost, owner: Option<i32>) -> Leftovers {
    Leftovers {
        netns: forkd_namespaces()
            .into_iter()
            .filter(|(_, pid)| owner.is_none_or(|o| o == *pid))
            .map(|(n, _)| n)
            .collect(),
        host_veths: host_veths(host).unwrap_or_default(),
        table: table_exists(host),
    }
}
