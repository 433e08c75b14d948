//! The hub commands through the real `forkd` binary: publish, hub serve, pull, images --hub,
//! pack / unpack, push, keygen + signed pull, and one-line errors.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{python_static_server, Serve};
use forkd_store::{SnapshotMeta, Store, Tag};

const MIB: u64 = 1 << 20;

fn forkd(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(args)
        .env("FORKD_HOME", home)
        .env("FORKD_TRUST_FILE", home.join("trust.toml"))
        .env("FORKD_HUB_RETRIES", "1")
        .env("FORKD_HUB_BACKOFF_MS", "10")
        .env_remove("FORKD_HUB_URL")
        // Never the user's own `forkd hub use` setting.
        .env("XDG_CONFIG_HOME", home.join("config"))
        // Used only where a test creates it (runs' sockets then stay out of /dev/shm).
        .env("XDG_RUNTIME_DIR", home.join("runtime"))
        .output()
        .unwrap()
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = forkd(home, args);
    assert!(
        out.status.success(),
        "forkd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The command fails with one error line holding `needle` (after any notices of retries).
fn fails(home: &Path, args: &[&str], needle: &str) {
    let out = forkd(home, args);
    assert!(!out.status.success(), "forkd {args:?} succeeded");
    let err = String::from_utf8(out.stderr).unwrap();
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("forkd: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "not one error line: {err:?}");
    assert!(errors[0].contains(needle), "{err:?} lacks {needle:?}");
    assert!(
        err.lines().all(|l| l.starts_with("forkd: ")),
        "stray output: {err:?}"
    );
    assert_no_repeated_cause(errors[0]);
}

/// An OS error is said once, not once per layer that passed it on.
fn assert_no_repeated_cause(line: &str) {
    let parts: Vec<&str> = line.split(": ").collect();
    for pair in parts.windows(2) {
        assert_ne!(pair[0], pair[1], "a cause repeated in {line:?}");
    }
}

/// A synthetic snapshot: sparse memory.bin with pseudo-random runs, small rootfs, vmstate.
fn make_snapshot(home: &Path, tag: &str, seed: u64) {
    let store = Store::open(home).unwrap();
    let staging = store.begin(&Tag::parse(tag).unwrap()).unwrap();
    let mem = std::fs::File::create(staging.path().join("memory.bin")).unwrap();
    mem.set_len(128 * MIB).unwrap();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut buf = vec![0u8; MIB as usize];
    for run in 0..4u64 {
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        mem.write_all_at(&buf, run * 32 * MIB).unwrap();
    }
    let rootfs = std::fs::File::create(staging.path().join("rootfs.ext4")).unwrap();
    rootfs.set_len(32 * MIB).unwrap();
    rootfs.write_all_at(b"ext4 superblock-ish", 1024).unwrap();
    std::fs::write(
        staging.path().join("vmstate.json"),
        format!("{{\"seed\":{seed}}}"),
    )
    .unwrap();
    staging
        .commit(SnapshotMeta {
            memory_mib: 128,
            vcpus: 1,
            description: "cli test".into(),
            ..Default::default()
        })
        .unwrap();
}

/// Starts `forkd hub serve` on a free loopback port; returns it and its base URL.
fn serve(home: &Path, dir: &Path, token_file: &Path) -> (Serve, String) {
    serve_with(home, dir, Some(token_file))
}

/// [`serve`], with or without a token file (without: pushes open, loopback only).
fn serve_with(home: &Path, dir: &Path, token_file: Option<&Path>) -> (Serve, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["hub", "serve", "--dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(
            token_file
                .map(|f| ["--token-file".as_ref(), f.as_os_str()])
                .into_iter()
                .flatten(),
        )
        .env("FORKD_HOME", home)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It announces itself once listening.
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("serving"), "{line}");
    (Serve(child), format!("http://127.0.0.1:{port}/"))
}

#[test]
fn publish_serve_pull_images_push_pack_unpack() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let hub = tempfile::tempdir().unwrap();
    make_snapshot(a.path(), "base", 1);
    make_snapshot(a.path(), "next", 2);
    let hub_dir = hub.path().join("site");
    let hd = hub_dir.to_str().unwrap();
    let out = ok(
        a.path(),
        &[
            "hub",
            "publish",
            "--tag",
            "base",
            "--dir",
            hd,
            "--name",
            "acme/demo",
            "--version",
            "v1",
            "--description",
            "demo image",
        ],
    );
    assert!(out.contains("published base as acme/demo@v1"), "{out}");

    let token = hub.path().join("token");
    std::fs::write(&token, "tok-123\n").unwrap();
    let (_server, url) = serve(a.path(), &hub_dir, &token);

    // Installed under the tag it was packed from, and `images` says what it was pulled as.
    let out = ok(b.path(), &["pull", "acme/demo", "--hub", &url]);
    assert!(out.contains("installed acme/demo@latest as base"), "{out}");
    assert!(ok(b.path(), &["verify", "base"]).contains("ok"));
    let images = ok(b.path(), &["images"]);
    assert!(images.contains("acme/demo@latest"), "{images}");
    let again = ok(b.path(), &["pull", "acme/demo", "--hub", &url]);
    assert!(again.contains("already present and identical"), "{again}");

    // images --hub, with FORKD_HUB_URL and with a URL.
    let json = ok(b.path(), &["images", "--hub", &url, "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2, "{json}");
    assert_eq!(rows[0]["package"], "acme/demo");
    assert_eq!(rows[0]["memory_mib"], 128);
    let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["images", "--hub"])
        .env("FORKD_HOME", b.path())
        .env("FORKD_HUB_URL", &url)
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("PACKAGE") && table.contains("demo image"),
        "{table}"
    );

    // push without a token to the hub server: told what is missing, not a bare 405.
    fails(
        a.path(),
        &[
            "push",
            "--tag",
            "next",
            "--to",
            &url,
            "--name",
            "acme/demo",
            "--version",
            "v2",
        ],
        "push with --token-file FILE",
    );
    // push with the token; with a wrong one it is refused.
    let bad = hub.path().join("bad");
    std::fs::write(&bad, "nope").unwrap();
    fails(
        a.path(),
        &[
            "push",
            "--tag",
            "next",
            "--to",
            &url,
            "--token-file",
            bad.to_str().unwrap(),
            "--name",
            "acme/demo",
            "--version",
            "v2",
        ],
        "403",
    );
    let out = ok(
        a.path(),
        &[
            "push",
            "--tag",
            "next",
            "--to",
            &url,
            "--token-file",
            token.to_str().unwrap(),
            "--name",
            "acme/demo",
            "--version",
            "v2",
        ],
    );
    assert!(out.contains("pushed next as acme/demo@v2"), "{out}");
    let out = ok(
        b.path(),
        &["pull", "acme/demo@v2", "--hub", &url, "--tag", "demo2"],
    );
    assert!(out.contains("as demo2"), "{out}");

    // Errors: unknown version lists the available ones; bad tag; unreachable hub.
    fails(
        b.path(),
        &["pull", "acme/demo@v9", "--hub", &url],
        "available: latest, v1, v2",
    );
    let out = forkd(
        b.path(),
        &["pull", "acme/demo", "--hub", &url, "--tag", "../x"],
    );
    assert!(!out.status.success());
    fails(
        b.path(),
        &["pull", "acme/demo", "--hub", "http://127.0.0.1:9/"],
        "cannot reach",
    );

    // pack / unpack round trip through a file.
    let pack = hub.path().join("next.forkd-snapshot.tar.zst");
    ok(
        a.path(),
        &[
            "pack",
            "--tag",
            "next",
            "-o",
            pack.to_str().unwrap(),
            "--name",
            "acme/next",
        ],
    );
    let c = tempfile::tempdir().unwrap();
    let out = ok(c.path(), &["unpack", pack.to_str().unwrap()]);
    assert!(out.contains("as next"), "{out}");
    assert!(ok(c.path(), &["verify", "next"]).contains("ok"));
    fails(
        c.path(),
        &["unpack", hub.path().join("token").to_str().unwrap()],
        "token",
    );
}

#[test]
fn keygen_sign_and_required_signatures() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    make_snapshot(a.path(), "base", 3);
    let prefix = work.path().join("acme");
    ok(a.path(), &["hub", "keygen", prefix.to_str().unwrap()]);
    fails(
        a.path(),
        &["hub", "keygen", prefix.to_str().unwrap()],
        "already exists",
    );
    let site = work.path().join("site");
    let key = format!("{}.key", prefix.display());
    ok(
        a.path(),
        &[
            "hub",
            "publish",
            "--tag",
            "base",
            "--dir",
            site.to_str().unwrap(),
            "--name",
            "acme/signed",
            "--version",
            "v1",
            "--sign",
            &key,
        ],
    );
    ok(
        a.path(),
        &[
            "hub",
            "publish",
            "--tag",
            "base",
            "--dir",
            site.to_str().unwrap(),
            "--name",
            "acme/plain",
            "--version",
            "v1",
        ],
    );
    std::fs::write(
        b.path().join("trust.toml"),
        format!(
            "require_signatures = true\ntrusted_key_files = [\"{}.pub\"]\n",
            prefix.display()
        ),
    )
    .unwrap();
    let out = ok(
        b.path(),
        &["pull", "acme/signed", "--hub", site.to_str().unwrap()],
    );
    assert!(out.contains("signature verified with key"), "{out}");
    // Under its own tag (under `base` it would be the identical snapshot, already present).
    fails(
        b.path(),
        &[
            "pull",
            "acme/plain",
            "--hub",
            site.to_str().unwrap(),
            "--tag",
            "plain",
        ],
        "unsigned",
    );
}

#[test]
fn the_hub_comes_from_the_flag_the_environment_or_hub_use_and_there_is_no_default() {
    let (a, b, hub) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    make_snapshot(a.path(), "base", 7);
    let hub_dir = hub.path().join("site");
    let hd = hub_dir.to_str().unwrap();
    ok(
        a.path(),
        &[
            "hub",
            "publish",
            "--tag",
            "base",
            "--dir",
            hd,
            "--name",
            "acme/demo",
            "--version",
            "v1",
        ],
    );
    // No hub anywhere: one line saying how to choose one, and nothing installed.
    fails(
        b.path(),
        &["pull", "acme/demo"],
        "no hub chosen: pass --hub URL",
    );
    fails(b.path(), &["images", "--hub"], "forkd hub use URL");
    assert!(Store::open(b.path()).unwrap().list().unwrap().is_empty());
    // A server address without its scheme is not taken for a file path.
    fails(
        b.path(),
        &["pull", "acme/demo", "--hub", "127.0.0.1:9/registry.json"],
        "needs its scheme",
    );
    fails(
        b.path(),
        &["hub", "use", "127.0.0.1:9/"],
        "needs its scheme",
    );

    let out = ok(b.path(), &["hub", "use", hd]);
    let config = b.path().join("config/forkd/config.toml");
    assert!(
        out.contains(&format!("saved in {}", config.display())),
        "{out}"
    );
    assert!(std::fs::read_to_string(&config).unwrap().contains(hd));
    let out = ok(b.path(), &["pull", "acme/demo"]);
    assert!(out.contains("installed acme/demo@latest"), "{out}");

    // --hub wins over the setting; a malformed setting is named in one line.
    std::fs::write(&config, "hub = [").unwrap();
    fails(
        b.path(),
        &["pull", "acme/demo"],
        "config.toml: not valid TOML",
    );
    let again = ok(b.path(), &["pull", "acme/demo", "--hub", hd]);
    assert!(again.contains("already present"), "{again}");
}

#[test]
fn the_seed_spellings_images_list_and_pack_out_work() {
    let home = tempfile::tempdir().unwrap();
    make_snapshot(home.path(), "mything", 3);
    assert_eq!(
        ok(home.path(), &["images", "list", "--json"]),
        ok(home.path(), &["images", "--json"])
    );
    let out = forkd(home.path(), &["images", "lsit"]);
    assert!(!out.status.success(), "a misspelt verb is refused");
    let file = home.path().join("mything.forkd-snapshot.tar.zst");
    let printed = ok(
        home.path(),
        &["pack", "--tag", "mything", "--out", file.to_str().unwrap()],
    );
    assert!(file.exists(), "{printed}");
    assert!(printed.ends_with('\n') && printed.lines().any(|l| l.starts_with("sha256 ")));
}

#[test]
fn a_push_without_a_token_goes_to_a_token_less_loopback_hub() {
    let (a, hub) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make_snapshot(a.path(), "base", 11);
    let dir = hub.path().join("site");
    std::fs::create_dir_all(&dir).unwrap();
    let (_server, url) = serve_with(a.path(), &dir, None);
    let out = ok(
        a.path(),
        &[
            "push",
            "--tag",
            "base",
            "--to",
            &url,
            "--name",
            "acme/open",
            "--version",
            "v1",
        ],
    );
    assert!(out.contains("acme/open"), "{out}");
    let registry = std::fs::read_to_string(dir.join("registry.json")).unwrap();
    assert!(registry.contains("acme/open"), "{registry}");
}

fn first_field(cmd: &str, file: &Path) -> String {
    let out = Command::new(cmd).arg(file).output().unwrap();
    assert!(out.status.success(), "{cmd} failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The Hub seed's "Publishing a new pack" and quickstart, step by step as typed there (our
/// namespace and a local static server instead of GitHub's).
#[test]
fn the_seeds_publishing_flow_and_quickstart_work_as_typed() {
    let publisher = tempfile::tempdir().unwrap();
    let user = tempfile::tempdir().unwrap();
    let site = tempfile::tempdir().unwrap();
    let Some((_server, base)) = python_static_server(site.path()) else {
        eprintln!("SKIP: the_seeds_publishing_flow_and_quickstart_work_as_typed: python3 -m http.server does not start here");
        return;
    };
    // 1) A snapshot tagged `langgraph` (a real VM's when KVM is here, so the children fork).
    let forkable = forkd_test_support::kvm_available("forking the pulled langgraph snapshot");
    if forkable {
        ok(
            publisher.path(),
            &[
                "snapshot",
                "--tag",
                "langgraph",
                "--kernel",
                "builtin:demo",
                "--mem-mib",
                "64",
            ],
        );
    } else {
        make_snapshot(publisher.path(), "langgraph", 7);
    }
    // 2) Pack it.
    let pack = site.path().join("langgraph-react.forkd-snapshot.tar.zst");
    let p = pack.to_str().unwrap();
    ok(
        publisher.path(),
        &[
            "pack",
            "--tag",
            "langgraph",
            "--description",
            "what this is",
            "--base-image",
            "python:3.12-slim",
            "--out",
            p,
        ],
    );
    // 3) sha256 + size.
    let sha = first_field("sha256sum", &pack);
    let wc = Command::new("sh")
        .arg("-c")
        .arg(format!("wc -c < {p}"))
        .output()
        .unwrap();
    let size: u64 = String::from_utf8_lossy(&wc.stdout).trim().parse().unwrap();
    assert_eq!(size, std::fs::metadata(&pack).unwrap().len());
    // 5) A registry.json entry written by hand, under a name the pack never declared.
    let registry = serde_json::json!({
        "schema_version": 1,
        "packages": {
            "testns/langgraph-react": {
                "description": "ReAct agent",
                "versions": { "latest": {
                    "url": format!("{base}/langgraph-react.forkd-snapshot.tar.zst"),
                    "sha256": sha, "size_bytes": size,
                }}
            }
        }
    });
    std::fs::write(site.path().join("registry.json"), registry.to_string()).unwrap();

    // The quickstart: pull, then fork by the tag the snapshot was packed with.
    let hub = format!("{base}/registry.json");
    let out = ok(
        user.path(),
        &["pull", "testns/langgraph-react", "--hub", &hub],
    );
    assert!(
        out.contains("installed testns/langgraph-react@latest as langgraph"),
        "{out}"
    );
    let images = ok(user.path(), &["images", "list"]);
    assert!(images.contains("testns/langgraph-react@latest"), "{images}");
    if forkable {
        let out = ok(user.path(), &["fork", "--tag", "langgraph", "-n", "3"]);
        assert!(out.contains('3'), "{out}");
    }
    // The seeds' spelling with the package's own name is a tag that does not exist: the
    // error points at the right one.
    fails(
        user.path(),
        &["fork", "--tag", "langgraph-react", "-n", "1"],
        "did you mean langgraph",
    );

    // A pack made with --name can only be listed under that name.
    let named = site.path().join("named.forkd-snapshot.tar.zst");
    ok(
        publisher.path(),
        &[
            "pack",
            "--tag",
            "langgraph",
            "--name",
            "other/thing",
            "--out",
            named.to_str().unwrap(),
        ],
    );
    let registry = serde_json::json!({
        "schema_version": 1,
        "packages": { "testns/named": { "versions": { "latest": {
            "url": format!("{base}/named.forkd-snapshot.tar.zst"),
            "sha256": first_field("sha256sum", &named),
        }}}}
    });
    std::fs::write(site.path().join("registry.json"), registry.to_string()).unwrap();
    fails(
        tempfile::tempdir().unwrap().path(),
        &["pull", "testns/named", "--hub", &hub],
        "declares package \"other/thing\" but was listed as \"testns/named\"",
    );
}

/// A pid no process has (beyond any pid this machine hands out).
const DEAD_PID: u32 = 4_194_000;

#[test]
fn cache_ls_and_prune_remove_only_what_nothing_uses() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    assert!(!Path::new(&format!("/proc/{DEAD_PID}")).exists());
    std::fs::create_dir(h.join("runtime")).unwrap();
    Store::open(h).unwrap();
    let packs = h.join("cache/packs");
    std::fs::create_dir_all(&packs).unwrap();
    std::fs::write(
        packs.join(format!("{}.partial", "ab".repeat(32))),
        vec![7u8; 9000],
    )
    .unwrap();
    std::fs::write(packs.join("cd.lock"), "123").unwrap();
    let me = std::process::id();
    let live_staging = h.join(format!("snapshots/.staging.{me}.1.busy"));
    std::fs::create_dir(&live_staging).unwrap();
    let dead_run = h.join(format!("run/fork-{DEAD_PID}"));
    let live_run = h.join(format!("run/fork-{me}"));
    for d in [&dead_run, &live_run] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("child-0.overlay"), vec![1u8; 5000]).unwrap();
    }

    let ls = ok(h, &["cache", "ls"]);
    for needle in [
        "partial download",
        "stale pull record",
        "snapshot staging",
        "run directory",
    ] {
        assert!(ls.contains(needle), "{needle} missing: {ls}");
    }
    assert!(ls.contains(&format!("in use by {me}")), "{ls}");
    let dry = ok(h, &["cache", "prune", "--dry-run"]);
    assert!(dry.contains("would remove 3 entries"), "{dry}");
    assert!(dead_run.exists(), "a dry run removed something");

    let out = ok(h, &["cache", "prune"]);
    assert!(out.contains("removed 3 entries"), "{out}");
    assert!(!dead_run.exists() && !packs.join("cd.lock").exists());
    assert_eq!(std::fs::read_dir(&packs).unwrap().count(), 0);
    assert!(
        live_run.exists() && live_staging.exists(),
        "removed what is in use"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(h, &["cache", "ls", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2, "{json}");
}

/// A throwaway system user whose home is a temporary directory; removed on drop.
struct TempUser {
    name: String,
    uid: u32,
    gid: u32,
    home: tempfile::TempDir,
}

impl TempUser {
    fn create() -> Option<TempUser> {
        // SAFETY: geteuid(2) takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let home = tempfile::tempdir().ok()?;
        let name = format!("forkdt{}", std::process::id());
        let made = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir"])
            .arg(home.path())
            .arg(&name)
            .status()
            .ok()?;
        if !made.success() {
            return None;
        }
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").args([flag, &name]).output().ok()?;
            String::from_utf8(out.stdout).ok()?.trim().parse().ok()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        let user = TempUser {
            name,
            uid: uid?,
            gid: gid?,
            home,
        };
        std::os::unix::fs::chown(user.home.path(), Some(user.uid), Some(user.gid)).ok()?;
        Some(user)
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// `sudo forkd …` works on the invoking user's data directory and leaves what it writes there
/// owned by that user (so `forkd pull` then `sudo forkd fork` find the same snapshots).
#[test]
fn under_sudo_forkd_uses_the_invoking_users_data_directory_and_leaves_it_theirs() {
    use std::os::unix::fs::MetadataExt;
    let Some(user) = TempUser::create() else {
        eprintln!(
            "SKIP: under_sudo_forkd_uses_the_invoking_users_data_directory: needs root and useradd"
        );
        return;
    };
    let publisher = tempfile::tempdir().unwrap();
    make_snapshot(publisher.path(), "base", 9);
    let pack = publisher.path().join("base.forkd-snapshot.tar.zst");
    ok(
        publisher.path(),
        &["pack", "--tag", "base", "--out", pack.to_str().unwrap()],
    );
    let sudo = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_forkd"))
            .args(args)
            .env_remove("FORKD_HOME")
            .env_remove("XDG_DATA_HOME")
            .env("HOME", "/root")
            .env("SUDO_USER", &user.name)
            .env("SUDO_UID", user.uid.to_string())
            .env("SUDO_GID", user.gid.to_string())
            .env("XDG_CONFIG_HOME", publisher.path().join("config"))
            .output()
            .unwrap()
    };
    let data = user.home.path().join(".local/share/forkd");
    let out = sudo(&["where"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        data.to_str().unwrap()
    );
    let out = sudo(&["unpack", pack.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for path in [
        user.home.path().join(".local"),
        user.home.path().join(".local/share"),
        data.clone(),
        data.join("snapshots"),
        data.join("snapshots/base"),
        data.join("snapshots/base/memory.bin"),
        data.join("snapshots/base/manifest.toml"),
    ] {
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (user.uid, user.gid),
            "{}",
            path.display()
        );
    }
    assert!(String::from_utf8_lossy(&sudo(&["images"]).stdout).contains("base"));
}
