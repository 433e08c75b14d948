//! `forkd serve` as a client meets it: a real daemon process on a Unix socket (and TCP with a
//! token, plain or TLS), its JSON errors, its OpenAPI document, its audit log and its stop.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    assert_error, create, demo_answers, demo_daemon, forkd_command, host_agent_sandbox, ids,
    post_json, zygote_count, Daemon, ZygoteReaper,
};
use forkd_store::{SnapshotMeta, Store, Tag};
use forkd_test_support::http::{request, Endpoint};

/// A small synthetic snapshot (no VM needed), optionally a diff against `parent`.
fn make_snapshot(home: &Path, tag: &str, parent: Option<&str>) {
    let store = Store::open(home).unwrap();
    let staging = store.begin(&Tag::parse(tag).unwrap()).unwrap();
    std::fs::write(staging.path().join("memory.bin"), vec![7u8; 4096]).unwrap();
    staging
        .commit(SnapshotMeta {
            memory_mib: 64,
            vcpus: 1,
            kernel: "builtin:demo".into(),
            description: format!("test snapshot {tag}"),
            parent_tag: parent.map(|p| Tag::parse(p).unwrap()),
            ..SnapshotMeta::default()
        })
        .unwrap();
}

#[test]
fn snapshots_are_listed_inspected_and_deleted_over_the_unix_socket() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    make_snapshot(h, "base", None);
    make_snapshot(h, "child", Some("base"));
    let daemon = Daemon::start(h, &[]);

    assert_eq!(daemon.get("/healthz").json()["status"], "ok");
    let version = daemon.get("/version").json();
    assert_eq!(version["api"], "v1");

    let list = daemon.get("/v1/snapshots").json();
    let tags: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags, ["base", "child"]);
    let child = daemon.get("/v1/snapshots/child").json();
    assert_eq!(child["parent_tag"], "base");
    assert_eq!(child["memory_mib"], 64);
    assert_eq!(child["logical_bytes"], 4096);

    let message = assert_error(&daemon.get("/v1/snapshots/nosuch"), 404, "not_found");
    assert_eq!(
        message, "no snapshot tagged \"nosuch\"",
        "no CLI hint in API errors"
    );
    assert_error(&daemon.get("/v1/snapshots/Bad%20Tag"), 400, "bad_request");

    let delete = |path: &str| request(&daemon.unix(), "DELETE", path, &[], b"").unwrap();
    let refused = assert_error(&delete("/v1/snapshots/base"), 409, "conflict");
    assert!(refused.contains("\"child\""), "{refused}");
    assert_error(
        &delete("/v1/snapshots/base?cascade=true&force=true"),
        400,
        "bad_request",
    );
    assert_error(
        &delete("/v1/snapshots/base?cascde=true"),
        400,
        "bad_request",
    );
    assert_eq!(
        daemon.get("/v1/snapshots").json()["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "refused deletes change nothing"
    );
    let deleted = delete("/v1/snapshots/base?cascade=true");
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    let mut gone: Vec<String> = deleted.json()["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    gone.sort();
    assert_eq!(gone, ["base", "child"]);
    assert!(daemon.get("/v1/snapshots").json()["snapshots"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn unknown_routes_and_methods_get_json_errors_and_the_openapi_document_is_served() {
    let home = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(home.path(), &[]);
    assert_error(&daemon.get("/v1/nothing-here"), 404, "not_found");
    let put = request(&daemon.unix(), "PUT", "/v1/snapshots", &[], b"{}").unwrap();
    assert_error(&put, 405, "method_not_allowed");

    let served = daemon.get("/openapi.json").json();
    let checked_in: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../forkd-daemon/openapi.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // Compared whole, reported short: the document is long.
    assert!(
        served == checked_in,
        "the served document differs from crates/forkd-daemon/openapi.json"
    );
}

#[test]
fn tcp_needs_the_token_and_a_public_address_needs_one_at_all() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let token_file = h.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let daemon = Daemon::start(
        h,
        &[
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let tcp = Endpoint::Tcp(daemon.tcp.expect("a TCP listener"));
    let get =
        |headers: &[(&str, &str)]| request(&tcp, "GET", "/v1/snapshots", headers, b"").unwrap();
    assert_error(&get(&[]), 401, "unauthorized");
    assert_error(
        &get(&[("Authorization", "Bearer wrong")]),
        401,
        "unauthorized",
    );
    assert_error(
        &get(&[("Authorization", "Bearer s3cret-token-and-more")]),
        401,
        "unauthorized",
    );
    assert_eq!(get(&[("Authorization", "Bearer s3cret-token")]).status, 200);
    // Liveness needs no token; the Unix socket trusts its permissions.
    assert_eq!(
        request(&tcp, "GET", "/healthz", &[], b"").unwrap().status,
        200
    );
    assert_eq!(daemon.get("/v1/snapshots").status, 200);
    let mode = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let out = forkd_command(h)
        .args(["serve", "--socket"])
        .arg(h.join("other.sock"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without a token"),
        "{err}"
    );
    assert!(
        !h.join("other.sock").exists(),
        "a refused start leaves no socket"
    );
}

#[test]
fn a_second_daemon_on_the_socket_is_refused_and_sigterm_stops_cleanly() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let audit = h.join("audit.jsonl");
    let mut daemon = Daemon::start(h, &["--audit-log", audit.to_str().unwrap()]);
    let out = forkd_command(h)
        .args(["serve", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another forkd serve is answering there"),
        "{err}"
    );
    assert_eq!(
        daemon.get("/healthz").status,
        200,
        "the first one still serves"
    );

    // The audit log has one JSON line per request; SIGHUP reopens it after a rotation.
    daemon.get("/v1/snapshots/nosuch");
    let rotated = h.join("audit.jsonl.1");
    std::fs::rename(&audit, &rotated).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !audit.exists() {
        daemon.get("/healthz");
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reopen the audit log"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let old = std::fs::read_to_string(&rotated).unwrap();
    let records: Vec<serde_json::Value> = old
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let miss = records
        .iter()
        .find(|r| r["path"] == "/v1/snapshots/nosuch")
        .expect("the request was audited");
    assert_eq!(miss["status"], 404);
    assert_eq!(miss["method"], "GET");
    assert_eq!(miss["client"], "unix");
    assert!(miss["latency_ms"].as_f64().is_some() && miss["time"].is_string());

    let status = daemon.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        !daemon.socket.exists(),
        "the socket is removed on the way out"
    );
}

/// Polls a job until it is no longer running.
fn finished_job(daemon: &Daemon, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = daemon.get(&format!("/v1/jobs/{id}")).json();
        if job["state"] != "running" {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} still running: {job}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_pull_is_a_job_whose_progress_and_outcome_can_be_read() {
    let publisher = tempfile::tempdir().unwrap();
    make_snapshot(publisher.path(), "base", None);
    let pack = publisher.path().join("base.forkd-snapshot.tar.zst");
    let packed = forkd_command(publisher.path())
        .args(["pack", "--tag", "base", "-o"])
        .arg(&pack)
        .output()
        .unwrap();
    assert!(packed.status.success(), "{packed:?}");
    let pack_bytes = std::fs::metadata(&pack).unwrap().len();

    let home = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(home.path(), &["--max-body-bytes", "1024"]);
    let body = serde_json::json!({ "reference": pack.to_str().unwrap() }).to_string();
    let started = post_json(&daemon, "/v1/snapshots", &body);
    assert_eq!(started.status, 202, "{}", started.text());
    let id = started.json()["id"].as_str().unwrap().to_string();
    let job = finished_job(&daemon, &id);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["kind"], "pull");
    assert_eq!(job["result"]["tag"], "base", "{job}");
    assert_eq!(job["bytes_done"], pack_bytes, "{job}");
    assert_eq!(daemon.get("/v1/snapshots/base").status, 200);
    let listed = daemon.get("/v1/jobs").json();
    assert!(listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str()));

    // A pull that cannot succeed fails as a job, with the reason.
    let missing = "/nonexistent/gone.forkd-snapshot.tar.zst";
    let started = post_json(
        &daemon,
        "/v1/snapshots",
        &serde_json::json!({ "reference": missing, "tag": "gone" }).to_string(),
    );
    assert_eq!(started.status, 202, "{}", started.text());
    let job = finished_job(&daemon, started.json()["id"].as_str().unwrap());
    assert_eq!(job["state"], "failed", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains(missing), "{job}");
    assert_error(&daemon.get("/v1/snapshots/gone"), 404, "not_found");
    assert_error(&daemon.get("/v1/jobs/job-999"), 404, "not_found");
}

#[test]
fn malformed_requests_are_refused_with_the_right_status_and_change_nothing() {
    let home = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(home.path(), &["--max-body-bytes", "1024"]);
    let refused = |body: &str, status: u16, code: &str| {
        let message = assert_error(&post_json(&daemon, "/v1/snapshots", body), status, code);
        assert!(!message.is_empty());
        message
    };
    refused("{\"reference\": ", 400, "bad_request");
    let unknown = refused(
        r#"{"reference": "a/b", "colour": "red"}"#,
        400,
        "bad_request",
    );
    assert!(unknown.contains("colour"), "{unknown}");
    refused(r#"{"reference": "  "}"#, 400, "bad_request");
    refused(
        r#"{"reference": "a/b", "tag": "Bad Tag"}"#,
        400,
        "bad_request",
    );
    refused(r#"{"reference": 7}"#, 400, "bad_request");
    let big = format!(r#"{{"reference": "{}"}}"#, "x".repeat(4 << 20));
    refused(&big, 413, "payload_too_large");
    let plain = request(&daemon.unix(), "POST", "/v1/snapshots", &[], b"{}").unwrap();
    assert_error(&plain, 415, "unsupported_media_type");
    assert!(daemon.get("/v1/jobs").json()["jobs"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn sandboxes_are_created_listed_filtered_timed_out_and_deleted() {
    let Some(demo) = demo_daemon(
        "sandboxes_are_created_listed_filtered_timed_out_and_deleted",
        &["--max-sandboxes", "6"],
    ) else {
        return;
    };
    let (daemon, h) = (&demo.daemon, demo.home.path());

    let made = create(
        daemon,
        serde_json::json!({"tag": "demo", "count": 3, "metadata": {"team": "a"}}),
    );
    assert_eq!(made.status, 201, "{}", made.text());
    let first = ids(&made.json());
    assert_eq!(first.len(), 3);
    for id in &first {
        assert!(demo_answers(h, id), "sandbox {id} answers");
    }
    let other = create(
        daemon,
        serde_json::json!({"tag": "demo", "metadata": {"team": "b"}}),
    );
    assert_eq!(other.status, 201, "{}", other.text());
    let b = ids(&other.json());

    assert_eq!(ids(&daemon.get("/v1/sandboxes").json()).len(), 4);
    assert_eq!(
        ids(&daemon.get("/v1/sandboxes?metadata.team=a").json()),
        first
    );
    assert_eq!(
        ids(&daemon.get("/v1/sandboxes?metadata.team=b&tag=demo").json()),
        b
    );
    assert!(ids(&daemon.get("/v1/sandboxes?tag=other").json()).is_empty());
    assert_error(&daemon.get("/v1/sandboxes?colour=red"), 400, "bad_request");
    let one = daemon.get(&format!("/v1/sandboxes/{}", first[0])).json();
    assert_eq!(one["tag"], "demo");
    assert_eq!(one["metadata"]["team"], "a");
    assert!(one["pid"].as_i64().unwrap() > 0);

    // Bad requests and the limit change nothing.
    for (body, status, code) in [
        (serde_json::json!({"tag": "nosuch"}), 404, "not_found"),
        (
            serde_json::json!({"tag": "demo", "count": 0}),
            400,
            "bad_request",
        ),
        (
            serde_json::json!({"tag": "demo", "count": 100000}),
            400,
            "bad_request",
        ),
        (
            serde_json::json!({"tag": "demo", "timeout_secs": 0}),
            400,
            "bad_request",
        ),
        (
            serde_json::json!({"tag": "demo", "count": -1}),
            400,
            "bad_request",
        ),
        (
            serde_json::json!({"tag": "demo", "count": 3}),
            429,
            "too_many_sandboxes",
        ),
    ] {
        assert_error(&create(daemon, body.clone()), status, code);
    }
    assert_eq!(ids(&daemon.get("/v1/sandboxes").json()).len(), 4);

    // The metrics saw it all.
    let metrics = daemon.get("/metrics");
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    for line in [
        "forkd_sandboxes{state=\"running\"} 4",
        "forkd_sandboxes_created_total 4",
        "forkd_sandbox_create_failures_total 2",
        "forkd_sandbox_restore_seconds_count 4",
        "forkd_sandbox_create_seconds_count 2",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
    }
    assert!(
        text.contains("forkd_http_requests_total{status=\"4xx\"}"),
        "{text}"
    );

    // A timeout kills the sandbox and removes its files.
    let short = create(
        daemon,
        serde_json::json!({"tag": "demo", "timeout_secs": 1}),
    );
    let short_id = ids(&short.json()).remove(0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while daemon.get(&format!("/v1/sandboxes/{short_id}")).status != 404 {
        assert!(Instant::now() < deadline, "the timeout did not expire");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!h.join("daemon/sandboxes").join(&short_id).exists());
    // Extending a timeout moves the expiry.
    let extended = post_json(
        daemon,
        &format!("/v1/sandboxes/{}/timeout", b[0]),
        r#"{"timeout_secs": 3600}"#,
    );
    assert_eq!(extended.status, 200, "{}", extended.text());
    assert!(extended.json()["expires_at"].as_u64().is_some());

    // The demo guest has no agent: commands are refused by name, not attempted.
    let exec_path = format!("/v1/sandboxes/{}/exec", first[0]);
    let no_agent = assert_error(
        &post_json(daemon, &exec_path, r#"{"cmd": "true"}"#),
        409,
        "no_agent",
    );
    assert!(no_agent.contains("built-in guest"), "{no_agent}");
    let eval_path = format!("/v1/sandboxes/{}/eval", first[0]);
    assert_error(
        &post_json(daemon, &eval_path, r#"{"code": "1"}"#),
        409,
        "no_agent",
    );
    assert_error(
        &daemon.get(&format!("/v1/sandboxes/{}/ping", first[0])),
        409,
        "no_agent",
    );
    assert_error(
        &post_json(daemon, "/v1/sandboxes/sb-nosuch/exec", r#"{"cmd": "true"}"#),
        404,
        "not_found",
    );
    assert_error(
        &post_json(daemon, &exec_path, r#"{"cmd": 7}"#),
        400,
        "bad_request",
    );
    check_agent_routes_refuse_cleanly(daemon, &first[0]);

    // Delete: the sandbox's process and files go; a second delete is 404.
    let pid = one["pid"].as_i64().unwrap();
    let deleted = request(
        &daemon.unix(),
        "DELETE",
        &format!("/v1/sandboxes/{}", first[0]),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "its process is gone"
    );
    assert!(!h.join("daemon/sandboxes").join(&first[0]).exists());
    let again = request(
        &daemon.unix(),
        "DELETE",
        &format!("/v1/sandboxes/{}", first[0]),
        &[],
        b"",
    )
    .unwrap();
    assert_error(&again, 404, "not_found");
}

/// mkdir and background processes on a sandbox without an agent: malformed requests are 400
/// before anything is asked, an unknown sandbox 404, the rest 409 no_agent; each a one-line
/// JSON error. (With an agent, linux_e2e's check_daemon covers them.)
fn check_agent_routes_refuse_cleanly(daemon: &Daemon, id: &str) {
    let call = |method: &str, path: &str, body: &str| {
        let headers: &[(&str, &str)] = if body.is_empty() {
            &[]
        } else {
            &[("Content-Type", "application/json")]
        };
        request(&daemon.unix(), method, path, headers, body.as_bytes()).unwrap()
    };
    let sb = format!("/v1/sandboxes/{id}");
    for (method, path, body, status, code) in [
        (
            "POST",
            format!("{sb}/files/mkdir?path=tmp/x"),
            "",
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("{sb}/files/mkdir?path=/tmp/x&mode=999"),
            "",
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("{sb}/files/mkdir?path=/tmp/x&parents=maybe"),
            "",
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("{sb}/files/mkdir?path=/tmp/x"),
            "",
            409,
            "no_agent",
        ),
        (
            "POST",
            "/v1/sandboxes/sb-nosuch/files/mkdir?path=/tmp/x".into(),
            "",
            404,
            "not_found",
        ),
        (
            "POST",
            format!("{sb}/processes"),
            r#"{"cmd": 7}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("{sb}/processes"),
            r#"{"cmd": "sleep 9"}"#,
            409,
            "no_agent",
        ),
        ("GET", format!("{sb}/processes"), "", 409, "no_agent"),
        (
            "GET",
            "/v1/sandboxes/sb-nosuch/processes".into(),
            "",
            404,
            "not_found",
        ),
        (
            "POST",
            format!("{sb}/processes/abc/wait"),
            "",
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("{sb}/processes/0/wait"),
            "",
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("{sb}/processes/12/wait?timeout=-1"),
            "",
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("{sb}/processes/12/wait?timeout=99999999"),
            "",
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("{sb}/processes/12/wait?colour=red"),
            "",
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("{sb}/processes/12/wait?timeout=1"),
            "",
            409,
            "no_agent",
        ),
        (
            "DELETE",
            format!("{sb}/processes/12?signal=0"),
            "",
            400,
            "bad_request",
        ),
        (
            "DELETE",
            format!("{sb}/processes/12?signal=65"),
            "",
            400,
            "bad_request",
        ),
        (
            "DELETE",
            format!("{sb}/processes/12?signal=NOPE"),
            "",
            400,
            "bad_request",
        ),
        (
            "DELETE",
            format!("{sb}/processes/12?signal=TERM"),
            "",
            409,
            "no_agent",
        ),
        (
            "DELETE",
            "/v1/sandboxes/sb-nosuch/processes/12".into(),
            "",
            404,
            "not_found",
        ),
    ] {
        let response = call(method, &path, body);
        assert_eq!(
            response.status,
            status,
            "{method} {path}: {}",
            response.text()
        );
        assert_error(&response, status, code);
    }
}

#[test]
fn sandboxes_outlive_a_daemon_killed_with_sigkill_and_are_adopted_by_the_next() {
    let Some(mut demo) = demo_daemon(
        "sandboxes_outlive_a_daemon_killed_with_sigkill_and_are_adopted_by_the_next",
        &[],
    ) else {
        return;
    };
    let h = demo.home.path().to_path_buf();
    let h = h.as_path();
    let daemon = &mut demo.daemon;
    let made = create(daemon, serde_json::json!({"tag": "demo", "count": 5}));
    assert_eq!(made.status, 201, "{}", made.text());
    let before = ids(&made.json());
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    for id in &before {
        assert!(demo_answers(h, id), "{id} runs on without the daemon");
    }

    let daemon = Daemon::start(h, &[]);
    assert_eq!(
        ids(&daemon.get("/v1/sandboxes").json()),
        before,
        "every sandbox re-adopted"
    );
    let gone = &before[0];
    let deleted = request(
        &daemon.unix(),
        "DELETE",
        &format!("/v1/sandboxes/{gone}"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    for id in &before[1..] {
        assert!(demo_answers(h, id));
    }
    // Sandboxes are forked from their zygote (same command line); the zygotes are the
    // processes whose parent is not one.
    assert_eq!(
        zygote_count(h),
        1,
        "one zygote for the one snapshot, reused"
    );
}

/// A self-signed certificate for localhost and 127.0.0.1: (certificate PEM, key PEM).
fn self_signed() -> (String, String) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    (generated.cert.pem(), generated.signing_key.serialize_pem())
}

#[test]
fn tls_serves_https_still_needs_the_token_and_outlives_clients_that_do_not_speak_it() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (cert, key) = self_signed();
    std::fs::write(h.join("cert.pem"), &cert).unwrap();
    std::fs::write(h.join("key.pem"), &key).unwrap();
    std::fs::write(h.join("token"), "s3cret-token\n").unwrap();
    let audit = h.join("audit.jsonl");
    let daemon = Daemon::start(
        h,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            h.join("cert.pem").to_str().unwrap(),
            "--tls-key",
            h.join("key.pem").to_str().unwrap(),
            "--token-file",
            h.join("token").to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    );
    assert!(
        daemon.tcp.is_none(),
        "the TCP listener is announced as https"
    );
    let addr = daemon.tls.expect("an https:// listener");
    let https = Endpoint::Tls {
        addr,
        ca_pem: cert.clone(),
    };
    let get = |path: &str, headers: &[(&str, &str)]| request(&https, "GET", path, headers, b"");

    assert_eq!(get("/healthz", &[]).unwrap().json()["status"], "ok");
    assert_error(&get("/v1/snapshots", &[]).unwrap(), 401, "unauthorized");
    assert_error(
        &get("/v1/snapshots", &[("Authorization", "Bearer wrong")]).unwrap(),
        401,
        "unauthorized",
    );
    let listed = get("/v1/snapshots", &[("Authorization", "Bearer s3cret-token")]).unwrap();
    assert_eq!(listed.status, 200, "{}", listed.text());

    // Plain HTTP to the TLS port is no handshake: the client gets an error or garbage, never
    // an answer, and the server goes on.
    if let Ok(response) = request(&Endpoint::Tcp(addr), "GET", "/healthz", &[], b"") {
        assert_ne!(response.status, 200, "plain HTTP was served over TLS");
    }
    // Nor does a client that does not trust the certificate get anywhere, or stop anything.
    let (stranger, _) = self_signed();
    let distrustful = Endpoint::Tls {
        addr,
        ca_pem: stranger,
    };
    assert!(request(&distrustful, "GET", "/healthz", &[], b"").is_err());
    for _ in 0..3 {
        assert_eq!(get("/healthz", &[]).unwrap().status, 200, "still serving");
    }
    assert_eq!(daemon.get("/healthz").status, 200, "the Unix socket too");

    // The CLI at https://: FORKD_CA_CERT makes it trust the daemon's certificate; without it,
    // or with another, the handshake fails in one line naming the daemon.
    let cli = |ca: Option<&Path>| {
        let mut cmd = common::forkd_command(h);
        cmd.args(["ps", "--json"])
            .env("FORKD_HOST", format!("https://localhost:{}", addr.port()))
            .env("FORKD_TOKEN", "s3cret-token")
            .env_remove("FORKD_CA_CERT");
        if let Some(ca) = ca {
            cmd.env("FORKD_CA_CERT", ca);
        }
        cmd.output().unwrap()
    };
    let listed = cli(Some(&h.join("cert.pem")));
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["sandboxes"], serde_json::json!([]), "{listed}");
    std::fs::write(h.join("stranger.pem"), self_signed().0).unwrap();
    for ca in [None, Some(h.join("stranger.pem"))] {
        let refused = cli(ca.as_deref());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success());
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("https://localhost:{}", addr.port()))
                && err.contains("certificate"),
            "{err}"
        );
    }
    std::fs::write(h.join("not.pem"), "hello").unwrap();
    let bad_ca = cli(Some(&h.join("not.pem")));
    let err = String::from_utf8_lossy(&bad_ca.stderr);
    assert!(!bad_ca.status.success());
    assert!(
        err.contains("FORKD_CA_CERT") && err.contains("not.pem"),
        "{err}"
    );

    // Requests over TLS are tagged with their TCP peer, in the audit log as everywhere.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let served = records
        .iter()
        .find(|r| r["path"] == "/v1/snapshots" && r["status"] == 200)
        .expect("the authorized request was audited");
    assert!(
        served["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{served}"
    );
}

#[test]
fn bad_tls_files_are_refused_in_one_line_and_leave_nothing_behind() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (cert, key) = self_signed();
    let (_, other_key) = self_signed();
    let file = |name: &str, text: &str| {
        let path = h.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let cert = file("cert.pem", &cert);
    let key = file("key.pem", &key);
    let other_key = file("other-key.pem", &other_key);
    let garbage = file("garbage.pem", "this is not a certificate\n");
    let truncated = file("truncated.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
    let missing = h.join("missing.pem").to_str().unwrap().to_string();

    let cases = [
        (&missing, &key, &missing, "No such file"),
        (&cert, &missing, &missing, "No such file"),
        (&garbage, &key, &garbage, "not a PEM file"),
        (&cert, &garbage, &garbage, "not a PEM file"),
        (&truncated, &key, &truncated, "malformed PEM"),
        (&key, &key, &key, "no certificate in it"),
        (&cert, &cert, &cert, "no private key in it"),
        (
            &cert,
            &other_key,
            &other_key,
            "does not match the certificate",
        ),
    ];
    let socket = h.join("forkd.sock");
    let audit = h.join("audit.jsonl");
    for (cert, key, named, problem) in cases {
        let out = forkd_command(h)
            .args(["serve", "--socket"])
            .arg(&socket)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ])
            .arg("--audit-log")
            .arg(&audit)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cert} {key}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(named.as_str()) && err.contains(problem),
            "{err}"
        );
        assert!(!socket.exists(), "a refused start leaves no socket: {err}");
        assert!(!audit.exists(), "a refused start opens no audit log: {err}");
    }

    // The two files go together, and with a TCP listener.
    for args in [
        vec!["--listen", "127.0.0.1:0", "--tls-cert", &cert],
        vec!["--listen", "127.0.0.1:0", "--tls-key", &key],
        vec!["--tls-cert", &cert, "--tls-key", &key],
    ] {
        let out = forkd_command(h)
            .args(["serve", "--socket"])
            .arg(&socket)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains("required"), "{args:?}: {err}");
        assert!(!socket.exists(), "{args:?}");
    }
}

/// `forkd ARGS` as a client of the daemon at `socket`.
fn client(home: &Path, socket: &Path, args: &[&str]) -> std::process::Output {
    forkd_command(home)
        .env("FORKD_HOST", socket)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_cli_spawns_lists_and_kills_through_the_daemon_and_says_when_there_is_none() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let nowhere = h.join("no-daemon.sock");
    let out = client(h, &nowhere, &["ps"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no forkd daemon answers at unix:") && err.contains("forkd serve"),
        "{err}"
    );
    let local = h.join("local.txt");
    std::fs::write(&local, "local\n").unwrap();
    let local = local.to_str().unwrap();
    for args in [
        &["eval", "sb-x", "1 + 1"][..],
        &["exec", "-d", "sb-x", "--", "true"],
        &["cp", local, "sb-x:/tmp/f"],
        &["cp", "sb-x:/etc/hostname", local],
    ] {
        let out = client(h, &nowhere, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("no forkd daemon answers at unix:"),
            "{args:?}: {err}"
        );
    }
    // cp needs exactly one side in a sandbox; that is known before any daemon is asked.
    for (args, says) in [
        (
            &["cp", local, "./other:name"][..],
            "neither side is in a sandbox",
        ),
        (&["cp", "-", "-"], "neither side is in a sandbox"),
        (&["cp", "sb-a:/x", "sb-b:/y"], "both sides are in a sandbox"),
    ] {
        let out = client(h, &nowhere, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(!h.join("other:name").exists());
    if !forkd_test_support::kvm_available("the_cli_spawns_lists_and_kills_through_the_daemon") {
        return;
    }
    let _reaper = ZygoteReaper(h.to_path_buf());
    common::snapshot_demo(h, "demo");
    let daemon = Daemon::start(h, &[]);
    let sock = daemon.socket.clone();
    let ok = |args: &[&str]| {
        let out = client(h, &sock, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let spawned = ok(&["spawn", "--tag", "demo", "-n", "2", "--label", "team=x"]);
    let ids: Vec<&str> = spawned.lines().collect();
    assert_eq!(ids.len(), 2, "{spawned}");
    let ps = ok(&["ps"]);
    assert!(ps.starts_with("ID"), "{ps}");
    for id in &ids {
        assert!(ps.contains(id), "{ps}");
    }
    assert!(ps.contains("team=x"), "{ps}");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["ps", "--json", "--label", "team=y"])).unwrap();
    assert!(listed["sandboxes"].as_array().unwrap().is_empty());

    // exec in a guest without an agent: the daemon's one-line reason, exit 1.
    let out = client(h, &sock, &["exec", ids[0], "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("built-in guest"), "{err}");
    // So do eval, a detached exec and cp either way; a failed download leaves no file.
    let upload_src = h.join("upload.bin");
    std::fs::write(&upload_src, vec![5u8; 8 << 20]).unwrap();
    let upload_src = upload_src.to_str().unwrap();
    let remote = format!("{}:/tmp/f", ids[0]);
    let download_dst = h.join("downloaded");
    let download_dst = download_dst.to_str().unwrap();
    for args in [
        &["eval", ids[0], "1 + 1"][..],
        &["exec", "-d", ids[0], "--", "sleep", "1"],
        &["cp", upload_src, &remote],
        &["cp", &remote, download_dst],
    ] {
        let out = client(h, &sock, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("built-in guest"), "{args:?}: {err}");
    }
    assert!(!Path::new(download_dst).exists());
    let out = client(h, &sock, &["cp", local, "sb-nosuch:/tmp/f"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cp to sb-nosuch:/tmp/f") && err.contains("sb-nosuch"),
        "{err}"
    );

    assert_eq!(ok(&["kill", ids[0]]).trim(), ids[0]);
    let out = client(h, &sock, &["kill", ids[0]]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a second kill of the same id fails"
    );
    ok(&["kill", "--all"]);
    assert!(daemon.get("/v1/sandboxes").json()["sandboxes"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn mkdir_and_background_processes_work_through_the_daemon_against_a_real_agent() {
    let Some(demo) = demo_daemon(
        "mkdir_and_background_processes_work_through_the_daemon_against_a_real_agent",
        &[],
    ) else {
        return;
    };
    let sandbox = host_agent_sandbox(&demo);
    let daemon = &demo.daemon;
    let work = tempfile::tempdir().unwrap();
    let w = work.path().to_str().unwrap();
    let sb = format!("/v1/sandboxes/{}", sandbox.id);
    let call = |method: &str, path: &str| {
        request(&daemon.unix(), method, &format!("{sb}{path}"), &[], b"").unwrap()
    };

    // mkdir: 201 with the stat, 200 for an existing one with parents, else the agent's refusal.
    let made = call("POST", &format!("/files/mkdir?path={w}/a&mode=700"));
    assert_eq!(made.status, 201, "{}", made.text());
    assert_eq!(made.json()["stat"]["kind"], "dir");
    assert_eq!(made.json()["stat"]["mode"], 0o700);
    let deep = call("POST", &format!("/files/mkdir?path={w}/b/c/d&parents=true"));
    assert_eq!(deep.status, 201, "{}", deep.text());
    assert!(work.path().join("b/c/d").is_dir());
    let again = call("POST", &format!("/files/mkdir?path={w}/b/c/d&parents=true"));
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["created"], false);
    std::fs::write(work.path().join("file"), "x").unwrap();
    assert_error(
        &call("POST", &format!("/files/mkdir?path={w}/a")),
        409,
        "conflict",
    );
    assert_error(
        &call("POST", &format!("/files/mkdir?path={w}/no/such")),
        404,
        "not_found",
    );
    assert_error(
        &call("POST", &format!("/files/mkdir?path={w}/file/sub")),
        409,
        "not_a_directory",
    );

    // A background process: 201 with its pid, its output and exit code at the wait.
    let start = |body: serde_json::Value| {
        let started = post_json(daemon, &format!("{sb}/processes"), &body.to_string());
        assert_eq!(started.status, 201, "{}", started.text());
        started.json()["pid"].as_u64().unwrap()
    };
    let pid = start(serde_json::json!({"cmd": "echo hi; echo e >&2; exit 3"}));
    let waited = call("POST", &format!("/processes/{pid}/wait?timeout=60"));
    assert_eq!(waited.status, 200, "{}", waited.text());
    let waited = waited.json();
    assert_eq!(waited["state"], "exited", "{waited}");
    assert_eq!(waited["exit_code"], 3);
    assert_eq!(
        (waited["stdout"].as_str(), waited["stderr"].as_str()),
        (Some("hi\n"), Some("e\n"))
    );
    assert_error(
        &call("POST", &format!("/processes/{pid}/wait")),
        404,
        "not_found",
    );

    // Listed while it runs; killed (its group) with the signal asked for; the wait says so.
    let sleeper = start(serde_json::json!({"cmd": ["sleep", "300"]}));
    let listed = call("GET", "/processes").json();
    let procs = listed["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{listed}");
    assert_eq!(
        (procs[0]["pid"].as_u64(), procs[0]["state"].as_str()),
        (Some(sleeper), Some("running"))
    );
    let peek = call("POST", &format!("/processes/{sleeper}/wait?timeout=0")).json();
    assert_eq!(peek["state"], "running", "{peek}");
    assert_error(
        &call("DELETE", &format!("/processes/{sleeper}?signal=99")),
        400,
        "bad_request",
    );
    let killed = call("DELETE", &format!("/processes/{sleeper}?signal=TERM"));
    assert_eq!(killed.status, 200, "{}", killed.text());
    assert_eq!(killed.json()["signal"], 15);
    let waited = call("POST", &format!("/processes/{sleeper}/wait?timeout=60")).json();
    assert_eq!(
        (waited["state"].as_str(), waited["signal"].as_i64()),
        (Some("exited"), Some(15))
    );
    assert_error(
        &call("DELETE", &format!("/processes/{sleeper}")),
        404,
        "not_found",
    );
    assert_error(
        &call("POST", "/processes/999999999/wait?timeout=0"),
        404,
        "not_found",
    );
    assert!(call("GET", "/processes").json()["processes"]
        .as_array()
        .unwrap()
        .is_empty());
    let refused = post_json(
        daemon,
        &format!("{sb}/processes"),
        r#"{"cmd": ["/nonexistent/x"]}"#,
    );
    assert_error(&refused, 422, "spawn_failed");
    let relative = post_json(
        daemon,
        &format!("{sb}/processes"),
        r#"{"cmd": "true", "cwd": "tmp"}"#,
    );
    assert_error(&relative, 400, "bad_request");
    assert!(call("GET", "/processes").json()["processes"]
        .as_array()
        .unwrap()
        .is_empty());

    // The CLI: exec -d prints the pid; cp both ways (and through stdin/stdout); eval.
    let sock = daemon.socket.clone();
    let h = demo.home.path();
    let ok = |args: &[&str], stdin: Option<&[u8]>| {
        let mut cmd = forkd_command(h);
        cmd.env("FORKD_HOST", &sock).args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut input, stdin.unwrap_or_default()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    };
    let out = ok(
        &["exec", "-d", &sandbox.id, "--", "sh", "-c", "echo detached"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let waited = call("POST", &format!("/processes/{pid}/wait?timeout=60")).json();
    assert_eq!(waited["stdout"], "detached\n", "{waited}");

    let local = work.path().join("local.sh");
    std::fs::write(&local, "#!/bin/sh\necho copied\n").unwrap();
    std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    let remote_dir = format!("{}:{w}/a/", sandbox.id);
    let out = ok(&["cp", local.to_str().unwrap(), &remote_dir], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uploaded = work.path().join("a/local.sh");
    assert_eq!(
        std::fs::read(&uploaded).unwrap(),
        b"#!/bin/sh\necho copied\n"
    );
    let mode = std::fs::metadata(&uploaded).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o750
    );
    let back = work.path().join("back.sh");
    let remote_file = format!("{}:{}", sandbox.id, uploaded.display());
    let out = ok(&["cp", &remote_file, back.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&back).unwrap(), b"#!/bin/sh\necho copied\n");
    let mode = std::fs::metadata(&back).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o750
    );
    let piped = format!("{}:{w}/piped.txt", sandbox.id);
    let out = ok(&["cp", "-", &piped], Some(b"through stdin"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ok(&["cp", &piped, "-"], None);
    assert_eq!(out.stdout, b"through stdin");
    let missing = format!("{}:{w}/nope", sandbox.id);
    let out = ok(
        &["cp", &missing, work.path().join("nope").to_str().unwrap()],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!work.path().join("nope").exists());

    if !std::process::Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_ok_and(|s| s.success())
    {
        return;
    }
    let out = ok(&["eval", &sandbox.id, "x = 6 * 7\nprint('side')\nx"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "side\n42\n");
    let out = ok(&["eval", &sandbox.id, "-"], Some(b"x + 1"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "43\n",
        "state is kept, code from stdin"
    );
    let out = ok(&["eval", &sandbox.id, "1/0"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("ZeroDivisionError: division by zero"), "{err}");
}

#[test]
fn a_silent_exec_stream_carries_heartbeats_and_a_client_that_leaves_ends_its_command() {
    let Some(demo) = demo_daemon("a_silent_exec_stream_carries_heartbeats", &[]) else {
        return;
    };
    let sandbox = host_agent_sandbox(&demo);
    let daemon = &demo.daemon;
    let exec_path = format!("/v1/sandboxes/{}/exec", sandbox.id);
    let quiet = post_json(
        daemon,
        &exec_path,
        r#"{"cmd": "echo started; sleep 7; echo done"}"#,
    );
    assert_eq!(quiet.status, 200, "{}", quiet.text());
    let kinds: Vec<String> = quiet
        .text()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["type"].to_string())
        .collect();
    let beat = kinds.iter().position(|k| k == "\"heartbeat\"");
    assert!(
        beat.is_some_and(|b| b > 0 && b < kinds.len() - 2),
        "{kinds:?}"
    );
    assert_eq!(kinds.last().unwrap(), "\"exit\"", "{kinds:?}");

    // The client leaves while the command is silent: the command (its process) ends.
    let work = tempfile::tempdir().unwrap();
    let pid_file = work.path().join("pid");
    let body = serde_json::json!({
        "cmd": format!("echo $$ > {}; echo started; exec sleep 300", pid_file.display())
    })
    .to_string();
    common::exec_then_leave(daemon, &exec_path, &body, "started");
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    // Its end is noticed at the next heartbeat, seconds from now: it still runs.
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state.split_whitespace().nth(2) == Some("Z") {
            break; // ended; its parent has yet to reap it
        }
        assert!(Instant::now() < deadline, "sleep 300 outlived its client");
        std::thread::sleep(Duration::from_millis(100));
    }
}
