//! Networking options as a user meets them: a malformed --allow or --publish is one line
//! naming the value and what is wrong with it, before anything is loaded or created.

mod common;

use common::forkd;
use common::net::{ip, net_snapshot, Namespaces};

fn one_line_naming(args: &[&str], needles: &[&str]) {
    let home = tempfile::tempdir().unwrap();
    let out = forkd(home.path(), args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

#[test]
fn malformed_allow_and_publish_values_are_named_in_one_line() {
    one_line_naming(
        &["fork", "--tag", "t", "--allow", "10.0.0.0/33"],
        &[
            "--allow \"10.0.0.0/33\"",
            "prefix length \"33\" is not 0-32",
        ],
    );
    one_line_naming(
        &["fork", "--tag", "t", "--allow", "10.0.0.1:http"],
        &["--allow \"10.0.0.1:http\"", "port \"http\" is not 1-65535"],
    );
    one_line_naming(
        &["fork", "--tag", "t", "--hold", "--publish", "8080"],
        &["--publish \"8080\"", "expected HOST_PORT:GUEST_PORT"],
    );
    one_line_naming(
        &["run", "--tag", "t", "--publish", "80:0", "--", "true"],
        &["--publish \"80:0\"", "port \"0\" is not 1-65535"],
    );
    one_line_naming(
        &["spawn", "--tag", "t", "--allow", "10.0.0.0/33"],
        &[
            "--allow \"10.0.0.0/33\"",
            "prefix length \"33\" is not 0-32",
        ],
    );
    one_line_naming(
        &["spawn", "--tag", "t", "-n", "2", "--publish", "8080:80"],
        &["--publish forwards a host port to one sandbox"],
    );
    one_line_naming(
        &[
            "snapshot",
            "--tag",
            "t",
            "--kernel",
            "builtin:net",
            "--allow",
            "example.com",
        ],
        &["--allow \"example.com\"", "is not an IPv4 address"],
    );
}

/// `forkd fork --hold ARGS` until it holds its children; then the egress rules of each
/// child's namespace, and the children stopped (SIGINT) with nothing of them left.
fn held_children_rules(
    home: &std::path::Path,
    host_ns: &str,
    args: &[&str],
) -> (Vec<String>, String) {
    use std::io::BufRead;
    let mut child = common::forkd_command(home)
        .env("FORKD_NET_HOST_NETNS", host_ns)
        .env("FORKD_NET_RANGE", "10.213.0.0/24")
        .args(["fork", "--hold"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("fork {args:?} ended before holding: {said}");
        }
        said.push_str(&line);
        if line.starts_with("holding ") {
            break;
        }
    }
    let prefix = format!("forkd-{pid}-");
    let mine = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let rules: Vec<String> = mine()
        .iter()
        .map(|ns| ip(&["netns", "exec", ns, "nft", "list", "table", "inet", "forkd"]).unwrap())
        .collect();
    // SAFETY: kill sends a signal to the forkd process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    std::io::Read::read_to_string(&mut stderr, &mut said).unwrap();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut said).unwrap();
    assert!(
        status.success(),
        "fork {args:?} after Ctrl-C: {status}: {said}"
    );
    assert_eq!(
        mine(),
        Vec::<String>::new(),
        "namespaces left after fork {args:?}"
    );
    (rules, said)
}

#[test]
fn a_snapshots_recorded_policy_is_what_its_children_get_unless_overridden_or_pulled() {
    let test = "a_snapshots_recorded_policy_is_what_its_children_get_unless_overridden_or_pulled";
    if !forkd_test_support::kvm_available(test) {
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return forkd_test_support::skip(test, "/dev/net/tun does not exist");
    }
    let pid = std::process::id();
    let (host_ns, boot_ns) = (
        format!("forkdt-{pid}-polhost"),
        format!("forkdt-{pid}-polboot"),
    );
    let _namespaces = match Namespaces::create(&[host_ns.clone(), boot_ns.clone()]) {
        Ok(n) => n,
        Err(e) => {
            return forkd_test_support::skip(test, format!("no network namespaces here: {e}"))
        }
    };
    if let Err(e) = ip(&["netns", "exec", &host_ns, "nft", "list", "tables"]) {
        return forkd_test_support::skip(test, format!("nftables does not work here: {e}"));
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    net_snapshot(
        h,
        &boot_ns,
        "netpol",
        forkd_store::NetRecord {
            allow: vec!["10.9.0.0/16:8080".into()],
            allow_dns: false,
        },
    );
    let inspect = String::from_utf8_lossy(&forkd(h, &["inspect", "netpol"]).stdout).into_owned();
    assert!(
        inspect.contains("net policy:     --allow 10.9.0.0/16:8080"),
        "{inspect}"
    );

    // No networking option: a snapshot with a network device gives every child a network,
    // and the policy it recorded.
    let (rules, _) = held_children_rules(h, &host_ns, &["--tag", "netpol", "-n", "2"]);
    assert_eq!(rules.len(), 2, "one namespace per child");
    for r in &rules {
        assert!(r.contains("10.9.0.0/16") && r.contains("8080"), "{r}");
    }

    // The fork's own --allow replaces it.
    let (rules, _) = held_children_rules(
        h,
        &host_ns,
        &["--tag", "netpol", "-n", "1", "--allow", "10.7.0.1"],
    );
    assert!(
        rules[0].contains("10.7.0.1") && !rules[0].contains("10.9.0.0/16"),
        "{}",
        rules[0]
    );

    // A snapshot pulled from a hub: its publisher's policy is named, not applied.
    let manifest = h.join("snapshots/netpol/manifest.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replacen("[net]", "name = \"acme/netpol\"\n\n[net]", 1),
    )
    .unwrap();
    let (rules, said) = held_children_rules(h, &host_ns, &["--tag", "netpol", "-n", "1"]);
    assert!(!rules[0].contains("10.9.0.0/16"), "{}", rules[0]);
    assert!(
        said.contains("netpol (pulled as acme/netpol) was taken with --allow 10.9.0.0/16:8080"),
        "{said}"
    );
}
