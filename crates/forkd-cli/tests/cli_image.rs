//! `forkd kernel fetch|status` and `forkd image build` through the binary: output, exit codes
//! and one-line errors for bad input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn forkd(env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("FORKD_AGENT_BIN")
        .env_remove("FORKD_RECIPES");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run forkd")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed command: exit 1 and exactly one line on stderr, containing `needle`.
fn assert_one_line_error(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "stdout: {}", stdout(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("forkd: error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {why}");
}

fn repo_recipes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes")
}

#[test]
fn image_list_on_an_empty_cache_says_how_to_build_one() {
    let cache = tempfile::tempdir().unwrap();
    let out = forkd(&[("FORKD_CACHE", cache.path())], &["image", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("forkd image build RECIPE"),
        "{}",
        stdout(&out)
    );
    let out = forkd(
        &[("FORKD_CACHE", cache.path())],
        &["image", "list", "--json"],
    );
    assert_eq!(stdout(&out).trim(), "[]");
}

#[test]
fn kernel_status_on_an_empty_cache_says_how_to_get_one() {
    let cache = tempfile::tempdir().unwrap();
    let out = forkd(&[("FORKD_CACHE", cache.path())], &["kernel", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("no guest kernel cached"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("forkd kernel fetch"));
    let out = forkd(
        &[("FORKD_CACHE", cache.path())],
        &["kernel", "status", "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kernels"], serde_json::json!([]));
    assert!(v["current"].is_null());
}

#[test]
fn kernel_fetch_without_apt_fails_naming_apt_and_leaves_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let empty_path = tempfile::tempdir().unwrap();
    let out = forkd(
        &[("FORKD_CACHE", cache.path()), ("PATH", empty_path.path())],
        &["kernel", "fetch"],
    );
    assert_one_line_error(&out, "`apt-get` not found on PATH");
    assert!(stderr(&out).contains("install the Debian package apt"));
    assert!(!cache.path().join("kernels").exists());
}

#[test]
fn kernel_fetch_then_status_report_the_cached_kernel() {
    let apt = Command::new("apt-cache")
        .args(["show", "--no-all-versions", "linux-image-cloud-amd64"])
        .output();
    if !apt.is_ok_and(|o| o.status.success() && !o.stdout.is_empty()) {
        skip("apt does not know linux-image-cloud-amd64: forkd kernel fetch not run");
        return;
    }
    // The default cache, so the ~27 MB download happens once across test runs.
    let out = forkd(&[], &["kernel", "fetch", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let fetched: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let release = fetched["kernel"]["info"]["release"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(release.ends_with("-cloud-amd64"), "{release}");
    assert!(Path::new(fetched["kernel"]["vmlinuz"].as_str().unwrap()).is_file());

    let out = forkd(&[], &["kernel", "fetch"]);
    assert!(stdout(&out).contains("already cached"), "{}", stdout(&out));
    let out = forkd(&[], &["kernel", "status"]);
    assert!(stdout(&out).contains(&release), "{}", stdout(&out));
}

#[test]
fn image_build_rejects_unknown_and_malformed_recipes() {
    let recipes = tempfile::tempdir().unwrap();
    std::fs::write(
        recipes.path().join("good.toml"),
        "name = \"good\"\nbase = \"busybox\"\n",
    )
    .unwrap();
    std::fs::write(
        recipes.path().join("broken.toml"),
        "name = \"broken\"\nbase = \"busybox\"\nmemory_mib = \"lots\"\n",
    )
    .unwrap();
    let env = [("FORKD_RECIPES", recipes.path())];

    let out = forkd(&env, &["image", "build", "nosuch"]);
    assert_one_line_error(&out, "unknown recipe `nosuch`");
    assert!(
        stderr(&out).contains("(known: broken, good)"),
        "{}",
        stderr(&out)
    );

    let out = forkd(&env, &["image", "build", "broken"]);
    assert_one_line_error(&out, "broken.toml: line 3: field `memory_mib`");

    let missing = recipes.path().join("missing.toml");
    let out = forkd(&env, &["image", "build", missing.to_str().unwrap()]);
    assert_one_line_error(&out, "missing.toml does not exist");

    let out = forkd(
        &env,
        &["image", "build", "good", "--agent", "/no/such/agent"],
    );
    assert_one_line_error(
        &out,
        "agent binary /no/such/agent (from --agent) does not exist",
    );

    let out = forkd(&env, &["image", "build", "good", "--agent", "/bin/sh"]);
    assert_one_line_error(&out, "dynamically linked");

    let empty_path = tempfile::tempdir().unwrap();
    let out = forkd(
        &[
            ("FORKD_RECIPES", recipes.path()),
            ("PATH", empty_path.path()),
        ],
        &["image", "build", "good", "--agent", "/bin/sh"],
    );
    assert_one_line_error(&out, "`mkfs.ext4` not found on PATH");
}

#[test]
fn image_build_minimal_writes_the_image_and_reuses_it() {
    let busybox = Path::new("/bin/busybox");
    let ok = Command::new("apt-cache")
        .args(["show", "--no-all-versions", "busybox-static"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !ok || !busybox.is_file() || Command::new("mkfs.ext4").arg("-V").output().is_err() {
        skip("image build via the CLI needs apt (busybox-static), mkfs.ext4 and a static /bin/busybox");
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("min.ext4");
    let recipes = repo_recipes();
    let env = [
        ("FORKD_CACHE", cache.path()),
        ("FORKD_RECIPES", recipes.as_path()),
    ];
    // The stand-in agent comes through FORKD_AGENT_BIN, the way scripts pass the real one.
    let mut env_with_agent = env.to_vec();
    env_with_agent.push(("FORKD_AGENT_BIN", busybox));
    let out = forkd(
        &env_with_agent,
        &[
            "image",
            "build",
            "minimal",
            "-o",
            output.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let built: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(built["already_present"], false);
    assert_eq!(built["info"]["recipe"]["name"], "minimal");
    let image = PathBuf::from(built["image"].as_str().unwrap());
    assert!(image.starts_with(cache.path().join("images")));
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&image).unwrap()
    );

    let out = forkd(
        &env,
        &["image", "build", "minimal", "--agent", "/bin/busybox"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("image minimal already built"),
        "{}",
        stdout(&out)
    );
}
