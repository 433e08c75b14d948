//! Networking helpers of the CLI tests: namespaces a test creates, the net test guest's
//! snapshot, and what is left of forkd's networks.

use std::path::Path;

/// Network namespaces a test creates, deleted when dropped (also on a failed assertion).
pub struct Namespaces(pub Vec<String>);

impl Namespaces {
    pub fn create(names: &[String]) -> Result<Namespaces, String> {
        let mut made = Namespaces(Vec::new());
        for n in names {
            let _ = ip(&["netns", "del", n]);
            ip(&["netns", "add", n])?;
            made.0.push(n.clone());
        }
        Ok(made)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The net test guest booted on `tap0` in `ns`, snapshotted as `tag` into `home`'s store
/// with `policy` recorded (what `forkd snapshot --net --allow ...` records).
pub fn net_snapshot(home: &Path, ns: &str, tag: &str, policy: forkd_store::NetRecord) {
    use forkd_vmm::devices::virtio::{NetConfig, VirtioConfig};
    use forkd_vmm::snapshot::{AfterSnapshot, Machine, SnapshotMode};
    use forkd_vmm::{KernelSource, SerialOutput, SharedBuffer, VmConfig};
    ip(&["-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]).unwrap();
    ip(&["-n", ns, "link", "set", "tap0", "up"]).unwrap();
    let serial = SharedBuffer::new();
    let mut config = VmConfig::new(KernelSource::parse("builtin:net").unwrap());
    config.mem_mib = 32;
    config.serial = SerialOutput::Buffer(serial.clone());
    let virtio = VirtioConfig {
        net: Some(NetConfig::new("tap0")),
        ..VirtioConfig::default()
    };
    let ns = ns.to_string();
    // Booted in a thread of its own so that only that thread enters the namespace.
    let mut m = std::thread::spawn(move || {
        let _inside = forkd_sandbox::net::NetnsGuard::enter(&ns).unwrap();
        Machine::boot(&config, &virtio).expect("boot the net guest")
    })
    .join()
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !serial.text().contains("READY net") {
        assert!(
            std::time::Instant::now() < deadline,
            "no READY net: {}",
            serial.text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    m.set_net_policy(Some(policy));
    let store = forkd_store::Store::open(home).unwrap();
    let tag = forkd_store::Tag::parse(tag).unwrap();
    m.snapshot(&store, &tag, SnapshotMode::Full, AfterSnapshot::StayPaused)
        .unwrap();
    m.stop();
}

/// Why a networking test cannot run here (None: it can): no KVM, no tun, no network
/// namespaces or nftables. `names` are the namespaces it would create (they are made and
/// returned).
pub fn net_lab(test: &str, names: &[String]) -> Option<Namespaces> {
    if !forkd_test_support::kvm_available(test) {
        return None;
    }
    if !Path::new("/dev/net/tun").exists() {
        forkd_test_support::skip(test, "/dev/net/tun does not exist");
        return None;
    }
    let made = match Namespaces::create(names) {
        Ok(n) => n,
        Err(e) => {
            forkd_test_support::skip(test, format!("no network namespaces here: {e}"));
            return None;
        }
    };
    if let Err(e) = ip(&["netns", "exec", &names[0], "nft", "list", "tables"]) {
        forkd_test_support::skip(test, format!("nftables does not work here: {e}"));
        return None;
    }
    Some(made)
}

/// forkd's network namespaces (`forkd-<owner pid>-<seq>`) whose owner is a process of the
/// data directory `home` (a daemon's zygote or one of its sandboxes: their command lines
/// name it), or whose owner is dead and is in `dead` (pids the test knew).
pub fn namespaces_of(home: &Path, dead: &[i32]) -> Vec<String> {
    let home = home.to_string_lossy().into_owned();
    let mut out: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| {
                    let Some(pid) = name
                        .strip_prefix("forkd-")
                        .and_then(|r| r.split('-').next())
                        .and_then(|p| p.parse::<i32>().ok())
                    else {
                        return false;
                    };
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    String::from_utf8_lossy(&cmdline).contains(&home) || dead.contains(&pid)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The host ends of children's veths in `host_ns`.
pub fn host_veths(host_ns: &str) -> Vec<String> {
    let mut out: Vec<String> = ip(&["-n", host_ns, "-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("forkdv"))
        .collect();
    out.sort();
    out
}

/// `nft list ...` in namespace `ns` (None when it fails: no such table or chain).
pub fn nft_list(ns: &str, what: &[&str]) -> Option<String> {
    let mut args = vec!["netns", "exec", ns, "nft", "list"];
    args.extend(what);
    ip(&args).ok()
}

/// One ICMP echo from `ns` to `to` is answered (busybox's ping, waiting up to 20 s).
pub fn pings(ns: &str, to: &str) -> bool {
    std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "20", to,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet): what a sweep
/// counts as a dead owner.
pub fn ended(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, None | Some("Z" | "X"))
}

/// Waits (up to 20 s) until every process of `pids` has ended; panics otherwise.
pub fn wait_ended(pids: &[i32]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while let Some(alive) = pids.iter().find(|p| !ended(**p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {alive} outlives SIGKILL"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The owner pids of `names` (`forkd-<pid>-<seq>`).
pub fn owners(names: &[String]) -> Vec<i32> {
    names
        .iter()
        .filter_map(|n| n.split('-').nth(1)?.parse().ok())
        .collect()
}

/// When dropped, kills the zygotes of `home` (and so their sandboxes) and sweeps the networks
/// they leave, so that a test that fails midway leaves nothing. Declare it after the
/// [`super::ZygoteReaper`] (it is dropped first) and before the daemon.
pub struct SweepAfter {
    pub home: std::path::PathBuf,
    pub host_ns: String,
    pub range: &'static str,
}

impl Drop for SweepAfter {
    fn drop(&mut self) {
        let zygotes = super::zygote_pids(&self.home);
        let mut pids = owners(&namespaces_of(&self.home, &[]));
        pids.extend(&zygotes);
        for z in zygotes {
            // SAFETY: kill(2) on a zygote of this test's own data directory.
            unsafe { libc::kill(z, libc::SIGKILL) };
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while pids.iter().any(|p| !ended(*p)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let host = forkd_sandbox::net::NetHost {
            range: self.range.parse().expect("a range"),
            netns: Some(self.host_ns.clone()),
        };
        let _ = forkd_sandbox::net::sweep(&host);
    }
}
