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
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        token_file.to_str().unwrap(),
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
    let url = format!("http://{}", demo.daemon.tcp.expect("a TCP listener"));
    let out = run_e2b_with(
        &python,
        "files.py",
        &url,
        "e2b_00",
        &[
            ("FORKD_E2B_SANDBOX", sandbox.id.as_str()),
            ("FORKD_E2B_DIR", files.path().to_str().unwrap()),
        ],
    );
    assert!(out.contains("e2b files: write"), "{out}");
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
    // A port nothing serves is E2B's "port is not open".
    let closed = forkd_test_support::http::request(
        &http,
        "GET",
        "/",
        &[
            ("E2b-Sandbox-Id", sandbox.id.as_str()),
            ("E2b-Sandbox-Port", "8080"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(closed.status, 502);
    assert!(closed.json()["message"]
        .as_str()
        .unwrap()
        .contains("port 8080 is not open"));
}
