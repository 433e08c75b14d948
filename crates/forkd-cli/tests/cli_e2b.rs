//! E2B wire compatibility, control plane: E2B's official `e2b` SDK (pinned, from PyPI, in
//! FORKD_E2B_VENV) drives a `forkd serve --listen` of the demo guest with nothing but
//! E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set (tests/e2b/control_plane.py), on a
//! daemon without a token (any `e2b_<hex>` key) and on one with (only its key).

mod common;

use std::path::PathBuf;
use std::process::Command;

/// The virtualenv scripts/test.sh prepares with E2B's SDKs.
fn e2b_python(test: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("FORKD_E2B_VENV").map(PathBuf::from);
    let python = venv.map(|v| v.join("bin/python")).filter(|p| p.exists());
    if python.is_none() {
        println!("SKIP: {test}: FORKD_E2B_VENV names no virtualenv with E2B's SDKs (scripts/test.sh makes one)");
    }
    python
}

/// Runs tests/e2b/`script` against the daemon at `url` with `key`; its stdout.
fn run_e2b(python: &PathBuf, script: &str, url: &str, key: &str) -> String {
    run_e2b_with(python, script, url, key, &[])
}

/// [`run_e2b`] with more environment variables.
fn run_e2b_with(
    python: &PathBuf,
    script: &str,
    url: &str,
    key: &str,
    env: &[(&str, &str)],
) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2b")
        .join(script);
    let out = Command::new(python)
        .arg(script)
        .env_clear()
        .envs(env.iter().copied())
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env("E2B_API_URL", url)
        .env("E2B_SANDBOX_URL", url)
        .env("E2B_API_KEY", key)
        .env("FORKD_E2B_TEMPLATE", "demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_e2b_sdk_drives_the_control_plane_without_a_token() {
    let test = "the_e2b_sdk_drives_the_control_plane_without_a_token";
    let Some(python) = e2b_python(test) else {
        return;
    };
    let Some(demo) = common::demo_daemon(test, &["--listen", "127.0.0.1:0"]) else {
        return;
    };
    let url = format!("http://{}", demo.daemon.tcp.expect("a TCP listener"));
    let out = run_e2b(&python, "control_plane.py", &url, "e2b_0123456789abcdef");
    assert!(out.contains("e2b control plane: create, get_info"), "{out}");
}

#[test]
fn with_a_token_the_e2b_key_is_the_token_in_hex_and_errors_have_e2bs_shape() {
    let test = "with_a_token_the_e2b_key_is_the_token_in_hex_and_errors_have_e2bs_shape";
    let Some(python) = e2b_python(test) else {
        return;
    };
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let audit = secrets.path().join("audit.jsonl");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        token_file.to_str().unwrap(),
        "--audit-log",
        audit.to_str().unwrap(),
    ];
    let Some(demo) = common::demo_daemon(test, &args) else {
        return;
    };
    let addr = demo.daemon.tcp.expect("a TCP listener");
    let url = format!("http://{addr}");
    let key = forkd_daemon::e2b::api_key_for_token("s3cret");
    run_e2b(&python, "control_plane.py", &url, &key);

    // The wire itself: E2B's error shape, and nothing made by a refused or malformed request.
    let http = forkd_test_support::http::Endpoint::Tcp(addr);
    let post = |key: &str, body: &[u8]| {
        forkd_test_support::http::request(
            &http,
            "POST",
            "/v2/sandboxes",
            &[("X-API-Key", key), ("Content-Type", "application/json")],
            body,
        )
        .unwrap()
    };
    let wrong = post("e2b_00", br#"{"templateID":"demo"}"#);
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["code"], 401, "{}", wrong.text());
    let malformed = post(&key, b"{\"templateID\":");
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["code"], 400);
    assert!(malformed.json()["message"]
        .as_str()
        .unwrap()
        .starts_with("malformed request body"));
    let missing = post(&key, br#"{"templateID":"nope"}"#);
    assert_eq!(missing.status, 404);
    assert_eq!(
        missing.json()["message"],
        "template 'nope' not found: no forkd snapshot has this tag"
    );
    let listed = forkd_test_support::http::request(
        &http,
        "GET",
        "/v2/sandboxes",
        &[("X-API-Key", &key)],
        b"",
    )
    .unwrap();
    assert_eq!(listed.json(), serde_json::json!([]));
    // forkd's own API on the same listener still wants its bearer token.
    assert_eq!(demo.daemon.get("/v1/sandboxes").status, 200, "the socket");
    let own = forkd_test_support::http::request(
        &http,
        "GET",
        "/v1/sandboxes",
        &[("X-API-Key", &key)],
        b"",
    )
    .unwrap();
    assert_eq!(own.status, 401);

    // E2B's requests are in the audit log with their plane, like forkd's own.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let refused = lines
        .iter()
        .find(|l| l["path"] == "e2b /v2/sandboxes" && l["status"] == 401)
        .expect("the refused create is audited");
    assert_eq!(refused["method"], "POST");
    assert!(
        lines
            .iter()
            .any(|l| l["path"] == "e2b /v2/sandboxes" && l["status"] == 201),
        "the SDK's creates are audited"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["path"].as_str().unwrap().ends_with(":49983 /health")),
        "the sandbox planes are audited with their sandbox and port"
    );
}

/// envd's files and commands, and the code interpreter, through E2B's SDKs, against a sandbox
/// whose agent runs on this host.
#[test]
fn the_e2b_sdks_run_commands_files_and_code_in_a_sandbox() {
    let test = "the_e2b_sdks_run_commands_files_and_code_in_a_sandbox";
    let Some(python) = e2b_python(test) else {
        return;
    };
    let Some(demo) = common::demo_daemon(test, &["--listen", "127.0.0.1:0"]) else {
        return;
    };
    let sandbox = common::host_agent_sandbox(&demo);
    let files = tempfile::tempdir().unwrap();
    let small = SmallDisk::mount();
    let url = format!("http://{}", demo.daemon.tcp.expect("a TCP listener"));
    let mut env = vec![
        ("FORKD_E2B_SANDBOX", sandbox.id.as_str()),
        ("FORKD_E2B_DIR", files.path().to_str().unwrap()),
    ];
    if let Some(small) = &small {
        env.push(("FORKD_E2B_SMALL_DIR", small.path()));
    }
    let out = run_e2b_with(&python, "files.py", &url, "e2b_00", &env);
    assert!(out.contains("e2b files: write"), "{out}");
    if small.is_some() {
        assert!(out.contains("full disk ok"), "{out}");
    }
    let out = run_e2b_with(
        &python,
        "commands.py",
        &url,
        "e2b_00",
        &[("FORKD_E2B_SANDBOX", sandbox.id.as_str())],
    );
    assert!(out.contains("e2b commands: run"), "{out}");
    let workdir = tempfile::tempdir().unwrap();
    let out = run_e2b_with(
        &python,
        "code_interpreter.py",
        &url,
        "e2b_00",
        &[
            ("FORKD_E2B_SANDBOX", sandbox.id.as_str()),
            ("FORKD_E2B_DIR", workdir.path().to_str().unwrap()),
        ],
    );
    assert!(out.contains("e2b code interpreter: run_code"), "{out}");

    // Without the sandbox's access token, envd answers 401 in E2B's shape; /health needs none.
    let http = forkd_test_support::http::Endpoint::Tcp(demo.daemon.tcp.unwrap());
    let envd = |path: &str, token: &str| {
        forkd_test_support::http::request(
            &http,
            "GET",
            path,
            &[
                ("E2b-Sandbox-Id", sandbox.id.as_str()),
                ("E2b-Sandbox-Port", "49983"),
                ("X-Access-Token", token),
            ],
            b"",
        )
        .unwrap()
    };
    assert_eq!(envd("/health", "").status, 204);
    let refused = envd("/files?path=/etc/hostname", "wrong");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["code"], 401);

    // A malformed Connect envelope is invalid_argument in Connect's JSON, and starts nothing.
    let info = forkd_test_support::http::request(
        &http,
        "GET",
        &format!("/sandboxes/{}", sandbox.id),
        &[("X-API-Key", "e2b_00")],
        b"",
    )
    .unwrap();
    let token = info.json()["envdAccessToken"].as_str().unwrap().to_string();
    let rpc = |method: &str, content_type: &str, body: &[u8]| {
        forkd_test_support::http::request(
            &http,
            "POST",
            &format!("/process.Process/{method}"),
            &[
                ("E2b-Sandbox-Id", sandbox.id.as_str()),
                ("X-Access-Token", token.as_str()),
                ("Content-Type", content_type),
            ],
            body,
        )
        .unwrap()
    };
    let before = rpc("List", "application/json", b"{}").json();
    for bad in [
        &b"\x00\x00\x00\x00\x40{}"[..],
        b"\x01\x00\x00\x00\x02{}",
        b"\x00\x00",
        b"\x00\x00\x00\x00\x05{\"pro",
    ] {
        let refused = rpc("Start", "application/connect+json", bad);
        assert_eq!(refused.status, 400, "{}", refused.text());
        assert_eq!(
            refused.json()["code"],
            "invalid_argument",
            "{}",
            refused.text()
        );
    }
    assert_eq!(rpc("List", "application/json", b"{}").json(), before);
    let unknown = rpc("Nope", "application/json", b"{}");
    assert_eq!(
        (unknown.status, unknown.json()["code"].clone()),
        (501, "unimplemented".into())
    );
    // A sandbox that does not exist: 401 without its token; its /health is E2B's 502 "was not
    // found" (the SDK's `is_running()` is False).
    let gone = forkd_test_support::http::request(
        &http,
        "GET",
        "/files?path=/etc/hostname",
        &[
            ("E2b-Sandbox-Id", "sbx-does-not-exist"),
            ("X-Access-Token", "x"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(
        gone.status,
        401,
        "a token is checked first: {}",
        gone.text()
    );
    assert_eq!(gone.json()["code"], 401);
    let health = forkd_test_support::http::request(
        &http,
        "GET",
        "/health",
        &[("E2b-Sandbox-Id", "sbx-does-not-exist")],
        b"",
    )
    .unwrap();
    assert_eq!(health.status, 502, "{}", health.text());
    assert!(health.json()["message"]
        .as_str()
        .unwrap()
        .contains("was not found"));

    // Any other port is forwarded to the guest's loopback (here the host's: the agent runs
    // here), by the routing headers or by E2B's `<port>-<id>.<domain>` host name.
    let (port, seen) = one_shot_http_server(2);
    let by_headers = forkd_test_support::http::request(
        &http,
        "POST",
        "/echo?x=1",
        &[
            ("E2b-Sandbox-Id", sandbox.id.as_str()),
            ("E2b-Sandbox-Port", &port.to_string()),
        ],
        b"ping",
    )
    .unwrap();
    assert_eq!(by_headers.status, 200);
    assert_eq!(by_headers.body, b"served POST /echo?x=1 ping");
    let host = format!("{port}-{}.forkd.test", sandbox.id);
    let by_host =
        forkd_test_support::http::request(&http, "GET", "/", &[("Host", host.as_str())], b"")
            .unwrap();
    assert_eq!(by_host.body, b"served GET / ");
    let requests = seen.join().unwrap();
    assert!(
        !requests[0].to_ascii_lowercase().contains("e2b-sandbox"),
        "the routing headers stay with forkd: {}",
        requests[0]
    );
    assert!(
        requests[1].contains(&host),
        "the guest sees the host name: {}",
        requests[1]
    );
    // A port nothing serves is E2B's "port is not open".
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let closed = forkd_test_support::http::request(
        &http,
        "GET",
        "/",
        &[
            ("E2b-Sandbox-Id", sandbox.id.as_str()),
            ("E2b-Sandbox-Port", &closed_port.to_string()),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(closed.status, 502);
    assert!(closed.json()["message"]
        .as_str()
        .unwrap()
        .contains(&format!("port {closed_port} is not open")));
}

/// Serves `count` HTTP requests on a loopback port, each answered with its method, target and
/// body; returns the port and, once done, the requests' heads.
fn one_shot_http_server(count: usize) -> (u16, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut heads = Vec::new();
        for _ in 0..count {
            let (mut socket, _) = listener.accept().unwrap();
            let mut data = Vec::new();
            let mut buf = [0u8; 4096];
            let head_end = loop {
                let n = socket.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early");
                data.extend_from_slice(&buf[..n]);
                if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
            };
            let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            while data.len() < head_end + length {
                let n = socket.read(&mut buf).unwrap();
                data.extend_from_slice(&buf[..n]);
            }
            let request_line = head.lines().next().unwrap().to_string();
            let mut parts = request_line.split(' ');
            let reply = format!(
                "served {} {} {}",
                parts.next().unwrap(),
                parts.next().unwrap(),
                String::from_utf8_lossy(&data[head_end..head_end + length])
            );
            write!(
                socket,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            )
            .unwrap();
            heads.push(head);
        }
        heads
    });
    (port, server)
}

/// A 1 MiB tmpfs in a temporary directory (a guest disk that fills up), when this process may
/// mount one; unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "forkd-e2b-test"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { dir })
    }

    fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}
