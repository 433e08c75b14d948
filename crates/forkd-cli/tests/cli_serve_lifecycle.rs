//! A daemon's sandboxes beyond create and delete, with the built-in demo guest: BRANCH a
//! running sandbox and fan out from the branch, pause to disk and resume under the same id
//! (across a daemon killed with SIGKILL too), the console log, bulk delete, and the CLI verbs.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    assert_error, create, demo_answers, demo_counter, demo_daemon, forkd_command, ids, post_json,
    zygote_count, zygote_pids, Daemon,
};
use forkd_test_support::http::request;

fn delete(daemon: &Daemon, path: &str) -> forkd_test_support::http::Response {
    request(&daemon.unix(), "DELETE", path, &[], b"").unwrap()
}

fn snapshot_tags(daemon: &Daemon) -> Vec<String> {
    let list = daemon.get("/v1/snapshots").json();
    let mut tags: Vec<String> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tag"].as_str().unwrap().to_string())
        .collect();
    tags.sort();
    tags
}

#[test]
fn a_branch_of_one_of_100_sandboxes_is_forked_20_times_and_its_children_continue_from_it() {
    let Some(demo) = demo_daemon("a_branch_of_one_of_100_sandboxes", &[]) else {
        return;
    };
    let (daemon, h) = (&demo.daemon, demo.home.path());
    let made = create(daemon, serde_json::json!({"tag": "demo", "count": 100}));
    assert_eq!(made.status, 201, "{}", made.text());
    let hundred = ids(&made.json());
    assert_eq!(hundred.len(), 100);
    assert_eq!(ids(&daemon.get("/v1/sandboxes").json()), hundred);
    let source = &hundred[42];

    // The sandbox has counted past its snapshot by the time it is branched; the branch's
    // children start from there, not from the snapshot.
    let before = demo_counter(h, source).expect("the sandbox answers");
    let branched = post_json(
        daemon,
        &format!("/v1/sandboxes/{source}/branch"),
        r#"{"tag": "forty-two", "diff": true}"#,
    );
    assert_eq!(branched.status, 201, "{}", branched.text());
    let report = branched.json();
    assert_eq!(report["tag"], "forty-two");
    assert_eq!(report["mode"], "diff");
    assert_eq!(report["parent"], "demo");
    assert!(report["pause_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        demo_answers(h, source),
        "the source runs on after its branch"
    );
    let manifest = daemon.get("/v1/snapshots/forty-two").json();
    assert_eq!(manifest["parent_tag"], "demo", "{manifest}");

    let kids = create(daemon, serde_json::json!({"tag": "forty-two", "count": 20}));
    assert_eq!(kids.status, 201, "{}", kids.text());
    let kids = ids(&kids.json());
    assert_eq!(kids.len(), 20);
    for kid in &kids {
        let counter = demo_counter(h, kid).expect("a branch child answers");
        assert!(
            counter >= before,
            "child {kid} of the branch counts from {counter}, below the sandbox's {before} at the branch"
        );
    }

    // A second branch of the same sandbox is a diff against its first; a full one stands alone.
    let second = post_json(daemon, &format!("/v1/sandboxes/{source}/branch"), "");
    assert_eq!(second.status, 201, "{}", second.text());
    assert_eq!(second.json()["parent"], "forty-two");
    assert_eq!(second.json()["tag"], format!("{source}-branch-1"));
    let full = post_json(
        daemon,
        &format!("/v1/sandboxes/{source}/branch"),
        r#"{"diff": false}"#,
    );
    assert_eq!(full.status, 201, "{}", full.text());
    assert_eq!(full.json()["mode"], "full");
    assert!(full.json()["parent"].is_null());

    // Bad branches change nothing.
    let tags = snapshot_tags(daemon);
    for (path, body, status, code) in [
        (
            format!("/v1/sandboxes/{source}/branch"),
            r#"{"tag": "forty-two"}"#,
            409,
            "conflict",
        ),
        (
            format!("/v1/sandboxes/{source}/branch"),
            r#"{"tag": "../x"}"#,
            400,
            "bad_request",
        ),
        (
            format!("/v1/sandboxes/{source}/branch"),
            r#"{"depth": 3}"#,
            400,
            "bad_request",
        ),
        (
            format!("/v1/sandboxes/{source}/branch"),
            "{",
            400,
            "bad_request",
        ),
        (
            "/v1/sandboxes/sb-nosuch/branch".to_string(),
            "{}",
            404,
            "not_found",
        ),
    ] {
        assert_error(&post_json(daemon, &path, body), status, code);
    }
    assert_eq!(snapshot_tags(daemon), tags);

    let metrics = daemon.get("/metrics").text();
    assert!(
        metrics
            .lines()
            .any(|l| l == "forkd_branch_pause_seconds_count 3"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("forkd_warm_shells{tag=\"demo\"}")),
        "{metrics}"
    );

    // Bulk delete: by tag, then everything; without a filter it is refused.
    assert_error(&delete(daemon, "/v1/sandboxes"), 400, "bad_request");
    let by_tag = delete(daemon, "/v1/sandboxes?tag=forty-two");
    assert_eq!(by_tag.status, 200, "{}", by_tag.text());
    let mut deleted: Vec<String> = by_tag.json()["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    deleted.sort();
    assert_eq!(deleted, kids);
    assert_eq!(ids(&daemon.get("/v1/sandboxes").json()), hundred);
    let all = delete(daemon, "/v1/sandboxes?all=true");
    assert_eq!(all.json()["deleted"].as_array().unwrap().len(), 100);
    assert!(ids(&daemon.get("/v1/sandboxes").json()).is_empty());
    let left: Vec<_> = std::fs::read_dir(h.join("daemon/sandboxes"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "sandbox files left: {left:?}");
}

/// The sandbox's console log, once it has one: the demo guest prints its counter every
/// second of its own time.
fn console(daemon: &Daemon, id: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let logs = daemon.get(&format!("/v1/sandboxes/{id}/logs"));
        assert_eq!(logs.status, 200, "{}", logs.text());
        let text = logs.text();
        if !text.is_empty() {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "no console output");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_paused_sandbox_keeps_its_id_resumes_where_it_left_off_and_survives_a_daemon_kill() {
    let Some(mut demo) = demo_daemon("a_paused_sandbox_keeps_its_id", &[]) else {
        return;
    };
    let h = demo.home.path().to_path_buf();
    let h = h.as_path();
    let made = create(
        &demo.daemon,
        serde_json::json!({"tag": "demo", "count": 2, "timeout_secs": 600}),
    );
    assert_eq!(made.status, 201, "{}", made.text());
    let both = ids(&made.json());
    let (id, other) = (&both[0], &both[1]);
    let pid = demo.daemon.get(&format!("/v1/sandboxes/{id}")).json()["pid"]
        .as_i64()
        .unwrap();
    let logs = console(&demo.daemon, id);
    assert!(logs.starts_with("counter "), "{logs:?}");
    let tail = demo.daemon.get(&format!("/v1/sandboxes/{id}/logs?tail=5"));
    assert_eq!(tail.body.len(), 5);

    let before = demo_counter(h, id).unwrap();
    let paused = post_json(&demo.daemon, &format!("/v1/sandboxes/{id}/pause"), "");
    assert_eq!(paused.status, 200, "{}", paused.text());
    let record = paused.json();
    assert_eq!(record["state"], "paused");
    assert_eq!(record["pid"], 0);
    assert!(
        record["expires_at"].is_null(),
        "a paused sandbox does not time out"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "its process is gone"
    );
    assert!(
        !h.join("daemon/sandboxes").join(id).exists(),
        "its files are gone"
    );
    assert!(demo_answers(h, other), "its sibling runs on");
    assert!(snapshot_tags(&demo.daemon).contains(&format!("_paused-{id}-1")));

    // While paused: what needs its VM is refused, by name.
    for path in ["pause", "branch", "timeout"] {
        let body = if path == "timeout" {
            r#"{"timeout_secs": 5}"#
        } else {
            ""
        };
        assert_error(
            &post_json(&demo.daemon, &format!("/v1/sandboxes/{id}/{path}"), body),
            409,
            "paused",
        );
    }
    assert_error(
        &demo.daemon.get(&format!("/v1/sandboxes/{id}/logs")),
        409,
        "paused",
    );
    assert_error(
        &post_json(&demo.daemon, &format!("/v1/sandboxes/{other}/resume"), ""),
        409,
        "not_paused",
    );

    // The daemon dies; the paused sandbox is still there when it comes back.
    demo.daemon.child.kill().unwrap();
    demo.daemon.child.wait().unwrap();
    demo.daemon = Daemon::start(h, &[]);
    let daemon = &demo.daemon;
    let record = daemon.get(&format!("/v1/sandboxes/{id}")).json();
    assert_eq!(record["state"], "paused", "{record}");

    let resumed = post_json(daemon, &format!("/v1/sandboxes/{id}/resume"), "");
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    let record = resumed.json();
    assert_eq!(record["state"], "running");
    assert_eq!(record["id"], id.as_str());
    assert!(record["pid"].as_i64().unwrap() > 0);
    assert!(
        record["expires_at"].as_u64().is_some(),
        "its timeout runs again"
    );
    let after = demo_counter(h, id).expect("the resumed sandbox answers under its id");
    assert!(after >= before, "resumed at {after}, paused at {before}");

    // Paused and resumed again: each pause is a diff of the last.
    let again = post_json(daemon, &format!("/v1/sandboxes/{id}/pause"), "");
    assert_eq!(again.status, 200, "{}", again.text());
    let manifest = daemon.get(&format!("/v1/snapshots/_paused-{id}-2")).json();
    assert_eq!(manifest["parent_tag"], format!("_paused-{id}-1"));
    let resumed = post_json(
        daemon,
        &format!("/v1/sandboxes/{id}/resume"),
        r#"{"timeout_secs": 60}"#,
    );
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    assert!(demo_counter(h, id).unwrap() >= after);
    assert_eq!(
        zygote_count(h),
        2,
        "one zygote for demo, one serving the resumed sandbox"
    );

    // Deleting it removes its pause snapshots and the zygote that served it.
    assert_eq!(delete(daemon, &format!("/v1/sandboxes/{id}")).status, 200);
    let tags = snapshot_tags(daemon);
    assert!(!tags.iter().any(|t| t.starts_with("_paused-")), "{tags:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while zygote_count(h) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pause's zygote stays"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_cli_branches_pauses_resumes_and_shows_logs() {
    let Some(demo) = demo_daemon("the_cli_branches_pauses_resumes_and_shows_logs", &[]) else {
        return;
    };
    let (daemon, h) = (&demo.daemon, demo.home.path());
    let run = |args: &[&str]| {
        forkd_command(h)
            .env("FORKD_HOST", &daemon.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let id = ok(&["spawn", "--tag", "demo"]).trim().to_string();
    let branch = ok(&["branch", &id, "--tag", "cli-branch"]);
    assert!(branch.starts_with("cli-branch (diff of "), "{branch}");
    let kid = ok(&["spawn", "--tag", "cli-branch"]).trim().to_string();
    assert!(demo_answers(h, &kid));
    console(daemon, &id);
    assert!(ok(&["logs", &id]).contains("counter "));
    assert_eq!(ok(&["pause", &id]).trim(), id);
    assert!(ok(&["ps"]).contains("paused"));
    let out = run(&["logs", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is paused; resume it first"), "{err}");
    assert_eq!(ok(&["resume", &id]).trim(), id);
    assert!(demo_answers(h, &id));
    let out = run(&["branch", &id, "--tag", "cli-branch"]);
    assert_eq!(out.status.code(), Some(1));
    ok(&["kill", "--all"]);
    assert!(ids(&daemon.get("/v1/sandboxes").json()).is_empty());
}

/// The daemon's sandbox records and its warm shells account for every process its zygotes
/// forked; and no sandbox directory is left of a sandbox that is not running.
fn assert_nothing_leaked(daemon: &Daemon, home: &Path) {
    let running: Vec<serde_json::Value> = daemon.get("/v1/sandboxes").json()["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "running")
        .cloned()
        .collect();
    let metrics = daemon.get("/metrics").text();
    let warm: usize = metrics
        .lines()
        .filter(|l| l.starts_with("forkd_warm_shells{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<usize>().unwrap())
        .sum();
    let processes = zygote_pids(home).len();
    assert_eq!(
        processes,
        zygote_count(home) + running.len() + warm,
        "zygote processes beyond the zygotes, {} sandboxes and {warm} warm shells",
        running.len()
    );
    let mut dirs: Vec<String> = std::fs::read_dir(home.join("daemon/sandboxes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut ids: Vec<String> = running
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(dirs, ids, "sandbox directories");
}

#[test]
fn a_daemon_killed_with_50_running_and_10_spawns_in_flight_restarts_with_all_of_them_and_no_leak() {
    let Some(mut demo) = demo_daemon("a_daemon_killed_with_50_running", &[]) else {
        return;
    };
    let h = demo.home.path().to_path_buf();
    let h = h.as_path();
    let made = create(
        &demo.daemon,
        serde_json::json!({"tag": "demo", "count": 50}),
    );
    assert_eq!(made.status, 201, "{}", made.text());
    let fifty = ids(&made.json());

    // Ten creates on their own connections; the daemon dies while they are under way.
    let endpoint = demo.daemon.unix();
    let in_flight: Vec<_> = (0..10)
        .map(|_| {
            let endpoint = endpoint.clone();
            std::thread::spawn(move || {
                request(
                    &endpoint,
                    "POST",
                    "/v1/sandboxes",
                    &[("Content-Type", "application/json")],
                    br#"{"tag": "demo"}"#,
                )
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(3));
    demo.daemon.child.kill().unwrap();
    demo.daemon.child.wait().unwrap();
    let answered: Vec<String> = in_flight
        .into_iter()
        .filter_map(|t| t.join().unwrap().ok())
        .filter(|r| r.status == 201)
        .flat_map(|r| ids(&r.json()))
        .collect();
    eprintln!(
        "{} of 10 in-flight creates answered before the kill",
        answered.len()
    );

    demo.daemon = Daemon::start(h, &[]);
    let daemon = &demo.daemon;
    let listed = ids(&daemon.get("/v1/sandboxes").json());
    for id in fifty.iter().chain(&answered) {
        assert!(listed.contains(id), "{id} was running and is not listed");
        assert!(demo_answers(h, id), "{id} does not answer under its id");
    }
    assert_nothing_leaked(daemon, h);
    let all = request(&daemon.unix(), "DELETE", "/v1/sandboxes?all=true", &[], b"").unwrap();
    assert_eq!(all.status, 200);
    assert_nothing_leaked(daemon, h);
}

#[test]
fn limits_land_in_a_cgroup_leaf_per_sandbox_or_are_refused_where_the_host_has_none() {
    let Some(demo) = demo_daemon("limits_land_in_a_cgroup_leaf_per_sandbox", &[]) else {
        return;
    };
    let (daemon, h) = (&demo.daemon, demo.home.path());
    for (limits, field) in [
        (serde_json::json!({"memory_mib": 1}), "limits.memory_mib 1"),
        (serde_json::json!({"cpus": 0.0}), "limits.cpus 0"),
        (serde_json::json!({"pids": 2}), "limits.pids 2"),
    ] {
        let body = serde_json::json!({"tag": "demo", "limits": limits});
        let message = assert_error(&create(daemon, body), 400, "bad_request");
        assert!(message.starts_with(field), "{message}");
    }
    assert_error(
        &create(
            daemon,
            serde_json::json!({"tag": "demo", "limits": {"disk": 1}}),
        ),
        400,
        "bad_request",
    );
    let body = serde_json::json!({
        "tag": "demo", "count": 2,
        "limits": {"memory_mib": 512, "cpus": 0.5, "pids": 64}
    });
    let made = create(daemon, body);
    if made.status == 422 {
        let message = assert_error(&made, 422, "limits_unsupported");
        assert!(
            message.starts_with("resource limits need cgroup v2: "),
            "{message}"
        );
        eprintln!("SKIP: cgroup limits on this host: {message}");
        assert!(
            ids(&daemon.get("/v1/sandboxes").json()).is_empty(),
            "nothing started"
        );
        return;
    }
    assert_eq!(made.status, 201, "{}", made.text());
    let sandboxes = made.json()["sandboxes"].as_array().unwrap().clone();
    let parent = forkd_sandbox::cgroup::CgroupParent::existing().expect("a cgroup parent");
    for s in &sandboxes {
        let id = s["id"].as_str().unwrap();
        assert_eq!(s["limits"]["memory_mib"], 512);
        let leaf = parent.leaf(id);
        let read = |f: &str| std::fs::read_to_string(leaf.join(f)).unwrap();
        assert_eq!(read("memory.max").trim(), "536870912");
        assert_eq!(read("cpu.max").trim(), "50000 100000");
        assert_eq!(read("pids.max").trim(), "64");
        assert_eq!(read("cgroup.procs").trim(), s["pid"].to_string());
        assert!(demo_answers(h, id));
    }
    let all = request(&daemon.unix(), "DELETE", "/v1/sandboxes?all=true", &[], b"").unwrap();
    assert_eq!(all.status, 200);
    for s in &sandboxes {
        assert!(
            !parent.leaf(s["id"].as_str().unwrap()).exists(),
            "leaf left"
        );
    }
}

#[test]
fn sandboxes_a_daemon_died_before_writing_down_are_adopted_from_their_zygote() {
    let Some(mut demo) = demo_daemon("sandboxes_a_daemon_died_before_writing_down", &[]) else {
        return;
    };
    let h = demo.home.path().to_path_buf();
    let h = h.as_path();
    let made = create(
        &demo.daemon,
        serde_json::json!({"tag": "demo", "count": 3, "metadata": {"team": "a"}}),
    );
    let three = ids(&made.json());
    demo.daemon.child.kill().unwrap();
    demo.daemon.child.wait().unwrap();
    // As if it had died before its state file caught up with the create.
    std::fs::remove_file(h.join("daemon/sandboxes.json")).unwrap();
    demo.daemon = Daemon::start(h, &[]);
    let listed = demo.daemon.get("/v1/sandboxes?metadata.team=a").json();
    assert_eq!(ids(&listed), three);
    for id in &three {
        assert!(demo_answers(h, id));
    }
    assert_nothing_leaked(&demo.daemon, h);
}

/// A BRANCH (a diff snapshot) published as a chain pack: a fresh host pulling it gets the
/// parent first, and a host that has the parent downloads only the link; both fork from it.
#[test]
fn a_branch_published_as_a_chain_pack_pulls_its_parent_first_then_only_the_link() {
    let Some(demo) = demo_daemon(
        "a_branch_published_as_a_chain_pack_pulls_its_parent_first_then_only_the_link",
        &[],
    ) else {
        return;
    };
    let (daemon, h) = (&demo.daemon, demo.home.path());
    let cli = |home: &Path, args: &[&str]| {
        let out = forkd_command(home)
            .env("FORKD_HOST", &daemon.socket)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env_remove("FORKD_HUB_URL")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let ok = |home: &Path, args: &[&str]| {
        let (success, text) = cli(home, args);
        assert!(success, "{args:?}: {text}");
        text
    };
    let id = ok(h, &["spawn", "--tag", "demo"]).trim().to_string();
    assert!(ok(h, &["branch", &id, "--tag", "leaf"]).starts_with("leaf (diff of "));
    ok(h, &["kill", "--all"]);

    let site = h.join("site");
    let s = site.to_str().unwrap();
    ok(
        h,
        &[
            "hub",
            "publish",
            "--tag",
            "demo",
            "--dir",
            s,
            "--name",
            "acme/demo",
            "--version",
            "v1",
        ],
    );
    let (refused, text) = cli(
        h,
        &[
            "hub",
            "publish",
            "--tag",
            "leaf",
            "--dir",
            s,
            "--name",
            "acme/leaf",
            "--version",
            "v1",
        ],
    );
    assert!(
        !refused && text.contains("--parent NS/NAME@VERSION"),
        "{text}"
    );
    ok(
        h,
        &[
            "hub",
            "publish",
            "--tag",
            "leaf",
            "--dir",
            s,
            "--name",
            "acme/leaf",
            "--version",
            "v1",
            "--parent",
            "acme/demo@v1",
        ],
    );
    let registry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(site.join("registry.json")).unwrap()).unwrap();
    let size = |p: &str| {
        registry["packages"][p]["versions"]["v1"]["size_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(size("acme/leaf") < size("acme/demo"), "{registry}");

    // A fresh host: the parent comes first, then the link; the chain forks.
    let fresh = tempfile::tempdir().unwrap();
    let out = ok(fresh.path(), &["pull", "acme/leaf", "--hub", s]);
    assert!(
        out.contains("as leaf") && out.contains("its parent acme/demo@v1 pulled first"),
        "{out}"
    );
    let images = ok(fresh.path(), &["images"]);
    assert!(
        images
            .lines()
            .any(|l| l.starts_with("leaf ") && l.contains(" demo ")),
        "{images}"
    );
    ok(fresh.path(), &["fork", "--tag", "leaf", "-n", "2"]);

    // A host that has the parent: only the link crosses.
    let warm = tempfile::tempdir().unwrap();
    ok(warm.path(), &["pull", "acme/demo", "--hub", s]);
    let out = forkd_command(warm.path())
        .args(["pull", "acme/leaf", "--hub", s, "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["fetched_bytes"].as_u64(),
        Some(size("acme/leaf")),
        "{report}"
    );
    assert_eq!(report["parents"].as_array().unwrap().len(), 0, "{report}");
    ok(warm.path(), &["fork", "--tag", "leaf", "-n", "1"]);
    eprintln!(
        "chain pack: parent {} bytes, link {} bytes",
        size("acme/demo"),
        size("acme/leaf")
    );
}
