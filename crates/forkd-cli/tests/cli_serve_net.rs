//! Daemon sandboxes with networks: a real `forkd serve` forks the freestanding net guest's
//! snapshot; each sandbox gets its own namespace with its policy and published ports, the
//! host reaches it, bad requests are refused in one line and leave nothing, and a network
//! lives exactly as long as its sandbox's VMM process — across a daemon killed with SIGKILL,
//! and swept by the next daemon once its zygote (and so its sandboxes) died.
//!
//! "The host" is a namespace of the test's own (`FORKD_NET_HOST_NETNS`): nothing on the real
//! host changes.

mod common;

use std::path::Path;

use common::net::{
    host_veths, namespaces_of, net_lab, net_snapshot, nft_list, owners, pings, wait_ended,
    SweepAfter,
};
use common::{assert_error, create, ids, zygote_pids, Daemon, ZygoteReaper};
use forkd_test_support::http::request;
use serde_json::{json, Value};

const RANGE: &str = "10.214.0.0/24";

/// What each test stands on: "the host" and the boot namespaces of its own, a data directory
/// with the net guest snapshotted as `tag` (recording `--allow 10.9.0.0/16:8080`), and, when it
/// ends, its zygotes stopped and whatever forkd left in "the host" swept (fields drop in order).
struct Lab {
    _sweep: SweepAfter,
    _zygotes: ZygoteReaper,
    home: tempfile::TempDir,
    host_ns: String,
    _namespaces: common::net::Namespaces,
}

impl Lab {
    /// None after a SKIP line where the test cannot run.
    fn set_up(test: &str, suffix: &str, tag: &str) -> Option<Lab> {
        let pid = std::process::id();
        let (host_ns, boot_ns) = (
            format!("forkdt-{pid}-{suffix}host"),
            format!("forkdt-{pid}-{suffix}boot"),
        );
        let namespaces = net_lab(test, &[host_ns.clone(), boot_ns.clone()])?;
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        net_snapshot(
            h,
            &boot_ns,
            tag,
            forkd_store::NetRecord {
                allow: vec!["10.9.0.0/16:8080".into()],
                allow_dns: false,
            },
        );
        Some(Lab {
            _sweep: SweepAfter {
                home: h.to_path_buf(),
                host_ns: host_ns.clone(),
                range: RANGE,
            },
            _zygotes: ZygoteReaper(h.to_path_buf()),
            home,
            host_ns,
            _namespaces: namespaces,
        })
    }
}

fn start(home: &Path, host_ns: &str) -> Daemon {
    Daemon::start_with_env(
        home,
        &["--warm", "1"],
        &[
            ("FORKD_NET_HOST_NETNS", host_ns),
            ("FORKD_NET_RANGE", RANGE),
        ],
    )
}

fn created(daemon: &Daemon, body: Value) -> Value {
    let made = create(daemon, body);
    assert_eq!(made.status, 201, "{}", made.text());
    made.json()["sandboxes"][0].clone()
}

/// Warm shells of `tag`'s zygote, once it has refilled its pool: asking for them goes
/// through the zygote, which answers after the refill its last spawn started.
fn warm_shells(daemon: &Daemon, tag: &str) -> usize {
    let metrics = daemon.get("/metrics").text();
    let line = format!("forkd_warm_shells{{tag=\"{tag}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |n| n.trim().parse().unwrap())
}

fn delete(daemon: &Daemon, id: &str) {
    let gone = request(
        &daemon.unix(),
        "DELETE",
        &format!("/v1/sandboxes/{id}"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(gone.status, 200, "{}", gone.text());
}

/// The DNAT rules of `host_ns`'s forkd table (its `prerouting` chain), one per line.
fn host_dnat(host_ns: &str) -> Vec<String> {
    nft_list(host_ns, &["chain", "inet", "forkd", "prerouting"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("dnat"))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn daemon_sandboxes_get_networks_that_live_exactly_as_long_as_their_vmm() {
    let test = "daemon_sandboxes_get_networks_that_live_exactly_as_long_as_their_vmm";
    let Some(lab) = Lab::set_up(test, "dn", "netd") else {
        return;
    };
    let (h, host_ns) = (lab.home.path(), lab.host_ns.clone());
    common::snapshot_demo(h, "plain");
    let mut daemon = start(h, &host_ns);

    // A policy of its own and a published port.
    let a = created(
        &daemon,
        json!({"tag": "netd", "network": {
            "allow": ["10.1.2.0/24:443"], "allow_dns": false, "publish": ["18080:8080"]}}),
    );
    let a_id = a["id"].as_str().unwrap().to_string();
    let a_pid = a["pid"].as_i64().unwrap() as i32;
    let net = &a["network"];
    let a_ns = net["namespace"].as_str().unwrap().to_string();
    assert!(
        a_ns.starts_with(&format!("forkd-{a_pid}-")),
        "named after its own VMM process {a_pid}: {net}"
    );
    let a_addr = net["address"].as_str().unwrap().to_string();
    assert!(a_addr.starts_with("10.214.0."), "{net}");
    assert_eq!(net["guest_address"], "10.0.2.15");
    assert_eq!(net["allow"], json!(["10.1.2.0/24:443"]));
    assert_eq!(net["allow_dns"], false);
    assert_eq!(net["publish"], json!(["18080:8080"]));
    assert_eq!(
        daemon.get(&format!("/v1/sandboxes/{a_id}")).json()["network"],
        *net,
        "the record shows its network"
    );
    let rules = nft_list(&a_ns, &["table", "inet", "forkd"]).unwrap();
    assert!(
        rules.contains("10.1.2.0/24") && rules.contains("dport 443"),
        "{rules}"
    );
    assert!(
        !rules.contains("10.9.0.0/16"),
        "its own policy replaces the snapshot's: {rules}"
    );
    assert!(
        host_dnat(&host_ns)
            .iter()
            .any(|r| r.contains(&format!("tcp dport 18080 dnat ip to {a_addr}:8080"))),
        "{:?}",
        host_dnat(&host_ns)
    );
    assert!(
        pings(&host_ns, &a_addr),
        "the host reaches its guest at {a_addr}"
    );

    // No network section: the snapshot's recorded policy.
    let b = created(&daemon, json!({"tag": "netd"}));
    let b_id = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["network"]["allow"], json!(["10.9.0.0/16:8080"]));
    assert_eq!(b["network"]["publish"], json!([]));
    let b_ns = b["network"]["namespace"].as_str().unwrap().to_string();
    let rules = nft_list(&b_ns, &["table", "inet", "forkd"]).unwrap();
    assert!(rules.contains("10.9.0.0/16"), "{rules}");
    assert_ne!(a_ns, b_ns);

    // A sandbox with a port, deleted: its network and its port go with it.
    let c = created(
        &daemon,
        json!({"tag": "netd", "network": {"publish": ["18081:80"]}}),
    );
    let c_id = c["id"].as_str().unwrap().to_string();
    let c_ns = c["network"]["namespace"].as_str().unwrap().to_string();
    let warm = warm_shells(&daemon, "netd");
    assert_eq!(warm, 1);
    assert_eq!(
        namespaces_of(h, &[]).len(),
        3 + warm,
        "three sandboxes and a warm shell: {:?} of {:?}",
        namespaces_of(h, &[]),
        std::fs::read_dir("/run/netns")
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );
    assert_eq!(host_veths(&host_ns).len(), 3 + warm);
    delete(&daemon, &c_id);
    assert!(!namespaces_of(h, &[]).contains(&c_ns), "{c_ns} is left");
    assert_eq!(host_veths(&host_ns).len(), 2 + warm);
    assert!(
        !host_dnat(&host_ns).iter().any(|r| r.contains("18081")),
        "{:?}",
        host_dnat(&host_ns)
    );

    // `forkd spawn` says the same in the CLI's words; `forkd kill` removes its network.
    let cli = |args: &[&str]| {
        let out = common::forkd_command(h)
            .env("FORKD_HOST", &daemon.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let spawned: Value = serde_json::from_str(&cli(&[
        "spawn",
        "--tag",
        "netd",
        "--allow",
        "10.3.0.0/16:22",
        "--allow-dns",
        "--publish",
        "18085:80",
        "--json",
    ]))
    .unwrap();
    let d = &spawned["sandboxes"][0];
    assert_eq!(d["network"]["allow"], json!(["10.3.0.0/16:22"]), "{d}");
    assert_eq!(d["network"]["allow_dns"], true);
    assert_eq!(d["network"]["publish"], json!(["18085:80"]));
    let d_ns = d["network"]["namespace"].as_str().unwrap().to_string();
    let rules = nft_list(&d_ns, &["table", "inet", "forkd"]).unwrap();
    assert!(
        rules.contains("10.3.0.0/16") && rules.contains("dport 53"),
        "{rules}"
    );
    cli(&["kill", d["id"].as_str().unwrap()]);
    assert!(!namespaces_of(h, &[]).contains(&d_ns), "{d_ns} is left");
    assert!(!host_dnat(&host_ns).iter().any(|r| r.contains("18085")));

    // Bad requests: one line naming the value, nothing made or left.
    // (A warm shell a refused spawn took is replaced: counted, not named.)
    let left = || {
        (
            namespaces_of(h, &[]).len(),
            host_veths(&host_ns).len(),
            host_dnat(&host_ns),
        )
    };
    let before = left();
    let message = assert_error(
        &create(
            &daemon,
            json!({"tag": "netd", "network": {"allow": ["10.0.0.0/33"]}}),
        ),
        400,
        "bad_request",
    );
    assert!(
        message.contains("network.allow \"10.0.0.0/33\"") && message.contains("prefix length"),
        "{message}"
    );
    let message = assert_error(
        &create(
            &daemon,
            json!({"tag": "netd", "network": {"publish": ["8080"]}}),
        ),
        400,
        "bad_request",
    );
    assert!(message.contains("network.publish \"8080\""), "{message}");
    let message = assert_error(
        &create(
            &daemon,
            json!({"tag": "netd", "count": 2, "network": {"publish": ["18082:80"]}}),
        ),
        400,
        "bad_request",
    );
    assert!(message.contains("one sandbox"), "{message}");
    let message = assert_error(
        &create(
            &daemon,
            json!({"tag": "netd", "network": {"publish": ["18080:80"]}}),
        ),
        409,
        "port_taken",
    );
    assert!(
        message.contains("18080") && message.contains(&a_id),
        "{message}"
    );
    let message = assert_error(
        &create(
            &daemon,
            json!({"tag": "plain", "network": {"allow_dns": true}}),
        ),
        422,
        "no_network_device",
    );
    assert!(message.contains("plain"), "{message}");
    // A port published on this host by something the daemon does not know (another forkd):
    // the zygote finds it in the host's table.
    common::net::ip(&[
        "netns",
        "exec",
        &host_ns,
        "nft",
        "add",
        "rule",
        "inet",
        "forkd",
        "prerouting",
        "tcp",
        "dport",
        "18090",
        "dnat",
        "ip",
        "to",
        "10.214.0.250:80",
    ])
    .unwrap();
    let message = assert_error(
        &create(
            &daemon,
            json!({"tag": "netd", "network": {"publish": ["18090:80"]}}),
        ),
        409,
        "port_taken",
    );
    assert!(message.contains("18090"), "{message}");
    let listing = common::net::ip(&[
        "netns",
        "exec",
        &host_ns,
        "nft",
        "-a",
        "list",
        "chain",
        "inet",
        "forkd",
        "prerouting",
    ])
    .unwrap();
    let handle = listing
        .lines()
        .find(|l| l.contains("dport 18090"))
        .and_then(|l| l.rsplit_once("# handle "))
        .map(|(_, h)| h.trim().to_string())
        .expect("the outsider's rule");
    common::net::ip(&[
        "netns",
        "exec",
        &host_ns,
        "nft",
        "delete",
        "rule",
        "inet",
        "forkd",
        "prerouting",
        "handle",
        &handle,
    ])
    .unwrap();
    assert_eq!(warm_shells(&daemon, "netd"), warm, "the pool refilled");
    assert_eq!(left(), before, "refused requests leave nothing");
    assert_eq!(ids(&daemon.get("/v1/sandboxes").json()), {
        let mut v = vec![a_id.clone(), b_id.clone()];
        v.sort();
        v
    });

    // The daemon dies (SIGKILL): the sandboxes and their networks live on, and the next
    // daemon's sweep leaves them alone.
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let alive = namespaces_of(h, &[]);
    assert!(alive.contains(&a_ns) && alive.contains(&b_ns), "{alive:?}");
    let daemon = start(h, &host_ns);
    assert_eq!(
        daemon.get(&format!("/v1/sandboxes/{a_id}")).json()["network"],
        *net,
        "re-adopted with its network"
    );
    assert_eq!(
        namespaces_of(h, &[]),
        alive,
        "the restart swept no live network"
    );
    assert_eq!(host_veths(&host_ns).len(), 2 + warm);
    assert!(host_dnat(&host_ns).iter().any(|r| r.contains("18080")));
    assert!(
        pings(&host_ns, &a_addr),
        "its guest still answers at {a_addr}"
    );

    // A BRANCH records its policy; its children get it.
    let branched = common::post_json(
        &daemon,
        &format!("/v1/sandboxes/{a_id}/branch"),
        r#"{"tag": "a-branch"}"#,
    );
    assert_eq!(branched.status, 201, "{}", branched.text());
    let inspect = common::forkd(h, &["inspect", "a-branch"]);
    let inspect = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.contains("net policy:     --allow 10.1.2.0/24:443"),
        "{inspect}"
    );

    // Paused: its process, network and port go; resumed: it has them again, in a namespace
    // named after its new VMM process.
    let paused = common::post_json(&daemon, &format!("/v1/sandboxes/{a_id}/pause"), "");
    assert_eq!(paused.status, 200, "{}", paused.text());
    let record = paused.json();
    assert!(record["network"]["address"].is_null(), "{record}");
    assert_eq!(record["network"]["publish"], json!(["18080:8080"]));
    assert!(!namespaces_of(h, &[]).contains(&a_ns));
    assert!(!host_dnat(&host_ns).iter().any(|r| r.contains("18080")));
    let resumed = common::post_json(&daemon, &format!("/v1/sandboxes/{a_id}/resume"), "");
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    let record = resumed.json();
    let a_pid = record["pid"].as_i64().unwrap();
    let net = &record["network"];
    let a_ns = net["namespace"].as_str().unwrap().to_string();
    assert!(a_ns.starts_with(&format!("forkd-{a_pid}-")), "{net}");
    assert_eq!(net["allow"], json!(["10.1.2.0/24:443"]));
    let a_addr = net["address"].as_str().unwrap().to_string();
    let rules = nft_list(&a_ns, &["table", "inet", "forkd"]).unwrap();
    assert!(
        rules.contains("10.1.2.0/24") && !rules.contains("10.9.0.0/16"),
        "{rules}"
    );
    assert!(
        host_dnat(&host_ns)
            .iter()
            .any(|r| r.contains(&format!("tcp dport 18080 dnat ip to {a_addr}:8080"))),
        "{:?}",
        host_dnat(&host_ns)
    );
    assert!(
        pings(&host_ns, &a_addr),
        "the resumed guest answers at {a_addr}"
    );

    // A sandbox's VMM process killed (SIGKILL) while the daemon runs: its zygote reaps it
    // and its network goes with it.
    let b_pid = b["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on sandbox B's VMM process, which this test's daemon started.
    unsafe { libc::kill(b_pid, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while namespaces_of(h, &[b_pid]).contains(&b_ns) {
        assert!(
            std::time::Instant::now() < deadline,
            "{b_ns} outlives its VMM process"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(warm_shells(&daemon, "netd"), warm);
    assert_eq!(
        host_veths(&host_ns).len(),
        1 + warm,
        "A's and the warm shell's"
    );

    // Its zygote dies too (SIGKILL), and with it every sandbox and warm shell: their
    // networks stay until the next daemon starts and sweeps them.
    let mut daemon = daemon;
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let zygotes = zygote_pids(h);
    let mut dead = owners(&namespaces_of(h, &[]));
    dead.extend(&zygotes);
    for z in &zygotes {
        // SAFETY: kill(2) on the zygote processes this test's daemon started.
        unsafe { libc::kill(*z, libc::SIGKILL) };
    }
    // Dead, not just dying: a sweep leaves the network of a process still exiting.
    wait_ended(&dead);
    assert_eq!(namespaces_of(h, &dead).len(), 1 + warm, "left by the dead");
    let daemon = start(h, &host_ns);
    assert_eq!(
        namespaces_of(h, &dead),
        Vec::<String>::new(),
        "swept at start"
    );
    assert_eq!(host_veths(&host_ns), Vec::<String>::new());
    assert!(
        nft_list(&host_ns, &["table", "inet", "forkd"]).is_none(),
        "the host's table goes with the last network"
    );
    assert!(ids(&daemon.get("/v1/sandboxes").json()).is_empty());
}

/// A daemon that keeps no shell warm leaves nothing of forkd's on the host once its last
/// sandbox is deleted (its zygote holds no network then, and drops the host's table); and
/// E2B's `allow_internet_access: false` closes a sandbox's egress while `true` (E2B's
/// default) keeps its snapshot's policy.
#[test]
fn without_warm_shells_nothing_is_left_and_e2b_can_close_egress() {
    let test = "without_warm_shells_nothing_is_left_and_e2b_can_close_egress";
    let Some(lab) = Lab::set_up(test, "dz", "netz") else {
        return;
    };
    let (h, host_ns) = (lab.home.path(), lab.host_ns.clone());
    let daemon = Daemon::start_with_env(
        h,
        &["--warm", "0", "--listen", "127.0.0.1:0"],
        &[
            ("FORKD_NET_HOST_NETNS", host_ns.as_str()),
            ("FORKD_NET_RANGE", RANGE),
        ],
    );
    let e2b = forkd_test_support::http::Endpoint::Tcp(daemon.tcp.expect("a TCP listener"));
    let e2b_create = |internet: bool| {
        let made = request(
            &e2b,
            "POST",
            "/v2/sandboxes",
            &[
                ("Content-Type", "application/json"),
                ("X-API-Key", "e2b_0123456789abcdef"),
            ],
            json!({"templateID": "netz", "allow_internet_access": internet})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(made.status, 201, "{}", made.text());
        let id = made.json()["sandboxID"].as_str().unwrap().to_string();
        daemon.get(&format!("/v1/sandboxes/{id}")).json()
    };
    let closed = e2b_create(false);
    let net = &closed["network"];
    assert_eq!(net["allow"], json!([]), "{closed}");
    assert_eq!(net["allow_dns"], false);
    let rules = nft_list(
        net["namespace"].as_str().unwrap(),
        &["table", "inet", "forkd"],
    )
    .unwrap();
    assert!(!rules.contains("10.9.0.0/16"), "{rules}");
    let open = e2b_create(true);
    assert_eq!(
        open["network"]["allow"],
        json!(["10.9.0.0/16:8080"]),
        "{open}"
    );
    let made = created(
        &daemon,
        json!({"tag": "netz", "network": {"publish": ["18095:80"]}}),
    );
    assert_eq!(
        namespaces_of(h, &[]).len(),
        3,
        "one network per sandbox, none warm"
    );
    assert_eq!(host_veths(&host_ns).len(), 3);

    for s in [&closed, &open, &made] {
        delete(&daemon, s["id"].as_str().unwrap());
    }
    assert_eq!(namespaces_of(h, &[]), Vec::<String>::new());
    assert_eq!(host_veths(&host_ns), Vec::<String>::new());
    assert!(
        nft_list(&host_ns, &["table", "inet", "forkd"]).is_none(),
        "the host's table goes with the last network"
    );
}
