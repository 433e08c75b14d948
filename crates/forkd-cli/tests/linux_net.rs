//! Linux children with networking, end to end through the real `forkd` binary (lab only, like
//! linux_e2e.rs: every test lives in `mod linux_guest`; on a PVM host it prints one SKIP line,
//! with FORKD_LINUX_PREPARE=1 it only fetches the kernel and builds the image).
//!
//! The parent is snapshotted with `--net` (its interface configured from ip= as it boots);
//! ten children are forked at once with `--net --allow 10.201.0.2/32:8000`, each in its own
//! namespace, and each fetches a page from an allowed server while a server that is not
//! allowed, the host's own services, the metadata address and every sibling's address are
//! refused at once (ICMP administratively prohibited: "No route to host", not a timeout).
//! Then one child serves a page with busybox httpd on a port published to the host, which
//! fetches it on loopback and on another of its addresses. After each fork no namespace,
//! veth (the taps live in the namespaces) or nftables table of forkd's is left.
//!
//! The children's range is a /26 (16 slots), so a guest can name every possible sibling.
//! When something fails, the message carries the child's own view (addresses, routes,
//! neighbours, interface counters) and the host's (rulesets with counters of the child
//! namespaces seen during the fork, links, forwarding).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_test_support::skip;
use forkd_vmm::host::KvmFlavour;
use serde_json::Value;

const CHILDREN: usize = 10;
/// The children's addresses: 16 /30 slots, few enough for a guest to try every sibling.
const RANGE: &str = "10.200.0.0/26";
const SLOTS: u32 = 16;
/// The host port published to a child's port 8080.
const PUBLISHED: u16 = 18080;

fn forkd_cmd(home: &Path) -> Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cmd = common::forkd_command(home);
    cmd.env("FORKD_RECIPES", root.join("recipes"))
        .env("FORKD_NET_RANGE", RANGE)
        .env_remove("FORKD_NET_HOST_NETNS")
        .current_dir(root);
    cmd
}

fn forkd(home: &Path, args: &[&str]) -> Output {
    forkd_cmd(home).args(args).output().expect("run forkd")
}

fn flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// `forkd ARGS --json` for a preparation step, or None after a SKIP line (outside the lab).
fn prepared(test: &str, home: &Path, args: &[&str]) -> Option<Value> {
    let out = forkd(home, args);
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(
            !flag("FORKD_IN_LAB") && !flag("FORKD_LINUX_PREPARE"),
            "{test}: {args:?}: {why}"
        );
        skip(test, format!("{args:?} failed: {why}"));
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("JSON"))
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace hanging off the host (`net.1` on the host, `net.2` inside) serving one line
/// over HTTP on port 8000; removed on drop.
struct Server {
    ns: String,
    veth: String,
}

impl Server {
    fn start(tag: &str, net: &str, body: &'static str) -> Server {
        let ns = format!("forkdt-{}-{tag}", std::process::id());
        let veth = format!("forkdt{tag}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        let server = Server { ns, veth };
        let (ns, veth) = (server.ns.clone(), server.veth.clone());
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{net}.1/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{net}.2/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("{net}.1"),
        ]);
        let addr = format!("{net}.2:8000");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            forkd_sandbox::net::enter_netns(&ns).expect("server namespace");
            let listener = TcpListener::bind(&addr).expect("bind the server");
            tx.send(()).unwrap();
            serve(listener, body);
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("server listening");
        server
    }
}

fn serve(listener: TcpListener, body: &'static str) {
    for mut conn in listener.incoming().flatten() {
        let mut buf = [0u8; 1024];
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = conn.read(&mut buf);
        let _ = write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// Run in every child. Each child serves on 8080 (for its siblings to be refused), then:
/// `ok` the allowed server, `denied` a server not allowed, `host` the host's own service on
/// an address outside the range, `meta` the metadata address, `siblings` every slot's child
/// address on 8080 and host end on 8001 that was not refused by the policy (empty when all
/// were). A refusal must be the policy's ("No route to host"); anything else is listed.
/// busybox wget has no -T here: Debian's busybox-static 1.35 wget crashes (SIGSEGV) with it.
const SCRIPT: &str = r#"
mkdir -p /tmp/www && echo forkd-sibling > /tmp/www/index.html
busybox httpd -p 8080 -h /tmp/www </dev/null >/dev/null 2>&1
get() {
    out=$(busybox timeout 120 busybox wget -q -O - "$1" 2>&1) && echo "$out" && return
    echo "refused($(echo "$out" | tail -n 1))"
}
probe() {
    r=$(busybox timeout 30 busybox nc -w 20 "$1" "$2" </dev/null 2>&1)
    case "$r" in *"No route to host"*) ;; *) bad="$bad $1:$2=[$r]" ;; esac
}
ok=$(get http://10.201.0.2:8000/)
denied=$(get http://10.202.0.2:8000/)
host=$(get http://10.201.0.1:8001/)
meta=$(get http://169.254.169.254/)
bad=
i=0
while [ $i -lt SLOTS ]; do
    probe 10.200.0.$((4 * i + 2)) 8080
    probe 10.200.0.$((4 * i + 1)) 8001
    i=$((i + 1))
done
addr=$(ip -4 -o addr show eth0 | grep -o 'inet [0-9./]*' | cut -d' ' -f2)
echo "ok=$ok denied=$denied host=$host meta=$meta siblings=[$bad] addr=$addr"
case "$ok" in
    forkd-net-ok) ;;
    *)
        echo "--- the child's view"
        ip addr; ip route; ip neigh
        cat /proc/net/dev
        grep -E '^(Ip|Icmp|Tcp):' /proc/net/snmp
        busybox timeout 10 busybox ping -c 2 -W 2 10.0.2.1 2>&1
        dmesg | tail -n 20
        ;;
esac
"#;

/// The forkd-owned namespaces, host veths and host table left on the host.
fn leftovers() -> String {
    let host = forkd_sandbox::net::NetHost {
        range: RANGE.parse().expect("range"),
        netns: None,
    };
    let left = forkd_sandbox::net::leftovers(&host, None);
    if left.is_empty() {
        String::new()
    } else {
        format!("{left:?}")
    }
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_else(|e| format!("{cmd}: {e}"));
    format!("$ {cmd}\n{out}")
}

/// The host's side of the children's networks, seen while a fork runs: each child
/// namespace's links, neighbours and ruleset (with the policy's counters), the last look
/// at each of the first two kept, plus the host's own state at the end.
struct Watcher {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start() -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut names: Vec<String> = std::fs::read_dir("/run/netns")
                    .map(|d| {
                        d.flatten()
                            .filter_map(|e| e.file_name().into_string().ok())
                            .filter(|n| n.starts_with("forkd-"))
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                for ns in names.iter().take(2) {
                    let look = sh(&format!(
                        "ip -n {ns} -s link; ip -n {ns} addr; ip -n {ns} neigh; ip netns exec {ns} nft list ruleset"
                    ));
                    let mut seen = v.lock().unwrap();
                    if let Some(entry) = seen.iter_mut().find(|(n, _)| n == ns) {
                        entry.1 = look;
                    } else if seen.len() < 2 {
                        seen.push((ns.clone(), look));
                    }
                }
                std::thread::sleep(Duration::from_millis(1500));
            }
        });
        Watcher {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Everything seen, and the host's state now.
    fn report(mut self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut out = String::from("--- the host's view\n");
        for (ns, look) in self.seen.lock().unwrap().iter() {
            out.push_str(&format!(
                "namespace {ns} (last look during the fork):\n{look}\n"
            ));
        }
        out.push_str(&sh(
            "cat /proc/sys/net/ipv4/ip_forward; ip -s link; ip route; nft list ruleset; grep -E '^(nf|nft|x_|ip_|veth|tun)' /proc/modules | cut -d' ' -f1 | tr '\n' ' '",
        ));
        out
    }
}

/// The value of `key=` in a child's line: up to ` next=`.
fn field<'a>(line: &'a str, key: &str, next: &str) -> Option<&'a str> {
    let rest = line.split_once(&format!("{key}="))?.1;
    Some(rest.split_once(&format!(" {next}="))?.0)
}

/// GET / from `addr`, retried for up to `patience` (the published port comes up with the
/// child); the whole response or the last error.
fn http_get(addr: SocketAddr, patience: Duration) -> Result<String, String> {
    http_get_path(addr, "/", patience)
}

/// The host's own resolvers as `--allow-dns` opens them: its resolv.conf's nameservers that
/// are not loopback addresses.
fn host_nameservers() -> Vec<String> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(str::trim)
        .filter(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .map(str::to_string)
        .collect()
}

/// GET `path` from `addr`, like [`http_get`].
fn http_get_path(addr: SocketAddr, path: &str, patience: Duration) -> Result<String, String> {
    let deadline = Instant::now() + patience;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if !body.is_empty() => return Ok(body),
            Ok(_) if Instant::now() < deadline => {}
            Err(_) if Instant::now() < deadline => {}
            Ok(_) => return Err("empty response".into()),
            Err(e) => return Err(e.to_string()),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A fresh data directory holding the minimal image snapshotted with `--net` as `tag` (its
/// interface configured from ip= as it boots), with no forkd network on the host before or
/// after; None after a SKIP line outside the lab (or once the kernel and image are prepared).
fn net_snapshot(test: &str, tag: &str) -> Option<tempfile::TempDir> {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    if flag("FORKD_LINUX_PREPARE") {
        prepared(test, h, &["kernel", "fetch", "--json"]);
        prepared(test, h, &["image", "build", "minimal", "--json"]);
        return None;
    }
    if !KvmFlavour::detect().is_hardware() {
        assert!(
            !flag("FORKD_IN_LAB"),
            "{test}: inside the lab KVM is not hardware"
        );
        skip(
            test,
            "no hardware virtualization here (Linux guests run in the lab)",
        );
        return None;
    }
    let kernel = prepared(test, h, &["kernel", "fetch", "--json"])?;
    let image = prepared(test, h, &["image", "build", "minimal", "--json"])?;
    assert_eq!(
        leftovers(),
        "",
        "forkd networks on the host before the test"
    );
    let mem = image["info"]["recipe"]["memory_mib"]
        .as_u64()
        .unwrap()
        .to_string();
    let out = forkd(
        h,
        &[
            "snapshot",
            "--tag",
            tag,
            "--net",
            "--kernel",
            kernel["kernel"]["vmlinuz"].as_str().unwrap(),
            "--initrd",
            kernel["kernel"]["initramfs"].as_str().unwrap(),
            "--rootfs",
            image["image"].as_str().unwrap(),
            "--mem-mib",
            &mem,
            "--ready-timeout",
            "300",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "snapshot --net: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(leftovers(), "", "forkd networks left after the snapshot");
    Some(home)
}

mod linux_guest {
    use super::*;

    /// A daemon sandbox of the `--net` snapshot with a published port: a guest's busybox
    /// httpd serves a page the host fetches through the port (on loopback, and at the
    /// sandbox's own address), and nothing of forkd's is left on the host after DELETE
    /// (the daemon keeps no shell warm, so its zygote holds no network then).
    #[test]
    fn a_daemon_sandbox_serves_a_page_on_its_published_port() {
        let test = "a_daemon_sandbox_serves_a_page_on_its_published_port";
        let Some(home) = net_snapshot(test, "dnet") else {
            return;
        };
        let h = home.path();
        let _zygotes = common::ZygoteReaper(h.to_path_buf());
        let daemon = common::Daemon::start_with_env(
            h,
            &["--warm", "0", "--agent-timeout", "600"],
            &[("FORKD_NET_RANGE", RANGE)],
        );
        let patience = Duration::from_secs(900);
        let port = PUBLISHED + 1;
        let made = common::post_json_within(
            &daemon,
            "/v1/sandboxes",
            &serde_json::json!({"tag": "dnet",
                "network": {"publish": [format!("{port}:8080")], "allow_dns": true}})
            .to_string(),
            patience,
        );
        assert_eq!(made.status, 201, "{}", made.text());
        let sandbox = made.json()["sandboxes"][0].clone();
        let id = sandbox["id"].as_str().unwrap().to_string();
        let address = sandbox["network"]["address"].as_str().unwrap().to_string();
        assert_eq!(
            sandbox["network"]["publish"],
            serde_json::json!([format!("{port}:8080")]),
            "{sandbox}"
        );
        let served = common::post_json_within(
            &daemon,
            &format!("/v1/sandboxes/{id}/exec"),
            &serde_json::json!({"cmd":
                "mkdir -p /tmp/www && echo forkd-daemon-published > /tmp/www/index.html && \
                 cp /etc/resolv.conf /tmp/www/resolv.txt && \
                 busybox httpd -p 8080 -h /tmp/www </dev/null >/dev/null 2>&1"})
            .to_string(),
            patience,
        );
        assert_eq!(served.status, 200, "{}", served.text());
        assert!(
            served.text().contains("\"exit_code\":0"),
            "httpd did not start: {}",
            served.text()
        );
        for addr in [format!("127.0.0.1:{port}"), format!("{address}:8080")] {
            let addr: SocketAddr = addr.parse().unwrap();
            let got = http_get(addr, Duration::from_secs(120));
            assert!(
                got.as_ref()
                    .is_ok_and(|b| b.contains("forkd-daemon-published")),
                "the sandbox's page at {addr}: {got:?}"
            );
        }
        // allow_dns: the sandbox's agent was given the host's resolvers with `restored`.
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let resolv = http_get_path(addr, "/resolv.txt", Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("GET /resolv.txt: {e}"));
        let listed: Vec<&str> = resolv
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver "))
            .collect();
        assert_eq!(
            listed,
            host_nameservers(),
            "the sandbox's resolv.conf:\n{resolv}"
        );
        let gone = forkd_test_support::http::request_within(
            &daemon.unix(),
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            &[],
            b"",
            patience,
        )
        .unwrap();
        assert_eq!(gone.status, 200, "{}", gone.text());
        assert_eq!(
            leftovers(),
            "",
            "forkd networks left after the sandbox was deleted"
        );
    }

    #[test]
    fn networked_children_reach_the_allowed_server_and_nothing_else() {
        let test = "networked_children_reach_the_allowed_server_and_nothing_else";
        let Some(home) = net_snapshot(test, "net") else {
            return;
        };
        let h = home.path();
        let _allowed = Server::start("lna", "10.201.0", "forkd-net-ok");
        let _denied = Server::start("lnd", "10.202.0", "forkd-net-denied");
        // A service of the host's own, on all its addresses: no child may reach it.
        let host_service = TcpListener::bind("0.0.0.0:8001").expect("host service");
        std::thread::spawn(move || serve(host_service, "forkd-net-host"));

        let n = CHILDREN.to_string();
        let script = SCRIPT.replace("SLOTS", &SLOTS.to_string());
        let watcher = Watcher::start();
        let t = Instant::now();
        let out = forkd(
            h,
            &[
                "fork",
                "--tag",
                "net",
                "-n",
                &n,
                "--net",
                "--allow",
                "10.201.0.2/32:8000",
                "--timeout",
                "600",
                "--exec-timeout",
                "900",
                "--json",
                "--exec",
                "--",
                "sh",
                "-c",
                &script,
            ],
        );
        let took = t.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let lines: Vec<String> = report["children"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|c| {
                        c["exec"]["stdout"]
                            .as_str()
                            .unwrap_or_default()
                            .trim()
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Refused by the policy: the error of `k=refused(...)` is the ICMP's "No route to
        // host" (a timeout or a reset would be something else).
        let refused = |l: &str, key: &str, next: &str| {
            field(l, key, next).is_some_and(|v| {
                v.starts_with("refused(") && v.ends_with(')') && v.contains("No route to host")
            })
        };
        let good = |l: &String| {
            field(l, "ok", "denied") == Some("forkd-net-ok")
                && field(l, "siblings", "addr") == Some("[]")
                && l.contains("addr=10.0.2.15/24")
                && refused(l, "denied", "host")
                && refused(l, "host", "meta")
                && refused(l, "meta", "siblings")
        };
        let failed = !out.status.success()
            || report["alive"] != CHILDREN as u64
            || lines.len() != CHILDREN
            || !lines.iter().all(good);
        let host_view = watcher.report();
        if failed {
            panic!(
                "fork --net of {CHILDREN} Linux children ({took:?}, {}): \
                 every child must reach the allowed server and be refused (No route to host) \
                 everywhere else\n--- children's output\n{}\n--- forkd's stderr\n{stderr}\n{host_view}",
                out.status,
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("child {i}: {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        eprintln!(
            "{test}: {CHILDREN} children reached the allowed server and nothing else in {took:?}"
        );
        assert_eq!(
            leftovers(),
            "",
            "forkd networks left after the children exited"
        );

        // Inbound: a published port serves a page from a child's httpd to the host.
        let mut held = forkd_cmd(h)
            .args([
                "fork",
                "--tag",
                "net",
                "-n",
                "1",
                "--publish",
                &format!("{PUBLISHED}:8080"),
                "--allow-dns",
                "--hold",
                "--timeout",
                "600",
                "--exec",
                "--",
                "sh",
                "-c",
                "mkdir -p /tmp/www && echo forkd-published > /tmp/www/index.html && \
                 cp /etc/resolv.conf /tmp/www/resolv.txt && \
                 busybox httpd -p 8080 -h /tmp/www </dev/null >/dev/null 2>&1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("forkd fork --hold");
        let (tx, rx) = std::sync::mpsc::channel();
        let err = held.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let log_w = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.starts_with("holding ") {
                    let _ = tx.send(());
                }
                log_w.lock().unwrap().push_str(&line);
                log_w.lock().unwrap().push('\n');
            }
        });
        let holding = rx.recv_timeout(Duration::from_secs(900)).is_ok();
        let fetched: Vec<(SocketAddr, Result<String, String>)> = if holding {
            ["127.0.0.1", "10.201.0.1"]
                .iter()
                .map(|a| {
                    let addr: SocketAddr = format!("{a}:{PUBLISHED}").parse().unwrap();
                    (addr, http_get(addr, Duration::from_secs(60)))
                })
                .collect()
        } else {
            Vec::new()
        };
        // --allow-dns: the child's agent was given the host's resolvers with `restored` (the
        // parent was snapshotted without DNS, so its resolv.conf named none).
        let resolv = holding.then(|| {
            let addr: SocketAddr = format!("127.0.0.1:{PUBLISHED}").parse().unwrap();
            http_get_path(addr, "/resolv.txt", Duration::from_secs(60))
        });
        // SAFETY: kill sends SIGINT (forkd's Ctrl-C) to the process we spawned.
        unsafe { libc::kill(held.id() as libc::pid_t, libc::SIGINT) };
        let status = held.wait().expect("forkd fork --hold");
        let log = log.lock().unwrap().clone();
        assert!(
            holding,
            "fork --publish --hold never held its child:\n{log}"
        );
        for (addr, got) in &fetched {
            assert!(
                got.as_ref().is_ok_and(|b| b.contains("forkd-published")),
                "the published port at {addr}: {got:?}\n--- forkd's stderr\n{log}"
            );
        }
        let resolv = resolv
            .unwrap()
            .unwrap_or_else(|e| panic!("GET /resolv.txt: {e}\n{log}"));
        let listed: Vec<&str> = resolv
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver "))
            .collect();
        assert_eq!(
            listed,
            host_nameservers(),
            "the --allow-dns child's resolv.conf:\n{resolv}"
        );
        assert!(status.success(), "fork --publish --hold: {status}\n{log}");
        assert_eq!(
            leftovers(),
            "",
            "forkd networks left after the published child stopped"
        );
    }
}
